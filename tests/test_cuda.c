// test_cuda.c: every <op>_cuda of nn_cuda.cu against its CPU twin, on random inputs at SD 1.5
// shapes (built only by make CUDA=1; it needs an NVIDIA GPU, and says "no CUDA device" without one).
//
// Each case runs the op four ways: the CPU function with g_device = DEVICE_CPU (the reference,
// timed); <op>_cuda called directly, twice (the second timed, host copies included), which must
// agree bit for bit (the kernels use no atomics); and the CPU function with g_device = DEVICE_CUDA,
// which must reach <op>_cuda (cuda_calls() counts) and give those same bits: the dispatch line.
// Accumulating outputs (conv2d_backward_input, attention_backward) restart from the same random
// values each time.
//
// Tolerances, element by element:
//   GEMM-shaped ops (sgemm, linear, conv2d forward and backward-data, K = summed products each):
//   any order of summing K products in float is within γ_(K+2)·S of the exact value (Higham,
//   "Accuracy and Stability of Numerical Algorithms", §3.1), S = Σ|a·b| + |beta·c| (+ |bias|),
//   computed by running the CPU op on absolute values. CPU and GPU may err in opposite
//   directions: |gpu − cpu| <= 2·(K+2)·2⁻²⁴·S. Tensor-core modes (INSTASTYLE_CUDA_GEMM) allow
//   3·(K+2)·2⁻²⁴·S for the sums (their adders need not round to nearest: the GPU's share doubles)
//   plus the product error: 3xtf32 2⁻¹⁹·S (the dropped small·small term and the rounding of
//   `small`, ~3·2⁻²² each product), tf32 2⁻⁹·S (both factors rounded to 11 significant bits).
//   Attention and norms: |gpu − cpu| <= atol·max|cpu| + rtol·|cpu| per output, with atol/rtol
//   in each case (FP32 rounding differences are ~1e-7 relative; a wrong index or a lost
//   rescaling moves results by 1e-2 or more).
// Prints per output: max abs error, max rel error, fraction of the allowed error used; per case
// the time of a CPU call and a CUDA call; then PASS/FAIL; last line "N passed, M failed".
// usage: test_cuda [--small] [GOLDEN_DIR (ignored)]   --small: reduced shapes (a quick smoke run)
#define _POSIX_C_SOURCE 200809L
#include "instastyle.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


enum { RUN_CPU, RUN_DIRECT, RUN_DISPATCH };
static int g_pass, g_fail, g_small;
static Arena g_arena;

static uint32_t g_seed = 2024;
static float frand(void) {                  // uniform in [-1, 1)
    g_seed = g_seed * 1664525u + 1013904223u;
    return (float)(g_seed >> 8) / 8388608.0f - 1.0f;
}
static float* rnd(size_t n, float scale, float shift) {
    float* x = xmalloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = scale * frand() + shift;
    return x;
}
static float* copyf(const float* x, size_t n) {
    float* y = xmalloc((n ? n : 1) * sizeof(float));
    memcpy(y, x, n * sizeof(float));
    return y;
}
static float* absdup(const float* x, size_t n) {
    float* y = copyf(x, n);
    for (size_t i = 0; i < n; i++) y[i] = fabsf(y[i]);
    return y;
}

// One call of op with one argument list: <op>_cuda directly, or the CPU function with g_device
// set to CPU (the reference) or CUDA (through its dispatch line).
#define RUN_OP(how, op, ...)                                                                      \
    do {                                                                                          \
        if ((how) == RUN_DIRECT) op##_cuda(__VA_ARGS__);                                          \
        else { g_device = (how) == RUN_DISPATCH ? DEVICE_CUDA : DEVICE_CPU; op(__VA_ARGS__); } \
        g_device = DEVICE_CPU;                                                               \
    } while (0)

// One output of a case: buffer (written by run), size, and its tolerance: per-element bound
// (GEMM-shaped ops) or atol·max|ref| + rtol·|ref|.
typedef struct Out { const char* name; float* buf; size_t n; const float* bound; double atol, rtol; } Out;
typedef void (*RunFn)(void* ctx, int how);

