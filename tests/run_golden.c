// run_golden.c: runs every DIR/cases/*.safetensors golden case against instastyle.
//
// A case file holds inputs `in.*`, expected outputs `out.*` and metadata (kind, model, params,
// atol, rtol, per-output tolerances); the format is specified in ../shared/golden/README.md.
// A table maps each kind to a function that reads the inputs, runs the program's own code (the
// same loaders the CLI uses) and returns named outputs. Every expected output is then compared:
// an element passes iff |got − exp| ≤ atol + rtol·|exp|, with the fixture's tolerance, never
// widened here. A missing output, a NaN/Inf, a wrong shape or an unknown kind is a failure; a
// kind this build does not implement yet is a SKIP; a missing model folder is a SKIP.
//
// usage: run_golden [DIR] [-k SUBSTRING] [--threads N] [-v]
#define _DEFAULT_SOURCE
#include "../instastyle.h"
#include "golden.h"

#include <dirent.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------------------------
// outputs produced by a kind

void out_add(Outputs* o, const char* name, const float* data, int ndim, const int* shape) {
    CHECK(o->n < GOLDEN_MAX_OUTPUTS, "too many outputs");
    GoldenOutput* g = &o->items[o->n++];
    snprintf(g->name, sizeof g->name, "%s", name);
    g->t.ndim = ndim;
    size_t n = 1;
    for (int i = 0; i < ndim; i++) { g->t.shape[i] = shape[i]; n *= (size_t)shape[i]; }
    g->t.data = xmalloc(n * sizeof(float));
    memcpy(g->t.data, data, n * sizeof(float));
}

void out_add4(Outputs* o, const char* name, const float* data, int d0, int d1, int d2, int d3) {
    int shape[4] = {d0, d1, d2, d3}, nd = 4;
    if (d3 < 0) nd = 3;
    if (d2 < 0) nd = 2;
    if (d1 < 0) nd = 1;
    out_add(o, name, data, nd, shape);
}

static void outputs_free(Outputs* o) {
    for (int i = 0; i < o->n; i++) free(o->items[i].t.data);
    o->n = 0;
}

// ----------------------------------------------------------------------------------------------
// case inputs

const float* case_input(Case* c, const char* name, Tensor* shape_out) {
    StEntry* e = st_find(&c->st, name);
    CHECK(e, "%s: missing input '%s'", c->path, name);
    if (shape_out) {
        shape_out->ndim = e->ndim;
        for (int i = 0; i < e->ndim; i++) shape_out->shape[i] = (int)e->shape[i];
    }
    return st_floats(&c->st, e);
}

int case_has(Case* c, const char* name) { return st_find(&c->st, name) != NULL; }

double param_number(Case* c, const char* key, double fallback) { return json_get_number(c->params, key, fallback); }

const char* param_string(Case* c, const char* key, const char* fallback) { return json_get_string(c->params, key, fallback); }

// The model of this case, loaded once per folder and kept for the following cases.
static StableDiffusion g_model;
static char g_model_path[6000];

StableDiffusion* case_model(Case* c) {
    char path[sizeof c->root + sizeof c->model + 2];
    snprintf(path, sizeof path, "%s/%s", c->root, c->model);
    if (strcmp(path, g_model_path) != 0) {
        if (g_model_path[0]) sd_free(&g_model);
        sd_load(&g_model, path, NULL, NULL, SD_ALL, 0);
        snprintf(g_model_path, sizeof g_model_path, "%s", path);
    }
    return &g_model;
}

// Registers params.added_tokens with the tokenizer and returns their count.
int case_added_tokens(Case* c, StableDiffusion* sd) {
    tokenizer_clear_added(sd->tok);
    const Json* a = json_get(c->params, "added_tokens");
    if (!a || a->type != JSON_ARRAY) return 0;
    for (int i = 0; i < a->count; i++) {
        CHECK(a->items[i].type == JSON_STRING, "%s: added_tokens must be strings", c->path);
        int id = tokenizer_add_token(sd->tok, a->items[i].string);
        CHECK(id == tokenizer_vocab_size(sd->tok) + i, "%s: added token '%s' got id %d", c->path, a->items[i].string, id);
    }
    return a->count;
}

// ----------------------------------------------------------------------------------------------
// comparison

typedef struct Tol { double atol, rtol; } Tol;

static Tol output_tolerance(Case* c, const char* name) {
    Tol t = {atof(st_meta(&c->st, "atol") ? st_meta(&c->st, "atol") : "0"),
             atof(st_meta(&c->st, "rtol") ? st_meta(&c->st, "rtol") : "0")};
    const char* js = st_meta(&c->st, "tolerances");
    if (js) {
        Json* j = json_parse(js, strlen(js));
        const Json* v = json_get(j, name);
        if (v && v->type == JSON_ARRAY && v->count == 2) { t.atol = v->items[0].number; t.rtol = v->items[1].number; }
        json_free(j);
    }
    return t;
}

