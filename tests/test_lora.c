// test_lora.c: invariants of prompt refinement (lora.c) on the tiny fixture model.
//   zero_up_equals_base     LoRA attached with up = 0 (A random) gives the base UNet's output bit for bit
//   threads_bitwise         a training step's loss and gradients are identical for 1 and 3 threads
//   resume_equals_straight  3 steps, checkpoint, reload into fresh state, 3 more == 6 steps straight
//                           (values, AdamW m and v, step and RNG state, compared bytewise)
//   export_import_lora      refine's checkpoint, the kohya LoRA + embedding exports and their import
//                           through trained_apply give identical UNet outputs
//   export_import_kv        the same for K/V mode (.diff = trained − base, so equal to float rounding)
//   train_step_fd_lora/kv   the whole step's gradients against finite differences of its loss
//                           (latents 6×10, batch 2, masked loss)
// usage: test_lora [GOLDEN_DIR]   (the model is GOLDEN_DIR/models/tiny-sd15)
#include "../instastyle.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int g_pass, g_fail;
static Arena g_scratch, g_saved;

static void report(const char* name, int ok, const char* detail) {
    printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name, detail[0] ? "  " : "", detail);
    ok ? g_pass++ : g_fail++;
}

// A fixed training problem: two latents, prompts with <style1>; timesteps and noise from the rng.
typedef struct Problem {
    int N, h, w, C;
    float* latent0;
    float* noise;
    int* ids;
    int ts[2];
    float* alphas;
    Schedule s;
} Problem;

static void problem_init(Problem* p, StableDiffusion* sd) {
    p->N = 2; p->h = 8; p->w = 8; p->C = sd->unet.cfg.in_channels;
    size_t n = (size_t)p->N * p->C * p->h * p->w;
    p->latent0 = xmalloc(n * sizeof(float));
    p->noise = xmalloc(n * sizeof(float));
    Rng r;
    rng_seed(&r, 99);
    rng_normal(&r, p->latent0, n);
    p->ids = xmalloc((size_t)p->N * CLIP_MAX_LENGTH * sizeof(int));
    const char* prompts[2] = {"A cat in the style of <style1>", "A house in the style of <style1>"};
    for (int i = 0; i < p->N; i++)
        CHECK(tokenizer_encode(sd->tok, prompts[i], p->ids + i * CLIP_MAX_LENGTH, CLIP_MAX_LENGTH) > 0, "%s", error_last());
    schedule_init(&p->s, &sd->sched, 1);
}

static void problem_free(Problem* p) {
    free(p->latent0); free(p->noise); free(p->ids);
    schedule_free(&p->s);
}

// One step as the refine loop does it: draw timesteps and noise, train_step, train_update.
static float train_once(StableDiffusion* sd, TrainParams* tp, Problem* p, Rng* rng, const AdamW* opt) {
    for (int i = 0; i < p->N; i++) p->ts[i] = (int)(rng_u32(rng) % (uint32_t)sd->sched.train_steps);
    rng_normal(rng, p->noise, (size_t)p->N * p->C * p->h * p->w);
    TrainBatch b = {p->N, p->h, p->w, p->latent0, p->noise, p->ts, NULL, p->ids};
    float loss = train_step(sd, tp, p->s.alphas_cumprod, &b, &g_scratch, &g_saved);
    train_update(tp, opt);
    return loss;
}

static void unet_eps(StableDiffusion* sd, const Problem* p, float* eps, int use_prompt) {
    float* ctx = xmalloc((size_t)p->N * CLIP_MAX_LENGTH * sd->unet.cfg.cross_dim * sizeof(float));
    float t[2] = {321, 777};
    if (use_prompt) clip_forward(&sd->clip, ctx, p->ids, p->N, CLIP_MAX_LENGTH, &g_scratch);
    else { Rng r; rng_seed(&r, 5); rng_normal(&r, ctx, (size_t)p->N * CLIP_MAX_LENGTH * sd->unet.cfg.cross_dim); }
    unet_forward(&sd->unet, eps, p->latent0, t, ctx, p->N, p->h, p->w, CLIP_MAX_LENGTH, &g_scratch);
    free(ctx);
}