// The GEMM bound 2·(K+2)·u·S (+ the tensor-core terms), S from a CPU run on absolute values.
static float* gemm_bound(float* S, size_t n, double K) {
    const char* mode = cuda_gemm_mode();
    double acc = (strcmp(mode, "fp32") == 0 ? 2.0 : 3.0) * (K + 2) * ldexp(1.0, -24);
    double prod = strcmp(mode, "tf32") == 0 ? ldexp(1.0, -9) : strcmp(mode, "3xtf32") == 0 ? ldexp(1.0, -19) : 0.0;
    for (size_t i = 0; i < n; i++) S[i] = (float)((acc + prod) * S[i]);
    return S;
}

static int bits_equal(float* const* a, const Out* o, int nout) {
    for (int i = 0; i < nout; i++) if (memcmp(a[i], o[i].buf, o[i].n * sizeof(float))) return 0;
    return 1;
}

// Runs the case the four ways, compares, prints, counts.
static void check_op(const char* name, RunFn run, void* ctx, Out* o, int nout, double gflop) {
    float *ref[4], *first[4];
    double t0 = time_now();
    run(ctx, RUN_CPU);
    double tcpu = time_now() - t0;
    for (int i = 0; i < nout; i++) ref[i] = copyf(o[i].buf, o[i].n);
    run(ctx, RUN_DIRECT);                              // first call: uploads weights, loads the module
    for (int i = 0; i < nout; i++) first[i] = copyf(o[i].buf, o[i].n);
    t0 = time_now();
    run(ctx, RUN_DIRECT);
    double tgpu = time_now() - t0;
    int repeat = bits_equal(first, o, nout);
    long calls = cuda_calls();
    run(ctx, RUN_DISPATCH);
    int dispatch = cuda_calls() > calls && bits_equal(first, o, nout);
    int ok = repeat && dispatch;
    printf("%s\n", name);
    for (int i = 0; i < nout; i++) {
        double refmax = 0, maxabs = 0, maxrel = 0, used = 0;
        size_t worst = 0, bad = 0;
        for (size_t e = 0; e < o[i].n; e++) refmax = fmax(refmax, fabs(ref[i][e]));
        for (size_t e = 0; e < o[i].n; e++) {
            double g = first[i][e], r = ref[i][e], err = fabs(g - r);
            double allowed = o[i].bound ? o[i].bound[e] : o[i].atol * refmax + o[i].rtol * fabs(r);
            if (!(err <= allowed) || !isfinite(g)) { if (!bad++) worst = e; }
            if (err > maxabs) maxabs = err;
            if (r != 0 && err / fabs(r) > maxrel) maxrel = err / fabs(r);
            if (allowed > 0 && err / allowed > used) { used = err / allowed; if (!bad) worst = e; }
        }
        printf("  %-6s n=%-10zu max abs %.3e  max rel %.3e  %5.1f%% of allowed%s", o[i].name, o[i].n, maxabs, maxrel,
               100 * used, bad ? "" : "\n");
        if (bad) printf("  FAILED at %zu elements, first [%zu]: cuda %.9g cpu %.9g\n", bad, worst,
                        first[i][worst], ref[i][worst]);
        ok = ok && !bad;
        free(ref[i]);
        free(first[i]);
    }
    printf("  cpu %9.3f ms   cuda %9.3f ms (host copies included)", 1e3 * tcpu, 1e3 * tgpu);
    if (gflop > 0) printf("   %.1f / %.1f GFLOP/s", gflop / tcpu, gflop / tgpu);
    printf("\n");
    if (!repeat) printf("  two CUDA runs differ (expected bitwise equal)\n");
    if (!dispatch) printf("  with g_device = CUDA the CPU function did not call <op>_cuda (is the dispatch line in?)\n");
    printf("%s %s\n", ok ? "PASS" : "FAIL", name);
    fflush(stdout);
    if (ok) g_pass++;
    else g_fail++;
}

// ---------------------------------------------------------------------------------------------
// sgemm

typedef struct { int tA, tB, M, N, K, lda, ldb, ldc; float alpha, beta; float *A, *B, *C0, *C; } SgemmCase;

static void sgemm_run(void* p, int how) {
    SgemmCase* c = p;
    memcpy(c->C, c->C0, (size_t)c->M * c->ldc * sizeof(float));
    RUN_OP(how, sgemm, c->tA, c->tB, c->M, c->N, c->K, c->alpha, c->A, c->lda, c->B, c->ldb, c->beta, c->C, c->ldc);
}