static void shape_str(char* buf, size_t cap, int ndim, const int* shape) {
    size_t n = 0;
    n += (size_t)snprintf(buf + n, cap - n, "[");
    for (int i = 0; i < ndim && n < cap; i++) n += (size_t)snprintf(buf + n, cap - n, i ? ",%d" : "%d", shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

// Compares one expected output; prints its line; returns 1 if it passes.
static int compare_output(Case* c, StEntry* e, const Outputs* got, int verbose) {
    const char* name = e->name + 4;   // without "out."
    Tol tol = output_tolerance(c, e->name);
    const GoldenOutput* g = NULL;
    for (int i = 0; i < got->n; i++) if (strcmp(got->items[i].name, name) == 0) g = &got->items[i];
    int eshape[TENSOR_MAX_DIMS];
    for (int i = 0; i < e->ndim; i++) eshape[i] = (int)e->shape[i];
    char es[64], gs[64];
    shape_str(es, sizeof es, e->ndim, eshape);
    if (!g) { printf("    %-60s %s  FAIL: not produced\n", e->name, es); return 0; }
    shape_str(gs, sizeof gs, g->t.ndim, g->t.shape);
    if (strcmp(es, gs) != 0) { printf("    %-60s FAIL: shape %s, expected %s\n", e->name, gs, es); return 0; }
    const float* exp = st_floats(&c->st, e);
    size_t n = tensor_numel(&g->t), worst = 0, nbad = 0, nonfinite = 0;
    double max_abs = 0, max_rel = 0, max_used = 0;
    for (size_t i = 0; i < n; i++) {
        double x = g->t.data[i], y = exp[i], d = fabs(x - y);
        if (!isfinite(x)) { nonfinite++; nbad++; continue; }
        double allowed = tol.atol + tol.rtol * fabs(y);
        double used = allowed > 0 ? d / allowed : (d > 0 ? INFINITY : 0);
        if (d > max_abs) max_abs = d;
        if (fabs(y) > 0 && d / fabs(y) > max_rel) max_rel = d / fabs(y);
        if (used > max_used) { max_used = used; worst = i; }
        if (d > allowed) nbad++;
    }
    int ok = nbad == 0;
    printf("    %-60s %-16s max_abs %.3e max_rel %.3e  atol %.1e rtol %.1e  used %5.1f%%  %s",
           e->name, es, max_abs, max_rel, tol.atol, tol.rtol, 100.0 * max_used, ok ? "OK" : "FAIL");
    if (nonfinite) printf(" (%zu NaN/Inf)", nonfinite);
    printf("\n");
    if (!ok || verbose > 1) {
        printf("      worst element %zu: got %.8g expected %.8g; %zu of %zu elements out of tolerance\n",
               worst, g->t.data[worst], exp[worst], nbad, n);
        printf("      first values (got / expected):");
        for (size_t i = 0; i < n && i < 5; i++) printf(" %.6g/%.6g", g->t.data[i], exp[i]);
        printf("\n");
    }
    return ok;
}

// ----------------------------------------------------------------------------------------------
// the kind table

typedef struct Kind { const char* name; KindFn fn; } Kind;

static const Kind KINDS[] = {
    {"tokenizer", kind_tokenizer}, {"text_encoder", kind_text_encoder}, {"vae_encode", kind_vae_encode},
    {"vae_decode", kind_vae_decode}, {"unet", kind_unet},
    {"ddim_schedule", kind_ddim_schedule}, {"snr", kind_snr}, {"ddim_step", kind_ddim_step},
    {"invert", kind_invert}, {"sample", kind_sample}, {"mix_sample", kind_mix_sample},
    {"lora_grad", kind_lora_grad}, {"kv_grad", kind_kv_grad}, {"adamw_step", kind_adamw_step},
    {"image_decode", kind_image_decode}, {"clip_preprocess", kind_clip_preprocess}, {"clip_vision", kind_clip_vision},
    {"clip_text_embeds", kind_clip_text_embeds}, {"clip_score", kind_clip_score},
};

typedef enum { RES_PASS, RES_FAIL, RES_SKIP } Result;

static Result run_case(const char* root, const char* file, int verbose) {
    Case c;
    memset(&c, 0, sizeof c);
    snprintf(c.path, sizeof c.path, "%s/cases/%s", root, file);
    snprintf(c.root, sizeof c.root, "%s", root);
    char label[256];
    snprintf(label, sizeof label, "%.*s", (int)(strlen(file) - 12), file);
    if (st_open(&c.st, c.path) != 0) { printf("FAIL  ?  %s: cannot read: %s\n", label, error_last()); return RES_FAIL; }
    const char* kind = st_meta(&c.st, "kind");
    const char* model = st_meta(&c.st, "model");
    const char* params = st_meta(&c.st, "params");
    snprintf(c.model, sizeof c.model, "%s", model ? model : "");
    c.params = params ? json_parse(params, strlen(params)) : json_parse("{}", 2);
    Result res = RES_FAIL;
    const Kind* k = NULL;
    for (size_t i = 0; kind && i < sizeof KINDS / sizeof *KINDS; i++) if (strcmp(KINDS[i].name, kind) == 0) k = &KINDS[i];
    char model_dir[4600];
    snprintf(model_dir, sizeof model_dir, "%s/%s", root, c.model);
    if (!c.params) {
        printf("FAIL  %-14s %s: params is not valid JSON\n", kind ? kind : "?", label);
    } else if (!k) {
        printf("FAIL  %-14s %s: unknown kind\n", kind ? kind : "(none)", label);
    } else if (c.model[0] && !path_is_dir(model_dir)) {
        printf("SKIP  %-14s %s: model folder %s not found\n", kind, label, model_dir);
        res = RES_SKIP;
    } else {
        Outputs out = {0};
        double t0 = time_now();
        int rc = k->fn(&c, &out);
        double dt = time_now() - t0;
        if (rc == KIND_NOT_IMPLEMENTED) {
            printf("SKIP  %-14s %s: kind not implemented yet\n", kind, label);
            res = RES_SKIP;
        } else {
            int ok = 1, nexp = 0;
            char lines[1] = "";
            (void)lines;
            printf("%s  %-14s %s (%.2fs)\n", "....", kind, label, dt);
            for (int i = 0; i < c.st.n; i++)
                if (strncmp(c.st.entries[i].name, "out.", 4) == 0) { nexp++; ok &= compare_output(&c, &c.st.entries[i], &out, verbose); }
            if (nexp == 0) { printf("    no expected outputs in the case file\n"); ok = 0; }
            printf("%s  %-14s %s\n", ok ? "PASS" : "FAIL", kind, label);
            res = ok ? RES_PASS : RES_FAIL;
        }
        outputs_free(&out);
    }
    json_free(c.params);
    st_close(&c.st);
    return res;
}

static int name_cmp(const void* a, const void* b) { return strcmp(*(char* const*)a, *(char* const*)b); }

int main(int argc, char** argv) {
    const char* root = "../shared/golden";
    const char* filter = NULL;
    int verbose = 0, threads = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-k") == 0 && i + 1 < argc) filter = argv[++i];
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "-v") == 0) verbose++;
        else if (argv[i][0] != '-') root = argv[i];
        else { fprintf(stderr, "usage: run_golden [DIR] [-k SUBSTRING] [--threads N] [-v]\n"); return 2; }
    }
    threads_init(threads);
    device_select(NULL);          // INSTASTYLE_DEVICE=cuda (make golden DEVICE=cuda) runs the GPU twins
    char cases_dir[4200];
    snprintf(cases_dir, sizeof cases_dir, "%s/cases", root);
    DIR* d = opendir(cases_dir);
    CHECK(d, "cannot open %s: no golden cases there (set GOLDEN=DIR)", cases_dir);
    char** files = NULL;
    int nf = 0, cap = 0;
    struct dirent* ent;
    while ((ent = readdir(d))) {
        size_t len = strlen(ent->d_name);
        if (len <= 12 || strcmp(ent->d_name + len - 12, ".safetensors") != 0) continue;
        if (filter && !strstr(ent->d_name, filter)) continue;
        if (nf == cap) { cap = cap ? 2 * cap : 64; files = realloc(files, (size_t)cap * sizeof(char*)); }
        files[nf++] = xstrdup(ent->d_name);
    }
    closedir(d);
    qsort(files, (size_t)nf, sizeof(char*), name_cmp);
    int pass = 0, fail = 0, skip = 0;
    for (int i = 0; i < nf; i++) {
        Result r = run_case(root, files[i], verbose);
        pass += r == RES_PASS;
        fail += r == RES_FAIL;
        skip += r == RES_SKIP;
        free(files[i]);
        fflush(stdout);
    }
    free(files);
    if (g_model_path[0]) sd_free(&g_model);
    printf("%d passed, %d failed, %d skipped\n", pass, fail, skip);
    return fail > 0;
}
