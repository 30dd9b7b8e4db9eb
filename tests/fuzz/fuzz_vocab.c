// Fuzz target: loading vocab.json + merges.txt. The input is split at the first "\n###\n" into
// the two files, written to a private temporary folder, and loaded.
#define _DEFAULT_SOURCE
#include "../../instastyle.h"
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static char g_dir[256];
static void put(const char* name, const unsigned char* d, size_t n) {
    char path[300];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE* f = fopen(path, "wb");
    if (!f) abort();
    fwrite(d, 1, n, f);
    fclose(f);
}
int LLVMFuzzerTestOneInput(const unsigned char* data, size_t size) {
    if (!g_dir[0]) {
        snprintf(g_dir, sizeof g_dir, "/tmp/fuzz_vocab_XXXXXX");
        if (!mkdtemp(g_dir)) abort();
    }
    const unsigned char* sep = NULL;
    for (size_t i = 0; i + 5 <= size && !sep; i++) if (memcmp(data + i, "\n###\n", 5) == 0) sep = data + i;
    size_t vn = sep ? (size_t)(sep - data) : size;
    put("vocab.json", data, vn);
    put("merges.txt", sep ? sep + 5 : (const unsigned char*)"", sep ? size - vn - 5 : 0);
    Tokenizer* t = tokenizer_load(g_dir);
    if (t) {
        int ids[CLIP_MAX_LENGTH];
        (void)tokenizer_encode(t, "a photo of a cat, 123 <|endoftext|>", ids, CLIP_MAX_LENGTH);
        tokenizer_free(t);
    }
    return 0;
}