static void test_zero_up(StableDiffusion* sd, Problem* p) {
    size_t n = (size_t)p->N * p->C * p->h * p->w;
    float* base = xmalloc(n * sizeof(float));
    float* lora = xmalloc(n * sizeof(float));
    unet_eps(sd, p, base, 0);
    Rng rng;
    rng_seed(&rng, 1);
    TrainParams tp;
    train_params_init(&tp, sd, TRAIN_LORA, 0, NULL, 4, 4.0f, &rng);
    train_attach(&tp, sd);
    unet_eps(sd, p, lora, 0);
    int nonzero = 0;
    for (size_t i = 0; i < (size_t)tp.lora[0].rank * tp.lora[0].in; i++) nonzero += tp.lora[0].down[i] != 0.0f;
    train_detach(&tp, sd);
    train_params_free(&tp);
    char d[64];
    snprintf(d, sizeof d, "(%d of A's entries non-zero)", nonzero);
    report("zero_up_equals_base", nonzero > 0 && memcmp(base, lora, n * sizeof(float)) == 0, d);
    free(base);
    free(lora);
}

static void test_threads(StableDiffusion* sd, Problem* p) {
    float* grads[2];
    float loss[2];
    for (int k = 0; k < 2; k++) {
        threads_init(k ? 3 : 1);
        Rng rng;
        rng_seed(&rng, 2);
        TrainParams tp;
        int init = 320;
        train_params_init(&tp, sd, TRAIN_LORA, 1, &init, 4, 4.0f, &rng);
        for (size_t i = 0; i < tp.n; i++) if (tp.values[i] == 0.0f) tp.values[i] = 0.01f;   // non-zero up
        train_attach(&tp, sd);
        for (int i = 0; i < p->N; i++) p->ts[i] = 400 + 100 * i;
        rng_normal(&rng, p->noise, (size_t)p->N * p->C * p->h * p->w);
        TrainBatch b = {p->N, p->h, p->w, p->latent0, p->noise, p->ts, NULL, p->ids};
        loss[k] = train_step(sd, &tp, p->s.alphas_cumprod, &b, &g_scratch, &g_saved);
        grads[k] = xmalloc(tp.n * sizeof(float));
        memcpy(grads[k], tp.grads, tp.n * sizeof(float));
        train_detach(&tp, sd);
        size_t n = tp.n;
        train_params_free(&tp);
        if (k) {
            int same = memcmp(grads[0], grads[1], n * sizeof(float)) == 0 && memcmp(&loss[0], &loss[1], sizeof(float)) == 0;
            report("threads_bitwise", same, "(1 vs 3 threads: loss and every gradient)");
        }
    }
    threads_init(1);
    free(grads[0]);
    free(grads[1]);
}

static void test_resume(StableDiffusion* sd, Problem* p, const char* dir) {
    AdamW opt = adamw_defaults();
    opt.lr = 1e-3;
    opt.weight_decay = 1e-2;
    opt.max_grad_norm = 1.0;
    opt.warmup = 2;
    int init = 320;
    char ck[4200], a[4200], b[4200];
    snprintf(ck, sizeof ck, "%s/test_lora_ck.safetensors", dir);
    snprintf(a, sizeof a, "%s/test_lora_a.safetensors", dir);
    snprintf(b, sizeof b, "%s/test_lora_b.safetensors", dir);
    for (int run = 0; run < 2; run++) {
        Rng rng;
        rng_seed(&rng, 42);
        TrainParams tp;
        train_params_init(&tp, sd, TRAIN_LORA, 1, &init, 4, 4.0f, &rng);
        train_attach(&tp, sd);
        for (int s = 0; s < 6; s++) {
            if (run == 1 && s == 3) {   // interrupt: save, forget everything, reload
                CHECK(train_save(&tp, ck, &rng, NULL) == 0, "%s", error_last());
                train_detach(&tp, sd);
                train_params_free(&tp);
                memset(&rng, 0, sizeof rng);
                CHECK(train_load(&tp, sd, ck, &rng) == 0, "%s", error_last());
                train_attach(&tp, sd);
            }
            train_once(sd, &tp, p, &rng, &opt);
        }
        CHECK(train_save(&tp, run ? b : a, &rng, NULL) == 0, "%s", error_last());
        train_detach(&tp, sd);
        train_params_free(&tp);
    }
    size_t la, lb;
    char* fa = file_read_all(a, &la, (size_t)1 << 30);
    char* fb = file_read_all(b, &lb, (size_t)1 << 30);
    report("resume_equals_straight", fa && fb && la == lb && memcmp(fa, fb, la) == 0, "(checkpoint files after 6 steps, bytewise)");
    free(fa);
    free(fb);
    remove(ck);
    remove(a);
    remove(b);
}

