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
    int N = t.shape[0], H = t.shape[2], W = t.shape[3], L = sd->vae.cfg.latent_channels;
    int h = H, w = W;
    for (int i = 1; i < sd->vae.cfg.levels; i++) { h = (h - 2) / 2 + 1; w = (w - 2) / 2 + 1; }
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
    int N = ts.shape[0], H = ts.shape[2], W = ts.shape[3];
    float* eps = xmalloc((size_t)N * sd->unet.cfg.out_channels * H * W * sizeof(float));
    sd->unet.tap = unet_tap;
    sd->unet.tap_ctx = o;
    unet_forward(&sd->unet, eps, x, t, ctx, N, H, W, tc.shape[1], scratch());
    sd->unet.tap = NULL;
    out_add4(o, "eps", eps, N, sd->unet.cfg.out_channels, H, W);
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

// lora_grad / kv_grad: one training step's loss and gradients (lora.c's train_step). Trained:
// the row of params.token (in.token_embedding) and LoRA A, B (in.lora.<path>.to_k.A ...) or the
// full to_k / to_v weights of every attn2. Batch size, timesteps, mask and prompts come from the case.
static int grad_case(Case* c, Outputs* o, TrainMode mode) {
    static Arena saved;
    if (!saved.chunk_size) arena_init(&saved, (size_t)64 << 20);
    StableDiffusion* sd = case_model(c);
    Tensor tl, tt;
    const float* latent0 = case_input(c, "in.latent0", &tl);
    const float* noise = case_input(c, "in.noise", NULL);
    const float* tsf = case_input(c, "in.timestep", &tt);
    const float* mask = case_has(c, "in.mask") ? case_input(c, "in.mask", NULL) : NULL;
    int N = tl.shape[0], h = tl.shape[2], w = tl.shape[3], H = sd->clip.cfg.hidden, T = CLIP_MAX_LENGTH;
    CHECK(tt.shape[0] == N, "%s: %d timesteps for a batch of %d", c->path, tt.shape[0], N);
    const Json* a = json_get(c->params, "masked");
    CHECK(!a || (a->number != 0) == (mask != NULL), "%s: params.masked disagrees with in.mask", c->path);
    int rank = 0;
    char name[320];
    TrainParams tp;
    if (mode == TRAIN_LORA) {   // the rank is the A's first dimension
        Attention* at[1];
        char path[1][128];
        unet_cross_attentions(&sd->unet, at, path, 1);
        Tensor ta;
        snprintf(name, sizeof name, "in.lora.%s.to_k.A", path[0]);
        case_input(c, name, &ta);
        rank = ta.shape[0];
    }
    // LoRA scale: params.scale, or params.alpha / rank (diffusers' network_alpha), or 1
    double alpha = json_get(c->params, "scale") ? param_number(c, "scale", 1) * rank : param_number(c, "alpha", rank);
    Tensor te;   // [H] for one token, [K, H] for K
    const float* emb = case_input(c, "in.token_embedding", &te);
    int K = te.ndim == 2 ? te.shape[0] : 1;
    train_params_init(&tp, sd, mode, K, NULL, rank, (float)alpha, NULL);
    const Json* names = json_get(c->params, "tokens");
    for (int k = 0; k < K; k++)
        if (names && names->type == JSON_ARRAY && k < names->count && names->items[k].type == JSON_STRING)
            snprintf(tp.tokens[k], sizeof tp.tokens[k], "%s", names->items[k].string);
        else if (K == 1)
            snprintf(tp.tokens[k], sizeof tp.tokens[k], "%s", param_string(c, "token", "<style1>"));
    memcpy(tp.tok, emb, (size_t)K * H * sizeof(float));
    for (int l = 0; l < tp.nlayers && mode == TRAIN_LORA; l++)
        for (int kv = 0; kv < 2; kv++) {
            LoraPair* lp = &tp.lora[2 * l + kv];
            const char* which = kv ? "to_v" : "to_k";
            snprintf(name, sizeof name, "in.lora.%s.%s.A", tp.paths[l], which);
            memcpy(lp->down, case_input(c, name, NULL), (size_t)lp->rank * lp->in * sizeof(float));
            snprintf(name, sizeof name, "in.lora.%s.%s.B", tp.paths[l], which);
            memcpy(lp->up, case_input(c, name, NULL), (size_t)lp->out * lp->rank * sizeof(float));
        }
    train_attach(&tp, sd);
    // prompts: params.prompts (one per sample) or params.prompt (a string or a list)
    const Json* pr = json_get(c->params, "prompts");
    if (!pr) pr = json_get(c->params, "prompt");
    CHECK(pr && (pr->type == JSON_STRING || (pr->type == JSON_ARRAY && pr->count == N)), "%s: need %d prompts", c->path, N);
    int* ids = xmalloc((size_t)N * T * sizeof(int));
    int* ts = xmalloc((size_t)N * sizeof(int));
    for (int n = 0; n < N; n++) {
        const char* text = pr->type == JSON_STRING ? pr->string : pr->items[n].string;
        CHECK(text && tokenizer_encode(sd->tok, text, ids + (size_t)n * T, T) >= 0, "%s: prompt %d: %s", c->path, n, error_last());
        ts[n] = (int)tsf[n];
    }
    Schedule s;
    schedule_init(&s, &sd->sched, 1);
    TrainBatch b = {N, h, w, latent0, noise, ts, mask, ids};
    float loss = train_step(sd, &tp, s.alphas_cumprod, &b, scratch(), &saved);
    out_add4(o, "loss", &loss, 1, -1, -1, -1);
    out_add(o, "grad.token_embedding", tp.dtok, te.ndim, te.shape);
    for (int l = 0; l < tp.nlayers; l++)
        for (int kv = 0; kv < 2; kv++) {
            const char* which = kv ? "to_v" : "to_k";
            if (mode == TRAIN_KV) {
                const Linear* lin = kv ? &tp.attn[l]->to_v : &tp.attn[l]->to_k;
                snprintf(name, sizeof name, "grad.%s.%s.weight", tp.paths[l], which);
                out_add4(o, name, tp.dkv[2 * l + kv], lin->out, lin->in, -1, -1);
                continue;
            }
            const LoraPair* lp = &tp.lora[2 * l + kv];
            snprintf(name, sizeof name, "grad.lora.%s.%s.A", tp.paths[l], which);
            out_add4(o, name, lp->ddown, lp->rank, lp->in, -1, -1);
            snprintf(name, sizeof name, "grad.lora.%s.%s.B", tp.paths[l], which);
            out_add4(o, name, lp->dup, lp->out, lp->rank, -1, -1);
        }
    train_detach(&tp, sd);
    train_params_free(&tp);
    schedule_free(&s);
    free(ids);
    free(ts);
    return 0;
}

