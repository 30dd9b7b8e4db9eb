// gradcheck.c: every backward kernel of nn.c (and the LoRA side path and MSE loss of lora.c)
// against central finite differences of its forward, on tiny random tensors.
//
// For a kernel y = f(x1, x2, ...) and a random upstream gradient r, the scalar L = Σ r·y is
// accumulated in double. The backward gives dL/dxk; the check compares it element by element
// with the five-point difference (−L(x+2h) + 8L(x+h) − 8L(x−h) + L(x−2h)) / 12h (error O(h⁴), so
// h can be large enough to keep the float forward's rounding noise small). An element's error is |a − n| / max(|a|, |n|, floor),
// floor = FLOOR · max|n| over the input (near-zero entries are judged on the tensor's scale: the
// float forward's rounding makes the difference quotient noisy at about 1e-4 absolute).
// Large inputs are checked at a fixed random subset of at most MAX_PROBES elements.
// Output: one line per kernel "PASS name max_rel=..." or "FAIL ...", then "N passed, M failed".
#include "../instastyle.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define TOL 1e-2
#define STEP 2e-2     // float forwards: a large step keeps the rounding noise small
#define FLOOR 3e-2    // error floor as a fraction of the input's largest gradient
#define MAX_PROBES 96
#define MAX_INPUTS 4

typedef struct Check Check;
typedef void (*ForwardFn)(Check* c, float* out);
typedef void (*BackwardFn)(Check* c, const float* dout, float** din);   // accumulates into din

struct Check {
    const char* name;
    int nin;
    float* in[MAX_INPUTS];
    size_t n_in[MAX_INPUTS];
    size_t n_out;
    ForwardFn forward;
    BackwardFn backward;
    int d[12];          // kernel dimensions, meaning per kernel
    float* saved[4];    // forward's saved buffers (recomputed at every forward)
};

static Rng g_rng;
static Arena g_scratch;
static int g_pass, g_fail;

static float* randn(size_t n, float scale) {
    float* x = xmalloc(n * sizeof(float));
    rng_normal(&g_rng, x, n);
    for (size_t i = 0; i < n; i++) x[i] *= scale;
    return x;
}

static double loss_of(Check* c, const float* r, float* out) {
    c->forward(c, out);
    double L = 0;
    for (size_t i = 0; i < c->n_out; i++) L += (double)r[i] * out[i];
    return L;
}

static void run_check(Check* c) {
    float* r = randn(c->n_out, 1.0f);
    float* out = xmalloc(c->n_out * sizeof(float));
    float* din[MAX_INPUTS];
    for (int k = 0; k < c->nin; k++) din[k] = xcalloc(c->n_in[k], sizeof(float));
    c->forward(c, out);
    c->backward(c, r, din);
    double worst = 0;
    for (int k = 0; k < c->nin; k++) {
        size_t n = c->n_in[k], probes = n < MAX_PROBES ? n : MAX_PROBES;
        double* num = xmalloc(probes * sizeof(double));
        size_t* idx = xmalloc(probes * sizeof(size_t));
        double maxn = 0;
        for (size_t p = 0; p < probes; p++) {
            idx[p] = n <= MAX_PROBES ? p : rng_u32(&g_rng) % n;
            float* x = &c->in[k][idx[p]];
            float x0 = *x, h = (float)(STEP * (fabsf(x0) > 1.0f ? fabsf(x0) : 1.0f));
            double l[4];
            const float off[4] = {2 * h, h, -h, -2 * h};
            for (int q = 0; q < 4; q++) { *x = x0 + off[q]; l[q] = loss_of(c, r, out); }
            *x = x0;
            num[p] = (-l[0] + 8 * l[1] - 8 * l[2] + l[3]) / (12.0 * h);
            if (fabs(num[p]) > maxn) maxn = fabs(num[p]);
        }
        for (size_t p = 0; p < probes; p++) {
            double a = din[k][idx[p]], nm = num[p];
            double den = fmax(fmax(fabs(a), fabs(nm)), FLOOR * maxn);
            double e = den > 0 ? fabs(a - nm) / den : 0;
            if (e > worst) worst = e;
        }
        free(num);
        free(idx);
    }
    int ok = worst < TOL && isfinite(worst);
    printf("%s %s max_rel=%.2e\n", ok ? "PASS" : "FAIL", c->name, worst);
    ok ? g_pass++ : g_fail++;
    for (int k = 0; k < c->nin; k++) { free(din[k]); free(c->in[k]); }
    for (int k = 0; k < 4; k++) { free(c->saved[k]); c->saved[k] = NULL; }
    free(r);
    free(out);
}