static void test_export_import(StableDiffusion* sd, Problem* p, const char* dir, TrainMode mode) {
    AdamW opt = adamw_defaults();
    opt.lr = 1e-2;
    int init = 320;
    Rng rng;
    rng_seed(&rng, 7);
    TrainParams tp;
    train_params_init(&tp, sd, mode, 1, &init, 4, 2.0f, &rng);
    train_attach(&tp, sd);
    for (int s = 0; s < 3; s++) train_once(sd, &tp, p, &rng, &opt);
    size_t n = (size_t)p->N * p->C * p->h * p->w;
    float* ref = xmalloc(n * sizeof(float));
    float* got = xmalloc(n * sizeof(float));
    unet_eps(sd, p, ref, 1);
    char ck[4200], lora[4200], emb[4200];
    snprintf(ck, sizeof ck, "%s/test_lora_refine.safetensors", dir);
    snprintf(lora, sizeof lora, "%s/test_lora_kohya.safetensors", dir);
    snprintf(emb, sizeof emb, "%s/test_lora_emb.safetensors", dir);
    CHECK(train_save(&tp, ck, &rng, NULL) == 0, "%s", error_last());
    CHECK(train_export_lora(&tp, lora) == 0, "%s", error_last());
    CHECK(train_export_embedding(&tp, 0, emb) == 0, "%s", error_last());
    train_detach(&tp, sd);
    train_params_free(&tp);
    double err[2] = {0, 0};
    for (int way = 0; way < 2; way++) {   // refine's file; the kohya LoRA + the embedding
        if (way == 0) CHECK(trained_apply(sd, ck) == 0, "%s", error_last());
        else { CHECK(trained_apply(sd, lora) == 0, "%s", error_last()); CHECK(trained_apply(sd, emb) == 0, "%s", error_last()); }
        unet_eps(sd, p, got, 1);
        for (size_t i = 0; i < n; i++) err[way] = fmax(err[way], fabs(got[i] - ref[i]));
        train_detach(sd->trained, sd);
        train_params_free(sd->trained);
        free(sd->trained);
        sd->trained = NULL;
    }
    char d[128];
    snprintf(d, sizeof d, "(max |diff|: refine file %.3g, exports %.3g)", err[0], err[1]);
    if (mode == TRAIN_LORA) report("export_import_lora", err[0] == 0 && err[1] == 0, d);
    else report("export_import_kv", err[0] == 0 && err[1] < 1e-4, d);
    free(ref);
    free(got);
    remove(ck);
    remove(lora);
    remove(emb);
}

