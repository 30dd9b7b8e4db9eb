// bench_gemm.c: sgemm speed on Stable Diffusion 1.5's GEMM shapes, with 1 and 2 threads, as
// GFLOP/s and as a percentage of the machine's FMA peak (cpu_peak_gflops on as many threads).
// Linear layers: out[M,N] = in[M,K]·W[N,K]ᵀ (batch 2 of 64^2 latents). Convolutions as GEMM:
// out[OC, H·W] = W[OC, C·9]·col[C·9, H·W]. Attention per head: Q·Kᵀ and P·V with the head's
// 40 columns taken in place from a [T, 320] matrix (leading dimension 320).
// Build: cc -O2 -std=c11 -Wall -Wextra -I. tests/bench_gemm.c gemm.c tensor.c -lm -lpthread
// Usage: bench_gemm [max_threads (default 2)] [min seconds per shape (default 0.3)]
// Each figure is the fastest of several calls (at least 3, and at least min seconds).
#define _POSIX_C_SOURCE 200809L
#include "instastyle.h"

#include <stdlib.h>

typedef struct Shape {
    const char* name;
    int transA, transB, M, N, K, lda, ldb, ldc;   // ld 0: packed (the row width)
} Shape;

static const Shape SHAPES[] = {
    {"linear attn proj", 0, 1, 8192, 320, 320, 0, 0, 0},
    {"linear GEGLU", 0, 1, 8192, 2560, 320, 0, 0, 0},
    {"linear ff out", 0, 1, 8192, 320, 1280, 0, 0, 0},
    {"linear 32^2 proj", 0, 1, 2048, 640, 640, 0, 0, 0},
    {"linear 16^2 proj", 0, 1, 512, 1280, 1280, 0, 0, 0},
    {"linear context k/v", 0, 1, 154, 320, 768, 0, 0, 0},
    {"conv 64^2 320", 0, 0, 320, 4096, 2880, 0, 0, 0},
    {"conv 32^2 640", 0, 0, 640, 1024, 5760, 0, 0, 0},
    {"conv 16^2 1280", 0, 0, 1280, 256, 11520, 0, 0, 0},
    {"vae conv 512^2 128", 0, 0, 128, 262144, 1152, 0, 0, 0},
    {"vae conv 256^2 256", 0, 0, 256, 65536, 2304, 0, 0, 0},
    {"vae conv 128^2 512", 0, 0, 512, 16384, 4608, 0, 0, 0},
    {"attn QK^T head", 0, 1, 4096, 4096, 40, 320, 320, 0},
    {"attn PV head", 0, 0, 4096, 40, 4096, 0, 320, 320},
    {"xattn QK^T head", 0, 1, 4096, 77, 40, 320, 320, 0},
};

static float* random_floats(size_t n, uint32_t seed) {
    float* x = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
    }
    return x;
}

// Seconds of the fastest call among calls that together take at least min_s (and at least 3),
// after a warm-up call. The fastest call is the one least disturbed by other processes.
static double time_shape(const Shape* s, const float* A, const float* B, float* C, double min_s) {
    int lda = s->lda ? s->lda : (s->transA ? s->M : s->K);
    int ldb = s->ldb ? s->ldb : (s->transB ? s->K : s->N);
    int ldc = s->ldc ? s->ldc : s->N;
    sgemm(s->transA, s->transB, s->M, s->N, s->K, 1.0f, A, lda, B, ldb, 0.0f, C, ldc);
    double best = 1e30, start = time_now();
    for (int reps = 0; reps < 3 || time_now() - start < min_s; reps++) {
        double t = time_now();
        sgemm(s->transA, s->transB, s->M, s->N, s->K, 1.0f, A, lda, B, ldb, 0.0f, C, ldc);
        t = time_now() - t;
        if (t < best) best = t;
    }
    return best;
}

int main(int argc, char** argv) {
    int max_threads = argc > 1 ? atoi(argv[1]) : 2;
    double min_s = argc > 2 ? atof(argv[2]) : 0.3;
    if (max_threads < 1) max_threads = 1;
    double peak[65];
    printf("kernel %s\n", sgemm_kernel_name());
    for (int t = 1; t <= max_threads && t <= 64; t++) {
        threads_init(t);
        peak[t] = cpu_peak_gflops(t);
        printf("peak %d thread%s: %.1f GFLOP/s\n", t, t > 1 ? "s" : "", peak[t]);
    }
    printf("%-40s", "shape (M,N,K)");
    for (int t = 1; t <= max_threads && t <= 64; t++) printf("   %dT GFLOP/s  %%peak", t);
    printf("\n");
    for (size_t i = 0; i < sizeof SHAPES / sizeof SHAPES[0]; i++) {
        const Shape* s = &SHAPES[i];
        size_t rowsA = s->transA ? s->K : s->M, rowsB = s->transB ? s->N : s->K;
        int lda = s->lda ? s->lda : (s->transA ? s->M : s->K);
        int ldb = s->ldb ? s->ldb : (s->transB ? s->K : s->N);
        int ldc = s->ldc ? s->ldc : s->N;
        float* A = random_floats(rowsA * lda, 1);
        float* B = random_floats(rowsB * ldb, 2);
        float* C = random_floats((size_t)s->M * ldc, 3);
        double flops = 2.0 * s->M * s->N * s->K;
        char label[96];
        snprintf(label, sizeof label, "%s (%d,%d,%d)", s->name, s->M, s->N, s->K);
        printf("%-40s", label);
        for (int t = 1; t <= max_threads && t <= 64; t++) {
            threads_init(t);
            double gf = flops / time_shape(s, A, B, C, min_s) * 1e-9;
            printf("   %6.1f      %5.1f%%", gf, 100.0 * gf / peak[t]);
            fflush(stdout);
        }
        printf("\n");
        free(A);
        free(B);
        free(C);
    }
    return 0;
}
