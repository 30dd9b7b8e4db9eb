// test_units.c: the invariants and parsers that the golden cases do not cover.
//   - JSON: valid documents parse to the right values; malformed ones are rejected, never crash.
//   - safetensors: a valid file round-trips through the writer; truncated files, lying headers,
//     overlapping or out-of-range offsets, unknown dtypes and overflowing shapes are rejected.
//   - the three model files of the fixture (diffusers folder, LDM fp32, LDM fp16) give the same
//     UNet output: fp32 bit for bit, fp16 within the rounding of fp16 weights.
//   - UNet, VAE and CLIP outputs are bitwise identical with 1 and 2 threads.
// usage: test_units [GOLDEN_DIR]
#define _DEFAULT_SOURCE
#include "../instastyle.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int g_pass, g_fail;
static void check(int ok, const char* name, const char* detail) {
    if (ok) { printf("PASS %s\n", name); g_pass++; }
    else { printf("FAIL %s: %s\n", name, detail); g_fail++; }
}

// ----------------------------------------------------------------------------------------------
// JSON

static void test_json(void) {
    const char* doc = "{\"a\": [1, 2.5e1, -3], \"s\": \"x\\u00e9\\ud83d\\ude00\\n\", \"t\": true, \"n\": null, \"o\": {}}";
    Json* j = json_parse(doc, strlen(doc));
    const Json* a = json_get(j, "a");
    int ok = j && a && a->type == JSON_ARRAY && a->count == 3 && a->items[1].number == 25 && a->items[2].number == -3;
    const char* s = json_get_string(j, "s", "");
    ok = ok && strcmp(s, "x\xc3\xa9\xf0\x9f\x98\x80\n") == 0 && json_get_number(j, "t", 0) == 1;
    ok = ok && json_get(j, "n")->type == JSON_NULL && json_get(j, "o")->type == JSON_OBJECT;
    check(ok, "json parses values, escapes and surrogate pairs", "wrong values");
    json_free(j);
    const char* bad[] = {"", "{", "[1,]", "{\"a\" 1}", "\"abc", "\"\\ud800\"", "\"\\udc00x\"", "[1 2]", "{\"a\":1}x",
                         "tru", "nul", "-", "\"\\x\"", "\"a\x01\"", "[\"\\u12g4\"]", "{1:2}"};
    int rejected = 1;
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        Json* b = json_parse(bad[i], strlen(bad[i]));
        if (b) { rejected = 0; printf("  accepted bad JSON: %s\n", bad[i]); json_free(b); }
    }
    check(rejected, "json rejects malformed documents", "see above");
    char deep[300];
    memset(deep, '[', sizeof deep);
    Json* d = json_parse(deep, sizeof deep);
    check(!d && strstr(error_last(), "deep"), "json limits nesting depth", error_last());
}

// ----------------------------------------------------------------------------------------------
// safetensors

static unsigned char* make_st(const char* header, size_t data_len, size_t* len) {
    size_t hl = strlen(header);
    *len = 8 + hl + data_len;
    unsigned char* b = calloc(1, *len);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(((uint64_t)hl >> (8 * i)) & 255);
    memcpy(b + 8, header, hl);
    return b;
}

