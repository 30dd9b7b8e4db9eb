// test_kernels.c: the fast paths of nn.c against plain references.
//
//   conv2d forward / backward-data (implicit GEMM, col2im tiles, 1×1) against the 7-loop
//     definition, within the rounding bound of test_gemm.c: |got − ref| <= 2·(n+2)·2⁻²⁴·S, where
//     S = Σ|terms| of the element and n their number (any summation order stays inside it);
//   conv2d_forward_up2 = upsample_nearest_forward + conv2d_forward, bit for bit;
//   the fp16-weight variants = the fp32 kernels on the converted weights, bit for bit;
//   attention forward / backward against the softmax definition summed in double, at sizes with
//     several blocks, partial blocks, cross-attention and the causal mask (relative 2e-5 of
//     the output's scale: the vector exp is within 2 ulp, sums are float);
//   GEGLU forward / backward against the erf definition in double (relative 1e-5: the vector
//     erf is Abramowitz-Stegun 7.1.26, |error| < 1.5e-7);
//   GroupNorm (+ SiLU) forward / backward against the definition in double;
//   1 vs 2 threads bitwise for each.
// The suite runs twice: with the CPU's vector row kernels and, in a child process, with
// INSTASTYLE_NO_AVX512=1 (the plain loops). The last line is "N passed, M failed".
#define _POSIX_C_SOURCE 200809L
#include "instastyle.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int g_pass, g_fail;
static Arena g_arena;

static void check(int ok, const char* name, const char* detail) {
    printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name, ok ? "" : ": ", ok ? "" : detail);
    fflush(stdout);
    if (ok) g_pass++;
    else g_fail++;
}

static uint32_t g_seed = 777;
static float frand(void) { g_seed = g_seed * 1664525u + 1013904223u; return (float)(g_seed >> 8) / 8388608.0f - 1.0f; }
static float* fill(size_t n, float scale) {
    float* x = xmalloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = scale * frand();
    return x;
}
static float* copy(const float* x, size_t n) { return memcpy(xmalloc((n ? n : 1) * sizeof(float)), x, n * sizeof(float)); }

// ----------------------------------------------------------------------------------------------
// convolution

typedef struct ConvCase { int N, C, H, W, OC, K, s, plo, phi; } ConvCase;

// Direct forward and backward-data with their error bounds (bound[i] = 2·(n+2)·2⁻²⁴·S).
static void conv_ref(const ConvCase* c, const float* x, const float* w, const float* b, float* y, double* yb,
                     const float* dy, float* dx, double* dxb) {
    int Ho = (c->H + c->plo + c->phi - c->K) / c->s + 1, Wo = (c->W + c->plo + c->phi - c->K) / c->s + 1;
    size_t nx = (size_t)c->N * c->C * c->H * c->W;
    double *sx = xcalloc(nx, sizeof(double)), *ax = xmalloc(nx * sizeof(double));
    int* cnt = xcalloc(nx, sizeof(int));
    for (size_t i = 0; i < nx; i++) { ax[i] = dx[i]; sx[i] = fabs(dx[i]); }
    for (int n = 0; n < c->N; n++)
        for (int o = 0; o < c->OC; o++)
            for (int oy = 0; oy < Ho; oy++)
                for (int ox = 0; ox < Wo; ox++) {
                    double acc = b[o], S = fabs(b[o]);
                    size_t yi = (((size_t)n * c->OC + o) * Ho + oy) * Wo + ox;
                    for (int ci = 0; ci < c->C; ci++)
                        for (int ky = 0; ky < c->K; ky++)
                            for (int kx = 0; kx < c->K; kx++) {
                                int iy = oy * c->s - c->plo + ky, ix = ox * c->s - c->plo + kx;
                                if (iy < 0 || iy >= c->H || ix < 0 || ix >= c->W) continue;
                                size_t xi = (((size_t)n * c->C + ci) * c->H + iy) * c->W + ix;
                                float wv = w[(((size_t)o * c->C + ci) * c->K + ky) * c->K + kx];
                                acc += (double)wv * x[xi];
                                S += fabs((double)wv * x[xi]);
                                sx[xi] += fabs((double)wv * dy[yi]);
                                cnt[xi]++;
                                ax[xi] += (double)wv * dy[yi];
                            }
                    y[yi] = (float)acc;
                    yb[yi] = 2.0 * (c->C * c->K * c->K + 2) * ldexp(1.0, -24) * S;
                }
    for (size_t i = 0; i < nx; i++) {
        dx[i] = (float)ax[i];
        dxb[i] = 2.0 * (cnt[i] + 2) * ldexp(1.0, -24) * sx[i];
    }
    free(sx);
    free(ax);
    free(cnt);
}

