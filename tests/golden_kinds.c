// golden_kinds.c: one function per golden kind. Each reads the case's inputs and params, runs
// instastyle's own code on the case's model, and returns named outputs (without the "out."
// prefix) for run_golden.c to compare.
#include "golden.h"

#include <stdlib.h>
#include <string.h>

static Arena g_scratch;

static Arena* scratch(void) {
    if (!g_scratch.chunk_size) arena_init(&g_scratch, (size_t)64 << 20);
    return &g_scratch;
}

int kind_tokenizer(Case* c, Outputs* o) {
    StableDiffusion* sd = case_model(c);
    case_added_tokens(c, sd);
    const Json* prompts = json_get(c->params, "prompts");
    CHECK(prompts && prompts->type == JSON_ARRAY, "%s: params.prompts missing", c->path);
    int N = prompts->count, T = (int)param_number(c, "max_length", CLIP_MAX_LENGTH);
    float* ids = xmalloc((size_t)N * T * sizeof(float));
    int* row = xmalloc((size_t)T * sizeof(int));
    for (int i = 0; i < N; i++) {
        CHECK(tokenizer_encode(sd->tok, prompts->items[i].string, row, T) >= 0, "%s: prompt %d: %s", c->path, i, error_last());
        for (int t = 0; t < T; t++) ids[(size_t)i * T + t] = (float)row[t];
    }
    out_add4(o, "ids", ids, N, T, -1, -1);
    free(ids);
    free(row);
    return 0;
}

// Added-token rows (in.added_embeddings [K, H]) are appended to the embedding table.
static void attach_added(Case* c, StableDiffusion* sd) {
    sd->clip.added = NULL;
    sd->clip.n_added = 0;
    if (case_has(c, "in.added_embeddings")) {
        Tensor t;
        sd->clip.added = case_input(c, "in.added_embeddings", &t);
        CHECK(t.ndim == 2 && t.shape[1] == sd->clip.cfg.hidden, "%s: added_embeddings must be [K, %d]", c->path, sd->clip.cfg.hidden);
        sd->clip.n_added = t.shape[0];
    }
}

int kind_text_encoder(Case* c, Outputs* o) {
    StableDiffusion* sd = case_model(c);
    attach_added(c, sd);
    Tensor t;
    const float* fid = case_input(c, "in.ids", &t);
    int N = t.shape[0], T = t.shape[1], H = sd->clip.cfg.hidden;
    int* ids = xmalloc((size_t)N * T * sizeof(int));
    for (int i = 0; i < N * T; i++) ids[i] = (int)fid[i];
    float* hidden = xmalloc((size_t)N * T * H * sizeof(float));
    clip_forward(&sd->clip, hidden, ids, N, T, scratch());
    out_add4(o, "hidden", hidden, N, T, H, -1);
    free(ids);
    free(hidden);
    return 0;
}

int kind_vae_encode(Case* c, Outputs* o) {
    StableDiffusion* sd = case_model(c);
    Tensor t;
    const float* img = case_input(c, "in.image", &t);
    int N = t.shape[0], H = t.shape[2], W = t.shape[3], f = vae_down_factor(&sd->vae), L = sd->vae.cfg.latent_channels;
    int h = H, w = W;
    for (int i = 1; i < sd->vae.cfg.levels; i++) { h = (h - 2) / 2 + 1; w = (w - 2) / 2 + 1; }
    (void)f;
    size_t n = (size_t)N * L * h * w;
    float* mean = xmalloc(n * sizeof(float));
    float* logvar = xmalloc(n * sizeof(float));
    vae_encode(&sd->vae, mean, logvar, img, N, H, W, scratch());
    out_add4(o, "mean", mean, N, L, h, w);
    out_add4(o, "logvar", logvar, N, L, h, w);
    for (size_t i = 0; i < n; i++) mean[i] *= sd->vae.cfg.scaling_factor;
    out_add4(o, "latent", mean, N, L, h, w);
    free(mean);
    free(logvar);
    return 0;
}

int kind_vae_decode(Case* c, Outputs* o) {
    StableDiffusion* sd = case_model(c);
    Tensor t;
    const float* lat = case_input(c, "in.latent", &t);
    int N = t.shape[0], h = t.shape[2], w = t.shape[3], f = vae_down_factor(&sd->vae);
    float* img = xmalloc((size_t)N * 3 * h * f * w * f * sizeof(float));
    vae_decode(&sd->vae, img, lat, N, h, w, scratch());
    out_add4(o, "image", img, N, sd->vae.cfg.out_channels, h * f, w * f);
    free(img);
    return 0;
}

