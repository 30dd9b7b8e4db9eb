// Fuzz target: tokenizing arbitrary bytes (invalid UTF-8, huge inputs, added tokens, ftfy paths)
// with the real CLIP vocabulary (FUZZ_TOKENIZER, default ../shared/golden/models/tiny-sd15/tokenizer).
#include "../../instastyle.h"
#include <stdlib.h>
#include <string.h>
static Tokenizer* g_tok;
int LLVMFuzzerTestOneInput(const unsigned char* data, size_t size) {
    if (!g_tok) {
        const char* dir = getenv("FUZZ_TOKENIZER");
        g_tok = tokenizer_load(dir ? dir : "../shared/golden/models/tiny-sd15/tokenizer");
        if (!g_tok) { fprintf(stderr, "fuzz_tokenizer: %s (set FUZZ_TOKENIZER)\n", error_last()); abort(); }
        tokenizer_add_token(g_tok, "<style1>");
        tokenizer_add_token(g_tok, "<style2>");
    }
    char* text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = 0;
    int ids[CLIP_MAX_LENGTH];
    int n = tokenizer_encode(g_tok, text, ids, CLIP_MAX_LENGTH);
    if (n > CLIP_MAX_LENGTH) abort();
    for (int i = 0; n >= 0 && i < CLIP_MAX_LENGTH; i++) if (ids[i] < 0 || ids[i] >= tokenizer_vocab_size(g_tok) + 2) abort();
    int raw[16];
    (void)tokenizer_encode_raw(g_tok, text, raw, 16);
    free(text);
    return 0;
}
