// Fuzz target: the candidates manifest (manifest.tsv) that 'refine --picks' reads.
#include "../../instastyle.h"
#include <stdlib.h>
#include <string.h>
int LLVMFuzzerTestOneInput(const unsigned char* data, size_t size) {
    char object[64], file[64];
    for (long k = 0; k < 4; k++)
        if (manifest_lookup((const char*)data, size, k, object, sizeof object, file, sizeof file) == 0) {
            if (strlen(object) >= sizeof object || strchr(file, '/')) abort();
        }
    return 0;
}
