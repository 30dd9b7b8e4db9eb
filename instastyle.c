// instastyle.c: the command line, with the only main().
//
//   instastyle <command> [options]
//   info        model summary: components, configs, parameter counts, dtypes
//   tokenize    prompt → CLIP token ids
//   invert      style image → inversion noise z_T (InstaStyle stage 0, eq. 6)
//   candidates  inversion noise → M stylised objects + a numbered contact sheet (stage 1)
//   refine      picked candidates → learned <style1> token + LoRA (stage 2)
//   generate    inversion noise (or a seed) → images for a prompt (inference)
//   mix         two inversion noises + two prompts → a two-style image (eq. 11, 12)
//   snr         the SNR of DDIM-inversion noise (eq. 8)
//   bench       full-size SD 1.5 with random weights: seconds, GFLOP/s, % of peak, peak RSS
//
// Every command parses its own long options from a table (name, type, default, help), so the
// usage text always shows the defaults. Outputs are written atomically (path.tmp + rename);
// long loops print step/total, elapsed, ETA and s/it on stderr.
#define _POSIX_C_SOURCE 200809L
#include "instastyle.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

// ----------------------------------------------------------------------------------------------
// options

typedef enum { OPT_STR, OPT_INT, OPT_FLOAT, OPT_FLAG } OptType;
typedef struct Opt {
    const char* name;      // "--model"
    OptType type;
    void* dst;             // const char**, int*, float*, int*
    const char* help;
} Opt;

typedef struct Common {
    const char* model;
    const char* tokenizer;
    const char* config;
    const char* trained;
    const char* weights;   // "fp16": frozen weights kept in fp16 (SD_F16); NULL or "fp32": fp32
    const char* device;    // "cpu", "cuda"; NULL: $INSTASTYLE_DEVICE, else cpu
    int threads, verbose;
} Common;

static void opt_default_str(const Opt* o, char* buf, size_t cap) {
    switch (o->type) {
    case OPT_STR: snprintf(buf, cap, "%s", *(const char**)o->dst ? *(const char**)o->dst : "(none)"); break;
    case OPT_INT: snprintf(buf, cap, "%d", *(int*)o->dst); break;
    case OPT_FLOAT: snprintf(buf, cap, "%g", *(float*)o->dst); break;
    case OPT_FLAG: snprintf(buf, cap, "%s", *(int*)o->dst ? "on" : "off"); break;
    }
}

static void usage_opts(FILE* f, const char* cmd, const char* summary, const Opt* opts, int n) {
    fprintf(f, "usage: instastyle %s [options]\n%s\n\noptions (default in brackets):\n", cmd, summary);
    for (int i = 0; i < n; i++) {
        char def[256];
        opt_default_str(&opts[i], def, sizeof def);
        const char* arg = opts[i].type == OPT_STR ? " S" : opts[i].type == OPT_INT ? " N" : opts[i].type == OPT_FLOAT ? " X" : "";
        char head[64];
        snprintf(head, sizeof head, "%s%s", opts[i].name, arg);
        fprintf(f, "  %-22s %s [%s]\n", head, opts[i].help, def);
    }
}

#define NOPTS(opts) ((int)(sizeof(opts) / sizeof *(opts)))

// Parses argv[1..] against opts; --help prints usage and exits 0; anything unknown exits 2.
static void parse_opts(int argc, char** argv, const char* cmd, const char* summary, const Opt* opts, int n) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage_opts(stdout, cmd, summary, opts, n);
            exit(0);
        }
        const Opt* o = NULL;
        for (int k = 0; k < n; k++) if (strcmp(argv[i], opts[k].name) == 0) o = &opts[k];
        if (!o) {
            fprintf(stderr, "error: %s: unknown option '%s'\n", cmd, argv[i]);
            usage_opts(stderr, cmd, summary, opts, n);
            exit(2);
        }
        if (o->type == OPT_FLAG) { (*(int*)o->dst)++; continue; }
        if (i + 1 >= argc) { fprintf(stderr, "error: %s: option %s needs a value\n", cmd, o->name); exit(2); }
        const char* v = argv[++i];
        char* end;
        errno = 0;
        if (o->type == OPT_STR) *(const char**)o->dst = v;
        else if (o->type == OPT_INT) {
            long x = strtol(v, &end, 10);
            if (*end || end == v || errno || x < -2147483647L || x > 2147483647L) {
                fprintf(stderr, "error: %s: %s expects an integer, got '%s'\n", cmd, o->name, v);
                exit(2);
            }
            *(int*)o->dst = (int)x;
        } else {
            double x = strtod(v, &end);
            if (*end || end == v || !isfinite(x)) {
                fprintf(stderr, "error: %s: %s expects a number, got '%s'\n", cmd, o->name, v);
                exit(2);
            }
            *(float*)o->dst = (float)x;
        }
    }
}

#define COMMON_OPTS(c) \
    {"--model", OPT_STR, &(c).model, "SD 1.5: diffusers folder, single-file .safetensors, or random:sd15 (timing)"}, \
    {"--tokenizer", OPT_STR, &(c).tokenizer, "folder with vocab.json + merges.txt (needed for single files)"}, \
    {"--config", OPT_STR, &(c).config, "diffusers folder whose config.json files describe a single file"}, \
    {"--weights", OPT_STR, &(c).weights, "fp16: keep linear/conv weights in fp16 (half the memory); fp32 if unset"}, \
    {"--threads", OPT_INT, &(c).threads, "worker threads, 0 = all cores"}, \
    {"--device", OPT_STR, &(c).device, "cpu or cuda (a build with make CUDA=1); default $INSTASTYLE_DEVICE, else cpu"}, \
    {"-v", OPT_FLAG, &(c).verbose, "verbose: loading details, arena peaks"}

static void need_model(const Common* c, const char* cmd) {
    CHECK(c->model, "%s: --model PATH is required (a diffusers folder of SD 1.5 or a .safetensors single file)", cmd);
}

// ----------------------------------------------------------------------------------------------
// progress line: step/total, elapsed, ETA, s/it

typedef struct Progress { const char* what; double t0; int tty; } Progress;

static void fmt_duration(char* buf, size_t cap, double s) {
    if (s < 60) snprintf(buf, cap, "%.1fs", s);
    else if (s < 3600) snprintf(buf, cap, "%dm%02ds", (int)s / 60, (int)s % 60);
    else snprintf(buf, cap, "%dh%02dm", (int)s / 3600, ((int)s % 3600) / 60);
}

static void progress_cb(void* ctx, int step, int total) {
    Progress* p = ctx;
    double el = time_now() - p->t0, per = el / step;
    char e[32], eta[32];
    fmt_duration(e, sizeof e, el);
    fmt_duration(eta, sizeof eta, per * (total - step));
    fprintf(stderr, "%s%s %d/%d  elapsed %s  ETA %s  %.2f s/it%s", p->tty ? "\r" : "", p->what, step, total, e, eta,
            per, p->tty && step < total ? "   " : "\n");
    fflush(stderr);
}

static Progress progress_start(const char* what) { return (Progress){what, time_now(), isatty(2)}; }

// ----------------------------------------------------------------------------------------------
// shared steps: model, image → latent, prompts, noise files, PNG output

typedef struct Run {
    Common c;
    StableDiffusion sd;
    Arena scratch;
    Schedule sched;
} Run;

// --weights: fp32 (default) or fp16 → SD_F16.
static int weights_flag(const char* w) {
    CHECK(!w || strcmp(w, "fp32") == 0 || strcmp(w, "fp16") == 0, "--weights must be fp32 or fp16, got '%s'", w);
    return w && strcmp(w, "fp16") == 0 ? SD_F16 : 0;
}

static void run_load(Run* r, int components) {
    threads_init(r->c.threads);
    device_select(r->c.device);
    sd_load(&r->sd, r->c.model, r->c.tokenizer, r->c.config, components | weights_flag(r->c.weights), r->c.verbose);
    // One large chunk (pages are touched only as used): the UNet's and the VAE's working sets reuse
    // the same memory instead of leaving chunks of mismatched sizes behind (peak RSS).
    arena_init(&r->scratch, (size_t)1 << 30);
}

static void run_free(Run* r) {
    if (r->c.verbose) fprintf(stderr, "scratch arena peak: %.1f MiB\n", r->scratch.peak / 1048576.0);
    arena_free(&r->scratch);
    if (r->sched.timesteps) schedule_free(&r->sched);
    sd_free(&r->sd);
}

// "512" or "768x512" (width x height); each a multiple of the VAE factor.
static void parse_size(const char* s, int factor, int* W, int* H) {
    char* end;
    long w = strtol(s, &end, 10), h = w;
    if (*end == 'x') h = strtol(end + 1, &end, 10);
    CHECK(*end == 0 && w >= factor && h >= factor && w <= 4096 && h <= 4096 && w % factor == 0 && h % factor == 0,
          "--size '%s': expected N or WxH with each side a multiple of %d in [%d, 4096]", s, factor, factor);
    *W = (int)w;
    *H = (int)h;
}

// Reads an image, centre-crops and resizes it to W×H, encodes it: latent[L, H/f, W/f] = mean × sf.
static void image_to_latent(Run* r, const char* path, int W, int H, float* latent) {
    Image img, fit;
    CHECK(image_read(&img, path) == 0, "%s", error_last());
    fit = image_center_crop_resize(&img, W, H);
    float* x = xmalloc((size_t)3 * W * H * sizeof(float));
    image_to_nchw(&fit, x);
    double t0 = time_now();
    vae_encode(&r->sd.vae, latent, NULL, x, 1, H, W, &r->scratch);
    int f = vae_down_factor(&r->sd.vae);
    size_t n = (size_t)r->sd.vae.cfg.latent_channels * (H / f) * (W / f);
    for (size_t i = 0; i < n; i++) latent[i] *= r->sd.vae.cfg.scaling_factor;
    if (r->c.verbose) fprintf(stderr, "VAE encode %dx%d: %.2fs\n", W, H, time_now() - t0);
    free(x);
    image_free(&img);
    image_free(&fit);
}

static char* make_prompt(const char* prompt, const char* object, const char* style) {
    char buf[4096];
    if (prompt) snprintf(buf, sizeof buf, "%s", prompt);
    else {
        CHECK(object && style, "give --prompt, or --object and --style (prompt: \"A <object> in the style of <style>\")");
        snprintf(buf, sizeof buf, "A %s in the style of %s", object, style);
    }
    return xstrdup(buf);
}

