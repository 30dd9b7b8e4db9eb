// Fuzz target: files from 'refine' and imported LoRA / embedding files (trained_apply), plus
// checkpoints (train_load), against the tiny fixture model (FUZZ_MODEL, default
// ../shared/golden/models/tiny-sd15). The input is written to a temporary file first.
#define _DEFAULT_SOURCE
#include "../../instastyle.h"
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static StableDiffusion g_sd;
static int g_loaded;
static char g_path[64];
int LLVMFuzzerTestOneInput(const unsigned char* data, size_t size) {
    if (!g_loaded) {
        const char* m = getenv("FUZZ_MODEL");
        sd_load(&g_sd, m ? m : "../shared/golden/models/tiny-sd15", NULL, NULL, SD_TEXT | SD_UNET | SD_TOKENIZER, 0);
        snprintf(g_path, sizeof g_path, "/tmp/fuzz_trained_%d.safetensors", (int)getpid());
        g_loaded = 1;
    }
    FILE* f = fopen(g_path, "wb");
    if (!f) abort();
    fwrite(data, 1, size, f);
    fclose(f);
    (void)trained_apply(&g_sd, g_path);
    TrainParams tp;
    Rng rng;
    rng_seed(&rng, 1);
    if (train_load(&tp, &g_sd, g_path, &rng) == 0) train_params_free(&tp);
    remove(g_path);
    return 0;
}
