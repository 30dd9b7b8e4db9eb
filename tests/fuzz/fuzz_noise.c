// Fuzz target: noise files (safetensors with "latent" [1, 4, h, w]) as 'generate'/'mix' read them.
#include "../../instastyle.h"
#include <stdlib.h>
int LLVMFuzzerTestOneInput(const unsigned char* data, size_t size) {
    SafeTensors st;
    if (st_open_mem(&st, data, size, "fuzz") != 0) return 0;
    int h, w;
    float* z = noise_from_st(&st, 4, &h, &w);
    if (z && (h < 1 || w < 1 || h > NOISE_MAX_SIDE || w > NOISE_MAX_SIDE)) abort();
    free(z);
    st_close(&st);
    return 0;
}