static void unet_tap(void* ctx, const char* name, const float* x, int N, int C, int H, int W) {
    char full[128];
    snprintf(full, sizeof full, "debug.%s", name);
    if (H == 1 && W == 1 && (strcmp(name, "time_proj") == 0 || strcmp(name, "time_emb") == 0))
        out_add4((Outputs*)ctx, full, x, N, C, -1, -1);
    else
        out_add4((Outputs*)ctx, full, x, N, C, H, W);
}

int kind_unet(Case* c, Outputs* o) {
    StableDiffusion* sd = case_model(c);
    Tensor ts, tc;
    const float* x = case_input(c, "in.sample", &ts);
    const float* t = case_input(c, "in.timestep", NULL);
    const float* ctx = case_input(c, "in.context", &tc);
    int N = ts.shape[0], C = ts.shape[1], H = ts.shape[2], W = ts.shape[3];
    float* eps = xmalloc((size_t)N * sd->unet.cfg.out_channels * H * W * sizeof(float));
    sd->unet.tap = unet_tap;
    sd->unet.tap_ctx = o;
    unet_forward(&sd->unet, eps, x, t, ctx, N, H, W, tc.shape[1], scratch());
    sd->unet.tap = NULL;
    out_add4(o, "eps", eps, N, sd->unet.cfg.out_channels, H, W);
    (void)C;
    free(eps);
    return 0;
}

static Schedule case_schedule(Case* c, int steps) {
    SchedulerConfig cfg;
    sd_default_configs(NULL, NULL, NULL, &cfg);
    if (c->model[0]) cfg = case_model(c)->sched;
    Schedule s;
    schedule_init(&s, &cfg, steps);
    return s;
}

int kind_ddim_schedule(Case* c, Outputs* o) {
    int S = (int)param_number(c, "num_inference_steps", 50);
    Schedule s = case_schedule(c, S);
    float* ts = xmalloc((size_t)S * sizeof(float));
    for (int i = 0; i < S; i++) ts[i] = (float)s.timesteps[i];
    out_add4(o, "timesteps", ts, S, -1, -1, -1);
    out_add4(o, "alphas_cumprod", s.alphas_cumprod, s.train_steps, -1, -1, -1);
    out_add4(o, "final_alpha_cumprod", &s.final_alpha, 1, -1, -1, -1);
    free(ts);
    schedule_free(&s);
    return 0;
}

int kind_snr(Case* c, Outputs* o) {
    Schedule s = case_schedule(c, 1);
    int n = s.train_steps - 1;
    double* snr = xmalloc((size_t)n * sizeof(double));
    float* f = xmalloc((size_t)n * sizeof(float));
    snr_curve(&s, snr);
    for (int i = 0; i < n; i++) f[i] = (float)snr[i];
    out_add4(o, "snr", f, n, -1, -1, -1);
    free(snr);
    free(f);
    schedule_free(&s);
    return 0;
}

int kind_ddim_step(Case* c, Outputs* o) {
    Tensor t;
    const float* x = case_input(c, "in.sample", &t);
    const float* eps = case_input(c, "in.eps", NULL);
    int ts = (int)param_number(c, "timestep", -1), S = (int)param_number(c, "num_inference_steps", 50);
    CHECK(ts >= 0, "%s: params.timestep missing", c->path);
    Schedule s = case_schedule(c, S);
    size_t n = tensor_numel(&t);
    float* out = xmalloc(n * sizeof(float));
    ddim_step(&s, out, x, eps, ts, n);
    out_add(o, "prev_sample", out, t.ndim, t.shape);
    ddim_inverse_step(&s, out, x, eps, ts, n);
    out_add(o, "next_sample", out, t.ndim, t.shape);
    free(out);
    schedule_free(&s);
    return 0;
}