// The whole train step against finite differences of its own loss, at an odd latent size (6×10:
// the up path resizes to the skips' sizes), batch 2 with masks, for a few entries of every kind of
// trainable tensor, including the first (down_blocks.0) and the last (up_blocks.3) attn2. The loss
// is a float, so the five-point difference uses a large step; errors are relative with a floor of
// 2e-3 (the gradients here are 1e-4 … 2e-2, the difference's noise about 1e-5).
static void test_step_fd(StableDiffusion* sd, Problem* p, TrainMode mode) {
    Rng rng;
    rng_seed(&rng, 11);
    TrainParams tp;
    int init[1] = {320};
    train_params_init(&tp, sd, mode, 1, init, 3, 3.0f, &rng);
    for (size_t i = 0; i < tp.n; i++) if (tp.values[i] == 0.0f) tp.values[i] = 0.05f * ((float)(i % 7) - 3.0f);
    train_attach(&tp, sd);
    int N = 2, h = 6, w = 10, C = p->C, ts[2] = {150, 700};
    size_t n = (size_t)N * C * h * w;
    float* lat = xmalloc(n * sizeof(float));
    float* noise = xmalloc(n * sizeof(float));
    float* mask = xmalloc((size_t)N * h * w * sizeof(float));
    rng_normal(&rng, lat, n);
    rng_normal(&rng, noise, n);
    for (int i = 0; i < N * h * w; i++) mask[i] = (float)(rng_u32(&rng) % 4 != 0);
    TrainBatch b = {N, h, w, lat, noise, ts, mask, p->ids};
    train_step(sd, &tp, p->s.alphas_cumprod, &b, &g_scratch, &g_saved);
    float* grad = xmalloc(tp.n * sizeof(float));
    memcpy(grad, tp.grads, tp.n * sizeof(float));
    const TrainTensor* pick[4] = {&tp.t[0], &tp.t[1], &tp.t[tp.nt / 2], &tp.t[tp.nt - 1]};
    double worst = 0;
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 3; j++) {
            size_t e = pick[k]->off + (size_t)(j * 7919) % pick[k]->numel;
            float x0 = tp.values[e], hstep = 5e-2f * (fabsf(x0) > 1 ? fabsf(x0) : 1), l[4];
            const float off[4] = {2 * hstep, hstep, -hstep, -2 * hstep};
            for (int q = 0; q < 4; q++) {
                tp.values[e] = x0 + off[q];
                l[q] = train_step(sd, &tp, p->s.alphas_cumprod, &b, &g_scratch, &g_saved);
            }
            tp.values[e] = x0;
            double num = (-(double)l[0] + 8.0 * l[1] - 8.0 * l[2] + l[3]) / (12.0 * hstep);
            double err = fabs(num - grad[e]) / fmax(fmax(fabs(num), fabs(grad[e])), 2e-3);
            if (err > worst) worst = err;
        }
    char d[96];
    snprintf(d, sizeof d, "(12 entries of 4 tensors, max rel err %.2e)", worst);
    report(mode == TRAIN_LORA ? "train_step_fd_lora" : "train_step_fd_kv", worst < 2e-2, d);
    train_detach(&tp, sd);
    train_params_free(&tp);
    free(lat); free(noise); free(mask); free(grad);
}

int main(int argc, char** argv) {
    const char* golden = argc > 1 ? argv[1] : "../shared/golden";
    char model[4200];
    snprintf(model, sizeof model, "%s/models/tiny-sd15", golden);
    if (!path_is_dir(model)) {
        printf("SKIP test_lora: %s not found\n0 passed, 0 failed, 1 skipped\n", model);
        return 0;
    }
    const char* tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    threads_init(1);   // tiny tensors: one thread is fastest; threads_bitwise compares 1 and 3
    arena_init(&g_scratch, (size_t)32 << 20);
    arena_init(&g_saved, (size_t)32 << 20);
    StableDiffusion sd;
    sd_load(&sd, model, NULL, NULL, SD_TEXT | SD_UNET | SD_TOKENIZER, 0);
    CHECK(tokenizer_add_token(sd.tok, "<style1>") == tokenizer_vocab_size(sd.tok), "could not add <style1>");
    Problem p;
    problem_init(&p, &sd);
    test_zero_up(&sd, &p);
    test_threads(&sd, &p);
    test_step_fd(&sd, &p, TRAIN_LORA);
    test_step_fd(&sd, &p, TRAIN_KV);
    test_resume(&sd, &p, tmp);
    test_export_import(&sd, &p, tmp, TRAIN_LORA);
    test_export_import(&sd, &p, tmp, TRAIN_KV);
    problem_free(&p);
    sd_free(&sd);
    arena_free(&g_scratch);
    arena_free(&g_saved);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail > 0;
}