static int within(const float* got, const float* ref, const double* bound, size_t n, char* detail, size_t cap) {
    for (size_t i = 0; i < n; i++)
        if (!(fabs((double)got[i] - ref[i]) <= bound[i] + 1e-30)) {
            snprintf(detail, cap, "element %zu: %.9g vs %.9g (bound %.3g)", i, got[i], ref[i], bound[i]);
            return 0;
        }
    return 1;
}

static void test_conv(void) {
    static const ConvCase cases[] = {
        {2, 3, 40, 36, 5, 3, 1, 1, 1},     // backward through the implicit GEMM (>= 1024 pixels)
        {1, 4, 9, 7, 3, 3, 1, 1, 1},       // backward through col2im tiles
        {2, 3, 11, 10, 4, 3, 2, 0, 1},     // the VAE encoder's down-sampling
        {1, 2, 13, 12, 3, 3, 2, 1, 1},     // the UNet's down-sampling
        {2, 5, 6, 7, 3, 1, 1, 0, 0},       // 1×1
        {1, 3, 48, 64, 6, 3, 1, 1, 1},     // vector fast path of the im2col packing, wide rows
    };
    char detail[256] = "", name[128];
    for (size_t t = 0; t < sizeof cases / sizeof *cases; t++) {
        const ConvCase* c = &cases[t];
        int Ho = (c->H + c->plo + c->phi - c->K) / c->s + 1, Wo = (c->W + c->plo + c->phi - c->K) / c->s + 1;
        size_t nx = (size_t)c->N * c->C * c->H * c->W, ny = (size_t)c->N * c->OC * Ho * Wo, nw = (size_t)c->OC * c->C * c->K * c->K;
        float *x = fill(nx, 1.0f), *w = fill(nw, 0.5f), *b = fill((size_t)c->OC, 0.1f), *dy = fill(ny, 1.0f);
        float *y = xmalloc(ny * sizeof(float)), *yr = xmalloc(ny * sizeof(float));
        float *dx = fill(nx, 0.3f), *dxr = copy(dx, nx);
        double *yb = xmalloc(ny * sizeof(double)), *dxb = xmalloc(nx * sizeof(double));
        conv_ref(c, x, w, b, yr, yb, dy, dxr, dxb);
        conv2d_forward(y, x, w, b, c->N, c->C, c->H, c->W, c->OC, c->K, c->s, c->plo, c->phi, &g_arena);
        snprintf(name, sizeof name, "conv2d_forward %dx%dx%dx%d k%d s%d pad(%d,%d) = direct loops", c->N, c->C, c->H, c->W,
                 c->K, c->s, c->plo, c->phi);
        check(within(y, yr, yb, ny, detail, sizeof detail), name, detail);
        conv2d_backward_input(dx, dy, w, c->N, c->C, c->H, c->W, c->OC, c->K, c->s, c->plo, c->phi, &g_arena);
        snprintf(name, sizeof name, "conv2d_backward_input %dx%dx%dx%d k%d s%d pad(%d,%d) = direct loops", c->N, c->C, c->H,
                 c->W, c->K, c->s, c->plo, c->phi);
        check(within(dx, dxr, dxb, nx, detail, sizeof detail), name, detail);

        // fp16 weights: the same bits as the fp32 kernels on the converted weights
        uint16_t* w16 = xmalloc(nw * sizeof(uint16_t));
        for (size_t i = 0; i < nw; i++) { w16[i] = f32_to_f16(w[i]); w[i] = f16_to_f32(w16[i]); }
        float *y16 = xmalloc(ny * sizeof(float)), *dx16 = fill(nx, 0.3f), *dx32 = copy(dx16, nx);
        conv2d_forward(y, x, w, b, c->N, c->C, c->H, c->W, c->OC, c->K, c->s, c->plo, c->phi, &g_arena);
        conv2d_forward_f16(y16, x, w16, b, c->N, c->C, c->H, c->W, c->OC, c->K, c->s, c->plo, c->phi);
        conv2d_backward_input(dx32, dy, w, c->N, c->C, c->H, c->W, c->OC, c->K, c->s, c->plo, c->phi, &g_arena);
        conv2d_backward_input_f16(dx16, dy, w16, c->N, c->C, c->H, c->W, c->OC, c->K, c->s, c->plo, c->phi, &g_arena);
        snprintf(name, sizeof name, "conv2d fp16 weights = fp32 on the converted weights, bitwise (case %zu)", t);
        check(memcmp(y, y16, ny * sizeof(float)) == 0 && memcmp(dx32, dx16, nx * sizeof(float)) == 0, name, "differs");

        // 1 vs 2 threads
        float *dxa = fill(nx, 0.3f), *dxbb = copy(dxa, nx);
        threads_init(1);
        conv2d_forward(yr, x, w, b, c->N, c->C, c->H, c->W, c->OC, c->K, c->s, c->plo, c->phi, &g_arena);
        conv2d_backward_input(dxa, dy, w, c->N, c->C, c->H, c->W, c->OC, c->K, c->s, c->plo, c->phi, &g_arena);
        threads_init(2);
        conv2d_backward_input(dxbb, dy, w, c->N, c->C, c->H, c->W, c->OC, c->K, c->s, c->plo, c->phi, &g_arena);
        snprintf(name, sizeof name, "conv2d forward and backward: 1 vs 2 threads bitwise (case %zu)", t);
        check(memcmp(y, yr, ny * sizeof(float)) == 0 && memcmp(dxa, dxbb, nx * sizeof(float)) == 0, name, "differs");
        free(x); free(w); free(b); free(dy); free(y); free(yr); free(dx); free(dxr); free(yb); free(dxb);
        free(w16); free(y16); free(dx16); free(dx32); free(dxa); free(dxbb);
    }

    // up-sampling fused into the convolution = up-sampling, then the convolution
    int N = 2, C = 3, H = 17, W = 24, OC = 4;
    size_t nx = (size_t)N * C * H * W, nu = 4 * nx, ny = (size_t)N * OC * 4 * H * W, nw = (size_t)OC * C * 9;
    float *x = fill(nx, 1.0f), *w = fill(nw, 0.5f), *b = fill(OC, 0.1f), *up = xmalloc(nu * sizeof(float));
    float *y1 = xmalloc(ny * sizeof(float)), *y2 = xmalloc(ny * sizeof(float));
    uint16_t* w16 = xmalloc(nw * sizeof(uint16_t));
    for (size_t i = 0; i < nw; i++) { w16[i] = f32_to_f16(w[i]); w[i] = f16_to_f32(w16[i]); }
    upsample_nearest_forward(up, x, N, C, H, W, 2 * H, 2 * W);
    conv2d_forward(y1, up, w, b, N, C, 2 * H, 2 * W, OC, 3, 1, 1, 1, &g_arena);
    conv2d_forward_up2(y2, x, w, NULL, b, N, C, H, W, OC, 3, 1);
    int ok = memcmp(y1, y2, ny * sizeof(float)) == 0;
    conv2d_forward_up2(y2, x, NULL, w16, b, N, C, H, W, OC, 3, 1);
    ok = ok && memcmp(y1, y2, ny * sizeof(float)) == 0;
    check(ok, "conv2d_forward_up2 (fp32 and fp16 weights) = upsample_nearest_forward + conv2d_forward, bitwise", "differs");
    free(x); free(w); free(b); free(up); free(y1); free(y2); free(w16);

    // linear with fp16 weights
    int M = 37, IN = 70, OUT = 45;
    float *in = fill((size_t)M * IN, 1.0f), *wl = fill((size_t)OUT * IN, 0.5f), *bl = fill(OUT, 0.1f);
    float *o1 = xmalloc((size_t)M * OUT * sizeof(float)), *o2 = xmalloc((size_t)M * OUT * sizeof(float));
    float *dout = fill((size_t)M * OUT, 1.0f), *d1 = fill((size_t)M * IN, 0.2f), *d2 = copy(d1, (size_t)M * IN);
    uint16_t* wl16 = xmalloc((size_t)OUT * IN * sizeof(uint16_t));
    for (int i = 0; i < OUT * IN; i++) { wl16[i] = f32_to_f16(wl[i]); wl[i] = f16_to_f32(wl16[i]); }
    linear_forward(o1, in, wl, bl, M, IN, OUT);
    linear_forward_f16(o2, in, wl16, bl, M, IN, OUT);
    linear_backward(d1, NULL, NULL, dout, NULL, wl, M, IN, OUT);
    linear_backward_f16(d2, dout, wl16, M, IN, OUT);
    check(memcmp(o1, o2, (size_t)M * OUT * sizeof(float)) == 0 && memcmp(d1, d2, (size_t)M * IN * sizeof(float)) == 0,
          "linear forward / backward with fp16 weights = fp32 on the converted weights, bitwise", "differs");
    free(in); free(wl); free(bl); free(o1); free(o2); free(dout); free(d1); free(d2); free(wl16);
}

