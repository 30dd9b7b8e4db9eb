// ddim.c: the sampler of InstaStyle — DDIM (Song et al. 2021) forwards and backwards.
//
//   schedule      diffusers' DDIMScheduler: scaled-linear betas β = linspace(√β₀, √β₁, T)²,
//                 ᾱ = cumprod(1 − β) in float32, "leading" timesteps (S−1−i)·(T//S) + steps_offset,
//                 final ᾱ = 1 if set_alpha_to_one else ᾱ[0]; eta = 0 throughout.
//   ddim_step     DDIM eq. 12 with σ = 0 (InstaStyle eq. 5): x₀ = (x − √(1−ᾱ_t)·ε)/√ᾱ_t,
//                 x_prev = √ᾱ_p·x₀ + √(1−ᾱ_p)·ε with p = t − T/S.
//   inverse step  InstaStyle eq. 6: the same update run from ᾱ_cur (cur = t − T/S) up to ᾱ_t.
//   invert        the reference latent → style noise z_T with the conditional ε only.
//   sample        classifier-free guidance (eq. 10): ε = ε_∅ + w·(ε_c − ε_∅), one batched UNet call;
//                 two styles (eq. 12): ε = ε_∅ + w(1−β)(ε₁ − ε_∅) + wβ(ε₂ − ε_∅), one batch of 3 —
//                 both are ε = ε₀ + Σ_k g_k·(ε_k − ε₀) with guidance weights g.
//   mix           eq. 11: z = (1 − M)⊙z₁ + M⊙z₂, M ∈ {0,1}^{h×w} shared by all channels.
//   snr           eq. 8: the SNR of the inversion noise after inverting to train step t+1.
// Noise and masks are always arguments: the RNG lives in the CLI and in training.
#include "instastyle.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void schedule_init(Schedule* s, const SchedulerConfig* cfg, int steps) {
    int T = cfg->train_steps;
    CHECK(steps >= 1 && steps <= T, "steps must be in [1, %d], got %d", T, steps);
    memset(s, 0, sizeof *s);
    s->train_steps = T;
    s->n = steps;
    s->alphas_cumprod = xmalloc((size_t)T * sizeof(float));
    s->timesteps = xmalloc((size_t)steps * sizeof(int));
    // torch.linspace in float32: the first half counts up from start, the second down from end.
    float lo = strcmp(cfg->beta_schedule, "scaled_linear") == 0 ? (float)sqrt(cfg->beta_start) : cfg->beta_start;
    float hi = strcmp(cfg->beta_schedule, "scaled_linear") == 0 ? (float)sqrt(cfg->beta_end) : cfg->beta_end;
    float step = (hi - lo) / (float)(T - 1), prod = 1.0f;
    for (int i = 0; i < T; i++) {
        float b = i < T / 2 ? lo + step * (float)i : hi - step * (float)(T - 1 - i);
        if (strcmp(cfg->beta_schedule, "scaled_linear") == 0) b = b * b;
        prod *= 1.0f - b;
        s->alphas_cumprod[i] = prod;
    }
    s->final_alpha = cfg->set_alpha_to_one ? 1.0f : s->alphas_cumprod[0];
    s->step_ratio = T / steps;
    for (int i = 0; i < steps; i++) s->timesteps[i] = (steps - 1 - i) * s->step_ratio + cfg->steps_offset;
    for (int i = 0; i < steps; i++)
        CHECK(s->timesteps[i] < T, "steps_offset %d pushes timestep %d past %d", cfg->steps_offset, s->timesteps[i], T - 1);
}

void schedule_free(Schedule* s) {
    free(s->alphas_cumprod);
    free(s->timesteps);
    memset(s, 0, sizeof *s);
}

static float alpha_at(const Schedule* s, int t) { return t >= 0 ? s->alphas_cumprod[t] : s->final_alpha; }

