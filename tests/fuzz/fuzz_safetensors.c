// Fuzz target: the safetensors reader (model files, noise files, LoRA/embedding files,
// checkpoints all go through it). Any input must give 0 with consistent entries or -1.
#include "../../instastyle.h"
#include <stdlib.h>
int LLVMFuzzerTestOneInput(const unsigned char* data, size_t size) {
    SafeTensors st;
    if (st_open_mem(&st, data, size, "fuzz") != 0) return 0;
    for (int i = 0; i < st.n; i++) {
        StEntry* e = &st.entries[i];
        if (e->end < e->begin || e->end > st.data_len) abort();
        const float* f = st_floats(&st, e);
        volatile float sink = e->end > e->begin ? f[0] : 0.0f;
        (void)sink;
        if (st_find(&st, e->name) != e) abort();
    }
    (void)st_meta(&st, "format");
    st_close(&st);
    return 0;
}
