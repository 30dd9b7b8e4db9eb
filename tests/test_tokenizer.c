// test_tokenizer.c: the tokenizer against the golden cases (ids from transformers' CLIPTokenizer
// with ftfy), plus the checks for bad input: invalid UTF-8, a 1 MB prompt, missing or hostile
// vocab.json / merges.txt.
//
//   cc -O2 -std=c11 -Wall -Wextra -I. tests/test_tokenizer.c tokenizer.c tensor.c -lm -lpthread
//      -o /tmp/test_tokenizer && /tmp/test_tokenizer [cases_dir]   (from the repository root)
//
// The argument is the cases folder or the golden root that holds it (tests/run_tests.sh passes
// the root); default ../shared/golden/cases. Each case's model folder is relative to its parent;
// the bad-input checks use the tokenizer of the last case. Ends with "N passed, M failed".
#define _POSIX_C_SOURCE 200809L
#include "instastyle.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int g_pass, g_fail;
static char g_tok_dir[2048];          // tokenizer folder of the last golden case

static void report(int ok, const char* name, const char* detail) {
    if (ok) { g_pass++; printf("PASS tokenizer %s\n", name); }
    else { g_fail++; printf("FAIL tokenizer %s: %s\n", name, detail); }
}

static void print_ids(const char* label, const int* ids, int n) {
    printf("    %s:", label);
    for (int i = 0; i < n; i++) printf(" %d", ids[i]);
    printf("\n");
}

static int cmp_str(const void* a, const void* b) { return strcmp(*(char* const*)a, *(char* const*)b); }

// One golden file: every prompt must give exactly the stored ids.
static void run_case(const char* cases_dir, const char* file) {
    char path[2048], name[256], detail[512];
    snprintf(path, sizeof path, "%.900s/%.900s", cases_dir, file);
    snprintf(name, sizeof name, "%.*s", (int)(strlen(file) - strlen(".safetensors")), file);
    SafeTensors st;
    if (st_open(&st, path) != 0) { report(0, name, error_last()); return; }
    Json* params = NULL;
    Tokenizer* tok = NULL;
    const char* kind = st_meta(&st, "kind");
    const char* model = st_meta(&st, "model");
    const char* ptext = st_meta(&st, "params");
    StEntry* e = st_find(&st, "out.ids");
    if (!kind || strcmp(kind, "tokenizer") || !model || !ptext || !e) {
        report(0, name, "expected kind 'tokenizer', metadata model/params and tensor out.ids");
        goto done;
    }
    params = json_parse(ptext, strlen(ptext));
    const Json* prompts = json_get(params, "prompts");
    const Json* added = json_get(params, "added_tokens");
    if (!prompts || prompts->type != JSON_ARRAY || !added || added->type != JSON_ARRAY) {
        report(0, name, "params must hold the arrays prompts and added_tokens");
        goto done;
    }
    int N = prompts->count, T = e->ndim == 2 ? (int)e->shape[1] : 0;
    if (e->dtype != DT_I32 || e->ndim != 2 || e->shape[0] != N || e->end - e->begin != (size_t)N * (size_t)T * 4) {
        report(0, name, "out.ids must be I32 [len(prompts), T]");
        goto done;
    }
    char dir[2048];
    snprintf(dir, sizeof dir, "%.900s/../%.900s/tokenizer", cases_dir, model);
    snprintf(g_tok_dir, sizeof g_tok_dir, "%s", dir);
    tok = tokenizer_load(dir);
    if (!tok) { report(0, name, error_last()); goto done; }
    for (int k = 0; k < added->count; k++) {
        int id = tokenizer_add_token(tok, added->items[k].string);
        if (id != tokenizer_vocab_size(tok) + k) {
            snprintf(detail, sizeof detail, "added token %s got id %d, expected %d", added->items[k].string,
                     id, tokenizer_vocab_size(tok) + k);
            report(0, name, detail);
            goto done;
        }
    }
    int* got = xmalloc((size_t)T * sizeof *got);
    int* want = xmalloc((size_t)T * sizeof *want);
    int bad = -1;
    for (int i = 0; i < N && bad < 0; i++) {
        const unsigned char* row = st.data + e->begin + (size_t)i * (size_t)T * 4;
        for (int j = 0; j < T; j++)
            want[j] = (int32_t)((uint32_t)row[4 * j] | (uint32_t)row[4 * j + 1] << 8 |
                                (uint32_t)row[4 * j + 2] << 16 | (uint32_t)row[4 * j + 3] << 24);
        int n = tokenizer_encode(tok, prompts->items[i].string, got, T);
        if (n < 0 || memcmp(got, want, (size_t)T * sizeof *got) != 0) bad = i;
    }
    if (bad < 0) {
        snprintf(detail, sizeof detail, "%d prompts", N);
        report(1, name, detail);
    } else {
        snprintf(detail, sizeof detail, "prompt %d differs: \"%.200s\"", bad, prompts->items[bad].string);
        report(0, name, detail);
        print_ids("expected", want, T);
        print_ids("got     ", got, T);
    }
    free(got);
    free(want);
done:
    tokenizer_free(tok);
    json_free(params);
    st_close(&st);
}