// ----------------------------------------------------------------------------------------------
// attention

typedef struct AttnCase { int N, Tq, Tk, NH, HD, causal; } AttnCase;

// The definition in double: out, lse, and the gradients of L = Σ dout·out.
static void attention_ref(const AttnCase* c, const float* q, const float* k, const float* v, const float* dout,
                          double* out, double* lse, double* dq, double* dk, double* dv) {
    int C = c->NH * c->HD;
    double scale = 1.0 / sqrt((double)c->HD), *p = xmalloc((size_t)c->Tk * sizeof(double));
    double* dp = xmalloc((size_t)c->Tk * sizeof(double));
    for (int n = 0; n < c->N; n++)
        for (int h = 0; h < c->NH; h++)
            for (int i = 0; i < c->Tq; i++) {
                const float* qi = q + ((size_t)n * c->Tq + i) * C + h * c->HD;
                const float* gi = dout + ((size_t)n * c->Tq + i) * C + h * c->HD;
                int valid = c->causal ? i + 1 : c->Tk;
                double mx = -1e300, sum = 0, D = 0;
                for (int j = 0; j < valid; j++) {
                    const float* kj = k + ((size_t)n * c->Tk + j) * C + h * c->HD;
                    double s = 0;
                    for (int d = 0; d < c->HD; d++) s += (double)qi[d] * kj[d];
                    p[j] = s * scale;
                    mx = p[j] > mx ? p[j] : mx;
                }
                for (int j = 0; j < valid; j++) { p[j] = exp(p[j] - mx); sum += p[j]; }
                double* oi = out + ((size_t)n * c->Tq + i) * C + h * c->HD;
                for (int d = 0; d < c->HD; d++) {
                    double o = 0;
                    for (int j = 0; j < valid; j++) o += p[j] / sum * v[((size_t)n * c->Tk + j) * C + h * c->HD + d];
                    oi[d] = o;
                    D += gi[d] * o;
                }
                lse[((size_t)n * c->NH + h) * c->Tq + i] = mx + log(sum);
                for (int j = 0; j < valid; j++) {    // dp_j = do·v_j, ds_j = p_j (dp_j − D)
                    const float* vj = v + ((size_t)n * c->Tk + j) * C + h * c->HD;
                    double a = 0;
                    for (int d = 0; d < c->HD; d++) a += (double)gi[d] * vj[d];
                    dp[j] = p[j] / sum * (a - D);
                }
                for (int j = 0; j < valid; j++)
                    for (int d = 0; d < c->HD; d++) {
                        size_t kj = ((size_t)n * c->Tk + j) * C + h * c->HD + d;
                        dq[((size_t)n * c->Tq + i) * C + h * c->HD + d] += scale * dp[j] * k[kj];
                        dk[kj] += scale * dp[j] * qi[d];
                        dv[kj] += p[j] / sum * gi[d];
                    }
            }
    free(p);
    free(dp);
}