// ----------------------------------------------------------------------------------------------
// linear: d = {M, IN, OUT}; inputs x, w, b

static void linear_f(Check* c, float* out) { linear_forward(out, c->in[0], c->in[1], c->in[2], c->d[0], c->d[1], c->d[2]); }
static void linear_b(Check* c, const float* dout, float** din) {
    linear_backward(din[0], din[1], din[2], dout, c->in[0], c->in[1], c->d[0], c->d[1], c->d[2]);
}

// conv2d (input gradient only; weights are frozen): d = {N, C, H, W, OC, K, stride, pad_lo, pad_hi, Ho, Wo}
static void conv_f(Check* c, float* out) {
    conv2d_forward(out, c->in[0], c->saved[0], c->saved[1], c->d[0], c->d[1], c->d[2], c->d[3], c->d[4], c->d[5],
                   c->d[6], c->d[7], c->d[8], &g_scratch);
}
static void conv_b(Check* c, const float* dout, float** din) {
    conv2d_backward_input(din[0], dout, c->saved[0], c->d[0], c->d[1], c->d[2], c->d[3], c->d[4], c->d[5],
                          c->d[6], c->d[7], c->d[8], &g_scratch);
}

// groupnorm: d = {N, C, HW, G, silu}; saved: w, b, mean, rstd
static void gn_f(Check* c, float* out) {
    groupnorm_forward(out, c->saved[2], c->saved[3], c->in[0], c->saved[0], c->saved[1], c->d[0], c->d[1], c->d[2],
                      c->d[3], 1e-5f, c->d[4]);
}
static void gn_b(Check* c, const float* dout, float** din) {
    groupnorm_backward(din[0], dout, c->in[0], c->saved[2], c->saved[3], c->saved[0], c->saved[1], c->d[0], c->d[1],
                       c->d[2], c->d[3], c->d[4]);
}

// layernorm: d = {M, C}
static void ln_f(Check* c, float* out) {
    layernorm_forward(out, c->saved[2], c->saved[3], c->in[0], c->saved[0], c->saved[1], c->d[0], c->d[1], 1e-5f);
}
static void ln_b(Check* c, const float* dout, float** din) {
    layernorm_backward(din[0], dout, c->in[0], c->saved[2], c->saved[3], c->saved[0], c->d[0], c->d[1]);
}

// pointwise: d = {n, which}
static void act_f(Check* c, float* out) {
    size_t n = (size_t)c->d[0];
    if (c->d[1] == 0) silu_forward(out, c->in[0], n);
    if (c->d[1] == 1) quick_gelu_forward(out, c->in[0], n);
    if (c->d[1] == 2) gelu_forward(out, c->in[0], n);
}
static void act_b(Check* c, const float* dout, float** din) {
    size_t n = (size_t)c->d[0];
    if (c->d[1] == 0) silu_backward(din[0], dout, c->in[0], n);
    if (c->d[1] == 1) quick_gelu_backward(din[0], dout, c->in[0], n);
    if (c->d[1] == 2) gelu_backward(din[0], dout, c->in[0], n);
}

// geglu: d = {M, F}
static void geglu_f(Check* c, float* out) { geglu_forward(out, c->in[0], c->d[0], c->d[1]); }
static void geglu_b(Check* c, const float* dout, float** din) { geglu_backward(din[0], dout, c->in[0], c->d[0], c->d[1]); }

// attention: d = {N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal}; inputs q, k, v; saved: out, lse
static void attn_f(Check* c, float* out) {
    const int* d = c->d;
    attention_forward(out, c->saved[1], c->in[0], c->in[1], c->in[2], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7],
                      d[8], d[9], &g_scratch);
    memcpy(c->saved[0], out, c->n_out * sizeof(float));
}
static void attn_b(Check* c, const float* dout, float** din) {
    const int* d = c->d;
    attention_backward(din[0], din[1], din[2], dout, c->saved[0], c->saved[1], c->in[0], c->in[1], c->in[2], d[0], d[1],
                       d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], &g_scratch);
}

