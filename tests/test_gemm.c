// test_gemm.c: sgemm against sgemm_ref, and the thread pool.
//
// Shapes cover the four transpose combinations, edges of every microkernel tile (1×1×1,
// 7×13×5, sizes around the tile and cache-block sizes), leading dimensions wider than the
// rows, alpha/beta combinations, M or N = 0, K = 0 and alpha = 0. With beta = 0 C starts as NaN
// (BLAS: C is not read), and the padding columns of C (ld > N) must keep their sentinel.
//
// Tolerance: any order of summing K products in float is within γ_(K+2)·S of the exact value
// (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1; K products and sums plus
// the alpha and beta steps), where S = |alpha|·Σ_k |a_ik·b_kj| + |beta·c_ij| and γ_n ≈ n·2⁻²⁴.
// Fast path and reference may err in opposite directions, so an element passes iff
// |got − ref| <= 2·(K+2)·2⁻²⁴·S. The bound is rigorous (no random failure), and tight enough to
// catch a dropped, doubled or perturbed product: one term is ~S/K, at least 10× the bound for
// the K <= 900 used here.
//
// sgemm_op's fp16, im2col and bias variants must reproduce sgemm's bits exactly (see test_operands).
//
// Each check prints PASS/FAIL; the last line is "N passed, M failed". The AVX2 and scalar
// kernels are tested in child processes (INSTASTYLE_GEMM selects them) when the CPU has them.
// Build: cc -O2 -std=c11 -Wall -Wextra -I. tests/test_gemm.c gemm.c tensor.c -lm -lpthread
#define _POSIX_C_SOURCE 200809L
#include "instastyle.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int g_pass, g_fail;

static void check(int ok, const char* name, const char* detail) {
    if (ok) {
        printf("PASS %s [%s]\n", name, sgemm_kernel_name());
        g_pass++;
    } else {
        printf("FAIL %s [%s]: %s\n", name, sgemm_kernel_name(), detail);
        g_fail++;
    }
    fflush(stdout);
}

static uint32_t g_seed = 12345;
static uint32_t next_u32(void) { return g_seed = g_seed * 1664525u + 1013904223u; }
static float frand(void) { return (float)(next_u32() >> 8) / 8388608.0f - 1.0f; }   // [-1, 1)
static int irand(int lo, int hi) { return lo + (int)((next_u32() >> 8) % (uint32_t)(hi - lo + 1)); }

static float* alloc_fill(size_t n) {
    float* x = xmalloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = frand();
    return x;
}

#define SENTINEL 12345.0f