// Noise files: safetensors with "latent" [1, C, h, w] and metadata (format, prompt, steps, size, model).
static void noise_write(const char* path, const float* z, int C, int h, int w, const char* const* meta) {
    StWriter* sw = stw_new();
    int64_t shape[4] = {1, C, h, w};
    stw_add(sw, "latent", DT_F32, z, 4, shape);
    stw_meta(sw, "format", "instastyle-noise");
    for (int i = 0; meta && meta[i]; i += 2) stw_meta(sw, meta[i], meta[i + 1]);
    CHECK(stw_write(sw, path) == 0, "%s", error_last());
    stw_free(sw);
}

// Reads a noise file and checks it against the model: returns latent [C, h, w] (caller frees).
static float* noise_read(const char* path, int C, int* h, int* w) {
    float* z = noise_load(path, C, h, w);
    CHECK(z, "%s", error_last());
    return z;
}

// Decodes latent [L, h, w] and writes a PNG/PPM/BMP carrying the generation parameters.
static void latent_to_file(Run* r, const float* z, int h, int w, const char* path, const char* params) {
    int f = vae_down_factor(&r->sd.vae);
    float* x = xmalloc((size_t)3 * h * f * w * f * sizeof(float));
    double t0 = time_now();
    vae_decode(&r->sd.vae, x, z, 1, h, w, &r->scratch);
    if (r->c.verbose) fprintf(stderr, "VAE decode: %.2fs\n", time_now() - t0);
    Image img = image_from_nchw(x, h * f, w * f);
    const char* text[] = {"parameters", params, "Software", "instastyle", NULL};
    CHECK(image_write(&img, path, text) == 0, "%s", error_last());
    image_free(&img);
    free(x);
}

static void schedule_for(Run* r, int steps) {
    CHECK(steps >= 1 && steps <= r->sd.sched.train_steps, "--steps must be in [1, %d], got %d", r->sd.sched.train_steps, steps);
    if (r->sched.timesteps) schedule_free(&r->sched);
    schedule_init(&r->sched, &r->sd.sched, steps);
}

static const char* model_name(const Run* r) {
    const char* s = strrchr(r->c.model, '/');
    return s && s[1] ? s + 1 : r->c.model;
}

// Registers the trained token(s) of --trained with the tokenizer and attaches LoRA/KV weights.
static void apply_trained(Run* r) {
    if (!r->c.trained) return;
    CHECK(trained_apply(&r->sd, r->c.trained) == 0, "%s", error_last());
}

// ----------------------------------------------------------------------------------------------
// info, tokenize, snr

static int cmd_info(int argc, char** argv) {
    Run r = {0};
    Opt opts[] = {COMMON_OPTS(r.c)};
    parse_opts(argc, argv, "info", "Print a model summary: components, configs, parameter counts, dtypes.", opts, NOPTS(opts));
    need_model(&r.c, "info");
    int comps = SD_TEXT | SD_UNET | SD_VAE | (r.c.tokenizer || path_is_dir(r.c.model) ? SD_TOKENIZER : 0);
    run_load(&r, comps);
    StableDiffusion* sd = &r.sd;
    printf("model      %s (%s)\n", r.c.model, strncmp(r.c.model, "random:", 7) == 0 ? "random weights" : sd->ldm ? "single-file LDM checkpoint" : "diffusers folder");
    for (int i = 0; i < sd->nfiles; i++) {
        int counts[6] = {0};
        for (int k = 0; k < sd->files[i].n; k++) counts[sd->files[i].entries[k].dtype]++;
        printf("file       %s: %d tensors (", sd->files[i].path, sd->files[i].n);
        for (int d = 0, first = 1; d < 6; d++)
            if (counts[d]) { printf("%s%d %s", first ? "" : ", ", counts[d], dtype_name((DType)d)); first = 0; }
        printf(")\n");
    }
    const ClipConfig* cc = &sd->clip.cfg;
    printf("text       CLIP: vocab %d, hidden %d, MLP %d, %d layers, %d heads, %d positions, %s; %.1fM parameters\n",
           cc->vocab_size, cc->hidden, cc->intermediate, cc->layers, cc->heads, cc->max_positions,
           cc->quick_gelu ? "quick_gelu" : "gelu", sd->params[0] / 1e6);
    const UNetConfig* u = &sd->unet.cfg;
    printf("unet       channels");
    for (int i = 0; i < u->levels; i++) printf(" %d", u->block_out[i]);
    printf(", heads");
    for (int i = 0; i < u->levels; i++) printf(" %d", u->heads[i]);
    printf(", %d layers/block, context %d, %d groups, eps %g; %.1fM parameters\n", u->layers_per_block, u->cross_dim,
           u->groups, u->eps, sd->params[1] / 1e6);
    const VaeConfig* v = &sd->vae.cfg;
    printf("vae        channels");
    for (int i = 0; i < v->levels; i++) printf(" %d", v->block_out[i]);
    printf(", %d latent channels, %d groups, scaling %g; %.1fM parameters\n", v->latent_channels, v->groups,
           v->scaling_factor, sd->params[2] / 1e6);
    printf("scheduler  DDIM, %d train steps, %s betas %g..%g, offset %d\n", sd->sched.train_steps, sd->sched.beta_schedule,
           sd->sched.beta_start, sd->sched.beta_end, sd->sched.steps_offset);
    if (sd->tok) printf("tokenizer  %d entries\n", tokenizer_vocab_size(sd->tok));
    printf("total      %.1fM parameters\n", (sd->params[0] + sd->params[1] + sd->params[2]) / 1e6);
    run_free(&r);
    return 0;
}

static int cmd_tokenize(int argc, char** argv) {
    Run r = {0};
    const char* prompt = NULL;
    const char* add = NULL;
    Opt opts[] = {COMMON_OPTS(r.c), {"--prompt", OPT_STR, &prompt, "text to tokenize"},
                  {"--add-token", OPT_STR, &add, "comma-separated added tokens, e.g. <style1>,<style2>"}};
    parse_opts(argc, argv, "tokenize", "Print the CLIP token ids of a prompt (BOS ... EOS, padding omitted).", opts, NOPTS(opts));
    CHECK(prompt, "tokenize: --prompt TEXT is required");
    const char* dir = r.c.tokenizer;
    char buf[4096];
    if (!dir) { need_model(&r.c, "tokenize"); snprintf(buf, sizeof buf, "%s/tokenizer", r.c.model); dir = buf; }
    Tokenizer* tok = tokenizer_load(dir);
    CHECK(tok, "%s%s", error_last(), r.c.tokenizer ? "" : ". Hint: a single-file model needs --tokenizer DIR");
    if (add) {
        char* list = xstrdup(add);
        for (char* t = strtok(list, ","); t; t = strtok(NULL, ",")) tokenizer_add_token(tok, t);
        free(list);
    }
    int ids[CLIP_MAX_LENGTH];
    int n = tokenizer_encode(tok, prompt, ids, CLIP_MAX_LENGTH);
    CHECK(n >= 0, "prompt: %s", error_last());
    for (int i = 0; i < n; i++) printf("%d%s", ids[i], i + 1 < n ? " " : "\n");
    if (r.c.verbose)
        for (int i = 0; i < n; i++) fprintf(stderr, "%6d  %s\n", ids[i], tokenizer_token_text(tok, ids[i]) ? tokenizer_token_text(tok, ids[i]) : "?");
    tokenizer_free(tok);
    return 0;
}

static int cmd_snr(int argc, char** argv) {
    Run r = {0};
    int every = 50;
    Opt opts[] = {COMMON_OPTS(r.c), {"--every", OPT_INT, &every, "print every N-th train step"}};
    parse_opts(argc, argv, "snr", "Print the SNR of DDIM-inversion noise by train timestep (InstaStyle eq. 8).\n"
               "The model's scheduler config is used when --model is given, else SD 1.5's.", opts, NOPTS(opts));
    CHECK(every >= 1, "--every must be >= 1");
    SchedulerConfig cfg;
    sd_default_configs(NULL, NULL, NULL, &cfg);
    if (r.c.model) { sd_load(&r.sd, r.c.model, NULL, r.c.config, 0, 0); cfg = r.sd.sched; sd_free(&r.sd); }
    Schedule s;
    schedule_init(&s, &cfg, 1);
    double* snr = xmalloc((size_t)s.train_steps * sizeof(double));
    snr_curve(&s, snr);
    printf("# timestep  snr\n");
    for (int t = 0; t + 1 < s.train_steps; t++)
        if ((t + 1) % every == 0 || t + 2 == s.train_steps) printf("%4d  %.6g\n", t + 1, snr[t]);
    printf("terminal SNR (timestep %d): %.5g\n", s.train_steps - 1, snr[s.train_steps - 2]);
    free(snr);
    schedule_free(&s);
    return 0;
}

// ----------------------------------------------------------------------------------------------
// invert

static int cmd_invert(int argc, char** argv) {
    Run r = {0};
    const char *image = NULL, *style = NULL, *object = NULL, *prompt = NULL, *out = "noise.safetensors", *size = "512";
    int steps = 50, until = 0;
    Opt opts[] = {COMMON_OPTS(r.c),
        {"--image", OPT_STR, &image, "style reference image (PNG, PPM, BMP)"},
        {"--style", OPT_STR, &style, "style words, e.g. \"watercolor\" (or <style1> with --trained)"},
        {"--object", OPT_STR, &object, "what the reference shows, e.g. \"house\""},
        {"--prompt", OPT_STR, &prompt, "full prompt instead of \"A <object> in the style of <style>\""},
        {"--trained", OPT_STR, &r.c.trained, "file from 'refine': learned token + LoRA"},
        {"--steps", OPT_INT, &steps, "DDIM steps"},
        {"--until", OPT_INT, &until, "invert only this many steps (0 = all; paper Fig. 19)"},
        {"--size", OPT_STR, &size, "working size N or WxH (centre crop + bicubic resize)"},
        {"--out", OPT_STR, &out, "noise file to write"}};
    parse_opts(argc, argv, "invert", "DDIM-invert a style image into its style noise z_T (conditional noise only).", opts, NOPTS(opts));
    need_model(&r.c, "invert");
    CHECK(image, "invert: --image PATH is required");
    char* text = make_prompt(prompt, object, style);
    run_load(&r, SD_ALL);
    apply_trained(&r);
    int W, H, f = vae_down_factor(&r.sd.vae), L = r.sd.unet.cfg.in_channels;
    parse_size(size, f, &W, &H);
    schedule_for(&r, steps);
    CHECK(until >= 0 && until <= steps, "--until must be in [0, %d]", steps);
    if (!until) until = steps;
    int h = H / f, w = W / f;
    float* z = xmalloc((size_t)L * h * w * sizeof(float));
    float* cond = xmalloc((size_t)CLIP_MAX_LENGTH * r.sd.unet.cfg.cross_dim * sizeof(float));
    image_to_latent(&r, image, W, H, z);
    const char* prompts[1] = {text};
    sd_encode_prompts(&r.sd, prompts, 1, cond, &r.scratch);
    Progress p = progress_start("invert");
    ddim_invert(&r.sd.unet, &r.sched, z, NULL, cond, CLIP_MAX_LENGTH, h, w, until, progress_cb, &p, &r.scratch);
    char steps_s[32], until_s[32], size_s[32];
    snprintf(steps_s, sizeof steps_s, "%d", steps);
    snprintf(until_s, sizeof until_s, "%d", until);
    snprintf(size_s, sizeof size_s, "%dx%d", W, H);
    const char* meta[] = {"prompt", text, "steps", steps_s, "inverted_steps", until_s, "size", size_s,
                          "model", model_name(&r), "image", image, r.c.trained ? "trained" : NULL, r.c.trained, NULL};
    noise_write(out, z, L, h, w, meta);
    printf("%s  (%s, %d/%d steps, %s)\n", out, size_s, until, steps, text);
    free(z); free(cond); free(text);
    run_free(&r);
    return 0;
}