// pad: extra columns in every leading dimension; C's padding holds a sentinel that must survive,
// and with beta = 0 C starts as NaN (it must not be read). frozen_b: B served from the weight cache.
static void test_sgemm(int tA, int tB, int M, int N, int K, float alpha, float beta, int pad, int frozen_b) {
    SgemmCase c = {tA, tB, M, N, K, (tA ? M : K) + pad, (tB ? K : N) + pad, N + pad, alpha, beta, 0, 0, 0, 0};
    size_t na = (size_t)(tA ? K : M) * c.lda, nb = (size_t)(tB ? N : K) * c.ldb, nc = (size_t)M * c.ldc;
    c.A = rnd(na, 1, 0); c.B = rnd(nb, 1, 0); c.C0 = rnd(nc, 1, 0); c.C = xmalloc(nc * sizeof(float));
    for (size_t e = 0; e < nc; e++) if ((int)(e % c.ldc) >= N) c.C0[e] = 12345.0f; else if (beta == 0) c.C0[e] = NAN;
    float *aA = absdup(c.A, na), *aB = absdup(c.B, nb), *S = absdup(c.C0, nc);
    if (beta == 0) for (size_t e = 0; e < nc; e++) S[e] = 0;
    sgemm(tA, tB, M, N, K, fabsf(alpha), aA, c.lda, aB, c.ldb, fabsf(beta), S, c.ldc);
    for (size_t e = 0; e < nc; e++) if ((int)(e % c.ldc) >= N) S[e] = 0;   // padding: exactly the sentinel
    gemm_bound(S, nc, K);
    if (frozen_b) cuda_weights_frozen(c.B, nb);
    char name[160];
    snprintf(name, sizeof name, "sgemm %dx%dx%d transA=%d transB=%d alpha=%g beta=%g pad=%d%s", M, N, K, tA, tB, alpha,
             beta, pad, frozen_b ? ", B cached" : "");
    Out o[1] = {{"C", c.C, nc, S, 0, 0}};
    check_op(name, sgemm_run, &c, o, 1, 2e-9 * M * N * K);
    cuda_weights_release();
    free(c.A); free(c.B); free(c.C0); free(c.C); free(aA); free(aB); free(S);
}

// linear (the bias is added per output column)

typedef struct { int M, IN, OUT; float *x, *w, *b, *y; } LinearCase;

static void linear_run(void* p, int how) {
    LinearCase* c = p;
    RUN_OP(how, linear_forward, c->y, c->x, c->w, c->b, c->M, c->IN, c->OUT);
}

static void test_linear(int M, int IN, int OUT, int bias) {
    LinearCase c = {M, IN, OUT, rnd((size_t)M * IN, 1, 0), rnd((size_t)OUT * IN, 1, 0), bias ? rnd(OUT, 1, 0) : NULL,
                    xmalloc((size_t)M * OUT * sizeof(float))};
    float *ax = absdup(c.x, (size_t)M * IN), *aw = absdup(c.w, (size_t)OUT * IN), *ab = bias ? absdup(c.b, OUT) : NULL;
    float* S = xmalloc((size_t)M * OUT * sizeof(float));
    linear_forward(S, ax, aw, ab, M, IN, OUT);
    gemm_bound(S, (size_t)M * OUT, IN);
    cuda_weights_frozen(c.w, (size_t)OUT * IN);
    char name[120];
    snprintf(name, sizeof name, "linear_forward %dx%d -> %d%s, weight cached", M, IN, OUT, bias ? " + bias" : "");
    Out o[1] = {{"out", c.y, (size_t)M * OUT, S, 0, 0}};
    check_op(name, linear_run, &c, o, 1, 2e-9 * M * IN * OUT);
    cuda_weights_release();
    free(c.x); free(c.w); free(c.b); free(c.y); free(ax); free(aw); free(ab); free(S);
}

// ---------------------------------------------------------------------------------------------
// conv2d forward, forward through 2× up-sampling, backward-data

typedef struct { int N, C, H, W, OC, K, s, plo, phi, Ho, Wo; float *x, *w, *b, *y, *dx0, *dx, *dy; } ConvCase;