// One sgemm call checked against sgemm_ref. Returns 1 when it passes; else writes detail.
static int run_case(int tA, int tB, int M, int N, int K, float alpha, float beta,
                    int pad, char* detail, size_t dlen) {
    int lda = (tA ? M : K) + pad, ldb = (tB ? K : N) + pad, ldc = N + pad;
    size_t na = (size_t)(tA ? K : M) * lda, nb = (size_t)(tB ? N : K) * ldb, nc = (size_t)M * ldc;
    float *A = alloc_fill(na), *B = alloc_fill(nb), *C0 = alloc_fill(nc);
    float *C = xmalloc((nc ? nc : 1) * sizeof(float)), *R = xmalloc((nc ? nc : 1) * sizeof(float));
    for (int i = 0; i < M; i++)
        for (int j = 0; j < ldc; j++) {
            float* c = &C0[(size_t)i * ldc + j];
            if (j >= N) *c = SENTINEL;
            else if (beta == 0.0f) *c = NAN;
        }
    memcpy(C, C0, nc * sizeof(float));
    memcpy(R, C0, nc * sizeof(float));
    sgemm(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    sgemm_ref(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, R, ldc);
    int ok = 1;
    for (int i = 0; i < M && ok; i++)
        for (int j = 0; j < ldc && ok; j++) {
            float got = C[(size_t)i * ldc + j], ref = R[(size_t)i * ldc + j];
            if (j >= N) {
                if (got != SENTINEL) {
                    snprintf(detail, dlen, "padding C[%d][%d] overwritten (%g)", i, j, got);
                    ok = 0;
                }
                continue;
            }
            double S = 0.0;
            for (int k = 0; k < K; k++) {
                float a = tA ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                float b = tB ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                S += fabs((double)a * b);
            }
            S *= fabs(alpha);
            if (beta != 0.0f) S += fabs(beta * C0[(size_t)i * ldc + j]);
            double tol = 2.0 * (K + 2) * ldexp(1.0, -24) * S;
            double err = fabs((double)got - ref);
            if (!(err <= tol)) {
                snprintf(detail, dlen, "tA=%d tB=%d M=%d N=%d K=%d alpha=%g beta=%g pad=%d: "
                         "C[%d][%d] = %.9g, ref %.9g, |d| %.3g > tol %.3g",
                         tA, tB, M, N, K, alpha, beta, pad, i, j, got, ref, err, tol);
                ok = 0;
            }
        }
    free(A);
    free(B);
    free(C0);
    free(C);
    free(R);
    return ok;
}

static void test_random_shapes(void) {
    static const float alphas[] = {1.0f, -0.5f, 2.5f}, betas[] = {0.0f, 1.0f, 0.5f};
    char detail[512], name[64];
    for (int t = 0; t < 4; t++) {
        int tA = t >> 1, tB = t & 1, ok = 1;
        for (int c = 0; c < 60 && ok; c++) {
            int big = c % 6 == 5;                // now and then past a cache block
            int M = irand(1, big ? 300 : 50), N = irand(1, big ? 300 : 100);
            int K = irand(1, big ? 900 : 40);
            ok = run_case(tA, tB, M, N, K, alphas[c % 3], betas[(c / 3) % 3], irand(0, 5),
                          detail, sizeof detail);
        }
        snprintf(name, sizeof name, "random shapes transA=%d transB=%d", tA, tB);
        check(ok, name, detail);
    }
}

static void test_fixed_shapes(void) {
    static const int shapes[][3] = {{1, 1, 1}, {7, 13, 5}, {13, 7, 5}, {1, 100, 3}, {100, 1, 3},
                                    {12, 32, 1}, {13, 33, 17}, {8, 48, 2}, {9, 49, 16},
                                    {24, 64, 769}, {77, 40, 40}, {130, 47, 64}};
    char detail[512] = "";
    int ok = 1;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0] && ok; s++)
        for (int t = 0; t < 4 && ok; t++)
            ok = run_case(t >> 1, t & 1, shapes[s][0], shapes[s][1], shapes[s][2], 1.0f,
                          (s & 1) ? 0.0f : 1.0f, (int)(s % 3), detail, sizeof detail);
    check(ok, "edge shapes (1,1,1) (7,13,5) ... all transposes", detail);
}

static void test_degenerate(void) {
    float C[6] = {1, 2, 3, 4, 5, 6}, A[6] = {1, 1, 1, 1, 1, 1};
    sgemm(0, 0, 0, 3, 2, 1.0f, A, 2, A, 3, 0.0f, C, 3);
    sgemm(0, 0, 2, 0, 2, 1.0f, A, 2, A, 1, 0.0f, C, 3);
    check(C[0] == 1 && C[5] == 6, "M = 0 or N = 0 leaves C untouched", "C changed");

    float D[6] = {NAN, NAN, NAN, 4, 5, NAN};
    sgemm(0, 0, 2, 2, 0, 1.0f, A, 1, A, 2, 0.0f, D, 3);          // K = 0, beta = 0: C = 0
    int ok = D[0] == 0 && D[1] == 0 && isnan(D[2]) && D[3] == 0 && D[4] == 0 && isnan(D[5]);
    check(ok, "K = 0 with beta = 0 clears C (NaN does not leak), padding untouched", "wrong C");

    float E[4] = {1, 2, 3, 4};
    sgemm(1, 1, 2, 2, 0, 1.0f, A, 2, A, 1, 0.5f, E, 2);           // K = 0: C = beta·C
    check(E[0] == 0.5f && E[3] == 2.0f, "K = 0 with beta = 0.5 scales C", "wrong C");

    float F[4] = {1, 2, 3, 4};
    sgemm(0, 1, 2, 2, 3, 0.0f, NULL, 3, NULL, 3, 2.0f, F, 2);     // alpha = 0: A, B not read
    check(F[0] == 2.0f && F[3] == 8.0f, "alpha = 0 scales C without reading A or B", "wrong C");

    float G[7 * 13], H[13 * 5];
    memset(G, 0, sizeof G);
    memset(H, 0, sizeof H);
    double f0 = sgemm_flop_count();
    sgemm(0, 0, 7, 13, 5, 1.0f, H, 5, H, 13, 0.0f, G, 13);
    check(sgemm_flop_count() - f0 == 2.0 * 7 * 13 * 5, "sgemm_flop_count adds 2·M·N·K per call",
          "wrong count");
}