// ----------------------------------------------------------------------------------------------
// generate, candidates, mix

typedef struct GenOpts {
    const char *noise, *prompt, *object, *style, *negative, *out, *size;
    float guidance, rand_scale;
    int steps, seed, count;
} GenOpts;

// The starting latent: a noise file (its size wins) or randn(seed) of the requested size.
static float* start_latent(Run* r, const GenOpts* g, int* h, int* w, int seed) {
    int f = vae_down_factor(&r->sd.vae), L = r->sd.unet.cfg.in_channels;
    Rng rng;
    rng_seed(&rng, (uint64_t)(uint32_t)seed);
    float* z;
    if (g->noise) {
        z = noise_read(g->noise, L, h, w);
        if (g->rand_scale > 0) noise_rand_scale(z, L, *h, *w, g->rand_scale, &rng);
    } else {
        int W, H;
        parse_size(g->size, f, &W, &H);
        *h = H / f;
        *w = W / f;
        z = xmalloc((size_t)L * *h * *w * sizeof(float));
        rng_normal(&rng, z, (size_t)L * *h * *w);
    }
    return z;
}

// Samples with K prompts (prompts[0] is the negative/unconditional) and guidance g; writes path.
static void generate_one(Run* r, const float* z0, int h, int w, const char* const* prompts, int K, const float* g,
                         const char* path, const char* params, const char* label) {
    int L = r->sd.unet.cfg.in_channels, D = r->sd.unet.cfg.cross_dim;
    size_t n = (size_t)L * h * w;
    float* z = xmalloc(n * sizeof(float));
    float* ctx = xmalloc((size_t)K * CLIP_MAX_LENGTH * D * sizeof(float));
    memcpy(z, z0, n * sizeof(float));
    sd_encode_prompts(&r->sd, prompts, K, ctx, &r->scratch);
    Progress p = progress_start(label);
    ddim_sample(&r->sd.unet, &r->sched, z, NULL, ctx, K, g, CLIP_MAX_LENGTH, h, w, 0, progress_cb, &p, &r->scratch);
    for (size_t i = 0; i < n; i++) CHECK(isfinite(z[i]), "sampling produced NaN/Inf in the latent (step %d)", r->sched.n);
    latent_to_file(r, z, h, w, path, params);
    free(z);
    free(ctx);
}

static void gen_params(char* buf, size_t cap, const char* prompt, const char* negative, const GenOpts* g, int seed,
                       int h, int w, int f, const Run* r) {
    snprintf(buf, cap, "%s\nNegative prompt: %s\nSteps: %d, Sampler: DDIM, CFG scale: %g, Seed: %d, Size: %dx%d, "
             "Model: %s%s%s%s%s", prompt, negative, g->steps, g->guidance, seed, w * f, h * f, model_name(r),
             g->noise ? ", Noise: " : "", g->noise ? g->noise : "", r->c.trained ? ", Trained: " : "",
             r->c.trained ? r->c.trained : "");
}

// path for the i-th of n outputs: out as is when n == 1, else out with "-<i>" before the extension
static void numbered_path(char* buf, size_t cap, const char* out, int i, int n) {
    if (n == 1) { snprintf(buf, cap, "%s", out); return; }
    const char* dot = strrchr(out, '.');
    int stem = dot ? (int)(dot - out) : (int)strlen(out);
    snprintf(buf, cap, "%.*s-%d%s", stem, out, i + 1, dot ? dot : "");
}

static int cmd_generate(int argc, char** argv) {
    Run r = {0};
    GenOpts g = {NULL, NULL, NULL, NULL, "", "out.png", "512", 2.5f, 0.0f, 50, 42, 1};
    Opt opts[] = {COMMON_OPTS(r.c),
        {"--noise", OPT_STR, &g.noise, "inversion noise from 'invert' (else Gaussian noise from --seed)"},
        {"--prompt", OPT_STR, &g.prompt, "prompt"},
        {"--object", OPT_STR, &g.object, "object for \"A <object> in the style of <style>\""},
        {"--style", OPT_STR, &g.style, "style words (or <style1> with --trained)"},
        {"--negative", OPT_STR, &g.negative, "negative (unconditional) prompt"},
        {"--trained", OPT_STR, &r.c.trained, "file from 'refine': learned token + LoRA"},
        {"--guidance", OPT_FLOAT, &g.guidance, "classifier-free guidance scale w"},
        {"--steps", OPT_INT, &g.steps, "DDIM steps"},
        {"--seed", OPT_INT, &g.seed, "seed for noise (negative: random)"},
        {"--rand-scale", OPT_FLOAT, &g.rand_scale, "blend this much renormalised fresh noise into --noise"},
        {"--count", OPT_INT, &g.count, "images to generate (seeds seed, seed+1, ...)"},
        {"--size", OPT_STR, &g.size, "image size N or WxH when no --noise is given"},
        {"--out", OPT_STR, &g.out, "output image (.png, .ppm, .bmp); numbered when --count > 1"}};
    parse_opts(argc, argv, "generate", "Sample images with DDIM and classifier-free guidance (InstaStyle eq. 10).", opts, NOPTS(opts));
    need_model(&r.c, "generate");
    CHECK(g.count >= 1 && g.count <= 1000, "--count must be in [1, 1000]");
    CHECK(g.rand_scale >= 0 && g.rand_scale <= 1, "--rand-scale must be in [0, 1]");
    if (g.seed < 0) g.seed = (int)((unsigned)time_now() ^ (unsigned)getpid()) & 0x7fffffff;
    char* text = make_prompt(g.prompt, g.object, g.style);
    run_load(&r, SD_ALL);
    apply_trained(&r);
    schedule_for(&r, g.steps);
    int f = vae_down_factor(&r.sd.vae);
    for (int i = 0; i < g.count; i++) {
        int h, w, seed = g.seed + i;
        float* z = start_latent(&r, &g, &h, &w, seed);
        char path[4096], params[8192];
        numbered_path(path, sizeof path, g.out, i, g.count);
        gen_params(params, sizeof params, text, g.negative, &g, seed, h, w, f, &r);
        const char* prompts[2] = {g.negative, text};
        float gw[2] = {0, g.guidance};
        generate_one(&r, z, h, w, prompts, 2, gw, path, params, "generate");
        printf("%s  (seed %d, %dx%d, %s)\n", path, seed, w * f, h * f, text);
        free(z);
    }
    free(text);
    run_free(&r);
    return 0;
}

static const char* PAPER_OBJECTS = "cat,lighthouse,volcano,goldfish,table lamp,tram,palace,tower,cup,desk,chair,pot,laptop,door,car";

static int mkdir_p(const char* dir) {
    if (path_is_dir(dir)) return 0;
    return mkdir(dir, 0755);
}