static void check_invalid_utf8(Tokenizer* tok) {
    static const char* const bad[] = {
        "\xff", "caf\xc3", "\xc0\xaf overlong", "\xed\xa0\x80 surrogate", "\xf4\x90\x80\x80 too big",
        "ok \xe2\x82 truncated", "\x80 lone continuation", NULL,
    };
    int ids[CLIP_MAX_LENGTH], ok = 1;
    for (int i = 0; bad[i]; i++) {
        error_set("%s", "");
        if (tokenizer_encode(tok, bad[i], ids, CLIP_MAX_LENGTH) != -1 || !strstr(error_last(), "UTF-8")) ok = 0;
        if (tokenizer_encode_raw(tok, bad[i], ids, CLIP_MAX_LENGTH) != -1) ok = 0;
    }
    report(ok, "invalid_utf8", "invalid UTF-8 must give -1 with a UTF-8 message");
}

// 1 MB prompts: many words, and one word of 1M letters. Both stop at 77 ids with EOS last.
static void check_long_prompt(Tokenizer* tok) {
    size_t n = 1 << 20;
    char* text = xmalloc(n + 1);
    const char* unit = "a photo of a cat, ";
    for (size_t i = 0; i < n; i++) text[i] = unit[i % strlen(unit)];
    text[n] = 0;
    int ids[CLIP_MAX_LENGTH], head[8];
    int r1 = tokenizer_encode(tok, text, ids, CLIP_MAX_LENGTH);
    int rh = tokenizer_encode_raw(tok, unit, head, 8);
    int ok = r1 == CLIP_MAX_LENGTH && ids[0] == 49406 && ids[CLIP_MAX_LENGTH - 1] == 49407 && rh == 6 &&
             memcmp(ids + 1, head, 6 * sizeof *ids) == 0 && memcmp(ids + 7, head, 6 * sizeof *ids) == 0;
    memset(text, 'a', n);
    int r2 = tokenizer_encode(tok, text, ids, CLIP_MAX_LENGTH);
    ok = ok && r2 == CLIP_MAX_LENGTH && ids[1] == 23126 && ids[CLIP_MAX_LENGTH - 1] == 49407;  // "aaaaaaaa"
    free(text);
    report(ok, "long_prompt_1MB", "a 1 MB prompt must give 77 ids, BOS first, EOS last");
}

static void check_api(Tokenizer* tok) {
    int ids[8];
    int n = tokenizer_encode_raw(tok, "a photo of a cat", ids, 8);
    int ok = n == 5 && ids[0] == 320 && ids[1] == 1125 && ids[4] == 2368;
    ok = ok && tokenizer_encode_raw(tok, "a photo of a cat", ids, 2) == 2 && ids[1] == 1125;
    ok = ok && tokenizer_encode_raw(tok, "", ids, 8) == 0;
    const char* s = tokenizer_token_text(tok, 320);
    ok = ok && s && strcmp(s, "a</w>") == 0 && tokenizer_token_text(tok, -1) == NULL;
    int a = tokenizer_add_token(tok, "<zz-test>"), b = tokenizer_add_token(tok, "<zz-test>");
    ok = ok && a == tokenizer_vocab_size(tok) && b == a && strcmp(tokenizer_token_text(tok, a), "<zz-test>") == 0;
    ok = ok && tokenizer_add_token(tok, "") == -1 && tokenizer_add_token(tok, "\xff") == -1;
    ok = ok && tokenizer_encode(tok, "a", ids, 1) == -1;
    report(ok, "api", "encode_raw / token_text / add_token contract");
}

static int write_file(const char* path, const char* data, size_t len) {
    FILE* f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(data, 1, len, f);
    return fclose(f) == 0 && w == len ? 0 : -1;
}