static void conv_fwd_run(void* p, int how) {
    ConvCase* c = p;
    RUN_OP(how, conv2d_forward, c->y, c->x, c->w, c->b, c->N, c->C, c->H, c->W, c->OC, c->K, c->s, c->plo, c->phi,
           &g_arena);
}
static void conv_up2_run(void* p, int how) {
    ConvCase* c = p;
    RUN_OP(how, conv2d_forward_up2, c->y, c->x, c->w, NULL, c->b, c->N, c->C, c->H, c->W, c->OC, c->K, c->plo);
}
static void conv_bwd_run(void* p, int how) {
    ConvCase* c = p;
    memcpy(c->dx, c->dx0, (size_t)c->N * c->C * c->H * c->W * sizeof(float));
    RUN_OP(how, conv2d_backward_input, c->dx, c->dy, c->w, c->N, c->C, c->H, c->W, c->OC, c->K, c->s, c->plo, c->phi,
           &g_arena);
}

static void test_conv(const char* what, int N, int C, int H, int W, int OC, int K, int s, int plo, int phi) {
    ConvCase c = {N, C, H, W, OC, K, s, plo, phi, (H + plo + phi - K) / s + 1, (W + plo + phi - K) / s + 1,
                  0, 0, 0, 0, 0, 0, 0};
    size_t nx = (size_t)N * C * H * W, nw = (size_t)OC * C * K * K, ny = (size_t)N * OC * c.Ho * c.Wo;
    c.x = rnd(nx, 1, 0); c.w = rnd(nw, 1, 0); c.b = rnd(OC, 1, 0); c.y = xmalloc(ny * sizeof(float));
    c.dy = rnd(ny, 1, 0); c.dx0 = rnd(nx, 1, 0); c.dx = xmalloc(nx * sizeof(float));
    float *ax = absdup(c.x, nx), *aw = absdup(c.w, nw), *ab = absdup(c.b, OC), *ady = absdup(c.dy, ny);
    float *Sy = xmalloc(ny * sizeof(float)), *Sx = absdup(c.dx0, nx);
    conv2d_forward(Sy, ax, aw, ab, N, C, H, W, OC, K, s, plo, phi, &g_arena);
    conv2d_backward_input(Sx, ady, aw, N, C, H, W, OC, K, s, plo, phi, &g_arena);
    gemm_bound(Sy, ny, (double)C * K * K);
    gemm_bound(Sx, nx, (double)OC * K * K);
    cuda_weights_frozen(c.w, nw);
    cuda_weights_frozen(c.b, OC);
    char name[200];
    double gflop = 2e-9 * ny * C * K * K;
    snprintf(name, sizeof name, "conv2d_forward %s: %dx%dx%dx%d -> %d, k%d s%d pad (%d, %d)", what, N, C, H, W, OC,
             K, s, plo, phi);
    Out oy[1] = {{"out", c.y, ny, Sy, 0, 0}};
    check_op(name, conv_fwd_run, &c, oy, 1, gflop);
    snprintf(name, sizeof name, "conv2d_backward_input %s: %dx%dx%dx%d <- %d, k%d s%d pad (%d, %d)", what, N, C, H, W,
             OC, K, s, plo, phi);
    Out ox[1] = {{"dinp", c.dx, nx, Sx, 0, 0}};
    check_op(name, conv_bwd_run, &c, ox, 1, gflop);
    cuda_weights_release();
    free(c.x); free(c.w); free(c.b); free(c.y); free(c.dy); free(c.dx0); free(c.dx);
    free(ax); free(aw); free(ab); free(ady); free(Sy); free(Sx);
}

// out[N, OC, 2H, 2W] = conv(upsample_nearest_2×(x[N, C, H, W])), k K, padding pad (the up-samplers).
static void test_conv_up2(int N, int C, int H, int W, int OC, int K, int pad) {
    ConvCase c = {N, C, H, W, OC, K, 1, pad, pad, 2 * H + 2 * pad - K + 1, 2 * W + 2 * pad - K + 1, 0, 0, 0, 0, 0, 0, 0};
    size_t nx = (size_t)N * C * H * W, nw = (size_t)OC * C * K * K, ny = (size_t)N * OC * c.Ho * c.Wo;
    c.x = rnd(nx, 1, 0); c.w = rnd(nw, 1, 0); c.b = rnd(OC, 1, 0); c.y = xmalloc(ny * sizeof(float));
    float *ax = absdup(c.x, nx), *aw = absdup(c.w, nw), *ab = absdup(c.b, OC), *S = xmalloc(ny * sizeof(float));
    conv2d_forward_up2(S, ax, aw, NULL, ab, N, C, H, W, OC, K, pad);
    gemm_bound(S, ny, (double)C * K * K);
    char name[160];
    snprintf(name, sizeof name, "conv2d_forward_up2 upsampler: %dx%dx%dx%d -> %d at %dx%d, k%d pad %d", N, C, H, W, OC,
             c.Ho, c.Wo, K, pad);
    Out o[1] = {{"out", c.y, ny, S, 0, 0}};
    check_op(name, conv_up2_run, &c, o, 1, 2e-9 * ny * C * K * K);
    free(c.x); free(c.w); free(c.b); free(c.y); free(ax); free(aw); free(ab); free(S);
}