static int cmd_candidates(int argc, char** argv) {
    Run r = {0};
    GenOpts g = {NULL, NULL, NULL, NULL, "", "candidates", "512", 2.5f, 0.0f, 50, 42, 1};
    const char* objects = PAPER_OBJECTS;
    const char* image = NULL;
    int cols = 5;
    Opt opts[] = {COMMON_OPTS(r.c),
        {"--noise", OPT_STR, &g.noise, "inversion noise from 'invert'"},
        {"--image", OPT_STR, &image, "or: a style image, inverted first with --style and --object"},
        {"--style", OPT_STR, &g.style, "style words"},
        {"--object", OPT_STR, &g.object, "object of the reference (only with --image)"},
        {"--objects", OPT_STR, &objects, "comma-separated new objects"},
        {"--negative", OPT_STR, &g.negative, "negative prompt"},
        {"--trained", OPT_STR, &r.c.trained, "file from 'refine'"},
        {"--guidance", OPT_FLOAT, &g.guidance, "guidance scale w"},
        {"--steps", OPT_INT, &g.steps, "DDIM steps"},
        {"--size", OPT_STR, &g.size, "working size when inverting --image"},
        {"--cols", OPT_INT, &cols, "contact sheet columns"},
        {"--out", OPT_STR, &g.out, "output folder: NN_<object>.png, sheet.png, manifest.tsv"}};
    parse_opts(argc, argv, "candidates", "InstaStyle stage 1: M stylised objects from one style noise, and a numbered\n"
               "contact sheet to pick the best N from (pass the numbers to 'refine --picks').", opts, NOPTS(opts));
    need_model(&r.c, "candidates");
    CHECK(g.style, "candidates: --style is required (the style words of the prompt)");
    CHECK(g.noise || image, "candidates: give --noise FILE (from 'invert') or --image PATH");
    CHECK(cols >= 1 && cols <= 64, "--cols must be in [1, 64]");
    run_load(&r, SD_ALL);
    apply_trained(&r);
    schedule_for(&r, g.steps);
    int f = vae_down_factor(&r.sd.vae), L = r.sd.unet.cfg.in_channels, h, w;
    float* z;
    if (g.noise) z = noise_read(g.noise, L, &h, &w);
    else {
        int W, H;
        parse_size(g.size, f, &W, &H);
        h = H / f; w = W / f;
        z = xmalloc((size_t)L * h * w * sizeof(float));
        char* text = make_prompt(NULL, g.object, g.style);
        float* cond = xmalloc((size_t)CLIP_MAX_LENGTH * r.sd.unet.cfg.cross_dim * sizeof(float));
        image_to_latent(&r, image, W, H, z);
        const char* ps[1] = {text};
        sd_encode_prompts(&r.sd, ps, 1, cond, &r.scratch);
        Progress p = progress_start("invert");
        ddim_invert(&r.sd.unet, &r.sched, z, NULL, cond, CLIP_MAX_LENGTH, h, w, g.steps, progress_cb, &p, &r.scratch);
        free(cond); free(text);
    }
    CHECK(mkdir_p(g.out) == 0, "cannot create folder %s: %s", g.out, strerror(errno));
    char* list = xstrdup(objects);
    char* names[256];
    int M = 0;
    for (char* t = strtok(list, ","); t && M < 256; t = strtok(NULL, ",")) {
        while (*t == ' ') t++;
        if (*t) names[M++] = t;
    }
    CHECK(M >= 1, "--objects: no objects given");
    Image* imgs = xcalloc((size_t)M, sizeof(Image));
    char** labels = xcalloc((size_t)M, sizeof(char*));
    size_t mcap = 65536, mlen = 0;
    char* manifest = xmalloc(mcap);
    mlen += (size_t)snprintf(manifest, mcap, "number\tobject\tprompt\tfile\n");
    for (int i = 0; i < M; i++) {
        char* text = make_prompt(NULL, names[i], g.style);
        char file[512], path[4096], params[8192], label[64];
        snprintf(file, sizeof file, "%02d_", i + 1);
        size_t k = strlen(file);
        for (const char* c = names[i]; *c && k < 200; c++) file[k++] = isalnum((unsigned char)*c) ? *c : '_';
        snprintf(file + k, sizeof file - k, ".png");
        snprintf(path, sizeof path, "%s/%s", g.out, file);
        gen_params(params, sizeof params, text, g.negative, &g, 0, h, w, f, &r);
        const char* prompts[2] = {g.negative, text};
        float gw[2] = {0, g.guidance};
        snprintf(label, sizeof label, "candidate %d/%d", i + 1, M);
        generate_one(&r, z, h, w, prompts, 2, gw, path, params, label);
        CHECK(image_read(&imgs[i], path) == 0, "%s", error_last());
        snprintf(label, sizeof label, "%d %s", i + 1, names[i]);
        labels[i] = xstrdup(label);
        if (mlen + strlen(text) + strlen(file) + 300 > mcap) { mcap *= 2; manifest = realloc(manifest, mcap); CHECK(manifest, "out of memory"); }
        mlen += (size_t)snprintf(manifest + mlen, mcap - mlen, "%d\t%s\t%s\t%s\n", i + 1, names[i], text, file);
        printf("%s  %s\n", path, text);
        free(text);
    }
    Image sheet = image_contact_sheet(imgs, (const char* const*)labels, M, cols < M ? cols : M);
    char path[4096];
    snprintf(path, sizeof path, "%s/sheet.png", g.out);
    CHECK(image_write(&sheet, path, NULL) == 0, "%s", error_last());
    printf("%s  (contact sheet: pick the best and pass their numbers to 'refine --picks')\n", path);
    snprintf(path, sizeof path, "%s/manifest.tsv", g.out);
    CHECK(file_write_atomic(path, manifest, mlen) == 0, "%s", error_last());
    printf("%s\n", path);
    for (int i = 0; i < M; i++) { image_free(&imgs[i]); free(labels[i]); }
    image_free(&sheet);
    free(imgs); free(labels); free(manifest); free(list); free(z);
    run_free(&r);
    return 0;
}

static int cmd_mix(int argc, char** argv) {
    Run r = {0};
    GenOpts g = {NULL, NULL, NULL, NULL, "", "mix.png", "512", 2.5f, 0.0f, 50, 42, 1};
    const char *noise1 = NULL, *noise2 = NULL, *prompt1 = NULL, *prompt2 = NULL, *style1 = NULL, *style2 = NULL;
    float alpha = 0.5f, beta = 0.5f;
    int grid = 0;
    Opt opts[] = {COMMON_OPTS(r.c),
        {"--noise1", OPT_STR, &noise1, "inversion noise of style 1"},
        {"--noise2", OPT_STR, &noise2, "inversion noise of style 2"},
        {"--prompt1", OPT_STR, &prompt1, "prompt with style 1 (or --object + --style1)"},
        {"--prompt2", OPT_STR, &prompt2, "prompt with style 2 (or --object + --style2)"},
        {"--object", OPT_STR, &g.object, "object for both prompts"},
        {"--style1", OPT_STR, &style1, "style 1 words (or <style1> with --trained)"},
        {"--style2", OPT_STR, &style2, "style 2 words (or <style2> with --trained)"},
        {"--negative", OPT_STR, &g.negative, "negative prompt"},
        {"--trained", OPT_STR, &r.c.trained, "file from 'refine' holding <style1> and <style2>"},
        {"--alpha", OPT_FLOAT, &alpha, "fraction of noise-2 positions in the mask (eq. 11)"},
        {"--beta", OPT_FLOAT, &beta, "weight of style 2's guidance (eq. 12)"},
        {"--grid", OPT_FLAG, &grid, "render the alpha x beta sweep 0.1..0.9 (paper Fig. 7) into one image"},
        {"--guidance", OPT_FLOAT, &g.guidance, "guidance scale w"},
        {"--steps", OPT_INT, &g.steps, "DDIM steps"},
        {"--seed", OPT_INT, &g.seed, "seed of the mask"},
        {"--out", OPT_STR, &g.out, "output image"}};
    parse_opts(argc, argv, "mix", "Two styles: mix their inversion noises with a random mask M (ratio alpha) and\n"
               "compose guidance: e = e0 + w(1-beta)(e1 - e0) + w beta (e2 - e0).", opts, NOPTS(opts));
    need_model(&r.c, "mix");
    CHECK(noise1 && noise2, "mix: --noise1 and --noise2 are required");
    CHECK(alpha >= 0 && alpha <= 1 && beta >= 0 && beta <= 1, "--alpha and --beta must be in [0, 1]");
    char* p1 = make_prompt(prompt1, g.object, style1);
    char* p2 = make_prompt(prompt2, g.object, style2);
    run_load(&r, SD_ALL);
    apply_trained(&r);
    schedule_for(&r, g.steps);
    int L = r.sd.unet.cfg.in_channels, f = vae_down_factor(&r.sd.vae), h, w, h2, w2;
    float* z1 = noise_read(noise1, L, &h, &w);
    float* z2 = noise_read(noise2, L, &h2, &w2);
    CHECK(h == h2 && w == w2, "--noise1 is %dx%d latents but --noise2 is %dx%d", w, h, w2, h2);
    float* z = xmalloc((size_t)L * h * w * sizeof(float));
    float* mask = xmalloc((size_t)h * w * sizeof(float));
    const char* prompts[3] = {g.negative, p1, p2};
    int n = grid ? 9 : 1;
    Image* cells = xcalloc((size_t)n * n, sizeof(Image));
    char** labels = xcalloc((size_t)n * n, sizeof(char*));
    for (int a = 0; a < n; a++)
        for (int b = 0; b < n; b++) {
            float al = grid ? 0.1f * (a + 1) : alpha, be = grid ? 0.1f * (b + 1) : beta;
            Rng rng;
            rng_seed(&rng, (uint64_t)(uint32_t)g.seed);
            noise_mask_draw(mask, h, w, al, &rng);
            noise_mix(z, z1, z2, mask, L, h, w);
            float gw[3] = {0, g.guidance * (1 - be), g.guidance * be};
            char path[4096], params[8192], label[64];
            if (grid) snprintf(path, sizeof path, "%s.cell.png", g.out);
            else snprintf(path, sizeof path, "%s", g.out);
            snprintf(params, sizeof params, "%s | %s\nNegative prompt: %s\nSteps: %d, Sampler: DDIM, CFG scale: %g, "
                     "alpha: %g, beta: %g, Seed: %d, Size: %dx%d, Model: %s", p1, p2, g.negative, g.steps, g.guidance,
                     al, be, g.seed, w * f, h * f, model_name(&r));
            snprintf(label, sizeof label, "mix a=%.1f b=%.1f", al, be);
            generate_one(&r, z, h, w, prompts, 3, gw, path, params, label);
            if (grid) {
                CHECK(image_read(&cells[a * n + b], path) == 0, "%s", error_last());
                remove(path);
                snprintf(label, sizeof label, "a%.1f b%.1f", al, be);
                labels[a * n + b] = xstrdup(label);
            }
        }
    if (grid) {
        Image sheet = image_contact_sheet(cells, (const char* const*)labels, n * n, n);
        CHECK(image_write(&sheet, g.out, NULL) == 0, "%s", error_last());
        image_free(&sheet);
        for (int i = 0; i < n * n; i++) { image_free(&cells[i]); free(labels[i]); }
        printf("%s  (rows alpha 0.1..0.9, columns beta 0.1..0.9)\n", g.out);
    } else {
        printf("%s  (alpha %g, beta %g)\n", g.out, alpha, beta);
    }
    free(cells); free(labels); free(z); free(z1); free(z2); free(mask); free(p1); free(p2);
    run_free(&r);
    return 0;
}

// ----------------------------------------------------------------------------------------------
// refine: InstaStyle stage 2 (prompt refinement). Learn the token <style1> (initialised from the
// style word's embedding) plus LoRA on attn2 to_k / to_v of every cross-attention, or the full
// K/V weights (the official code's variant), from the picked candidates and the reference.

typedef struct TrainItem { char* path; char* object; int token; } TrainItem;
typedef struct TrainSet { TrainItem* items; int n, cap; } TrainSet;

static void trainset_add(TrainSet* ts, const char* path, const char* object, int token) {
    if (ts->n == ts->cap) {
        ts->cap = ts->cap ? 2 * ts->cap : 16;
        ts->items = realloc(ts->items, (size_t)ts->cap * sizeof(TrainItem));
        CHECK(ts->items, "out of memory");
    }
    ts->items[ts->n++] = (TrainItem){xstrdup(path), xstrdup(object), token};
}

// Splits "a,b,c" into at most cap trimmed, non-empty parts (pointers into buf).
static int split_list(char* buf, char** out, int cap) {
    int n = 0;
    for (char* t = strtok(buf, ","); t && n < cap; t = strtok(NULL, ",")) {
        while (*t == ' ') t++;
        size_t l = strlen(t);
        while (l && t[l - 1] == ' ') t[--l] = 0;
        if (*t) out[n++] = t;
    }
    return n;
}

// Picks "1,3,4" from a 'candidates' folder: its manifest.tsv maps numbers to object and file.
static void add_picks(TrainSet* ts, const char* dir, const char* picks, int token) {
    char path[4096];
    snprintf(path, sizeof path, "%s/manifest.tsv", dir);
    size_t len;
    char* text = file_read_all(path, &len, (size_t)1 << 20);
    CHECK(text, "%s. Hint: --candidates names the folder written by 'instastyle candidates'", error_last());
    char* list = xstrdup(picks);
    char* nums[256];
    int np = split_list(list, nums, 256);
    CHECK(np >= 1, "--picks: no numbers given");
    for (int i = 0; i < np; i++) {
        char* end;
        long want = strtol(nums[i], &end, 10);
        CHECK(*end == 0 && want >= 1 && want <= 10000, "--picks: '%s' is not a candidate number", nums[i]);
        char object[256], file[256], img[8192];
        CHECK(manifest_lookup(text, len, want, object, sizeof object, file, sizeof file) == 0, "%s: %s", path, error_last());
        snprintf(img, sizeof img, "%s/%s", dir, file);
        trainset_add(ts, img, object, token);
    }
    free(list);
    free(text);
}