// upsample nearest: d = {N, C, H, W, Ho, Wo}
static void up_f(Check* c, float* out) { upsample_nearest_forward(out, c->in[0], c->d[0], c->d[1], c->d[2], c->d[3], c->d[4], c->d[5]); }
static void up_b(Check* c, const float* dout, float** din) {
    upsample_nearest_backward(din[0], dout, c->d[0], c->d[1], c->d[2], c->d[3], c->d[4], c->d[5]);
}

// LoRA side path out = W·x + scale·up·(down·x): d = {M, IN, OUT, rank}; inputs x, down, up; saved: W, h
static void lora_f(Check* c, float* out) {
    LoraPair lp = {c->in[1], c->in[2], NULL, NULL, c->d[3], c->d[1], c->d[2], 0.7f};
    linear_forward(out, c->in[0], c->saved[0], NULL, c->d[0], c->d[1], c->d[2]);
    lora_forward_save(&lp, out, c->saved[1], c->in[0], c->d[0]);
}
static void lora_b(Check* c, const float* dout, float** din) {
    LoraPair lp = {c->in[1], c->in[2], din[1], din[2], c->d[3], c->d[1], c->d[2], 0.7f};
    linear_backward(din[0], NULL, NULL, dout, c->in[0], c->saved[0], c->d[0], c->d[1], c->d[2]);
    lora_backward(&lp, din[0], dout, c->saved[1], c->in[0], c->d[0], &g_scratch);
}

// MSE loss (plain or InstaStyle's masked form): d = {N, C, HW, masked}; inputs pred; saved: target, mask
static void mse_f(Check* c, float* out) {
    out[0] = loss_mse(NULL, c->in[0], c->saved[0], c->d[3] ? c->saved[1] : NULL, c->d[0], c->d[1], c->d[2]);
}
static void mse_b(Check* c, const float* dout, float** din) {
    float* d = xcalloc(c->n_in[0], sizeof(float));
    loss_mse(d, c->in[0], c->saved[0], c->d[3] ? c->saved[1] : NULL, c->d[0], c->d[1], c->d[2]);
    for (size_t i = 0; i < c->n_in[0]; i++) din[0][i] += dout[0] * d[i];
    free(d);
}

// ----------------------------------------------------------------------------------------------

static void check_linear(int M, int IN, int OUT) {
    Check c = {"linear", 3, {randn((size_t)M * IN, 1), randn((size_t)OUT * IN, 0.5f), randn((size_t)OUT, 0.1f)},
               {(size_t)M * IN, (size_t)OUT * IN, (size_t)OUT}, (size_t)M * OUT, linear_f, linear_b, {M, IN, OUT}, {0}};
    run_check(&c);
}

static void check_conv(const char* name, int N, int C, int H, int W, int OC, int K, int s, int plo, int phi) {
    int Ho = (H + plo + phi - K) / s + 1, Wo = (W + plo + phi - K) / s + 1;
    Check c = {name, 1, {randn((size_t)N * C * H * W, 1)}, {(size_t)N * C * H * W}, (size_t)N * OC * Ho * Wo,
               conv_f, conv_b, {N, C, H, W, OC, K, s, plo, phi, Ho, Wo}, {randn((size_t)OC * C * K * K, 0.3f), randn((size_t)OC, 0.1f)}};
    run_check(&c);
}

static void check_groupnorm(const char* name, int N, int C, int HW, int G, int silu) {
    size_t n = (size_t)N * C * HW;
    Check c = {name, 1, {randn(n, 1.5f)}, {n}, n, gn_f, gn_b, {N, C, HW, G, silu}, {NULL}};
    c.saved[0] = randn((size_t)C, 1);
    c.saved[1] = randn((size_t)C, 0.5f);
    c.saved[2] = xmalloc((size_t)N * G * sizeof(float));
    c.saved[3] = xmalloc((size_t)N * G * sizeof(float));
    run_check(&c);
}

static void check_layernorm(int M, int C) {
    size_t n = (size_t)M * C;
    Check c = {"layernorm", 1, {randn(n, 1.5f)}, {n}, n, ln_f, ln_b, {M, C}, {NULL}};
    c.saved[0] = randn((size_t)C, 1);
    c.saved[1] = randn((size_t)C, 0.5f);
    c.saved[2] = xmalloc((size_t)M * sizeof(float));
    c.saved[3] = xmalloc((size_t)M * sizeof(float));
    run_check(&c);
}