// ---------------------------------------------------------------------------------------------
// attention forward and backward. q, k, v are column blocks of one fused row buffer
// [N, T, 3·NH·HD] for self-attention (ld = 3C), separate for cross-attention; out has ld C.

typedef struct {
    int N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal;
    const float *q, *k, *v;
    float *o, *lse, *dout, *dq, *dk, *dv, *g0, *g;   // g0: initial gradients (dq|dk|dv buffers), g: working copy
    size_t ng;
} AttnCase;

static void attn_fwd_run(void* p, int how) {
    AttnCase* a = p;
    RUN_OP(how, attention_forward, a->o, a->lse, a->q, a->k, a->v, a->N, a->Tq, a->Tk, a->NH, a->HD, a->ldq, a->ldk,
           a->ldv, a->ldo, a->causal, &g_arena);
}
static void attn_bwd_run(void* p, int how) {
    AttnCase* a = p;
    memcpy(a->g, a->g0, a->ng * sizeof(float));
    RUN_OP(how, attention_backward, a->dq, a->dk, a->dv, a->dout, a->o, a->lse, a->q, a->k, a->v, a->N, a->Tq, a->Tk,
           a->NH, a->HD, a->ldq, a->ldk, a->ldv, a->ldo, a->causal, &g_arena);
}