int kind_lora_grad(Case* c, Outputs* o) { return grad_case(c, o, TRAIN_LORA); }
int kind_kv_grad(Case* c, Outputs* o) { return grad_case(c, o, TRAIN_KV); }

// adamw_step: params.num_steps × (grad_clip_norm over all P tensors, then adamw_update of each);
// the state after every step is an output.
int kind_adamw_step(Case* c, Outputs* o) {
    int P = 0, S = -1;
    char name[64];
    for (;; P++) { snprintf(name, sizeof name, "in.param.%d", P); if (!case_has(c, name)) break; }
    CHECK(P > 0 && P <= 64, "%s: no in.param.<i> tensors", c->path);
    const Json* betas = json_get(c->params, "betas");
    AdamW opt = {param_number(c, "lr", 1e-3), 0.9, 0.999, param_number(c, "eps", 1e-8),
                 param_number(c, "weight_decay", 1e-2), param_number(c, "max_grad_norm", 0), 0};
    if (betas && betas->type == JSON_ARRAY && betas->count == 2) { opt.beta1 = betas->items[0].number; opt.beta2 = betas->items[1].number; }
    int step0 = (int)param_number(c, "step", 0);
    float *p[64], *m[64], *v[64], *g[64], *hist[64][4];
    const float* grads[64];
    size_t n[64];
    Tensor shape[64];
    for (int i = 0; i < P; i++) {
        Tensor tg;
        snprintf(name, sizeof name, "in.param.%d", i);
        const float* p0 = case_input(c, name, &shape[i]);
        n[i] = tensor_numel(&shape[i]);
        snprintf(name, sizeof name, "in.grad.%d", i);
        grads[i] = case_input(c, name, &tg);
        CHECK(S < 0 || S == tg.shape[0], "%s: in.grad.%d has %d steps", c->path, i, tg.shape[0]);
        S = tg.shape[0];
        CHECK(shape[i].ndim < TENSOR_MAX_DIMS, "%s: param %d has too many dims", c->path, i);
        p[i] = xmalloc(n[i] * sizeof(float)); m[i] = xmalloc(n[i] * sizeof(float));
        v[i] = xmalloc(n[i] * sizeof(float)); g[i] = xmalloc(n[i] * sizeof(float));
        memcpy(p[i], p0, n[i] * sizeof(float));
        snprintf(name, sizeof name, "in.exp_avg.%d", i);
        memcpy(m[i], case_input(c, name, NULL), n[i] * sizeof(float));
        snprintf(name, sizeof name, "in.exp_avg_sq.%d", i);
        memcpy(v[i], case_input(c, name, NULL), n[i] * sizeof(float));
        for (int k = 0; k < 4; k++) hist[i][k] = xmalloc((size_t)S * n[i] * sizeof(float));
    }
    float* norms = xmalloc((size_t)S * sizeof(float));
    for (int st = 0; st < S; st++) {
        for (int i = 0; i < P; i++) memcpy(g[i], grads[i] + (size_t)st * n[i], n[i] * sizeof(float));
        norms[st] = grad_clip_norm(g, n, P, (float)opt.max_grad_norm);
        for (int i = 0; i < P; i++) {
            adamw_update(p[i], g[i], m[i], v[i], n[i], &opt, opt.lr, step0 + st + 1);
            const float* state[4] = {p[i], m[i], v[i], g[i]};
            for (int k = 0; k < 4; k++) memcpy(hist[i][k] + (size_t)st * n[i], state[k], n[i] * sizeof(float));
        }
    }
    out_add4(o, "grad_norm", norms, S, -1, -1, -1);
    static const char* names[4] = {"param", "exp_avg", "exp_avg_sq", "clipped_grad"};
    for (int i = 0; i < P; i++) {
        int sh[TENSOR_MAX_DIMS] = {S};
        for (int d = 0; d < shape[i].ndim; d++) sh[d + 1] = shape[i].shape[d];
        for (int k = 0; k < 4; k++) {
            snprintf(name, sizeof name, "%s.%d", names[k], i);
            out_add(o, name, hist[i][k], shape[i].ndim + 1, sh);
            free(hist[i][k]);
        }
        free(p[i]); free(m[i]); free(v[i]); free(g[i]);
    }
    free(norms);
    return 0;
}

// ----------------------------------------------------------------------------------------------
// image_decode: JPEG decoding as Pillow does (not implemented yet: SKIP)

int kind_image_decode(Case* c, Outputs* o) { (void)c; (void)o; return KIND_NOT_IMPLEMENTED; }