static void add_images(TrainSet* ts, const char* images, const char* objects, int token) {
    char* il = xstrdup(images);
    char* ol = xstrdup(objects ? objects : "");
    char *im[256], *ob[256];
    int ni = split_list(il, im, 256), no = split_list(ol, ob, 256);
    CHECK(ni >= 1, "--images: no paths given");
    CHECK(no == ni || no == 1, "--objects must name one object for all images or one per image (%d images, %d objects)", ni, no);
    for (int i = 0; i < ni; i++) trainset_add(ts, im[i], ob[no == 1 ? 0 : i], token);
    free(il);
    free(ol);
}

// The style word must be one CLIP token; returns its id.
static int style_token_id(const Tokenizer* tok, const char* word, const char* flag) {
    int ids[8];
    int n = tokenizer_encode_raw(tok, word, ids, 8);
    CHECK(n >= 0, "%s '%s': %s", flag, word, error_last());
    CHECK(n == 1, "%s '%s' is %d CLIP tokens; the token is initialised from one word's embedding. "
          "Hint: pick a single word such as \"watercolor\" or \"sketch\" (put the rest in --prompt-style)", flag, word, n);
    return ids[0];
}

typedef struct RefineOpts {
    const char *picks, *candidates, *images, *objects, *image, *object, *style;
    const char *picks2, *candidates2, *images2, *objects2, *image2, *object2, *style2;
    const char *mode, *out, *resume, *checkpoint;
    int steps, rank, batch, size, seed, save_every, official, augment, no_reference, warmup;
    float lr, alpha, weight_decay, clip;
} RefineOpts;

// Official augmentation (Custom Diffusion's dataset, used by InstaStyle's code): random flip;
// with p = 2/3 shrink to [size/3, size] at a random place on a black canvas (prefix "a far away"
// or "very small", loss masked to the image), else zoom to [1.2, 1.4]·size and crop (prefix
// "zoomed in" or "close up"). Returns the prefix; fills x [3, S, S] and mask [S/f, S/f].
static const char* augment(const Image* src, int S, int f, float* x, float* mask, Rng* rng) {
    Image base = image_center_crop_resize(src, S, S);
    if (rng_uniform(rng) < 0.5f)
        for (int y = 0; y < S; y++)
            for (int i = 0; i < S / 2; i++)
                for (int c = 0; c < 3; c++) {
                    unsigned char* a = &base.rgb[((size_t)y * S + i) * 3 + c];
                    unsigned char* b = &base.rgb[((size_t)y * S + S - 1 - i) * 3 + c];
                    unsigned char t = *a; *a = *b; *b = t;
                }
    int small = rng_uniform(rng) < 0.66f;
    int scale = small ? S / 3 + (int)(rng_u32(rng) % (uint32_t)(S - S / 3 + 1))
                      : (int)(1.2 * S) + (int)(rng_u32(rng) % (uint32_t)((int)(1.4 * S) - (int)(1.2 * S) + 1));
    scale = scale / f * f;
    if (scale < f) scale = f;
    Image sc = image_center_crop_resize(&base, scale, scale);
    Image canvas = image_alloc(S, S);
    memset(canvas.rgb, 0, (size_t)S * S * 3);
    int m = S / f;
    const char* prefix;
    if (scale <= S) {
        int ox = (int)(rng_u32(rng) % (uint32_t)(S - scale + 1)) / f * f, oy = (int)(rng_u32(rng) % (uint32_t)(S - scale + 1)) / f * f;
        for (int y = 0; y < scale; y++) memcpy(&canvas.rgb[((size_t)(oy + y) * S + ox) * 3], &sc.rgb[(size_t)y * scale * 3], (size_t)scale * 3);
        for (int i = 0; i < m * m; i++) {
            int yy = i / m * f, xx = i % m * f;
            mask[i] = yy >= oy && yy < oy + scale && xx >= ox && xx < ox + scale ? 1.0f : 0.0f;
        }
        prefix = rng_uniform(rng) < 0.5f ? "a far away " : "very small ";
    } else {
        int ox = (int)(rng_u32(rng) % (uint32_t)(scale - S + 1)), oy = (int)(rng_u32(rng) % (uint32_t)(scale - S + 1));
        for (int y = 0; y < S; y++) memcpy(&canvas.rgb[(size_t)y * S * 3], &sc.rgb[((size_t)(oy + y) * scale + ox) * 3], (size_t)S * 3);
        for (int i = 0; i < m * m; i++) mask[i] = 1.0f;
        prefix = rng_uniform(rng) < 0.5f ? "zoomed in " : "close up ";
    }
    image_to_nchw(&canvas, x);
    image_free(&base); image_free(&sc); image_free(&canvas);
    return prefix;
}

static void refine_progress(double t0, int done, int step, int total, float loss, float avg, float gnorm) {
    double el = time_now() - t0, per = el / (done > 0 ? done : 1);
    char e[32], eta[32];
    fmt_duration(e, sizeof e, el);
    fmt_duration(eta, sizeof eta, per * (total - step));
    fprintf(stderr, "%sstep %d/%d  loss %.5f (avg %.5f)  |g| %.3g  elapsed %s  ETA %s  %.2f s/it%s", isatty(2) ? "\r" : "",
            step, total, loss, avg, gnorm, e, eta, per, isatty(2) && step < total ? "   " : "\n");
    fflush(stderr);
}

static void refine_save(const TrainParams* tp, const char* path, const Rng* rng, const RefineOpts* o, const char* model) {
    char steps[32], lr[32], seed[32];
    snprintf(steps, sizeof steps, "%d", o->steps);
    snprintf(lr, sizeof lr, "%g", o->lr);
    snprintf(seed, sizeof seed, "%d", o->seed);
    const char* meta[] = {"style", o->style, "style2", o->style2 ? o->style2 : "", "total_steps", steps, "lr", lr,
                          "seed", seed, "model", model, NULL};
    CHECK(train_save(tp, path, rng, meta) == 0, "%s", error_last());
}

static void refine_loop(Run* r, TrainParams* tp, const TrainSet* ts, float* latents, const RefineOpts* o, Rng* rng,
                        const char* ckpt) {
    int f = vae_down_factor(&r->sd.vae), h = o->size / f, w = h, L = r->sd.unet.cfg.in_channels, B = o->batch;
    size_t n1 = (size_t)L * h * w;
    float* z0 = xmalloc(B * n1 * sizeof(float));
    float* noise = xmalloc(B * n1 * sizeof(float));
    float* mask = xmalloc((size_t)B * h * w * sizeof(float));
    float* x = xmalloc((size_t)3 * o->size * o->size * sizeof(float));
    int* ids = xmalloc((size_t)B * CLIP_MAX_LENGTH * sizeof(int));
    int* tsteps = xmalloc((size_t)B * sizeof(int));
    Image* imgs = NULL;
    if (o->augment) {
        imgs = xcalloc((size_t)ts->n, sizeof(Image));
        for (int i = 0; i < ts->n; i++) CHECK(image_read(&imgs[i], ts->items[i].path) == 0, "%s", error_last());
    }
    Arena saved;
    arena_init(&saved, (size_t)256 << 20);
    AdamW opt = adamw_defaults();
    opt.lr = o->lr; opt.weight_decay = o->weight_decay; opt.max_grad_norm = o->clip; opt.warmup = o->warmup;
    double t0 = time_now(), avg = 0;
    int start = tp->step;
    train_catch_sigint();
    for (int step = tp->step; step < o->steps; step++) {
        for (int b = 0; b < B; b++) {   // draws: item, timestep, noise (+ augmentation), all from rng
            int i = (int)(rng_u32(rng) % (uint32_t)ts->n);
            tsteps[b] = (int)(rng_u32(rng) % (uint32_t)r->sd.sched.train_steps);
            rng_normal(rng, noise + b * n1, n1);
            char prompt[1024];
            const char* tok = tp->tokens[ts->items[i].token];
            const char* prefix = "";
            if (o->augment) {
                prefix = augment(&imgs[i], o->size, f, x, mask + (size_t)b * h * w, rng);
                vae_encode(&r->sd.vae, z0 + b * n1, NULL, x, 1, o->size, o->size, &r->scratch);
                for (size_t k = 0; k < n1; k++) z0[b * n1 + k] *= r->sd.vae.cfg.scaling_factor;
            } else {
                memcpy(z0 + b * n1, latents + (size_t)i * n1, n1 * sizeof(float));
            }
            snprintf(prompt, sizeof prompt, "%sA %s in the style of %s", prefix, ts->items[i].object, tok);
            CHECK(tokenizer_encode(r->sd.tok, prompt, ids + b * CLIP_MAX_LENGTH, CLIP_MAX_LENGTH) >= 0, "prompt: %s", error_last());
        }
        TrainBatch batch = {B, h, w, z0, noise, tsteps, o->augment ? mask : NULL, ids};
        float loss = train_step(&r->sd, tp, r->sched.alphas_cumprod, &batch, &r->scratch, &saved);
        CHECK(isfinite(loss), "step %d: the loss is %g (NaN/Inf); stopping. The last checkpoint (%s) holds the last good state",
              step + 1, loss, ckpt);
        float gnorm = train_update(tp, &opt);
        CHECK(isfinite(gnorm), "step %d: the gradient norm is %g (NaN/Inf in the LoRA/token gradients); stopping. "
              "The last checkpoint (%s) holds the last good state", step + 1, gnorm, ckpt);
        avg = step == start ? loss : 0.95 * avg + 0.05 * loss;
        refine_progress(t0, step + 1 - start, step + 1, o->steps, loss, (float)avg, gnorm);
        int interrupted = train_interrupted();
        if ((o->save_every > 0 && (step + 1) % o->save_every == 0) || interrupted) {
            refine_save(tp, ckpt, rng, o, model_name(r));
            if (interrupted) {
                fprintf(stderr, "\ninterrupted: checkpoint %s (step %d); continue with --resume %s\n", ckpt, step + 1, ckpt);
                exit(130);
            }
        }
    }
    if (imgs) { for (int i = 0; i < ts->n; i++) image_free(&imgs[i]); free(imgs); }
    arena_free(&saved);
    free(z0); free(noise); free(mask); free(x); free(ids); free(tsteps);
}