// One DDIM move of x[n] from ᾱ_from to ᾱ_to along the predicted ε.
static void ddim_move(float* out, const float* x, const float* eps, size_t n, float a_from, float a_to) {
    float sa = sqrtf(a_from), sb = sqrtf(1.0f - a_from), ta = sqrtf(a_to), tb = sqrtf(1.0f - a_to);
    for (size_t i = 0; i < n; i++) {
        float x0 = (x[i] - sb * eps[i]) / sa;
        out[i] = ta * x0 + tb * eps[i];
    }
}

void ddim_step(const Schedule* s, float* prev, const float* x, const float* eps, int t, size_t n) {
    ddim_move(prev, x, eps, n, alpha_at(s, t), alpha_at(s, t - s->step_ratio));
}

void ddim_inverse_step(const Schedule* s, float* next, const float* x, const float* eps, int t, size_t n) {
    int cur = t - s->step_ratio;
    if (cur > s->train_steps - 1) cur = s->train_steps - 1;
    ddim_move(next, x, eps, n, alpha_at(s, cur), s->alphas_cumprod[t]);
}

void snr_curve(const Schedule* s, double* snr) {
    const float* a = s->alphas_cumprod;
    double sum = 0;
    for (int t = 0; t + 1 < s->train_steps; t++) {
        double d = sqrt(1.0 / a[t + 1] - 1.0) - sqrt(1.0 / a[t] - 1.0);
        sum += ((double)a[0] / a[t + 1]) * d * d;
        snr[t] = 1.0 / sum;
    }
}

void noise_mix(float* out, const float* z1, const float* z2, const float* mask, int C, int h, int w) {
    size_t hw = (size_t)h * w;
    for (int c = 0; c < C; c++)
        for (size_t p = 0; p < hw; p++) out[c * hw + p] = (1.0f - mask[p]) * z1[c * hw + p] + mask[p] * z2[c * hw + p];
}

void noise_mask_draw(float* mask, int h, int w, float alpha, Rng* rng) {
    for (int i = 0; i < h * w; i++) mask[i] = rng_uniform(rng) < alpha ? 1.0f : 0.0f;
}

void noise_rand_scale(float* z, int C, int h, int w, float scale, Rng* rng) {
    size_t hw = (size_t)h * w;
    float* fresh = xmalloc(hw * sizeof(float));
    for (int c = 0; c < C; c++) {
        float* zc = z + c * hw;
        rng_normal(rng, fresh, hw);
        double zm = 0, zs = 0, fm = 0, fs = 0;
        for (size_t p = 0; p < hw; p++) { zm += zc[p]; fm += fresh[p]; }
        zm /= hw; fm /= hw;
        for (size_t p = 0; p < hw; p++) { zs += (zc[p] - zm) * (zc[p] - zm); fs += (fresh[p] - fm) * (fresh[p] - fm); }
        zs = sqrt(zs / (hw - 1 ? hw - 1 : 1)); fs = sqrt(fs / (hw - 1 ? hw - 1 : 1));
        for (size_t p = 0; p < hw; p++) {
            float renorm = (float)((fresh[p] - fm) / (fs > 0 ? fs : 1) * zs + zm);
            zc[p] = (1.0f - scale) * zc[p] + scale * renorm;
        }
    }
    free(fresh);
}

// Numerical guard: a NaN/Inf in the latent stops the run, naming the loop, step and tensor.
static void check_finite(const float* z, size_t n, const char* loop, int step, int total, int t) {
    for (size_t i = 0; i < n; i++)
        CHECK(isfinite(z[i]), "%s step %d/%d (timestep %d): the latent holds NaN/Inf at element %zu "
              "(the model weights or the input noise are broken)", loop, step, total, t, i);
}

void ddim_invert(const UNet* u, const Schedule* s, float* z, float* latents, const float* cond, int Tc,
                 int h, int w, int nsteps, DdimProgress progress, void* pctx, Arena* scratch) {
    int C = u->cfg.in_channels;
    size_t n = (size_t)C * h * w;
    CHECK(nsteps >= 0 && nsteps <= s->n, "inversion steps %d outside [0, %d]", nsteps, s->n);
    size_t mark = arena_mark(scratch);
    float* eps = arena_alloc(scratch, n);
    if (latents) memcpy(latents, z, n * sizeof(float));
    for (int i = 0; i < nsteps; i++) {
        int t = s->timesteps[s->n - 1 - i];
        float tf = (float)t;
        unet_forward(u, eps, z, &tf, cond, 1, h, w, Tc, scratch);
        ddim_inverse_step(s, z, z, eps, t, n);
        check_finite(z, n, "inversion", i + 1, nsteps, t);
        if (latents) memcpy(latents + (i + 1) * n, z, n * sizeof(float));
        if (progress) progress(pctx, i + 1, nsteps);
    }
    arena_reset(scratch, mark);
}