// Hostile tokenizer folders: each must load to NULL with a message, or load and still encode.
static void check_hostile(const char* good_dir) {
    char dir[256], path[4200];
    snprintf(dir, sizeof dir, "/tmp/instastyle_tok_%ld", (long)getpid());
    if (mkdir(dir, 0700) != 0) { report(0, "hostile_files", "cannot create a temporary folder"); return; }
    size_t mlen = 0;
    snprintf(path, sizeof path, "%s/merges.txt", good_dir);
    char* merges = file_read_all(path, &mlen, 1 << 24);
    static const char* const vocabs[] = {
        "", "{", "[1, 2]", "{\"a\": \"0\"}", "{\"a\": 0.5, \"b\": 1}", "{\"a\": 0, \"b\": 0}",
        "{\"a\": -1, \"b\": 0}", "{\"a\": 0, \"b\": 7}", "{\"a\": 0, \"b\": 1}",
        "{\"<|startoftext|>\": 0, \"<|endoftext|>\": 1, \"x\": {\"y\": 2}}", "\"just a string\"",
        "{\"<|startoftext|>\": 0, \"<|endoftext|>\": 1", NULL,
    };
    int ok = merges != NULL, ran = 0;
    char vpath[512], mpath[512];
    snprintf(vpath, sizeof vpath, "%s/vocab.json", dir);
    snprintf(mpath, sizeof mpath, "%s/merges.txt", dir);
    for (int i = 0; ok && vocabs[i]; i++) {
        ok = write_file(vpath, vocabs[i], strlen(vocabs[i])) == 0 && write_file(mpath, merges, mlen) == 0;
        error_set("%s", "");
        Tokenizer* t = tokenizer_load(dir);
        if (t || !error_last()[0]) { printf("    vocab case %d loaded or gave no message\n", i); ok = 0; }
        tokenizer_free(t);
        ran++;
    }
    // A vocabulary holding only BOS/EOS, with garbage merges: loads, and every id is valid.
    static const char* const merge_files[] = {
        "", "#version: 0.2\n", "#h\na\n\n a b c \n\xc3\xa9 \xc3\xa9</w>\nx y\nx y\n", "#h\r\na b\r\n", "\xff\xfe",
        NULL,
    };
    const char* small = "{\"<|startoftext|>\": 0, \"<|endoftext|>\": 1, \"a\": 2, \"b</w>\": 3, \"ab</w>\": 4}";
    for (int i = 0; ok && merge_files[i]; i++) {
        ok = write_file(vpath, small, strlen(small)) == 0 &&
             write_file(mpath, merge_files[i], strlen(merge_files[i])) == 0;
        Tokenizer* t = tokenizer_load(dir);
        if (i == 4) { ok = ok && t == NULL; tokenizer_free(t); continue; }   // not UTF-8
        int ids[CLIP_MAX_LENGTH];
        int n = t ? tokenizer_encode(t, "ab é <|endoftext|> zz", ids, CLIP_MAX_LENGTH) : -1;
        for (int k = 0; k < n; k++) ok = ok && ids[k] >= 0 && ids[k] < 5;
        if (n < 3) { printf("    merges case %d: %s\n", i, t ? "no ids" : error_last()); ok = 0; }
        tokenizer_free(t);
        ran++;
    }
    // A vocab.json over the size limit (sparse file).
    if (ok) {
        FILE* f = fopen(vpath, "wb");
        ok = f && fputc('{', f) != EOF && fflush(f) == 0 && ftruncate(fileno(f), (off_t)65 << 20) == 0;
        if (f) fclose(f);
        Tokenizer* t = tokenizer_load(dir);
        ok = ok && t == NULL && strstr(error_last(), "limit");
        tokenizer_free(t);
        ran++;
    }
    free(merges);
    remove(vpath);
    remove(mpath);
    remove(dir);
    char detail[64];
    snprintf(detail, sizeof detail, "failed after %d files", ran);
    report(ok, "hostile_files", detail);
    error_set("%s", "");
    Tokenizer* t = tokenizer_load("/nonexistent/instastyle/tokenizer");
    report(t == NULL && strstr(error_last(), "/nonexistent/"), "missing_dir", "a missing folder must give NULL");
    tokenizer_free(t);
}

int main(int argc, char** argv) {
    char cases[1024];                 // argv[1]: the cases folder, or the golden root holding it
    snprintf(cases, sizeof cases, "%.900s/cases", argc > 1 ? argv[1] : "../shared/golden");
    if (!path_is_dir(cases)) snprintf(cases, sizeof cases, "%.900s", argc > 1 ? argv[1] : "");
    DIR* d = opendir(cases);
    if (!d) { fprintf(stderr, "cannot open %s\n", cases); printf("0 passed, 1 failed\n"); return 1; }
    char* files[256];
    int nf = 0;
    for (struct dirent* de; (de = readdir(d)) != NULL && nf < 256;) {
        size_t l = strlen(de->d_name);
        if (strncmp(de->d_name, "tokenizer_", 10) == 0 && l > 12 && strcmp(de->d_name + l - 12, ".safetensors") == 0)
            files[nf++] = xstrdup(de->d_name);
    }
    closedir(d);
    qsort(files, (size_t)nf, sizeof *files, cmp_str);
    for (int i = 0; i < nf; i++) { run_case(cases, files[i]); free(files[i]); }
    if (nf == 0) report(0, "cases", "no tokenizer_*.safetensors found");

    const char* dir = g_tok_dir;
    Tokenizer* tok = dir[0] ? tokenizer_load(dir) : NULL;
    if (!tok) {
        report(0, "load", error_last());
    } else {
        check_invalid_utf8(tok);
        check_long_prompt(tok);
        check_api(tok);
        tokenizer_free(tok);
        check_hostile(dir);
    }
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