static void refine_outputs(const TrainParams* tp, const RefineOpts* o, const Rng* rng, const char* model) {
    refine_save(tp, o->out, rng, o, model);
    printf("%s  (use with --trained; prompt token%s %s%s%s)\n", o->out, tp->ntok > 1 ? "s" : "", tp->tokens[0],
           tp->ntok > 1 ? ", " : "", tp->ntok > 1 ? tp->tokens[1] : "");
    const char* dot = strrchr(o->out, '.');
    int stem = dot ? (int)(dot - o->out) : (int)strlen(o->out);
    char path[4096];
    snprintf(path, sizeof path, "%.*s.lora.safetensors", stem, o->out);
    CHECK(train_export_lora(tp, path) == 0, "%s", error_last());
    printf("%s  (kohya/A1111 %s)\n", path, tp->mode == TRAIN_KV ? "K/V .diff deltas" : "LoRA");
    for (int k = 0; k < tp->ntok; k++) {
        snprintf(path, sizeof path, "%.*s.style%d.safetensors", stem, o->out, k + 1);
        CHECK(train_export_embedding(tp, k, path) == 0, "%s", error_last());
        printf("%s  (embedding of %s)\n", path, tp->tokens[k]);
    }
}

int cmd_refine(int argc, char** argv) {
    Run r = {0};
    RefineOpts o = {0};
    o.mode = "lora"; o.out = "style.safetensors"; o.steps = 500; o.rank = 4; o.batch = 1; o.size = 512; o.seed = 42;
    o.save_every = 100; o.lr = 1e-5f; o.alpha = 0;
    Opt opts[] = {COMMON_OPTS(r.c),
        {"--picks", OPT_STR, &o.picks, "candidate numbers from the contact sheet, e.g. 1,3,4,9,12"},
        {"--candidates", OPT_STR, &o.candidates, "folder written by 'candidates' (its manifest.tsv)"},
        {"--images", OPT_STR, &o.images, "or: comma-separated picked images"},
        {"--objects", OPT_STR, &o.objects, "objects of --images (one, or one per image)"},
        {"--image", OPT_STR, &o.image, "the style reference (added to the training set, as the official code does)"},
        {"--object", OPT_STR, &o.object, "object of the reference"},
        {"--no-reference", OPT_FLAG, &o.no_reference, "train without the reference image"},
        {"--style", OPT_STR, &o.style, "one-token style word that initialises <style1>"},
        {"--picks2", OPT_STR, &o.picks2, "second style (trained jointly as <style2>): picks"},
        {"--candidates2", OPT_STR, &o.candidates2, "second style: candidates folder"},
        {"--images2", OPT_STR, &o.images2, "second style: images"},
        {"--objects2", OPT_STR, &o.objects2, "second style: objects of --images2"},
        {"--image2", OPT_STR, &o.image2, "second style: reference"},
        {"--object2", OPT_STR, &o.object2, "second style: object of the reference"},
        {"--style2", OPT_STR, &o.style2, "second style: one-token word that initialises <style2>"},
        {"--mode", OPT_STR, &o.mode, "lora (the paper) or kv (official code: full to_k/to_v)"},
        {"--steps", OPT_INT, &o.steps, "optimiser steps"},
        {"--lr", OPT_FLOAT, &o.lr, "learning rate"},
        {"--rank", OPT_INT, &o.rank, "LoRA rank r"},
        {"--alpha", OPT_FLOAT, &o.alpha, "LoRA alpha (scale alpha/r; 0 = rank, scale 1)"},
        {"--batch", OPT_INT, &o.batch, "images per step"},
        {"--size", OPT_INT, &o.size, "training resolution (512; 256 for CPU speed)"},
        {"--weight-decay", OPT_FLOAT, &o.weight_decay, "AdamW decoupled weight decay"},
        {"--clip", OPT_FLOAT, &o.clip, "global gradient-norm clip (0 = off)"},
        {"--warmup", OPT_INT, &o.warmup, "linear learning-rate warm-up steps"},
        {"--augment", OPT_FLAG, &o.augment, "official augmentation: flip, rescale with prompt prefixes, masked loss"},
        {"--official", OPT_FLAG, &o.official, "the official code's settings: --batch 2 --weight-decay 0.01 --clip 1 --augment"},
        {"--seed", OPT_INT, &o.seed, "seed (draws of images, timesteps, noise, LoRA init)"},
        {"--save-every", OPT_INT, &o.save_every, "checkpoint every N steps (0 = only at the end and on Ctrl-C)"},
        {"--checkpoint", OPT_STR, &o.checkpoint, "checkpoint file (default <out>.ckpt)"},
        {"--resume", OPT_STR, &o.resume, "continue from a checkpoint (same data and options)"},
        {"--out", OPT_STR, &o.out, "trained file for --trained (+ .lora / .style1 exports beside it)"}};
    parse_opts(argc, argv, "refine", "InstaStyle stage 2: learn <style1> (from --style) + LoRA on every cross-attention\n"
               "to_k/to_v, loss |e - e_theta(z_t, t, c)|^2, Adam, on the picked candidates and the reference.", opts, NOPTS(opts));
    need_model(&r.c, "refine");
    CHECK(o.style, "refine: --style WORD is required (one CLIP token that initialises <style1>)");
    CHECK(strcmp(o.mode, "lora") == 0 || strcmp(o.mode, "kv") == 0, "--mode must be lora or kv, got '%s'", o.mode);
    if (o.official) { o.batch = 2; o.weight_decay = 0.01f; o.clip = 1.0f; o.augment = 1; }
    CHECK(o.steps >= 1 && o.steps <= 1000000, "--steps must be in [1, 1000000]");
    CHECK(o.rank >= 1 && o.rank <= 1024, "--rank must be in [1, 1024]");
    CHECK(o.batch >= 1 && o.batch <= 64, "--batch must be in [1, 64]");
    CHECK(o.lr > 0 && o.lr < 1, "--lr must be in (0, 1)");
    CHECK(o.size >= 64 && o.size <= 2048 && o.size % 64 == 0, "--size must be a multiple of 64 in [64, 2048]");
    CHECK(o.save_every >= 0 && o.warmup >= 0 && o.weight_decay >= 0 && o.clip >= 0, "--save-every, --warmup, --weight-decay, --clip must be >= 0");
    char ckpt[4096];
    snprintf(ckpt, sizeof ckpt, "%s", o.checkpoint ? o.checkpoint : o.out);
    if (!o.checkpoint) snprintf(ckpt, sizeof ckpt, "%s.ckpt", o.out);
    run_load(&r, SD_ALL);
    schedule_for(&r, 1);
    TrainSet ts = {0};
    if (o.picks) { CHECK(o.candidates, "--picks needs --candidates DIR"); add_picks(&ts, o.candidates, o.picks, 0); }
    if (o.images) add_images(&ts, o.images, o.objects, 0);
    if (o.image && !o.no_reference) { CHECK(o.object, "--image needs --object (what the reference shows)"); trainset_add(&ts, o.image, o.object, 0); }
    int ntok = 1, init[2];
    init[0] = style_token_id(r.sd.tok, o.style, "--style");
    if (o.style2) {
        ntok = 2;
        init[1] = style_token_id(r.sd.tok, o.style2, "--style2");
        int before = ts.n;
        if (o.picks2) { CHECK(o.candidates2, "--picks2 needs --candidates2 DIR"); add_picks(&ts, o.candidates2, o.picks2, 1); }
        if (o.images2) add_images(&ts, o.images2, o.objects2, 1);
        if (o.image2 && !o.no_reference) { CHECK(o.object2, "--image2 needs --object2"); trainset_add(&ts, o.image2, o.object2, 1); }
        CHECK(ts.n > before, "--style2 given but no images for it (--picks2/--candidates2, --images2 or --image2)");
    }
    CHECK(ts.n >= 1, "refine: no training images: give --picks with --candidates, --images with --objects, or --image with --object");
    int f = vae_down_factor(&r.sd.vae), h = o.size / f, L = r.sd.unet.cfg.in_channels;
    size_t n1 = (size_t)L * h * h;
    float* latents = NULL;
    if (!o.augment) {   // encode every image once: latent = VAE mean × scaling factor
        latents = xmalloc(ts.n * n1 * sizeof(float));
        for (int i = 0; i < ts.n; i++) image_to_latent(&r, ts.items[i].path, o.size, o.size, latents + i * n1);
    }
    fprintf(stderr, "refine: %d images, %s, %d steps, lr %g, batch %d, %dx%d\n", ts.n, o.mode, o.steps, o.lr, o.batch, o.size, o.size);
    Rng rng;
    rng_seed(&rng, (uint64_t)(uint32_t)o.seed);
    TrainParams tp;
    if (o.resume) {
        CHECK(train_load(&tp, &r.sd, o.resume, &rng) == 0, "%s", error_last());
        CHECK(tp.ntok == ntok, "%s holds %d token(s) but the options ask for %d", o.resume, tp.ntok, ntok);
        fprintf(stderr, "resuming from %s at step %d\n", o.resume, tp.step);
    } else {
        train_params_init(&tp, &r.sd, strcmp(o.mode, "kv") == 0 ? TRAIN_KV : TRAIN_LORA, ntok, init, o.rank,
                          o.alpha > 0 ? o.alpha : (float)o.rank, &rng);
    }
    train_attach(&tp, &r.sd);
    refine_loop(&r, &tp, &ts, latents, &o, &rng, ckpt);
    refine_outputs(&tp, &o, &rng, model_name(&r));
    train_detach(&tp, &r.sd);
    train_params_free(&tp);
    for (int i = 0; i < ts.n; i++) { free(ts.items[i].path); free(ts.items[i].object); }
    free(ts.items);
    free(latents);
    run_free(&r);
    return 0;
}

// ----------------------------------------------------------------------------------------------
// bench: full-size SD 1.5 with random weights. Each stage runs in a child process that builds
// only the weights it needs, so its peak RSS is its own. FLOPs are counted by sgemm (every
// matmul, convolution and attention product goes through it: 2·M·N·K each). The model stages
// are timed after one untimed call (sampling calls the UNet 50 times, training steps hundreds of
// times; the first call also pays the arena's first page faults); the generate-equivalent row is
// one cold pass of what 'generate --steps 1' runs, for its peak RSS.

typedef struct BenchResult { double seconds, gflop; long rss_kb; int ok; } BenchResult;
typedef void (*BenchFn)(int threads, int size, BenchResult* out);
static int g_bench_f16;      // SD_F16 when --weights fp16
static const char* g_bench_device;   // --device (selected in each child: a CUDA context does not survive fork)

