// Fuzz target: the JSON reader (config.json, safetensors headers, fixture params, vocab.json).
#include "../../instastyle.h"
int LLVMFuzzerTestOneInput(const unsigned char* data, size_t size) {
    Json* j = json_parse((const char*)data, size);
    if (j) {
        (void)json_get_number(j, "a", 0);
        (void)json_get_string(j, "b", "");
        json_free(j);
    }
    return 0;
}