static void test_safetensors(void) {
    float data[6] = {1, 2, 3, 4, 5, 6};
    StWriter* w = stw_new();
    int64_t shape[2] = {2, 3};
    stw_add(w, "x", DT_F32, data, 2, shape);
    stw_meta(w, "k", "v \"quoted\"");
    char path[] = "/tmp/instastyle_test_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    int wrote = stw_write(w, path) == 0;
    stw_free(w);
    SafeTensors st;
    int ok = wrote && st_open(&st, path) == 0;
    if (ok) {
        StEntry* e = st_find(&st, "x");
        ok = e && e->ndim == 2 && e->shape[1] == 3 && memcmp(st_floats(&st, e), data, sizeof data) == 0 &&
             strcmp(st_meta(&st, "k"), "v \"quoted\"") == 0;
        st_close(&st);
    }
    remove(path);
    check(ok, "safetensors write/read round trip", error_last());

    struct { const char* name; const char* header; size_t data; const char* expect; } bad[] = {
        {"truncated data", "{\"x\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8, "outside"},
        {"shape/bytes mismatch", "{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}", 16, "span"},
        {"overlap", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 16, "overlap"},
        {"unknown dtype", "{\"x\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "dtype"},
        {"negative offset", "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, "outside"},
        {"overflowing shape", "{\"x\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,4]}}", 4, "overflow"},
        {"too many dims", "{\"x\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, "dims"},
        {"header not an object", "[1,2]", 0, "object"},
        {"bad JSON", "{\"x\":", 0, "JSON"},
        {"duplicate name", "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "twice"},
        {"metadata not strings", "{\"__metadata__\":{\"a\":1}}", 0, "string"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        size_t len;
        unsigned char* b = make_st(bad[i].header, bad[i].data, &len);
        int rc = st_open_mem(&st, b, len, "mem");
        char name[128];
        snprintf(name, sizeof name, "safetensors rejects %s", bad[i].name);
        check(rc != 0 && strstr(error_last(), bad[i].expect), name, rc ? error_last() : "accepted");
        if (rc == 0) st_close(&st);
        free(b);
    }
    unsigned char lying[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, '{', '}'};
    int rc = st_open_mem(&st, lying, sizeof lying, "mem");
    check(rc != 0 && strstr(error_last(), "exceeds"), "safetensors rejects a header length past the file", error_last());
    size_t len;
    unsigned char* good = make_st("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, &len);
    int all = 1;
    for (size_t cut = 0; cut < len; cut++)
        if (st_open_mem(&st, good, cut, "mem") == 0) { all = 0; st_close(&st); }
    free(good);
    check(all, "safetensors rejects every truncation of a valid file", "a truncated file was accepted");
}

// ----------------------------------------------------------------------------------------------
// models

static float* unet_output(StableDiffusion* sd, int N, int h, int w, Arena* a) {
    const UNetConfig* c = &sd->unet.cfg;
    size_t n = (size_t)N * c->in_channels * h * w, nc = (size_t)N * CLIP_MAX_LENGTH * c->cross_dim;
    float* x = xmalloc(n * sizeof(float));
    float* ctx = xmalloc(nc * sizeof(float));
    float* eps = xmalloc(n * sizeof(float));
    Rng rng;
    rng_seed(&rng, 1234);
    rng_normal(&rng, x, n);
    rng_normal(&rng, ctx, nc);
    float t[4] = {981, 500, 1, 250};
    unet_forward(&sd->unet, eps, x, t, ctx, N, h, w, CLIP_MAX_LENGTH, a);
    free(x);
    free(ctx);
    return eps;
}

// One training step (LoRA or K/V, one added token) on the model in `file`; returns the gradients.
static float* train_grads(const char* file, const char* dir, int f16, TrainMode mode, size_t* n, Arena* a) {
    char tok[4096];
    snprintf(tok, sizeof tok, "%s/tokenizer", dir);
    StableDiffusion sd;
    sd_load(&sd, file, tok, dir, SD_TEXT | SD_UNET | SD_TOKENIZER | f16, 0);
    Rng rng;
    rng_seed(&rng, 11);
    int init = 320, N = 1, h = 8, w = 8, C = sd.unet.cfg.in_channels, ts[1] = {500}, ids[CLIP_MAX_LENGTH];
    TrainParams tp;
    train_params_init(&tp, &sd, mode, 1, &init, 4, 4.0f, &rng);
    train_attach(&tp, &sd);
    for (size_t i = 0; i < tp.n; i++) tp.values[i] += 0.01f * (float)((i * 7919) % 13) - 0.06f;   // LoRA up != 0
    CHECK(tokenizer_encode(sd.tok, "A cat in the style of <style1>", ids, CLIP_MAX_LENGTH) > 0, "%s", error_last());
    float* lat = xmalloc((size_t)2 * N * C * h * w * sizeof(float));
    rng_normal(&rng, lat, (size_t)2 * N * C * h * w);
    Schedule s;
    schedule_init(&s, &sd.sched, 1);
    Arena saved;
    arena_init(&saved, 1 << 24);
    TrainBatch b = {N, h, w, lat, lat + (size_t)N * C * h * w, ts, NULL, ids};
    train_step(&sd, &tp, s.alphas_cumprod, &b, a, &saved);
    *n = tp.n;
    float* g = memcpy(xmalloc(tp.n * sizeof(float)), tp.grads, tp.n * sizeof(float));
    arena_free(&saved);
    schedule_free(&s);
    free(lat);
    train_detach(&tp, &sd);
    train_params_free(&tp);
    sd_free(&sd);
    return g;
}

static void test_model_files(const char* golden) {
    char dir[4096], ldm[4096], fp16[4096];
    snprintf(dir, sizeof dir, "%s/models/tiny-sd15", golden);
    snprintf(ldm, sizeof ldm, "%s/models/tiny-sd15.ldm.safetensors", golden);
    snprintf(fp16, sizeof fp16, "%s/models/tiny-sd15.ldm.fp16.safetensors", golden);
    if (!path_is_dir(dir)) { printf("SKIP model files: %s not found\n", dir); return; }
    Arena a;
    arena_init(&a, 1 << 24);
    StableDiffusion sd;
    int N = 2, h = 8, w = 12;
    size_t n = (size_t)N * 4 * h * w;
    sd_load(&sd, dir, NULL, NULL, SD_UNET, 0);
    float* ref = unet_output(&sd, N, h, w, &a);
    sd_free(&sd);
    sd_load(&sd, ldm, NULL, dir, SD_UNET, 0);
    float* got = unet_output(&sd, N, h, w, &a);
    sd_free(&sd);
    check(memcmp(ref, got, n * sizeof(float)) == 0, "LDM fp32 file = diffusers folder, bit for bit", "UNet outputs differ");
    free(got);
    // fp16 weights carry a relative rounding error of at most 2^-11 each; through the ~40 layers of
    // the tiny UNet this grows to well under 1% of the output's scale.
    sd_load(&sd, fp16, NULL, dir, SD_UNET, 0);
    got = unet_output(&sd, N, h, w, &a);
    sd_free(&sd);
    double maxd = 0, maxr = 0;
    for (size_t i = 0; i < n; i++) { maxd = fmax(maxd, fabs(got[i] - ref[i])); maxr = fmax(maxr, fabs(ref[i])); }
    char detail[128];
    snprintf(detail, sizeof detail, "max |fp16 - fp32| = %.3g, max |fp32| = %.3g", maxd, maxr);
    printf("  fp16 vs fp32 UNet: %s\n", detail);
    check(maxd <= 1e-2 * maxr && maxd > 0, "LDM fp16 file = diffusers folder within fp16 rounding", detail);
    // SD_F16 keeps those fp16 weights as they are and converts them while packing: the same bits.
    sd_load(&sd, fp16, NULL, dir, SD_UNET | SD_F16, 0);
    float* got16 = unet_output(&sd, N, h, w, &a);
    check(sd.unet.conv_in.w16 && !sd.unet.conv_in.w, "SD_F16 keeps conv weights in fp16", "conv_in is fp32");
    sd_free(&sd);
    check(memcmp(got, got16, n * sizeof(float)) == 0, "SD_F16 on the fp16 file = its fp32 conversion, bit for bit",
          "UNet outputs differ");
    free(got16);
    // ... and converts an fp32 file's linear/conv weights once (norms, biases stay fp32): within fp16 rounding.
    sd_load(&sd, ldm, NULL, dir, SD_UNET | SD_F16, 0);
    got16 = unet_output(&sd, N, h, w, &a);
    sd_free(&sd);
    maxd = 0;
    for (size_t i = 0; i < n; i++) maxd = fmax(maxd, fabs(got16[i] - ref[i]));
    snprintf(detail, sizeof detail, "max |fp16 weights - fp32| = %.3g, max |fp32| = %.3g", maxd, maxr);
    check(maxd <= 1e-2 * maxr && maxd > 0, "SD_F16 on the fp32 file = fp32 within fp16 rounding", detail);
    free(got16);
    free(got);
    free(ref);
    // training through fp16 weights (conv/linear backward-data, attention) = through their conversion
    for (int mode = 0; mode < 2; mode++) {
        size_t n32, n16;
        float* g32 = train_grads(fp16, dir, 0, (TrainMode)mode, &n32, &a);
        float* g16 = train_grads(fp16, dir, SD_F16, (TrainMode)mode, &n16, &a);
        check(n32 == n16 && memcmp(g32, g16, n32 * sizeof(float)) == 0, mode ? "K/V training step with SD_F16 = fp32, "
              "bit for bit" : "LoRA training step with SD_F16 = fp32, bit for bit", "gradients differ");
        free(g32);
        free(g16);
    }

    // threads: 1 vs 2, bitwise (UNet at an odd size, VAE decode, CLIP)
    sd_load(&sd, dir, NULL, NULL, SD_UNET | SD_VAE | SD_TEXT, 0);
    threads_init(1);
    float* e1 = unet_output(&sd, N, 6, 10, &a);
    float* img1 = xmalloc((size_t)3 * 48 * 80 * sizeof(float));
    vae_decode(&sd.vae, img1, e1, 1, 6, 10, &a);
    int ids[2 * CLIP_MAX_LENGTH];
    for (int i = 0; i < 2 * CLIP_MAX_LENGTH; i++) ids[i] = (i * 7919) % 49408;
    float* h1 = xmalloc((size_t)2 * CLIP_MAX_LENGTH * sd.clip.cfg.hidden * sizeof(float));
    clip_forward(&sd.clip, h1, ids, 2, CLIP_MAX_LENGTH, &a);
    threads_init(2);
    float* e2 = unet_output(&sd, N, 6, 10, &a);
    float* img2 = xmalloc((size_t)3 * 48 * 80 * sizeof(float));
    vae_decode(&sd.vae, img2, e2, 1, 6, 10, &a);
    float* h2 = xmalloc((size_t)2 * CLIP_MAX_LENGTH * sd.clip.cfg.hidden * sizeof(float));
    clip_forward(&sd.clip, h2, ids, 2, CLIP_MAX_LENGTH, &a);
    check(memcmp(e1, e2, (size_t)N * 4 * 60 * sizeof(float)) == 0, "UNet bitwise equal with 1 and 2 threads", "differs");
    check(memcmp(img1, img2, (size_t)3 * 48 * 80 * sizeof(float)) == 0, "VAE decode bitwise equal with 1 and 2 threads", "differs");
    check(memcmp(h1, h2, (size_t)2 * CLIP_MAX_LENGTH * sd.clip.cfg.hidden * sizeof(float)) == 0,
          "CLIP bitwise equal with 1 and 2 threads", "differs");
    free(e1); free(e2); free(img1); free(img2); free(h1); free(h2);
    sd_free(&sd);
    arena_free(&a);
}

int main(int argc, char** argv) {
    const char* golden = argc > 1 ? argv[1] : "../shared/golden";
    test_json();
    test_safetensors();
    test_model_files(golden);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail > 0;
}