static int close_rel(const float* got, const double* ref, size_t n, double rel, char* detail, size_t cap) {
    double scale = 0;
    for (size_t i = 0; i < n; i++) scale = fmax(scale, fabs(ref[i]));
    for (size_t i = 0; i < n; i++)
        if (!(fabs(got[i] - ref[i]) <= rel * scale)) {
            snprintf(detail, cap, "element %zu: %.9g vs %.9g (scale %.3g)", i, got[i], ref[i], scale);
            return 0;
        }
    return 1;
}

static void test_attention(void) {
    static const AttnCase cases[] = {
        {2, 70, 67, 2, 8, 0},     // several blocks, partial last blocks, Tq != Tk
        {1, 77, 77, 3, 16, 1},    // CLIP-like causal
        {2, 100, 7, 2, 5, 0},     // cross-attention: few keys, odd head size
        {1, 33, 33, 1, 64, 1},    // one query past a block, causal
        {1, 70, 2300, 2, 40, 0},  // three key blocks (online softmax), a partial last one
        {1, 2100, 2100, 1, 8, 1}, // causal over three key blocks: later blocks skipped per query block
    };
    char detail[256] = "", name[128];
    for (size_t t = 0; t < sizeof cases / sizeof *cases; t++) {
        const AttnCase* c = &cases[t];
        int C = c->NH * c->HD;
        size_t nq = (size_t)c->N * c->Tq * C, nk = (size_t)c->N * c->Tk * C, nl = (size_t)c->N * c->NH * c->Tq;
        float *q = fill(nq, 1.0f), *k = fill(nk, 1.0f), *v = fill(nk, 1.0f), *dout = fill(nq, 1.0f);
        double *ro = xcalloc(nq, sizeof(double)), *rl = xcalloc(nl, sizeof(double)), *rdq = xcalloc(nq, sizeof(double));
        double *rdk = xcalloc(nk, sizeof(double)), *rdv = xcalloc(nk, sizeof(double));
        attention_ref(c, q, k, v, dout, ro, rl, rdq, rdk, rdv);
        float *o = xmalloc(nq * sizeof(float)), *lse = xmalloc(nl * sizeof(float));
        float *dq = xcalloc(nq, sizeof(float)), *dk = xcalloc(nk, sizeof(float)), *dv = xcalloc(nk, sizeof(float));
        attention_forward(o, lse, q, k, v, c->N, c->Tq, c->Tk, c->NH, c->HD, C, C, C, C, c->causal, &g_arena);
        attention_backward(dq, dk, dv, dout, o, lse, q, k, v, c->N, c->Tq, c->Tk, c->NH, c->HD, C, C, C, C, c->causal,
                           &g_arena);
        snprintf(name, sizeof name, "attention N%d Tq%d Tk%d NH%d HD%d%s: out, lse = definition", c->N, c->Tq, c->Tk, c->NH,
                 c->HD, c->causal ? " causal" : "");
        check(close_rel(o, ro, nq, 2e-5, detail, sizeof detail) && close_rel(lse, rl, nl, 2e-5, detail, sizeof detail), name,
              detail);
        snprintf(name, sizeof name, "attention N%d Tq%d Tk%d NH%d HD%d%s: dq, dk, dv = definition", c->N, c->Tq, c->Tk, c->NH,
                 c->HD, c->causal ? " causal" : "");
        check(close_rel(dq, rdq, nq, 5e-5, detail, sizeof detail) && close_rel(dk, rdk, nk, 5e-5, detail, sizeof detail) &&
              close_rel(dv, rdv, nk, 5e-5, detail, sizeof detail), name, detail);
        float *o1 = xmalloc(nq * sizeof(float)), *dq1 = xcalloc(nq, sizeof(float)), *dk1 = xcalloc(nk, sizeof(float));
        float* dv1 = xcalloc(nk, sizeof(float));
        threads_init(1);
        attention_forward(o1, lse, q, k, v, c->N, c->Tq, c->Tk, c->NH, c->HD, C, C, C, C, c->causal, &g_arena);
        attention_backward(dq1, dk1, dv1, dout, o1, lse, q, k, v, c->N, c->Tq, c->Tk, c->NH, c->HD, C, C, C, C, c->causal,
                           &g_arena);
        threads_init(2);
        snprintf(name, sizeof name, "attention case %zu: 1 vs 2 threads bitwise", t);
        check(!memcmp(o, o1, nq * 4) && !memcmp(dq, dq1, nq * 4) && !memcmp(dk, dk1, nk * 4) && !memcmp(dv, dv1, nk * 4), name,
              "differs");
        free(q); free(k); free(v); free(dout); free(ro); free(rl); free(rdq); free(rdk); free(rdv);
        free(o); free(lse); free(dq); free(dk); free(dv); free(o1); free(dq1); free(dk1); free(dv1);
    }
}