// Bitwise equality of 1, 2 and 3 threads. Shapes pick either microkernel and either split,
// and K spans several KC-blocks.
static void test_threads_bitwise(void) {
    static const int shapes[][5] = {{0, 1, 301, 203, 1700}, {0, 0, 37, 2000, 300},
                                    {1, 0, 128, 1000, 800}, {1, 1, 250, 90, 1000}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int tA = shapes[s][0], tB = shapes[s][1];
        int M = shapes[s][2], N = shapes[s][3], K = shapes[s][4];
        float *A = alloc_fill((size_t)M * K), *B = alloc_fill((size_t)K * N);
        float* C0 = alloc_fill((size_t)M * N);
        float* C[3];
        for (int t = 0; t < 3; t++) {
            C[t] = xmalloc((size_t)M * N * sizeof(float));
            memcpy(C[t], C0, (size_t)M * N * sizeof(float));
            threads_init(t + 1);
            sgemm(tA, tB, M, N, K, 0.75f, A, tA ? M : K, B, tB ? K : N, 0.5f, C[t], N);
        }
        size_t bytes = (size_t)M * N * sizeof(float);
        int ok = memcmp(C[0], C[1], bytes) == 0 && memcmp(C[0], C[2], bytes) == 0;
        char name[96];
        snprintf(name, sizeof name, "1 vs 2 vs 3 threads bitwise (%d,%d,%d) transA=%d transB=%d",
                 M, N, K, tA, tB);
        check(ok, name, "results differ between thread counts");
        for (int t = 0; t < 3; t++) free(C[t]);
        free(A);
        free(B);
        free(C0);
    }
    threads_init(0);
}

typedef struct Counts { int* hits; int nested_n; } Counts;

static void count_nested(void* ctx, int begin, int end) {
    int* hits = ctx;
    for (int i = begin; i < end; i++) hits[i]++;
}

static void count_range(void* ctx, int begin, int end) {
    Counts* c = ctx;
    for (int i = begin; i < end; i++) {
        c->hits[i]++;
        if (c->nested_n) {                     // a nested call must run serially and return
            int inner[7] = {0};
            parallel_for(7, count_nested, inner);
            for (int k = 0; k < 7; k++)
                if (inner[k] != 1) c->hits[c->nested_n + k] = 1000;
        }
    }
}

static void test_parallel_for(void) {
    static const int sizes[] = {0, 1, 2, 3, 5, 1000};
    int ok = 1;
    for (int t = 1; t <= 4; t++) {
        threads_init(t);
        ok = ok && threads_count() == t;
        for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
            int n = sizes[s], hits[1000 + 7] = {0};
            Counts c = {hits, 1000};
            parallel_for(n, count_range, &c);
            for (int i = 0; i < 1000 + 7; i++) ok = ok && hits[i] == (i < n);
        }
    }
    threads_init(0);
    ok = ok && threads_count() >= 1;
    check(ok, "parallel_for covers [0,n) once for 1-4 threads; nested calls run serially",
          "an index was run zero or several times, or threads_count is wrong");
}