// self: Tq == Tk and q, k, v fused; want_dq = 0 checks the backward with dq = NULL.
static void test_attention(const char* what, int N, int Tq, int Tk, int NH, int HD, int self, int causal, int backward,
                           int want_dq) {
    int C = NH * HD;
    AttnCase a = {N, Tq, Tk, NH, HD, 0, 0, 0, C, causal, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    float *qkv = NULL, *qb = NULL, *kvb = NULL;
    if (self) {            // queries 3× wider so that the softmax is peaked and its max moves between key blocks
        qkv = rnd((size_t)N * Tq * 3 * C, 1, 0);
        for (size_t r = 0; r < (size_t)N * Tq; r++) for (int e = 0; e < C; e++) qkv[r * 3 * C + e] *= 3;
        a.q = qkv; a.k = qkv + C; a.v = qkv + 2 * C; a.ldq = a.ldk = a.ldv = 3 * C;
    } else {
        qb = rnd((size_t)N * Tq * C, 3, 0); kvb = rnd((size_t)N * Tk * 2 * C, 1, 0);
        a.q = qb; a.k = kvb; a.v = kvb + C; a.ldq = C; a.ldk = a.ldv = 2 * C;
    }
    size_t no = (size_t)N * Tq * C, nl = (size_t)N * NH * Tq;
    a.o = xmalloc(no * sizeof(float)); a.lse = xmalloc(nl * sizeof(float));
    double pairs = (double)N * NH * Tq * Tk * (causal ? 0.5 : 1.0);
    char name[200];
    snprintf(name, sizeof name, "attention_forward %s: N=%d Tq=%d Tk=%d NH=%d HD=%d%s", what, N, Tq, Tk, NH, HD,
             causal ? " causal" : "");
    Out of[2] = {{"out", a.o, no, NULL, 1e-5, 1e-4}, {"lse", a.lse, nl, NULL, 2e-6, 2e-6}};
    if (!backward) check_op(name, attn_fwd_run, &a, of, 2, 4e-9 * pairs * HD);
    else {
        attn_fwd_run(&a, RUN_CPU);       // out and lse: inputs of both backwards
        size_t nq = (size_t)N * Tq * a.ldq, nk = (size_t)N * Tk * a.ldk;
        a.dout = rnd(no, 1, 0);
        // the gradients mirror q, k, v: one fused buffer for self-attention, dq | dkv otherwise
        a.ng = self ? nq : nq + nk;
        a.g0 = rnd(a.ng, 1, 0); a.g = xmalloc(a.ng * sizeof(float));
        a.dq = want_dq ? a.g : NULL;
        a.dk = self ? a.g + C : a.g + nq;
        a.dv = a.dk + C;
        snprintf(name, sizeof name, "attention_backward %s: N=%d Tq=%d Tk=%d NH=%d HD=%d%s%s", what, N, Tq, Tk, NH, HD,
                 causal ? " causal" : "", want_dq ? "" : ", dq = NULL");
        Out ob[1] = {{"dqkv", a.g, a.ng, NULL, 2e-5, 1e-4}};
        check_op(name, attn_bwd_run, &a, ob, 1, 10e-9 * pairs * HD);
        free(a.dout); free(a.g0); free(a.g);
    }
    free(qkv); free(qb); free(kvb); free(a.o); free(a.lse);
}

// ---------------------------------------------------------------------------------------------
// group norm (with and without the fused SiLU) and layer norm

typedef struct { int N, C, HW, G, silu, M; float eps; float *x, *w, *b, *y, *mean, *rstd; } NormCase;

static void gn_run(void* p, int how) {
    NormCase* c = p;
    RUN_OP(how, groupnorm_forward, c->y, c->mean, c->rstd, c->x, c->w, c->b, c->N, c->C, c->HW, c->G, c->eps, c->silu);
}
static void ln_run(void* p, int how) {
    NormCase* c = p;
    RUN_OP(how, layernorm_forward, c->y, c->mean, c->rstd, c->x, c->w, c->b, c->M, c->C, c->eps);
}

// G > 0: groupnorm x[N, C, HW]; G == 0: layernorm x[M = N, C]. Inputs are off-centre (mean ~0.5)
// so that the saved mean is not ~0.
static void test_norm(int N, int C, int HW, int G, float eps, int silu) {
    size_t n = (size_t)N * C * (G ? HW : 1), ns = G ? (size_t)N * G : (size_t)N;
    NormCase c = {N, C, HW, G, silu, N, eps, rnd(n, 2, 0.5f), rnd(C, 1, 1), rnd(C, 1, 0), xmalloc(n * sizeof(float)),
                  xmalloc(ns * sizeof(float)), xmalloc(ns * sizeof(float))};
    cuda_weights_frozen(c.w, C);
    cuda_weights_frozen(c.b, C);
    char name[160];
    if (G) snprintf(name, sizeof name, "groupnorm_forward %dx%dx%d G=%d eps=%g%s", N, C, HW, G, eps, silu ? " + silu" : "");
    else snprintf(name, sizeof name, "layernorm_forward %dx%d eps=%g", N, C, eps);
    Out o[3] = {{"out", c.y, n, NULL, 2e-6, 1e-5}, {"mean", c.mean, ns, NULL, 0, 1e-6}, {"rstd", c.rstd, ns, NULL, 0, 1e-6}};
    check_op(name, G ? gn_run : ln_run, &c, o, 3, 0);
    cuda_weights_release();
    free(c.x); free(c.w); free(c.b); free(c.y); free(c.mean); free(c.rstd);
}

int main(int argc, char** argv) {
    for (int i = 1; i < argc; i++) if (strcmp(argv[i], "--small") == 0) g_small = 1;
    threads_init(0);
    arena_init(&g_arena, (size_t)64 << 20);
    cuda_init();                              // exits with "no CUDA device" when there is none
    printf("test_cuda: %s, GEMM mode %s (INSTASTYLE_CUDA_GEMM), %d CPU threads, sgemm kernel %s%s\n",
           cuda_device_name(), cuda_gemm_mode(), threads_count(), sgemm_kernel_name(), g_small ? ", small shapes" : "");
    int s = g_small;
    // sgemm: UNet linear (weight cached), conv-shaped, attention QK, and the awkward ones:
    // transposes, alpha/beta, padded leading dimensions, sizes off the 128-tile grid
    test_sgemm(0, 1, s ? 300 : 8192, s ? 130 : 320, s ? 70 : 320, 1.0f, 0.0f, 0, 1);
    test_sgemm(0, 0, s ? 129 : 320, s ? 200 : 4096, s ? 100 : 2880, 1.0f, 0.0f, 0, 0);
    test_sgemm(0, 1, s ? 200 : 4096, s ? 150 : 4096, 40, 0.158f, 0.0f, 0, 0);
    test_sgemm(1, 0, 333, 257, 77, 0.7f, 0.5f, 3, 0);
    test_sgemm(1, 1, 77, 200, 130, -1.5f, 1.0f, 1, 1);
    test_sgemm(0, 0, 5, 7, 0, 1.0f, 2.0f, 2, 0);                        // K = 0: C = beta·C
    // linear: transformer projections (to_q 320, GEGLU 320 -> 2560, CLIP fc1 768 -> 3072)
    test_linear(s ? 300 : 8192, 320, s ? 200 : 2560, 1);
    test_linear(s ? 100 : 4096, s ? 64 : 320, s ? 96 : 320, 0);
    test_linear(154, 768, s ? 300 : 3072, 1);
    // conv2d: ResBlock 3x3, down-sampler (UNet pad 1, VAE pad (0, 1)), 1x1 shortcut, conv_in
    test_conv("resnet 3x3", 2, s ? 32 : 320, s ? 16 : 64, s ? 16 : 64, s ? 48 : 320, 3, 1, 1, 1);
    test_conv("unet downsample", 2, s ? 32 : 320, s ? 16 : 64, s ? 16 : 64, s ? 32 : 320, 3, 2, 1, 1);
    test_conv("vae downsample", 1, s ? 16 : 128, s ? 17 : 128, s ? 15 : 128, s ? 16 : 128, 3, 2, 0, 1);
    test_conv("1x1 shortcut", 2, s ? 40 : 640, s ? 8 : 32, s ? 8 : 32, s ? 24 : 320, 1, 1, 0, 0);
    test_conv("unet conv_in", 2, 4, s ? 16 : 64, s ? 16 : 64, s ? 40 : 320, 3, 1, 1, 1);
    test_conv_up2(2, s ? 24 : 640, s ? 8 : 32, s ? 7 : 32, s ? 16 : 640, 3, 1);
    // attention: UNet self (HD 40, 80, 160), cross on 77 text tokens, CLIP causal, VAE one 512-wide head
    test_attention("unet self", 2, s ? 200 : 4096, s ? 200 : 4096, s ? 2 : 8, 40, 1, 0, 0, 1);
    test_attention("unet cross", 2, s ? 100 : 4096, 77, s ? 2 : 8, 40, 0, 0, 0, 1);
    test_attention("clip causal", 2, 77, 77, 12, 64, 1, 1, 0, 1);
    test_attention("unet self level 1", s ? 1 : 2, s ? 150 : 1024, s ? 150 : 1024, s ? 2 : 8, 80, 1, 0, 0, 1);
    test_attention("unet self level 2", s ? 1 : 2, s ? 100 : 256, s ? 100 : 256, s ? 2 : 8, 160, 1, 0, 0, 1);
    test_attention("vae mid", 1, s ? 100 : 4096, s ? 100 : 4096, 1, 512, 1, 0, 0, 1);
    test_attention("unet self", s ? 1 : 2, s ? 150 : 4096, s ? 150 : 4096, s ? 2 : 8, 40, 1, 0, 1, 1);
    test_attention("unet cross", 2, s ? 100 : 4096, 77, s ? 2 : 8, 40, 0, 0, 1, 1);
    test_attention("unet cross", 2, s ? 100 : 4096, 77, s ? 2 : 8, 40, 0, 0, 1, 0);
    test_attention("clip causal", 2, 77, 77, 12, 64, 1, 1, 1, 1);
    test_attention("unet self level 1", s ? 1 : 2, s ? 150 : 1024, s ? 150 : 1024, s ? 2 : 8, 80, 1, 0, 1, 1);
    test_attention("unet self level 2", s ? 1 : 2, s ? 70 : 256, s ? 70 : 256, s ? 2 : 8, 160, 1, 0, 1, 1);
    // norms: ResBlock groupnorm + SiLU, transformer groupnorm, VAE, transformer and CLIP layernorms
    test_norm(2, s ? 64 : 320, s ? 64 : 4096, 32, 1e-5f, 1);
    test_norm(2, s ? 64 : 1280, s ? 25 : 64, 32, 1e-6f, 0);
    test_norm(1, s ? 32 : 512, s ? 100 : 4096, s ? 16 : 32, 1e-6f, 1);
    test_norm(s ? 300 : 8192, 320, 0, 0, 1e-5f, 0);
    test_norm(154, 768, 0, 0, 1e-5f, 0);
    test_norm(s ? 64 : 512, 1280, 0, 0, 1e-5f, 0);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    arena_free(&g_arena);
    cuda_shutdown();
    return g_fail > 0;
}