// ----------------------------------------------------------------------------------------------
// GEGLU

static void test_geglu(void) {
    int M = 300, F = 77;
    size_t n = (size_t)M * F;
    float *proj = fill(2 * n, 4.0f), *dout = fill(n, 1.0f), *out = xmalloc(n * sizeof(float));
    float* dproj = xcalloc(2 * n, sizeof(float));
    double *ro = xmalloc(n * sizeof(double)), *rd = xmalloc(2 * n * sizeof(double));
    for (int m = 0; m < M; m++)
        for (int f = 0; f < F; f++) {
            double v = proj[(size_t)m * 2 * F + f], g = proj[(size_t)m * 2 * F + F + f], d = dout[(size_t)m * F + f];
            double phi = 0.5 * (1 + erf(g / sqrt(2.0))), pdf = exp(-0.5 * g * g) / sqrt(2 * 3.14159265358979323846);
            ro[(size_t)m * F + f] = v * g * phi;
            rd[(size_t)m * 2 * F + f] = d * g * phi;
            rd[(size_t)m * 2 * F + F + f] = d * v * (phi + g * pdf);
        }
    geglu_forward(out, proj, M, F);
    geglu_backward(dproj, dout, proj, M, F);
    char detail[256] = "";
    check(close_rel(out, ro, n, 1e-5, detail, sizeof detail), "geglu_forward = erf definition", detail);
    check(close_rel(dproj, rd, 2 * n, 1e-5, detail, sizeof detail), "geglu_backward = erf definition", detail);
    free(proj); free(dout); free(out); free(dproj); free(ro); free(rd);
}