void ddim_sample(const UNet* u, const Schedule* s, float* z, float* latents, const float* ctx, int K,
                 const float* guidance, int Tc, int h, int w, int first, DdimProgress progress, void* pctx,
                 Arena* scratch) {
    int C = u->cfg.in_channels, D = u->cfg.cross_dim;
    size_t n = (size_t)C * h * w;
    CHECK(first >= 0 && first <= s->n, "first step %d outside [0, %d]", first, s->n);
    (void)D;
    size_t mark = arena_mark(scratch);
    float* zb = arena_alloc(scratch, K * n);
    float* eps = arena_alloc(scratch, K * n);
    float* e = arena_alloc(scratch, n);
    float* tk = arena_alloc(scratch, (size_t)K);
    if (latents) memcpy(latents, z, n * sizeof(float));
    for (int i = first; i < s->n; i++) {
        int t = s->timesteps[i];
        for (int k = 0; k < K; k++) { memcpy(zb + k * n, z, n * sizeof(float)); tk[k] = (float)t; }
        unet_forward(u, eps, zb, tk, ctx, K, h, w, Tc, scratch);
        for (size_t j = 0; j < n; j++) {   // ε = ε₀ + Σ_k g_k (ε_k − ε₀)
            float e0 = eps[j], acc = e0;
            for (int k = 1; k < K; k++) acc += guidance[k] * (eps[k * n + j] - e0);
            e[j] = acc;
        }
        ddim_step(s, z, z, e, t, n);
        check_finite(z, n, "sampling", i - first + 1, s->n - first, t);
        if (latents) memcpy(latents + (i - first + 1) * n, z, n * sizeof(float));
        if (progress) progress(pctx, i - first + 1, s->n - first);
    }
    arena_reset(scratch, mark);
}

// ----------------------------------------------------------------------------------------------
// noise files: safetensors with "latent" F32 [1, C, h, w] (format "instastyle-noise"), untrusted
// input: every property is checked, and the result is NULL + error_last() rather than an exit.

float* noise_from_st(SafeTensors* st, int C, int* h, int* w) {
    StEntry* e = st_find(st, "latent");
    if (!e) { error_set("%s: no 'latent' tensor: not a noise file written by 'instastyle invert'", st->path); return NULL; }
    if (e->dtype != DT_F32 || e->ndim != 4 || e->shape[0] != 1 || e->shape[1] != C || e->shape[2] < 1 ||
        e->shape[3] < 1 || e->shape[2] > NOISE_MAX_SIDE || e->shape[3] > NOISE_MAX_SIDE) {
        error_set("%s: 'latent' must be F32 [1, %d, h, w] with 1 <= h, w <= %d (latents of images up to %d pixels)",
                  st->path, C, NOISE_MAX_SIDE, 8 * NOISE_MAX_SIDE);
        return NULL;
    }
    *h = (int)e->shape[2];
    *w = (int)e->shape[3];
    size_t n = (size_t)C * *h * *w;
    const float* src = st_floats(st, e);
    for (size_t i = 0; i < n; i++)
        if (!isfinite(src[i])) { error_set("%s: 'latent' holds NaN or Inf at element %zu", st->path, i); return NULL; }
    float* z = xmalloc(n * sizeof(float));
    memcpy(z, src, n * sizeof(float));
    return z;
}

float* noise_load(const char* path, int C, int* h, int* w) {
    SafeTensors st;
    if (st_open(&st, path) != 0) return NULL;
    float* z = noise_from_st(&st, C, h, w);
    st_close(&st);
    return z;
}