// sgemm_op: an fp16 operand gives the bits of sgemm on its fp32 conversion (packing converts
// exactly); an im2col operand the bits of sgemm on the materialised im2col matrix; a bias the bits
// of a pass over C afterwards. Shapes cover all transposes, strides 1 and 2, asymmetric padding,
// images narrower than a vector (row-crossing pixel groups) and wider than a panel.
static void test_operands(void) {
    int ok = 1;
    char detail[256] = "";
    for (int c = 0; c < 80 && ok; c++) {
        int M = irand(1, 70), N = irand(1, 130), K = irand(1, 900), tA = c & 1, tB = (c >> 1) & 1, half_a = (c >> 2) & 1;
        int lda = (tA ? M : K) + irand(0, 2), ldb = (tB ? K : N) + irand(0, 2);
        size_t na = (size_t)(tA ? K : M) * lda, nb = (size_t)(tB ? N : K) * ldb;
        float *A = alloc_fill(na), *B = alloc_fill(nb), *X = half_a ? A : B;
        size_t nx = half_a ? na : nb;
        uint16_t* H = xmalloc(nx * sizeof(uint16_t));
        for (size_t i = 0; i < nx; i++) { H[i] = f32_to_f16(X[i]); X[i] = f16_to_f32(H[i]); }
        float *bias = alloc_fill((size_t)(M > N ? M : N)), *C1 = alloc_fill((size_t)M * N);
        float* C2 = xmalloc((size_t)M * N * sizeof(float));
        memcpy(C2, C1, (size_t)M * N * sizeof(float));
        int rows = c % 3 == 0;
        sgemm(tA, tB, M, N, K, 0.75f, A, lda, B, ldb, 0.5f, C1, N);
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) C1[(size_t)i * N + j] += bias[rows ? i : j];
        GemmOperand oa = {.f32 = half_a ? NULL : A, .f16 = half_a ? H : NULL, .ld = lda, .trans = tA};
        GemmOperand ob = {.f32 = half_a ? B : NULL, .f16 = half_a ? NULL : H, .ld = ldb, .trans = tB};
        sgemm_op(M, N, K, 0.75f, oa, ob, 0.5f, bias, rows, C2, N);
        if (memcmp(C1, C2, (size_t)M * N * sizeof(float)) != 0) {
            ok = 0;
            snprintf(detail, sizeof detail, "fp16 %s operand, bias per %s: M=%d N=%d K=%d tA=%d tB=%d", half_a ? "A" : "B",
                     rows ? "row" : "column", M, N, K, tA, tB);
        }
        free(A); free(B); free(H); free(bias); free(C1); free(C2);
    }
    check(ok, "sgemm_op: fp16 operand and bias = sgemm on the fp32 conversion + bias pass, bitwise", detail);
    ok = 1;
    for (int c = 0; c < 60 && ok; c++) {
        int C = irand(1, 12), H = irand(1, 40), W = irand(1, 70), K = c % 4 == 3 ? 1 : 3, s = 1 + (c % 5 == 4);
        int plo = K == 3 ? irand(0, 1) : 0, phi = K == 3 ? irand(0, 1) : 0, up = 1 + (c % 7 >= 4);
        if (c % 3 == 0) { W = 16 * irand(1, 5); s = 1; K = 3; plo = phi = 1; }   // the vector fast path
        H *= up;          // the image read through 2× nearest up-sampling of x [C, H/2, W/2]
        W *= up;
        int Ho = (H + plo + phi - K) / s + 1, Wo = (W + plo + phi - K) / s + 1;
        if (Ho < 1 || Wo < 1) continue;
        int OC = irand(1, 40), CKK = C * K * K, P = Ho * Wo;
        float *x = alloc_fill((size_t)C * (H / up) * (W / up)), *w = alloc_fill((size_t)OC * CKK);
        float* col = xmalloc((size_t)CKK * P * sizeof(float));
        for (int k = 0; k < CKK; k++)
            for (int p = 0; p < P; p++) {
                int ch = k / (K * K), iy = p / Wo * s - plo + k / K % K, ix = p % Wo * s - plo + k % K;
                int inside = iy >= 0 && iy < H && ix >= 0 && ix < W;
                col[(size_t)k * P + p] = inside ? x[((size_t)ch * (H / up) + iy / up) * (W / up) + ix / up] : 0.0f;
            }
        float *C1 = xmalloc((size_t)OC * P * sizeof(float)), *C2 = xmalloc((size_t)OC * P * sizeof(float));
        sgemm(0, 0, OC, P, CKK, 1.0f, w, CKK, col, P, 0.0f, C1, P);
        GemmIm2col im = {x, C, H, W, K, s, plo, Wo, up};
        sgemm_op(OC, P, CKK, 1.0f, (GemmOperand){.f32 = w, .ld = CKK}, (GemmOperand){.im2col = &im}, 0.0f,
                 NULL, 0, C2, P);
        if (memcmp(C1, C2, (size_t)OC * P * sizeof(float)) != 0) {
            ok = 0;
            snprintf(detail, sizeof detail, "C=%d H=%d W=%d K=%d stride=%d pad=(%d,%d) up=%d OC=%d", C, H, W, K, s, plo, phi,
                     up, OC);
        }
        free(x); free(w); free(col); free(C1); free(C2);
    }
    check(ok, "sgemm_op: im2col operand (also up-sampled) = sgemm on the materialised im2col matrix, bitwise", detail);
    ok = 1;
    for (int c = 0; c < 40 && ok; c++) {     // pre-packed A or B, reused for products of other widths
        int M = irand(1, 300), N = irand(1, 200), K = irand(1, 1700), tA = c & 1, tB = (c >> 1) & 1, pb = (c >> 2) & 1;
        int M2 = pb ? irand(1, 300) : M, N2 = pb ? N : irand(1, 200);   // the other side of the second product
        float *A = alloc_fill((size_t)M2 * K), *B = alloc_fill((size_t)K * N2);
        float *C1 = xmalloc((size_t)M2 * N2 * sizeof(float)), *C2 = xmalloc((size_t)M2 * N2 * sizeof(float));
        GemmOperand oa = {.f32 = A, .ld = tA ? M2 : K, .trans = tA}, ob = {.f32 = B, .ld = tB ? K : N2, .trans = tB};
        float* buf = aligned_alloc(64, (sgemm_pack_floats(M, N, K, pb) * sizeof(float) + 63) / 64 * 64);
        GemmPacked pk;
        sgemm_pack(&pk, buf, pb ? ob : oa, M, N, K, pb);
        sgemm_op(M2, N2, K, 1.25f, oa, ob, 0.0f, NULL, 0, C1, N2);
        if (pb) ob = (GemmOperand){.packed = &pk};
        else oa = (GemmOperand){.packed = &pk};
        sgemm_op(M2, N2, K, 1.25f, oa, ob, 0.0f, NULL, 0, C2, N2);
        if (memcmp(C1, C2, (size_t)M2 * N2 * sizeof(float)) != 0) {
            ok = 0;
            snprintf(detail, sizeof detail, "packed %s for %d×%d×%d, used in %d×%d×%d", pb ? "B" : "A", M, N, K, M2, N2, K);
        }
        free(A); free(B); free(C1); free(C2); free(buf);
    }
    check(ok, "sgemm_op: pre-packed operand = the same product packed on the fly, bitwise", detail);
}

