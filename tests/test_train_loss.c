// test_train_loss.c: 100 steps of prompt refinement on the tiny fixture model lower the loss.
//
// Fixed seed; one latent "image" with the prompt "A painting in the style of <style1>"; the token row
// and rank-4 LoRA factors are trained with AdamW (lr 1e-3, clip 1.0). The data are 10 (timestep,
// noise) pairs drawn once from the seed and visited in order every 10 steps, so the first and the
// last 10 steps see the same samples: their average losses are directly comparable. The test passes
// when the last average is below 0.9 × the first.
// usage: test_train_loss [GOLDEN_DIR]
#include "../instastyle.h"

#include <stdlib.h>
#include <string.h>

#define STEPS 100
#define PAIRS 10

int main(int argc, char** argv) {
    const char* golden = argc > 1 ? argv[1] : "../shared/golden";
    char model[4200];
    snprintf(model, sizeof model, "%s/models/tiny-sd15", golden);
    if (!path_is_dir(model)) {
        printf("SKIP test_train_loss: %s not found\n0 passed, 0 failed, 1 skipped\n", model);
        return 0;
    }
    threads_init(1);   // tiny tensors: one thread is the fastest here (results do not depend on it)
    StableDiffusion sd;
    sd_load(&sd, model, NULL, NULL, SD_TEXT | SD_UNET | SD_TOKENIZER, 0);
    Rng rng;
    rng_seed(&rng, 2024);
    int init;
    CHECK(tokenizer_encode_raw(sd.tok, "watercolor", &init, 1) == 1, "init word is not one token");
    TrainParams tp;
    train_params_init(&tp, &sd, TRAIN_LORA, 1, &init, 4, 4.0f, &rng);
    train_attach(&tp, &sd);
    int C = sd.unet.cfg.in_channels, h = 8, w = 8, ids[CLIP_MAX_LENGTH];
    size_t n = (size_t)C * h * w;
    CHECK(tokenizer_encode(sd.tok, "A painting in the style of <style1>", ids, CLIP_MAX_LENGTH) > 0, "%s", error_last());
    float* latent = xmalloc(n * sizeof(float));
    float* noise = xmalloc(PAIRS * n * sizeof(float));
    int ts[PAIRS];
    rng_normal(&rng, latent, n);
    rng_normal(&rng, noise, PAIRS * n);
    for (int i = 0; i < PAIRS; i++) ts[i] = (int)(rng_u32(&rng) % (uint32_t)sd.sched.train_steps);
    Schedule s;
    schedule_init(&s, &sd.sched, 1);
    AdamW opt = adamw_defaults();
    opt.lr = 1e-3;
    opt.max_grad_norm = 1.0;
    Arena scratch, saved;
    arena_init(&scratch, (size_t)16 << 20);
    arena_init(&saved, (size_t)16 << 20);
    double first = 0, last = 0, t0 = time_now();
    for (int step = 0; step < STEPS; step++) {
        TrainBatch b = {1, h, w, latent, noise + (size_t)(step % PAIRS) * n, &ts[step % PAIRS], NULL, ids};
        float loss = train_step(&sd, &tp, s.alphas_cumprod, &b, &scratch, &saved);
        train_update(&tp, &opt);
        if (step < PAIRS) first += loss / PAIRS;
        if (step >= STEPS - PAIRS) last += loss / PAIRS;
    }
    int ok = last < 0.9 * first;
    printf("%s train_loss_decreases  first %d steps: %.5f  last %d steps: %.5f  (%.1fs)\n", ok ? "PASS" : "FAIL", PAIRS,
           first, PAIRS, last, time_now() - t0);
    printf("%d passed, %d failed\n", ok, !ok);
    train_detach(&tp, &sd);
    train_params_free(&tp);
    schedule_free(&s);
    arena_free(&scratch);
    arena_free(&saved);
    free(latent);
    free(noise);
    sd_free(&sd);
    return !ok;
}