// ----------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU)

static void test_groupnorm(void) {
    int N = 2, C = 6, HW = 133, G = 3, cg = C / G;
    size_t n = (size_t)N * C * HW;
    float *x = fill(n, 2.0f), *w = fill(C, 1.0f), *b = fill(C, 0.5f), *dout = fill(n, 1.0f);
    for (size_t i = 0; i < n; i++) x[i] += 0.7f;                        // a mean away from 0
    float *y = xmalloc(n * sizeof(float)), *mean = xmalloc(N * G * sizeof(float)), *rstd = xmalloc(N * G * sizeof(float));
    double *ry = xmalloc(n * sizeof(double)), *rdx = xmalloc(n * sizeof(double));
    char detail[256] = "", name[96];
    for (int silu = 0; silu < 2; silu++) {
        for (int i = 0; i < N * G; i++) {                                 // the definition, in double
            size_t off = (size_t)i * cg * HW, cnt = (size_t)cg * HW;
            double mu = 0, var = 0, sg = 0, sgx = 0;
            for (size_t j = 0; j < cnt; j++) mu += x[off + j];
            mu /= cnt;
            for (size_t j = 0; j < cnt; j++) var += (x[off + j] - mu) * (x[off + j] - mu);
            double rs = 1.0 / sqrt(var / cnt + 1e-5);
            for (int pass = 0; pass < 2; pass++)
                for (size_t j = 0; j < cnt; j++) {
                    int ch = (int)((i % G) * cg + j / HW);
                    double xh = (x[off + j] - mu) * rs, v = xh * w[ch] + b[ch], s = 1.0 / (1.0 + exp(-v));
                    double g = dout[off + j] * w[ch] * (silu ? s * (1 + v * (1 - s)) : 1.0);
                    if (pass == 0) { ry[off + j] = silu ? v * s : v; sg += g; sgx += g * xh; }
                    else rdx[off + j] = rs * (g - sg / cnt - xh * sgx / cnt);
                }
        }
        float* dx = xcalloc(n, sizeof(float));
        groupnorm_forward(y, mean, rstd, x, w, b, N, C, HW, G, 1e-5f, silu);
        groupnorm_backward(dx, dout, x, mean, rstd, w, b, N, C, HW, G, silu);
        snprintf(name, sizeof name, "groupnorm%s forward and backward = definition", silu ? "+silu" : "");
        check(close_rel(y, ry, n, 2e-6, detail, sizeof detail) && close_rel(dx, rdx, n, 2e-5, detail, sizeof detail), name,
              detail);
        free(dx);
    }
    free(x); free(w); free(b); free(dout); free(y); free(mean); free(rstd); free(ry); free(rdx);
}

static void run_all(void) {
    printf("row kernels: %s\n", getenv("INSTASTYLE_NO_AVX512") ? "plain" : "the CPU's widest");
    arena_init(&g_arena, (size_t)1 << 24);
    threads_init(2);
    test_conv();
    test_attention();
    test_geglu();
    test_groupnorm();
    arena_free(&g_arena);
}

int main(void) {
    if (!getenv("INSTASTYLE_NO_AVX512")) {     // the plain row kernels, in a child (before any thread starts)
        fflush(stdout);
        pid_t pid = fork();
        CHECK(pid >= 0, "fork failed");
        if (pid == 0) {
            setenv("INSTASTYLE_NO_AVX512", "1", 1);
            run_all();
            _exit(g_fail ? 1 : 0);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        int ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        check(ok, "plain row kernels: every check above", "a check failed or the child crashed");
    }
    run_all();
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