static void check_act(const char* name, int which) {
    Check c = {name, 1, {randn(40, 2)}, {40}, 40, act_f, act_b, {40, which}, {NULL}};
    run_check(&c);
}

static void check_attention(const char* name, int N, int Tq, int Tk, int NH, int HD, int pad, int causal) {
    int ld = NH * HD + pad;
    size_t nq = (size_t)N * Tq * ld, nk = (size_t)N * Tk * ld;
    Check c = {name, 3, {randn(nq, 1), randn(nk, 1), randn(nk, 1)}, {nq, nk, nk}, (size_t)N * Tq * ld, attn_f, attn_b,
               {N, Tq, Tk, NH, HD, ld, ld, ld, ld, causal}, {NULL}};
    c.saved[0] = xcalloc(c.n_out, sizeof(float));
    c.saved[1] = xmalloc((size_t)N * NH * Tq * sizeof(float));
    run_check(&c);
}

static void check_upsample(int N, int C, int H, int W, int Ho, int Wo) {
    size_t n = (size_t)N * C * H * W;
    Check c = {"upsample_nearest", 1, {randn(n, 1)}, {n}, (size_t)N * C * Ho * Wo, up_f, up_b, {N, C, H, W, Ho, Wo}, {NULL}};
    run_check(&c);
}

static void check_lora(int M, int IN, int OUT, int r) {
    Check c = {"lora_linear", 3, {randn((size_t)M * IN, 1), randn((size_t)r * IN, 0.5f), randn((size_t)OUT * r, 0.5f)},
               {(size_t)M * IN, (size_t)r * IN, (size_t)OUT * r}, (size_t)M * OUT, lora_f, lora_b, {M, IN, OUT, r}, {NULL}};
    c.saved[0] = randn((size_t)OUT * IN, 0.5f);
    c.saved[1] = xmalloc((size_t)M * r * sizeof(float));
    run_check(&c);
}

static void check_mse(const char* name, int N, int C, int HW, int masked) {
    size_t n = (size_t)N * C * HW;
    Check c = {name, 1, {randn(n, 1)}, {n}, 1, mse_f, mse_b, {N, C, HW, masked}, {randn(n, 1), xmalloc((size_t)N * HW * sizeof(float))}};
    for (int i = 0; i < N * HW; i++) c.saved[1][i] = (float)(rng_u32(&g_rng) % 3 != 0);
    run_check(&c);
}

int main(int argc, char** argv) {
    (void)argc;
    (void)argv;
    rng_seed(&g_rng, 1234);
    arena_init(&g_scratch, (size_t)1 << 20);
    check_linear(5, 7, 6);
    check_conv("conv2d_3x3", 2, 3, 5, 6, 4, 3, 1, 1, 1);
    check_conv("conv2d_3x3_stride2", 1, 3, 7, 6, 2, 3, 2, 1, 1);
    check_conv("conv2d_3x3_stride2_pad01", 1, 2, 8, 7, 3, 3, 2, 0, 1);
    check_conv("conv2d_1x1", 2, 5, 3, 4, 3, 1, 1, 0, 0);
    check_groupnorm("groupnorm", 2, 6, 5, 3, 0);
    check_groupnorm("groupnorm_silu", 2, 6, 5, 2, 1);
    check_layernorm(4, 8);
    check_act("silu", 0);
    check_act("quick_gelu", 1);
    check_act("gelu", 2);
    Check g = {"geglu", 1, {randn(3 * 10, 1.5f)}, {30}, 15, geglu_f, geglu_b, {3, 5}, {NULL}};
    run_check(&g);
    check_attention("attention", 2, 5, 7, 2, 3, 1, 0);
    check_attention("attention_causal", 1, 6, 6, 3, 2, 0, 1);
    check_attention("attention_blocks", 1, 70, 67, 2, 4, 3, 0);
    check_attention("attention_causal_blocks", 1, 70, 70, 1, 4, 0, 1);
    check_upsample(1, 2, 3, 5, 6, 7);
    check_upsample(2, 1, 2, 2, 4, 4);
    check_lora(5, 6, 4, 2);
    check_mse("mse_loss", 2, 3, 4, 0);
    check_mse("mse_loss_masked", 2, 3, 4, 1);
    arena_free(&g_scratch);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail > 0;
}