int kind_invert(Case* c, Outputs* o) {
    StableDiffusion* sd = case_model(c);
    attach_added(c, sd);
    case_added_tokens(c, sd);
    Tensor t;
    const float* img = case_input(c, "in.image", &t);
    int H = t.shape[2], W = t.shape[3], f = vae_down_factor(&sd->vae), h = H / f, w = W / f, L = sd->vae.cfg.latent_channels;
    int S = (int)param_number(c, "steps", 50), D = sd->unet.cfg.cross_dim;
    const char* prompt = param_string(c, "prompt", "");
    Schedule s = case_schedule(c, S);
    size_t n = (size_t)L * h * w;
    float* z = xmalloc(n * sizeof(float));
    float* latents = xmalloc((S + 1) * n * sizeof(float));
    float* cond = xmalloc((size_t)CLIP_MAX_LENGTH * D * sizeof(float));
    vae_encode(&sd->vae, z, NULL, img, 1, H, W, scratch());
    for (size_t i = 0; i < n; i++) z[i] *= sd->vae.cfg.scaling_factor;
    out_add4(o, "latent0", z, 1, L, h, w);
    sd_encode_prompts(sd, &prompt, 1, cond, scratch());
    ddim_invert(&sd->unet, &s, z, latents, cond, CLIP_MAX_LENGTH, h, w, S, NULL, NULL, scratch());
    out_add4(o, "latents", latents, S + 1, L, h, w);
    free(z); free(latents); free(cond);
    schedule_free(&s);
    return 0;
}

// Shared by sample and mix_sample: K prompts (the first unconditional), guidance g[K].
static void run_sample(Case* c, Outputs* o, StableDiffusion* sd, const float* noise, int h, int w,
                       const char* const* prompts, int K, const float* g) {
    int S = (int)param_number(c, "steps", 50), D = sd->unet.cfg.cross_dim, L = sd->unet.cfg.in_channels;
    int f = vae_down_factor(&sd->vae);
    Schedule s = case_schedule(c, S);
    size_t n = (size_t)L * h * w;
    float* ctx = xmalloc((size_t)K * CLIP_MAX_LENGTH * D * sizeof(float));
    float* z = xmalloc(n * sizeof(float));
    float* latents = xmalloc((S + 1) * n * sizeof(float));
    float* img = xmalloc((size_t)3 * h * f * w * f * sizeof(float));
    sd_encode_prompts(sd, prompts, K, ctx, scratch());
    memcpy(z, noise, n * sizeof(float));
    ddim_sample(&sd->unet, &s, z, latents, ctx, K, g, CLIP_MAX_LENGTH, h, w, 0, NULL, NULL, scratch());
    out_add4(o, "latents", latents, S + 1, L, h, w);
    vae_decode(&sd->vae, img, z, 1, h, w, scratch());
    out_add4(o, "image", img, 1, sd->vae.cfg.out_channels, h * f, w * f);
    free(ctx); free(z); free(latents); free(img);
    schedule_free(&s);
}

int kind_sample(Case* c, Outputs* o) {
    StableDiffusion* sd = case_model(c);
    attach_added(c, sd);
    case_added_tokens(c, sd);
    Tensor t;
    const float* noise = case_input(c, "in.noise", &t);
    const char* prompts[2] = {param_string(c, "negative_prompt", ""), param_string(c, "prompt", "")};
    float g[2] = {0, (float)param_number(c, "guidance_scale", 7.5)};
    run_sample(c, o, sd, noise, t.shape[2], t.shape[3], prompts, 2, g);
    return 0;
}

int kind_mix_sample(Case* c, Outputs* o) {
    StableDiffusion* sd = case_model(c);
    attach_added(c, sd);
    case_added_tokens(c, sd);
    Tensor t;
    const float* n1 = case_input(c, "in.noise1", &t);
    const float* n2 = case_input(c, "in.noise2", NULL);
    const float* mask = case_input(c, "in.mask", NULL);
    int C = t.shape[1], h = t.shape[2], w = t.shape[3];
    float* noise = xmalloc((size_t)C * h * w * sizeof(float));
    noise_mix(noise, n1, n2, mask, C, h, w);
    out_add4(o, "noise", noise, 1, C, h, w);
    const char* prompts[3] = {param_string(c, "negative_prompt", ""), param_string(c, "prompt1", ""), param_string(c, "prompt2", "")};
    double wg = param_number(c, "guidance_scale", 7.5), beta = param_number(c, "beta", 0.5);
    float g[3] = {0, (float)(wg * (1 - beta)), (float)(wg * beta)};
    run_sample(c, o, sd, noise, h, w, prompts, 3, g);
    free(noise);
    return 0;
}

int kind_lora_grad(Case* c, Outputs* o) { (void)c; (void)o; return KIND_NOT_IMPLEMENTED; }
int kind_kv_grad(Case* c, Outputs* o) { (void)c; (void)o; return KIND_NOT_IMPLEMENTED; }
int kind_adamw_step(Case* c, Outputs* o) { (void)c; (void)o; return KIND_NOT_IMPLEMENTED; }