// Runs fn(ctx) for at least a second (and 5 calls) after one warm-up call and reports the median
// call: the machine may be shared, and a median ignores the calls another process interrupted
// (the FMA probe reports its best run, so this is the conservative side).
static int cmp_double(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}
static void bench_repeat(void (*fn)(void* ctx), void* ctx, BenchResult* out) {
    enum { MAX_CALLS = 4096 };
    static double secs[MAX_CALLS];
    fn(ctx);                                   // warm-up: pack buffers, pages
    double flop0 = sgemm_flop_count(), start = time_now();
    int calls = 0;
    while (calls < MAX_CALLS && (calls < 5 || time_now() - start < 1.0)) {
        double t = time_now();
        fn(ctx);
        secs[calls++] = time_now() - t;
    }
    qsort(secs, (size_t)calls, sizeof *secs, cmp_double);
    out->seconds = calls % 2 ? secs[calls / 2] : 0.5 * (secs[calls / 2 - 1] + secs[calls / 2]);
    out->gflop = (sgemm_flop_count() - flop0) / calls / 1e9;
}

typedef struct GemmRun { int M, N, K, transB; const float *A, *B; float* C; } GemmRun;
static void gemm_run(void* ctx) {
    const GemmRun* g = ctx;
    sgemm(0, g->transB, g->M, g->N, g->K, 1.0f, g->A, g->K, g->B, g->transB ? g->K : g->N, 0.0f, g->C, g->N);
}

static void bench_gemm_shape(int M, int N, int K, int transB, BenchResult* out) {
    float* A = xmalloc_large((size_t)M * K * sizeof(float));
    float* B = xmalloc_large((size_t)K * N * sizeof(float));
    float* C = xmalloc_large((size_t)M * N * sizeof(float));
    Rng rng;
    rng_seed(&rng, 1);
    rng_normal(&rng, A, (size_t)M * K);
    rng_normal(&rng, B, (size_t)K * N);
    GemmRun run = {M, N, K, transB, A, B, C};
    bench_repeat(gemm_run, &run, out);
    free(A); free(B); free(C);
}

static Arena bench_arena(void) { Arena a; arena_init(&a, (size_t)1 << 30); return a; }

// The model stages: each runs once untimed, then once timed.
typedef struct BenchModel {
    StableDiffusion sd;
    Arena a;
    int N, h, w, size;
    int ids[2 * CLIP_MAX_LENGTH];
    float *hidden, *x, *eps, *ctx, *img, *lat;
} BenchModel;

static void bench_model_init(BenchModel* m, int components, int size) {
    sd_build_random(&m->sd, components | g_bench_f16, 1);
    m->a = bench_arena();
    m->N = 2;
    m->size = size;
    m->h = m->w = size / 8;
    for (int i = 0; i < 2 * CLIP_MAX_LENGTH; i++) m->ids[i] = (i * 7919) % m->sd.clip.cfg.vocab_size;
    size_t lat = (size_t)m->N * m->sd.unet.cfg.in_channels * m->h * m->w;
    size_t nctx = (size_t)m->N * CLIP_MAX_LENGTH * m->sd.unet.cfg.cross_dim;
    m->hidden = xmalloc((size_t)m->N * CLIP_MAX_LENGTH * m->sd.clip.cfg.hidden * sizeof(float));
    m->ctx = xmalloc(nctx * sizeof(float));
    m->x = xmalloc(lat * sizeof(float));
    m->eps = xmalloc(lat * sizeof(float));
    m->lat = xmalloc(lat * sizeof(float));
    m->img = xmalloc((size_t)m->N * 3 * size * size * sizeof(float));
    Rng rng;
    rng_seed(&rng, 3);
    rng_normal(&rng, m->x, lat);
    rng_normal(&rng, m->lat, lat);
    rng_normal(&rng, m->ctx, nctx);
    rng_normal(&rng, m->img, (size_t)3 * size * size);
}

static void bench_model_free(BenchModel* m) {
    free(m->hidden); free(m->ctx); free(m->x); free(m->eps); free(m->lat); free(m->img);
    arena_free(&m->a);
    sd_free(&m->sd);
}

enum { RUN_CLIP = 1, RUN_UNET = 2, RUN_DECODE = 4, RUN_ENCODE = 8 };
static void bench_model_run(BenchModel* m, int what) {
    float t[2] = {981, 981};
    if (what & RUN_CLIP) clip_forward(&m->sd.clip, m->hidden, m->ids, m->N, CLIP_MAX_LENGTH, &m->a);
    if (what & RUN_UNET) unet_forward(&m->sd.unet, m->eps, m->x, t, m->ctx, m->N, m->h, m->w, CLIP_MAX_LENGTH, &m->a);
    if (what & RUN_DECODE) vae_decode(&m->sd.vae, m->img, m->lat, 1, m->h, m->w, &m->a);
    if (what & RUN_ENCODE) vae_encode(&m->sd.vae, m->lat, NULL, m->img, 1, m->size, m->size, &m->a);
}

static void bench_model(int components, int what, int warm, int size, BenchResult* out) {
    BenchModel m;
    bench_model_init(&m, components, size);
    if (warm) bench_model_run(&m, what);
    double f0 = sgemm_flop_count(), t0 = time_now();
    bench_model_run(&m, what);
    out->seconds = time_now() - t0;
    out->gflop = (sgemm_flop_count() - f0) / 1e9;
    bench_model_free(&m);
}

static void bench_clip(int threads, int size, BenchResult* out) { (void)threads; bench_model(SD_TEXT, RUN_CLIP, 1, size, out); }
static void bench_unet(int threads, int size, BenchResult* out) { (void)threads; bench_model(SD_UNET, RUN_UNET, 1, size, out); }
static void bench_vae_decode(int threads, int size, BenchResult* out) { (void)threads; bench_model(SD_VAE, RUN_DECODE, 1, size, out); }
static void bench_vae_encode(int threads, int size, BenchResult* out) { (void)threads; bench_model(SD_VAE, RUN_ENCODE, 1, size, out); }
// CLIP for 2 prompts + one CFG UNet call + one decode, cold, with fp16 weights: generate's peak RSS.
static void bench_generate(int threads, int size, BenchResult* out) {
    (void)threads;
    int f16 = g_bench_f16;
    g_bench_f16 = SD_F16;
    bench_model(SD_TEXT | SD_UNET | SD_VAE, RUN_CLIP | RUN_UNET | RUN_DECODE, 0, size, out);
    g_bench_f16 = f16;
}

static void bench_train(int threads, int size, BenchResult* out) {
    (void)threads;
    double f0 = sgemm_flop_count();
    out->seconds = train_bench_step(size, 1, g_bench_f16);
    out->gflop = (sgemm_flop_count() - f0) / 1e9 / 2;     // a warm-up step, then the timed one
    out->ok = out->seconds > 0;
}

// Runs fn in a child process; returns its result with the child's peak RSS.
static BenchResult bench_in_child(BenchFn fn, int threads, int size) {
    BenchResult r = {0, 0, 0, 0};
    int fd[2];
    CHECK(pipe(fd) == 0, "pipe: %s", strerror(errno));
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        close(fd[0]);
        threads_init(threads);
        device_select(g_bench_device);
        BenchResult c = {0, 0, 0, 1};
        fn(threads, size, &c);
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        c.rss_kb = ru.ru_maxrss;
        ssize_t wr = write(fd[1], &c, sizeof c);
        _exit(wr == (ssize_t)sizeof c ? 0 : 1);
    }
    close(fd[1]);
    ssize_t got = read(fd[0], &r, sizeof r);
    close(fd[0]);
    int status;
    waitpid(pid, &status, 0);
    if (got != (ssize_t)sizeof r || !WIFEXITED(status) || WEXITSTATUS(status) != 0) r.ok = 0;
    return r;
}

static void bench_row(const char* name, int threads, BenchResult r, double peak) {
    if (!r.ok) { printf("%-40s %3d  (not available in this build)\n", name, threads); return; }
    double gfs = r.gflop / r.seconds;
    printf("%-40s %3d  %8.3f  %9.1f  %8.1f  %5.1f%%  %8.0f\n", name, threads, r.seconds, r.gflop, gfs,
           100.0 * gfs / peak, r.rss_kb / 1024.0);
    fflush(stdout);
}

typedef struct GemmCase { const char* name; int M, N, K, transB; } GemmCase;
static const GemmCase GEMM_CASES[] = {
    {"gemm linear 8192x320x320", 8192, 320, 320, 1},     {"gemm geglu 8192x2560x320", 8192, 2560, 320, 1},
    {"gemm ff-out 8192x320x1280", 8192, 320, 1280, 1},   {"gemm linear 2048x640x640", 2048, 640, 640, 1},
    {"gemm linear 512x1280x1280", 512, 1280, 1280, 1},   {"gemm conv 320x4096x2880", 320, 4096, 2880, 0},
    {"gemm conv 640x1024x5760", 640, 1024, 5760, 0},     {"gemm conv 1280x256x11520", 1280, 256, 11520, 0},
    {"gemm vae-conv 128x65536x1152", 128, 65536, 1152, 0}, {"gemm vae-conv 512x16384x4608", 512, 16384, 4608, 0},
    {"gemm attn QK 4096x4096x40", 4096, 4096, 40, 1},    {"gemm attn PV 4096x40x4096", 4096, 40, 4096, 0},
};

// The same convolution shapes as the program runs them: implicit GEMM straight from the image
// (conv2d_forward, 3×3, stride 1, padding 1, batch 1), no im2col matrix in memory.
typedef struct ConvCase { const char* name; int C, OC, HW; } ConvCase;
static const ConvCase CONV_CASES[] = {
    {"conv3x3 320->320 64x64 (implicit)", 320, 320, 64},      {"conv3x3 640->640 32x32 (implicit)", 640, 640, 32},
    {"conv3x3 1280->1280 16x16 (implicit)", 1280, 1280, 16},  {"conv3x3 128->128 512x512 (implicit)", 128, 128, 512},
    {"conv3x3 512->512 128x128 (implicit)", 512, 512, 128},
};

static int g_gemm_case, g_conv_case;
static void bench_gemm(int threads, int size, BenchResult* out) {
    (void)threads; (void)size;
    const GemmCase* g = &GEMM_CASES[g_gemm_case];
    bench_gemm_shape(g->M, g->N, g->K, g->transB, out);
}

typedef struct ConvRun { const ConvCase* c; const float *x, *w, *b; float* y; } ConvRun;
static void conv_run(void* ctx) {
    const ConvRun* r = ctx;
    conv2d_forward(r->y, r->x, r->w, r->b, 1, r->c->C, r->c->HW, r->c->HW, r->c->OC, 3, 1, 1, 1, NULL);
}