static void run_all(void) {
    printf("kernel %s\n", sgemm_kernel_name());
    test_fixed_shapes();
    test_random_shapes();
    test_degenerate();
    test_operands();
    test_threads_bitwise();
    test_parallel_for();
}

// Runs the suite in a child with INSTASTYLE_GEMM=name; adds its counts to ours.
static void run_child(const char* name) {
    int fd[2];
    CHECK(pipe(fd) == 0, "pipe failed");
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork failed");
    if (pid == 0) {
        close(fd[0]);
        setenv("INSTASTYLE_GEMM", name, 1);
        int counts[2] = {0, 0};
        if (strcmp(sgemm_kernel_name(), name) == 0) {
            run_all();
            counts[0] = g_pass;
            counts[1] = g_fail;
        } else {
            printf("skip %s kernel (this CPU lacks it)\n", name);
        }
        fflush(stdout);
        ssize_t w = write(fd[1], counts, sizeof counts);
        _exit(w == (ssize_t)sizeof counts ? 0 : 1);
    }
    close(fd[1]);
    int counts[2] = {0, 1}, status = 0;
    ssize_t r = read(fd[0], counts, sizeof counts);
    close(fd[0]);
    waitpid(pid, &status, 0);
    if (r != (ssize_t)sizeof counts || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        printf("FAIL %s kernel suite: child process crashed\n", name);
        counts[0] = 0;
        counts[1] = 1;
    }
    g_pass += counts[0];
    g_fail += counts[1];
}

int main(void) {
    // Children first: the parent must not have started its thread pool when it forks.
    if (!getenv("INSTASTYLE_GEMM")) {
        run_child("scalar");
        run_child("avx2");
    }
    run_all();
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