static void bench_conv(int threads, int size, BenchResult* out) {
    (void)threads; (void)size;
    const ConvCase* c = &CONV_CASES[g_conv_case];
    size_t nx = (size_t)c->C * c->HW * c->HW, nw = (size_t)c->OC * c->C * 9, ny = (size_t)c->OC * c->HW * c->HW;
    float *x = xmalloc_large(nx * sizeof(float)), *w = xmalloc_large(nw * sizeof(float)), *b = xmalloc(c->OC * sizeof(float));
    float* y = xmalloc_large(ny * sizeof(float));
    Rng rng;
    rng_seed(&rng, 1);
    rng_normal(&rng, x, nx); rng_normal(&rng, w, nw); rng_normal(&rng, b, (size_t)c->OC);
    ConvRun run = {c, x, w, b, y};
    bench_repeat(conv_run, &run, out);
    free(x); free(w); free(b); free(y);
}
// The UNet's largest attention (level 0 at 64×64 latents: 4096 tokens, 8 heads of 40), batch 2,
// forward or (batch 1, as in training) backward; FLOPs as sgemm counts them (forward 2 products,
// backward 7: S and dP are recomputed once per pass).
static int g_attn_backward;
typedef struct AttnRun { float *q, *k, *v, *o, *d, *lse, *dq, *dk, *dv; int N, T, NH, HD, C; Arena* a; } AttnRun;
static void attention_run(void* ctx) {
    const AttnRun* r = ctx;
    int C = r->C;
    if (g_attn_backward)
        attention_backward(r->dq, r->dk, r->dv, r->d, r->o, r->lse, r->q, r->k, r->v, r->N, r->T, r->T, r->NH, r->HD, C, C, C, C, 0, r->a);
    else
        attention_forward(r->o, r->lse, r->q, r->k, r->v, r->N, r->T, r->T, r->NH, r->HD, C, C, C, C, 0, r->a);
}

static void bench_attention(int threads, int size, BenchResult* out) {
    (void)threads;
    int N = g_attn_backward ? 1 : 2, T = (size / 8) * (size / 8), NH = 8, HD = 40, C = NH * HD;
    size_t n = (size_t)N * T * C;
    float *q = xmalloc(n * sizeof(float)), *k = xmalloc(n * sizeof(float)), *v = xmalloc(n * sizeof(float));
    float *o = xmalloc(n * sizeof(float)), *d = xmalloc(n * sizeof(float)), *lse = xmalloc((size_t)N * NH * T * sizeof(float));
    float *dq = xcalloc(n, sizeof(float)), *dk = xcalloc(n, sizeof(float)), *dv = xcalloc(n, sizeof(float));
    Rng rng;
    rng_seed(&rng, 1);
    rng_normal(&rng, q, n); rng_normal(&rng, k, n); rng_normal(&rng, v, n); rng_normal(&rng, d, n);
    Arena a = bench_arena();
    attention_forward(o, lse, q, k, v, N, T, T, NH, HD, C, C, C, C, 0, &a);   // the backward's o and lse
    AttnRun run = {q, k, v, o, d, lse, dq, dk, dv, N, T, NH, HD, C, &a};
    bench_repeat(attention_run, &run, out);
    free(q); free(k); free(v); free(o); free(d); free(lse); free(dq); free(dk); free(dv);
    arena_free(&a);
}

static void bench_peak(int threads, int size, BenchResult* out) {
    (void)size;
    if (g_device == DEVICE_CUDA) {
        printf("device: %s, GEMM arithmetic %s\n", cuda_device_name(), cuda_gemm_mode());
        fflush(stdout);
        out->gflop = cuda_peak_gflops();
    } else
        out->gflop = cpu_peak_gflops(threads);
    out->seconds = 1.0;
}

int cmd_bench(int argc, char** argv) {
    int threads = 0, size = 512;
    const char* only = "gemm,conv,attention,clip,unet,vae,train,generate";
    const char* weights = NULL;
    Opt opts[] = {{"--threads", OPT_INT, &threads, "worker threads, 0 = all cores"},
                  {"--device", OPT_STR, &g_bench_device, "cpu or cuda (make CUDA=1); default $INSTASTYLE_DEVICE, else cpu"},
                  {"--size", OPT_INT, &size, "image size for UNet/VAE/training (latents size/8)"},
                  {"--weights", OPT_STR, &weights, "fp16: frozen linear/conv weights in fp16; fp32 if unset"},
                  {"--only", OPT_STR, &only, "comma-separated stages: gemm,conv,attention,clip,unet,vae,train,generate"}};
    parse_opts(argc, argv, "bench", "Time full-size SD 1.5 (random weights, built in memory) and report seconds,\n"
               "GFLOP (counted by sgemm), GFLOP/s, % of this machine's FP32 peak (FMA probe), peak RSS.", opts, NOPTS(opts));
    CHECK(size >= 64 && size <= 2048 && size % 64 == 0, "--size must be a multiple of 64 in [64, 2048]");
    g_bench_f16 = weights_flag(weights);
    if (threads <= 0) threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    BenchResult pk = bench_in_child(bench_peak, threads, size);
    CHECK(pk.ok, "bench: the peak probe failed on this device (see the message above)");
    double peak = pk.gflop;
    const char* dev = g_bench_device ? g_bench_device : getenv("INSTASTYLE_DEVICE");
    int on_gpu = dev && strcmp(dev, "cuda") == 0;
    printf("instastyle bench: %d thread(s), %s, %s weights, %s FP32 peak by FMA probe %.1f GFLOP/s\n", threads,
           on_gpu ? "CUDA kernels" : sgemm_kernel_name(), g_bench_f16 ? "fp16" : "fp32", on_gpu ? "GPU" : "CPU", peak);
    printf("%-40s %3s  %8s  %9s  %8s  %6s  %8s\n", "stage", "thr", "seconds", "GFLOP", "GFLOP/s", "peak", "RSS MiB");
    char name[64];
    if (strstr(only, "gemm"))
        for (g_gemm_case = 0; g_gemm_case < (int)(sizeof GEMM_CASES / sizeof *GEMM_CASES); g_gemm_case++)
            bench_row(GEMM_CASES[g_gemm_case].name, threads, bench_in_child(bench_gemm, threads, size), peak);
    if (strstr(only, "conv"))
        for (g_conv_case = 0; g_conv_case < (int)(sizeof CONV_CASES / sizeof *CONV_CASES); g_conv_case++)
            bench_row(CONV_CASES[g_conv_case].name, threads, bench_in_child(bench_conv, threads, size), peak);
    if (strstr(only, "attention"))
        for (g_attn_backward = 0; g_attn_backward < 2; g_attn_backward++) {
            snprintf(name, sizeof name, "attention %s %dx8x%dx40 (flash)", g_attn_backward ? "bwd" : "fwd", 2 - g_attn_backward,
                     (size / 8) * (size / 8));
            bench_row(name, threads, bench_in_child(bench_attention, threads, size), peak);
        }
    if (strstr(only, "clip")) bench_row("clip text encoder 2x77", threads, bench_in_child(bench_clip, threads, size), peak);
    if (strstr(only, "unet")) {
        snprintf(name, sizeof name, "unet batch 2, %dx%d latents", size / 8, size / 8);
        bench_row(name, threads, bench_in_child(bench_unet, threads, size), peak);
    }
    if (strstr(only, "vae")) {
        snprintf(name, sizeof name, "vae encode %dx%d", size, size);
        bench_row(name, threads, bench_in_child(bench_vae_encode, threads, size), peak);
        snprintf(name, sizeof name, "vae decode %dx%d", size, size);
        bench_row(name, threads, bench_in_child(bench_vae_decode, threads, size), peak);
    }
    if (strstr(only, "train")) {
        int sizes[2] = {256, size};
        for (int i = size == 256 ? 1 : 0; i < 2; i++) {
            snprintf(name, sizeof name, "train step (LoRA) %dx%d batch 1", sizes[i], sizes[i]);
            bench_row(name, threads, bench_in_child(bench_train, threads, sizes[i]), peak);
        }
    }
    if (strstr(only, "generate")) {
        snprintf(name, sizeof name, "generate %dx%d, 1 step, fp16 weights", size, size);
        bench_row(name, threads, bench_in_child(bench_generate, threads, size), peak);
    }
    return 0;
}

// ----------------------------------------------------------------------------------------------
// main

typedef struct Command { const char* name; int (*fn)(int, char**); const char* help; } Command;


static const Command COMMANDS[] = {
    {"info", cmd_info, "model summary: components, configs, parameter counts, dtypes"},
    {"tokenize", cmd_tokenize, "print the CLIP token ids of a prompt"},
    {"invert", cmd_invert, "style image -> inversion noise z_T (DDIM inversion)"},
    {"candidates", cmd_candidates, "stage 1: M stylised objects + numbered contact sheet"},
    {"refine", cmd_refine, "stage 2: learn <style1> + LoRA from the picked candidates"},
    {"generate", cmd_generate, "inversion noise or seed -> images (CFG DDIM sampling)"},
    {"mix", cmd_mix, "two styles: noise mask mixing + composed guidance"},
    {"snr", cmd_snr, "SNR curve of DDIM-inversion noise (paper eq. 8)"},
    {"bench", cmd_bench, "full-size SD 1.5 with random weights: time, GFLOP/s, % of peak, RSS"},
};

static void usage(FILE* f) {
    fprintf(f, "instastyle: InstaStyle (ECCV 2024) on Stable Diffusion 1.5, in plain C\n\n"
               "usage: instastyle <command> [options]   (instastyle <command> --help for its options)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof COMMANDS / sizeof *COMMANDS; i++) fprintf(f, "  %-11s %s\n", COMMANDS[i].name, COMMANDS[i].help);
    fprintf(f, "\ncommon options: --model PATH (diffusers folder or single-file .safetensors), --tokenizer DIR,\n"
               "  --config DIR, --weights fp16 (half the memory), --threads N [0 = all cores], --device cpu|cuda, -v\n"
               "  (--model random:sd15 --tokenizer DIR: full-size SD 1.5 with random weights, for timing and memory)\n"
#ifdef USE_CUDA
               "devices in this build: cpu, cuda\n"
#else
               "devices in this build: cpu (cuda: rebuild with make CUDA=1)\n"
#endif
               "\nthe method: invert -> candidates -> (pick) -> refine -> invert/generate with --trained; mix for two styles\n");
}

int main(int argc, char** argv) {
    if (argc < 2) { usage(stdout); return 0; }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) { usage(stdout); return 0; }
    for (size_t i = 0; i < sizeof COMMANDS / sizeof *COMMANDS; i++)
        if (strcmp(argv[1], COMMANDS[i].name) == 0) return COMMANDS[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "error: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
