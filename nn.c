// nn.c: the kernels of SD 1.5, each forward with its backward directly below it.
//
// Layouts are PyTorch's: activations NCHW, token sequences (N, T, C), linear weight (OUT, IN),
// conv weight (OC, C, KH, KW). Arguments: outputs, saved-for-backward buffers, inputs, weights,
// dims. Backward: input grads, parameter grads (NULL = frozen, not computed), dout, saved buffers,
// inputs, weights, dims. Gradients accumulate (+=) into buffers the caller zeroed.
//
// Dimension letters: N batch, C channels, H W height width, HW = H·W, T tokens, Tq Tk query and
// key tokens, NH heads, HD head size, G groups, OC out channels, K kernel size, M rows.
//
// Threads split independent outputs only (rows, channels, query blocks), so every output is
// computed in the same order for any thread count: results are bitwise reproducible.
// The matrix multiplies all go through sgemm (gemm.c): convolutions as implicit GEMM, frozen
// weights in fp32 or fp16 (the _f16 variants). Norm statistics are accumulated in double.
// Row kernels (softmax, norms, GEGLU) have an AVX-512 path chosen at run time and the plain loop
// beside it (INSTASTYLE_NO_AVX512=1 selects the plain loops; tests/test_kernels.c holds both to
// the definitions).
// What is deliberately left out: dropout (inference and SD fine-tuning use p = 0), affine-parameter
// gradients of norms (all norms are frozen in InstaStyle), bias gradients of frozen layers.
#include "instastyle.h"

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

// Backward kernels split independent outputs over threads only when there is enough work: below
// NN_SERIAL_WORK floating-point operations the pool's wake-up costs more than it saves. The result
// does not depend on the split.
#define NN_SERIAL_WORK ((size_t)1 << 17)
static void parallel_for_work(int n, size_t work, void (*fn)(void* ctx, int begin, int end), void* ctx) {
    if (work < NN_SERIAL_WORK) fn(ctx, 0, n);
    else parallel_for(n, fn, ctx);
}

// ----------------------------------------------------------------------------------------------
// row kernels of the softmax and the fused norm + SiLU: an AVX-512 path chosen at run time from
// the CPU's features, and the plain loop beside it. exp is Cephes' expf (Moshier): e^x =
// 2^n · e^r with n = round(x·log2 e), r = x − n·ln 2 (two-part ln 2), e^r a degree-6
// polynomial; relative error about 2 ulp over the float range.

#define ATT_B 32      // attention: queries (or keys) per block; a block [T, ATT_B] is one GEMM panel

typedef struct RowOps {
    // attention's column softmax and softmax gradient (see col_softmax_plain, dsoftmax_plain)
    void (*col_softmax)(float* s, int Tk, int cols, int i0, int causal, float* m, float* sum);
    void (*dsoftmax)(float* s, float* dp, int rows, int cols, const float* lse, const float* D, int by_row, int causal,
                     int off);
    void (*affine)(float* out, const float* x, int n, float scale, float shift, int silu);  // (x·scale + shift), SiLU
    double (*sum)(const float* x, size_t n);                  // Σ x, in double
    double (*sqdev)(const float* x, size_t n, double mu);     // Σ (x − mu)², in double
    void (*gn_back)(float* dx, const float* dout, const float* x, int n, const float* par, int silu, double* sums,
                    int pass);                                  // see gn_back_plain
    // GEGLU on one row (see geglu_forward): out[f] = v[f]·gelu(g[f]); its gradient dv, dg += ...
    void (*geglu)(float* out, const float* v, const float* g, int F);
    void (*geglu_back)(float* dv, float* dg, const float* d, const float* v, const float* g, int F);
} RowOps;

// The column softmax of one block of keys s[Tk, ATT_B], whose first `cols` columns are queries
// i0 .. i0+cols−1 counted from the block's first key (the rest are set to 0). Column c sees the keys
// j < valid(c) = causal ? i0 + c + 1 : Tk (later keys get P = 0). m[c] holds the running maximum
// over earlier blocks (−FLT_MAX before the first) and becomes max(m[c], max_j s); s ← exp(s − m)
// in place, sum[c] = Σ_j s, summed down the column in key order.
static void col_softmax_plain(float* s, int Tk, int cols, int i0, int causal, float* m, float* sum) {
    for (int c = 0; c < ATT_B; c++) {
        int valid = c >= cols ? 0 : causal && i0 + c + 1 < Tk ? i0 + c + 1 : Tk;
        float mx = c < cols ? m[c] : -FLT_MAX, acc = 0.0f;
        for (int j = 0; j < valid; j++) mx = s[(size_t)j * ATT_B + c] > mx ? s[(size_t)j * ATT_B + c] : mx;
        for (int j = 0; j < Tk; j++) {
            float* e = &s[(size_t)j * ATT_B + c];
            *e = j < valid ? expf(*e - mx) : 0.0f;
            acc += *e;
        }
        if (c < cols) { m[c] = mx; sum[c] = acc; }
    }
}
// The softmax gradient of one attention block of ATT_B columns (cols of them in use; the rest
// are set to 0): s ← p = exp(s − lse), dp ← ds = p·(dp − D). by_row: row r is query r and column
// c key off + c (lse[r], D[r]); else row r is key r and column c query off + c (lse[c], D[c]).
// Causal: p = 0 where the key comes after the query.
static void dsoftmax_plain(float* s, float* dp, int rows, int cols, const float* lse, const float* D, int by_row, int causal,
                           int off) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < ATT_B; c++) {
            size_t e = (size_t)r * ATT_B + c;
            int key = by_row ? off + c : r, query = by_row ? r : off + c, i = by_row ? r : c;
            float p = c < cols && !(causal && key > query) ? expf(s[e] - lse[i]) : 0.0f;
            s[e] = p;
            dp[e] = c < cols ? p * (dp[e] - D[i]) : 0.0f;
        }
}
// gelu(x) = x·Φ(x) = ½x(1 + erf(x/√2));  d/dx = Φ(x) + x·φ(x)
static float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
static float gelu_grad(float x) {
    return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) + x * 0.39894228040143268f * expf(-0.5f * x * x);
}
static void geglu_plain(float* out, const float* v, const float* g, int F) {
    for (int f = 0; f < F; f++) out[f] = v[f] * gelu(g[f]);
}
static void geglu_back_plain(float* dv, float* dg, const float* d, const float* v, const float* g, int F) {
    for (int f = 0; f < F; f++) {
        dv[f] += d[f] * gelu(g[f]);
        dg[f] += d[f] * v[f] * gelu_grad(g[f]);
    }
}
static double sum_plain(const float* x, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += x[i];
    return s;
}
static double sqdev_plain(const float* x, size_t n, double mu) {
    double s = 0;
    for (size_t i = 0; i < n; i++) { double d = x[i] - mu; s += d * d; }
    return s;
}
static float silu_grad(float y) {       // d/dy y·σ(y) = σ(y)·(1 + y·(1 − σ(y)))
    float s = 1.0f / (1.0f + expf(-y));
    return s * (1.0f + y * (1.0f - s));
}
// One channel row of groupnorm's backward: x̂ = (x − mu)·rs, g = dout·w (times silu'(x̂·w + b) when
// silu); pass 0 adds Σ g, Σ g·x̂ to sums[0..1], pass 1 adds rs·(g − mg − x̂·mgx) to dx.
// par = {mu, rs, w, b, mg, mgx}.
static void gn_back_plain(float* dx, const float* dout, const float* x, int n, const float* par, int silu, double* sums,
                          int pass) {
    for (int j = 0; j < n; j++) {
        float xh = (x[j] - par[0]) * par[1], gk = dout[j] * par[2];
        if (silu) gk *= silu_grad(xh * par[2] + par[3]);
        if (pass == 0) { sums[0] += gk; sums[1] += gk * xh; }
        else dx[j] += par[1] * (gk - par[4] - xh * par[5]);
    }
}
static void affine_plain(float* out, const float* x, int n, float scale, float shift, int silu) {
    if (silu) for (int i = 0; i < n; i++) { float v = x[i] * scale + shift; out[i] = v / (1.0f + expf(-v)); }
    else for (int i = 0; i < n; i++) out[i] = x[i] * scale + shift;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f")))

AVX512 static __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(88.72283f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
AVX512 static __mmask16 lanes(int n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

AVX512 static void col_softmax_avx512(float* s, int Tk, int cols, int i0, int causal, float* m, float* sum) {
    __m512 mx[ATT_B / 16], acc[ATT_B / 16];
    for (int g = 0; g < ATT_B / 16; g++) {
        mx[g] = _mm512_mask_loadu_ps(_mm512_set1_ps(-FLT_MAX), lanes(cols - 16 * g), m + 16 * g);
        acc[g] = _mm512_setzero_ps();
    }
    for (int j = 0; j < Tk; j++)         // key j is valid for columns c >= j − i0 (causal)
        for (int g = 0; g < ATT_B / 16; g++) {
            __mmask16 k = lanes(cols - 16 * g) & (causal ? (__mmask16)~lanes(j - i0 - 16 * g) : (__mmask16)0xFFFF);
            mx[g] = _mm512_mask_max_ps(mx[g], k, mx[g], _mm512_maskz_loadu_ps(k, s + (size_t)j * ATT_B + 16 * g));
        }
    for (int j = 0; j < Tk; j++)
        for (int g = 0; g < ATT_B / 16; g++) {
            __mmask16 k = lanes(cols - 16 * g) & (causal ? (__mmask16)~lanes(j - i0 - 16 * g) : (__mmask16)0xFFFF);
            float* row = s + (size_t)j * ATT_B + 16 * g;
            __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row), mx[g])));
            _mm512_storeu_ps(row, e);
            acc[g] = _mm512_add_ps(acc[g], e);
        }
    for (int g = 0; g < ATT_B / 16; g++) {
        _mm512_mask_storeu_ps(m + 16 * g, lanes(cols - 16 * g), mx[g]);
        _mm512_mask_storeu_ps(sum + 16 * g, lanes(cols - 16 * g), acc[g]);
    }
}
AVX512 static void dsoftmax_avx512(float* s, float* dp, int rows, int cols, const float* lse, const float* D, int by_row,
                                   int causal, int off) {
    __m512 vl[ATT_B / 16], vd[ATT_B / 16];
    for (int g = 0; g < ATT_B / 16; g++) {    // columns are queries: their lse and D
        vl[g] = by_row ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(lanes(cols - 16 * g), lse + 16 * g);
        vd[g] = by_row ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(lanes(cols - 16 * g), D + 16 * g);
    }
    for (int r = 0; r < rows; r++) {
        if (by_row) vl[0] = vl[1] = _mm512_set1_ps(lse[r]), vd[0] = vd[1] = _mm512_set1_ps(D[r]);
        for (int g = 0; g < ATT_B / 16; g++) {
            __mmask16 k = lanes(cols - 16 * g);            // key ≤ query: by_row c ≤ r − off, else c ≥ r − off
            if (causal) k &= by_row ? lanes(r - off + 1 - 16 * g) : (__mmask16)~lanes(r - off - 16 * g);
            float* sr = s + (size_t)r * ATT_B + 16 * g;
            float* dr = dp + (size_t)r * ATT_B + 16 * g;
            __m512 p = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_loadu_ps(sr), vl[g])));
            _mm512_storeu_ps(sr, p);
            _mm512_storeu_ps(dr, _mm512_maskz_mul_ps(lanes(cols - 16 * g), p, _mm512_sub_ps(_mm512_loadu_ps(dr), vd[g])));
        }
    }
}
// erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, as PyTorch's vectorised CPU GELU computes it):
// erf(x) = sign(x)·(1 − t·(a1 + t·(a2 + t·(a3 + t·(a4 + t·a5))))·e^(−x²)), t = 1/(1 + p·|x|).
AVX512 static __m512 erf512(__m512 x) {
    __m512 ax = _mm512_abs_ps(x), one = _mm512_set1_ps(1.0f);
    __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), ax, one));
    __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
    r = _mm512_mul_ps(r, t);
    __m512 y = _mm512_fnmadd_ps(r, exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), ax), ax)), one);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), _mm512_and_si512(_mm512_castps_si512(x),
                                                                                         _mm512_set1_epi32((int)0x80000000))));
}
AVX512 static void geglu_avx512(float* out, const float* v, const float* g, int F) {
    for (int f = 0; f < F; f += 16) {
        __mmask16 k = lanes(F - f);
        __m512 x = _mm512_maskz_loadu_ps(k, g + f);
        __m512 phi = _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_add_ps(_mm512_set1_ps(1.0f),
                                   erf512(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)))));
        _mm512_mask_storeu_ps(out + f, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, v + f), _mm512_mul_ps(x, phi)));
    }
}
AVX512 static void geglu_back_avx512(float* dv, float* dg, const float* d, const float* v, const float* g, int F) {
    for (int f = 0; f < F; f += 16) {
        __mmask16 k = lanes(F - f);
        __m512 x = _mm512_maskz_loadu_ps(k, g + f), dd = _mm512_maskz_loadu_ps(k, d + f);
        __m512 phi = _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_add_ps(_mm512_set1_ps(1.0f),
                                   erf512(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)))));
        __m512 pdf = _mm512_mul_ps(_mm512_set1_ps(0.39894228040143268f),
                                   exp512(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(-0.5f), x), x)));
        __m512 grad = _mm512_fmadd_ps(x, pdf, phi);                       // Φ(x) + x·φ(x)
        _mm512_mask_storeu_ps(dv + f, k, _mm512_fmadd_ps(dd, _mm512_mul_ps(x, phi), _mm512_maskz_loadu_ps(k, dv + f)));
        _mm512_mask_storeu_ps(dg + f, k, _mm512_fmadd_ps(_mm512_mul_ps(dd, _mm512_maskz_loadu_ps(k, v + f)), grad,
                                                         _mm512_maskz_loadu_ps(k, dg + f)));
    }
}
// The double sums in 4 × 8 lanes (summed in a fixed order at the end): x converted 8 at a time.
AVX512 static double sum_avx512(const float* x, size_t n) {
    __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
    size_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int u = 0; u < 4; u++) acc[u] = _mm512_add_pd(acc[u], _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8 * u)));
    double s = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
    for (; i < n; i++) s += x[i];
    return s;
}
AVX512 static double sqdev_avx512(const float* x, size_t n, double mu) {
    __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
    __m512d m = _mm512_set1_pd(mu);
    size_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int u = 0; u < 4; u++) {
            __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8 * u)), m);
            acc[u] = _mm512_fmadd_pd(d, d, acc[u]);
        }
    double s = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
    for (; i < n; i++) { double d = x[i] - mu; s += d * d; }
    return s;
}
// gn_back_plain 16 at a time; the sums in double lanes (summed in a fixed order at the end).
AVX512 static void gn_back_avx512(float* dx, const float* dout, const float* x, int n, const float* par, int silu,
                                  double* sums, int pass) {
    __m512 mu = _mm512_set1_ps(par[0]), rs = _mm512_set1_ps(par[1]), w = _mm512_set1_ps(par[2]), b = _mm512_set1_ps(par[3]);
    __m512 one = _mm512_set1_ps(1.0f);
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    for (int j = 0; j < n; j += 16) {
        __mmask16 k = lanes(n - j);
        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), mu), rs);
        __m512 gk = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, dout + j), w);
        if (silu) {                        // σ(y)·(1 + y·(1 − σ(y))), y = x̂·w + b
            __m512 y = _mm512_add_ps(_mm512_mul_ps(xh, w), b);
            __m512 sg = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), y))));
            gk = _mm512_mul_ps(gk, _mm512_mul_ps(sg, _mm512_add_ps(one, _mm512_mul_ps(y, _mm512_sub_ps(one, sg)))));
        }
        gk = _mm512_maskz_mov_ps(k, gk);
        if (pass == 0) {
            __m512 gx = _mm512_mul_ps(gk, xh);
            s0 = _mm512_add_pd(s0, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(gk)),
                                                 _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(gk), 1)))));
            s1 = _mm512_add_pd(s1, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(gx)),
                                                 _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(gx), 1)))));
        } else {
            __m512 d = _mm512_sub_ps(_mm512_sub_ps(gk, _mm512_set1_ps(par[4])), _mm512_mul_ps(xh, _mm512_set1_ps(par[5])));
            _mm512_mask_storeu_ps(dx + j, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, dx + j), _mm512_mul_ps(rs, d)));
        }
    }
    if (pass == 0) { sums[0] += _mm512_reduce_add_pd(s0); sums[1] += _mm512_reduce_add_pd(s1); }
}
AVX512 static void affine_avx512(float* out, const float* x, int n, float scale, float shift, int silu) {
    __m512 a = _mm512_set1_ps(scale), b = _mm512_set1_ps(shift), one = _mm512_set1_ps(1.0f);
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = lanes(n - i);
        __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x + i), a, b);
        if (silu) v = _mm512_div_ps(v, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), v))));
        _mm512_mask_storeu_ps(out + i, k, v);
    }
}
#endif

static RowOps row_ops_chosen;
static pthread_once_t row_ops_once = PTHREAD_ONCE_INIT;

static void row_ops_choose(void) {
    RowOps o = {col_softmax_plain, dsoftmax_plain, affine_plain, sum_plain, sqdev_plain, gn_back_plain, geglu_plain,
                geglu_back_plain};
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && !getenv("INSTASTYLE_NO_AVX512"))
        o = (RowOps){col_softmax_avx512, dsoftmax_avx512, affine_avx512, sum_avx512, sqdev_avx512, gn_back_avx512,
                     geglu_avx512, geglu_back_avx512};
#endif
    row_ops_chosen = o;
}

static const RowOps* row_ops(void) {
    pthread_once(&row_ops_once, row_ops_choose);
    return &row_ops_chosen;
}

// ----------------------------------------------------------------------------------------------
// linear: out[M, OUT] = inp[M, IN] · w[OUT, IN]ᵀ + b[OUT]   (b may be NULL)
// Frozen weights may be fp16 (the _f16 variants, --weights fp16): sgemm converts them exactly
// while packing, so an fp16 weight gives the same bits as its fp32 conversion.

static GemmOperand matrix(const float* x, int ld, int trans) { return (GemmOperand){.f32 = x, .ld = ld, .trans = trans}; }
static GemmOperand weight(const float* w, const uint16_t* w16, int ld, int trans) {
    return (GemmOperand){.f32 = w16 ? NULL : w, .f16 = w16, .ld = ld, .trans = trans};
}

static void linear_run(float* out, const float* inp, GemmOperand w, const float* b, int M, int IN, int OUT) {
    sgemm_op(M, OUT, IN, 1.0f, matrix(inp, IN, 0), w, 0.0f, b, 0, out, OUT);
}
void linear_forward(float* out, const float* inp, const float* w, const float* b, int M, int IN, int OUT) {
    if (g_device == DEVICE_CUDA) { linear_forward_cuda(out, inp, w, b, M, IN, OUT); return; }
    linear_run(out, inp, weight(w, NULL, IN, 1), b, M, IN, OUT);
}
void linear_forward_f16(float* out, const float* inp, const uint16_t* w, const float* b, int M, int IN, int OUT) {
    linear_run(out, inp, weight(NULL, w, IN, 1), b, M, IN, OUT);
}

// dinp[M, IN] += dout · w;  dw[OUT, IN] += doutᵀ · inp;  db[OUT] += Σ_m dout.
void linear_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                     const float* w, int M, int IN, int OUT) {
    if (dinp) sgemm(0, 0, M, IN, OUT, 1.0f, dout, OUT, w, IN, 1.0f, dinp, IN);
    if (dw) sgemm(1, 0, OUT, IN, M, 1.0f, dout, OUT, inp, IN, 1.0f, dw, IN);
    if (db)
        for (int m = 0; m < M; m++)
            for (int o = 0; o < OUT; o++) db[o] += dout[(size_t)m * OUT + o];
}
// The input gradient through a frozen fp16 weight: dinp += dout · w.
void linear_backward_f16(float* dinp, const float* dout, const uint16_t* w, int M, int IN, int OUT) {
    sgemm_op(M, IN, OUT, 1.0f, matrix(dout, OUT, 0), weight(NULL, w, IN, 0), 1.0f, NULL, 0, dinp, IN);
}

// ----------------------------------------------------------------------------------------------
// conv2d: out[N, OC, Ho, Wo] = w[OC, C, K, K] ⊛ inp[N, C, H, W] + b, stride s, zero padding
// pad_lo on top/left and pad_hi on bottom/right (the VAE encoder's down-sampling pads (0, 1)).
// Ho = (H + pad_lo + pad_hi − K) / s + 1. Implicit GEMM: out[n] = w[OC, C·K·K] · col, where col
// [C·K·K, Ho·Wo] is the im2col matrix of inp[n], which sgemm packs panel by panel straight from
// the image (GemmIm2col): no column buffer at all. 1×1 stride-1 convs are a plain GEMM. The bias
// is added by sgemm as each tile is finished.

// inp [N, C, H, W] is read through nearest-neighbour up-sampling by `up` (1: as it is).
static void conv_run(float* out, const float* inp, GemmOperand w, const float* b, int N, int C, int H, int W,
                     int OC, int K, int stride, int pad_lo, int pad_hi, int up) {
    int Ho = (H * up + pad_lo + pad_hi - K) / stride + 1, Wo = (W * up + pad_lo + pad_hi - K) / stride + 1;
    size_t HWo = (size_t)Ho * Wo, CKK = (size_t)C * K * K;
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C * H * W;
        float* o = out + (size_t)n * OC * HWo;
        GemmIm2col im = {x, C, H * up, W * up, K, stride, pad_lo, Wo, up};
        int plain = K == 1 && stride == 1 && pad_lo == 0 && pad_hi == 0 && up == 1;
        sgemm_op(OC, (int)HWo, (int)CKK, 1.0f, w, plain ? matrix(x, (int)HWo, 0) : (GemmOperand){.im2col = &im},
                 0.0f, b, 1, o, (int)HWo);
    }
}

void conv2d_forward(float* out, const float* inp, const float* w, const float* b, int N, int C,
                    int H, int W, int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch) {
    if (g_device == DEVICE_CUDA) { conv2d_forward_cuda(out, inp, w, b, N, C, H, W, OC, K, stride, pad_lo, pad_hi, scratch); return; }
    conv_run(out, inp, weight(w, NULL, C * K * K, 0), b, N, C, H, W, OC, K, stride, pad_lo, pad_hi, 1);
}
void conv2d_forward_f16(float* out, const float* inp, const uint16_t* w, const float* b, int N, int C,
                        int H, int W, int OC, int K, int stride, int pad_lo, int pad_hi) {
    conv_run(out, inp, weight(NULL, w, C * K * K, 0), b, N, C, H, W, OC, K, stride, pad_lo, pad_hi, 1);
}
// out[N, OC, 2H, 2W] = conv(upsample_nearest_2×(inp[N, C, H, W])), stride 1, padding pad each side:
// the up-sampled image is never stored (the decoder's 512² up-sampling would take 256 MiB).
void conv2d_forward_up2(float* out, const float* inp, const float* w, const uint16_t* w16, const float* b, int N,
                        int C, int H, int W, int OC, int K, int pad) {
    if (g_device == DEVICE_CUDA && !w16) { conv2d_forward_up2_cuda(out, inp, w, w16, b, N, C, H, W, OC, K, pad); return; }
    conv_run(out, inp, weight(w, w16, C * K * K, 0), b, N, C, H, W, OC, K, 1, pad, pad, 2);
}

// Backward-data: dinp += wᵀ ⊛ dout (the transposed convolution):
//   dinp[c, y, x] += Σ_{oc, ky, kx} w[oc, c, ky, kx] · dout[oc, (y + pad − ky)/s, (x + pad − kx)/s].
// Stride 1 on a large image: that is a forward convolution of dout with the flipped, transposed
// kernel wf[c, oc, ky', kx'] = w[oc, c, K−1−ky', K−1−kx'] and padding K−1−pad, so it runs as
// implicit GEMM too (wf built per call: C·OC·K² floats, small beside the C·OC·K²·HW products).
// Otherwise (stride 2, small images where the weight dominates) col = wᵀ·dout over tiles of
// output pixels, then col2im adds each column row (c, ky, kx) into input channel c (threads split
// the channels).

#define CONV_TILE_BYTES ((size_t)16 << 20)
#define CONV_IMPLICIT_BACKWARD_PIXELS 1024   // stride-1 images at least this large use implicit GEMM

typedef struct Col2im {
    float* dx; const float* col;
    int C, H, W, K, stride, pad, Wo, p0, np;
} Col2im;

static void col2im_channels(void* ctx, int c0, int c1) {
    const Col2im* a = ctx;
    int K = a->K;
    for (int c = c0; c < c1; c++) {
        float* dxc = a->dx + (size_t)c * a->H * a->W;
        for (int r = c * K * K; r < (c + 1) * K * K; r++) {
            int ky = (r / K) % K, kx = r % K;
            const float* src = a->col + (size_t)r * a->np;
            for (int i = 0; i < a->np; ) {       // one output row segment at a time
                int p = a->p0 + i, oy = p / a->Wo, ox0 = p % a->Wo;
                int run = a->Wo - ox0 < a->np - i ? a->Wo - ox0 : a->np - i;
                int iy = oy * a->stride - a->pad + ky;
                if (iy >= 0 && iy < a->H) {
                    float* row = dxc + (size_t)iy * a->W;
                    const float* s = src + i;
                    if (a->stride == 1) {    // ix = ox0 + j − pad + kx: one run inside [0, W)
                        int off = ox0 - a->pad + kx, lo = off < 0 ? -off : 0, hi = a->W - off < run ? a->W - off : run;
                        for (int j = lo; j < hi; j++) row[off + j] += s[j];
                    } else {
                        for (int j = 0; j < run; j++) {
                            int ix = (ox0 + j) * a->stride - a->pad + kx;
                            if (ix >= 0 && ix < a->W) row[ix] += s[j];
                        }
                    }
                }
                i += run;
            }
        }
    }
}

typedef struct FlipArgs { float* wf; const float* w; const uint16_t* w16; int C, OC, K; } FlipArgs;

static void flip_rows(void* ctx, int c0, int c1) {       // wf[c, oc, ky', kx'] = w[oc, c, K−1−ky', K−1−kx']
    const FlipArgs* a = ctx;
    int KK = a->K * a->K;
    for (int c = c0; c < c1; c++)
        for (int oc = 0; oc < a->OC; oc++) {
            size_t src = ((size_t)oc * a->C + c) * KK;
            float* d = a->wf + ((size_t)c * a->OC + oc) * KK;
            for (int t = 0; t < KK; t++) d[KK - 1 - t] = a->w16 ? f16_to_f32(a->w16[src + t]) : a->w[src + t];
        }
}

static void conv_backward_run(float* dinp, const float* dout, const float* w, const uint16_t* w16, int N, int C,
                              int H, int W, int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch) {
    int Ho = (H + pad_lo + pad_hi - K) / stride + 1, Wo = (W + pad_lo + pad_hi - K) / stride + 1;
    size_t HWo = (size_t)Ho * Wo, CKK = (size_t)C * K * K;
    if (K == 1 && stride == 1 && pad_lo == 0 && pad_hi == 0) {
        for (int n = 0; n < N; n++)
            sgemm_op(C, (int)HWo, OC, 1.0f, weight(w, w16, C, 1), matrix(dout + (size_t)n * OC * HWo, (int)HWo, 0),
                     1.0f, NULL, 0, dinp + (size_t)n * C * HWo, (int)HWo);
        return;
    }
    size_t mark = arena_mark(scratch);
    if (stride == 1 && pad_lo <= K - 1 && HWo >= CONV_IMPLICIT_BACKWARD_PIXELS) {
        FlipArgs f = {arena_alloc(scratch, CKK * OC), w, w16, C, OC, K};
        parallel_for_work(C, CKK * OC, flip_rows, &f);
        for (int n = 0; n < N; n++) {
            GemmIm2col im = {dout + (size_t)n * OC * HWo, OC, Ho, Wo, K, 1, K - 1 - pad_lo, W, 1};
            sgemm_op(C, H * W, OC * K * K, 1.0f, matrix(f.wf, OC * K * K, 0), (GemmOperand){.im2col = &im},
                     1.0f, NULL, 0, dinp + (size_t)n * C * H * W, H * W);
        }
        arena_reset(scratch, mark);
        return;
    }
    size_t tile = CONV_TILE_BYTES / (CKK * sizeof(float));
    if (tile < 256) tile = 256;
    if (tile > HWo) tile = HWo;
    float* col = arena_alloc(scratch, CKK * tile);
    for (int n = 0; n < N; n++)
        for (size_t p0 = 0; p0 < HWo; p0 += tile) {
            int np = (int)(HWo - p0 < tile ? HWo - p0 : tile);
            sgemm_op((int)CKK, np, OC, 1.0f, weight(w, w16, (int)CKK, 1), matrix(dout + (size_t)n * OC * HWo + p0, (int)HWo, 0),
                     0.0f, NULL, 0, col, np);
            Col2im a = {dinp + (size_t)n * C * H * W, col, C, H, W, K, stride, pad_lo, Wo, (int)p0, np};
            parallel_for_work(C, CKK * (size_t)np, col2im_channels, &a);
        }
    arena_reset(scratch, mark);
}

void conv2d_backward_input(float* dinp, const float* dout, const float* w, int N, int C, int H, int W,
                           int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch) {
    if (g_device == DEVICE_CUDA) {
        conv2d_backward_input_cuda(dinp, dout, w, N, C, H, W, OC, K, stride, pad_lo, pad_hi, scratch);
        return;
    }
    conv_backward_run(dinp, dout, w, NULL, N, C, H, W, OC, K, stride, pad_lo, pad_hi, scratch);
}
void conv2d_backward_input_f16(float* dinp, const float* dout, const uint16_t* w, int N, int C, int H, int W,
                               int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch) {
    conv_backward_run(dinp, dout, NULL, w, N, C, H, W, OC, K, stride, pad_lo, pad_hi, scratch);
}

// ----------------------------------------------------------------------------------------------
// groupnorm: x[N, C, HW] in G groups of C/G channels; per (n, g): mean μ, rstd = 1/√(σ² + eps);
// out = (x − μ)·rstd·w[c] + b[c], then SiLU when `silu` is set (ResBlocks always follow the norm
// with SiLU; fusing saves a pass). Saves mean, rstd [N, G] when non-NULL.

typedef struct GroupNormArgs {
    float* out; float* mean; float* rstd;
    const float* x; const float* w; const float* b;
    int C, HW, G, silu; float eps;
} GroupNormArgs;

static void groupnorm_groups(void* ctx, int i0, int i1) {
    const GroupNormArgs* a = ctx;
    int cg = a->C / a->G;
    for (int i = i0; i < i1; i++) {              // i = n·G + g
        int n = i / a->G, g = i % a->G;
        size_t off = ((size_t)n * a->C + (size_t)g * cg) * a->HW, cnt = (size_t)cg * a->HW;
        const float* x = a->x + off;
        double mu = row_ops()->sum(x, cnt) / (double)cnt, sq = row_ops()->sqdev(x, cnt, mu);
        float rstd = (float)(1.0 / sqrt(sq / (double)cnt + a->eps)), m = (float)mu;
        if (a->mean) { a->mean[i] = m; a->rstd[i] = rstd; }
        for (int c = 0; c < cg; c++) {
            int ch = g * cg + c;
            float scale = rstd * a->w[ch], shift = a->b[ch] - m * scale;
            const float* xc = x + (size_t)c * a->HW;
            float* oc = a->out + off + (size_t)c * a->HW;
            row_ops()->affine(oc, xc, a->HW, scale, shift, a->silu);
        }
    }
}

void groupnorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w,
                       const float* b, int N, int C, int HW, int G, float eps, int silu) {
    if (g_device == DEVICE_CUDA) { groupnorm_forward_cuda(out, mean, rstd, x, w, b, N, C, HW, G, eps, silu); return; }
    GroupNormArgs a = {out, mean, rstd, x, w, b, C, HW, G, silu, eps};
    parallel_for(N * G, groupnorm_groups, &a);
}

// Forward: y = (x − μ)·rstd·w + b, out = silu(y) when `silu` (y recomputed from the saved stats).
// With dy = dout·silu'(y) (or dout), x̂ = (x − μ)·rstd and g = dy·w:
// dx = rstd · (g − mean(g) − x̂ · mean(g·x̂)), means over the group. Threads split the groups.
typedef struct GroupNormBack {
    float* dx; const float* dout; const float* x; const float* mean; const float* rstd;
    const float* w; const float* b; int C, HW, G, silu;
} GroupNormBack;


static void groupnorm_backward_groups(void* ctx, int i0, int i1) {
    const GroupNormBack* a = ctx;
    int cg = a->C / a->G, HW = a->HW;
    for (int i = i0; i < i1; i++) {              // i = n·G + g
        int n = i / a->G, g = i % a->G;
        size_t off = ((size_t)n * a->C + (size_t)g * cg) * HW, cnt = (size_t)cg * HW;
        double sums[2] = {0, 0};                  // Σ g, Σ g·x̂ over the group
        for (int pass = 0; pass < 2; pass++)
            for (int c = 0; c < cg; c++) {
                int ch = g * cg + c;
                float par[6] = {a->mean[i], a->rstd[i], a->w[ch], a->b[ch], (float)(sums[0] / (double)cnt),
                                (float)(sums[1] / (double)cnt)};
                size_t k = off + (size_t)c * HW;
                row_ops()->gn_back(a->dx + k, a->dout + k, a->x + k, HW, par, a->silu, sums, pass);
            }
    }
}

void groupnorm_backward(float* dx, const float* dout, const float* x, const float* mean, const float* rstd,
                        const float* w, const float* b, int N, int C, int HW, int G, int silu) {
    GroupNormBack a = {dx, dout, x, mean, rstd, w, b, C, HW, G, silu};
    parallel_for_work(N * G, (size_t)N * C * HW * 8, groupnorm_backward_groups, &a);
}

// ----------------------------------------------------------------------------------------------
// layernorm over the last dim: x[M, C]; out = (x − μ)·rstd·w + b; saves mean, rstd [M].

typedef struct LayerNormArgs {
    float* out; float* mean; float* rstd; const float* x; const float* w; const float* b; int C; float eps;
} LayerNormArgs;

static void layernorm_rows(void* ctx, int m0, int m1) {    // threads split the rows
    const LayerNormArgs* a = ctx;
    int C = a->C;
    for (int m = m0; m < m1; m++) {
        const float* xm = a->x + (size_t)m * C;
        double sum = 0, sq = 0;
        for (int c = 0; c < C; c++) sum += xm[c];
        double mu = sum / C;
        for (int c = 0; c < C; c++) { double d = xm[c] - mu; sq += d * d; }
        float r = (float)(1.0 / sqrt(sq / C + a->eps)), mf = (float)mu;
        if (a->mean) { a->mean[m] = mf; a->rstd[m] = r; }
        float* om = a->out + (size_t)m * C;
        for (int c = 0; c < C; c++) om[c] = (xm[c] - mf) * r * a->w[c] + a->b[c];
    }
}

void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w,
                       const float* b, int M, int C, float eps) {
    if (g_device == DEVICE_CUDA) { layernorm_forward_cuda(out, mean, rstd, x, w, b, M, C, eps); return; }
    LayerNormArgs a = {out, mean, rstd, x, w, b, C, eps};
    parallel_for_work(M, (size_t)M * C * 8, layernorm_rows, &a);
}

// Same derivative as groupnorm with one group per row: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),
// g = dout·w. Threads split the rows.
typedef struct LayerNormBack {
    float* dx; const float* dout; const float* x; const float* mean; const float* rstd; const float* w; int C;
} LayerNormBack;

static void layernorm_backward_rows(void* ctx, int m0, int m1) {
    const LayerNormBack* a = ctx;
    int C = a->C;
    for (int m = m0; m < m1; m++) {
        const float* xm = a->x + (size_t)m * C;
        const float* dm = a->dout + (size_t)m * C;
        float* dxm = a->dx + (size_t)m * C;
        double sg = 0, sgx = 0;
        for (int c = 0; c < C; c++) {
            float xh = (xm[c] - a->mean[m]) * a->rstd[m], g = dm[c] * a->w[c];
            sg += g;
            sgx += g * xh;
        }
        float mg = (float)(sg / C), mgx = (float)(sgx / C);
        for (int c = 0; c < C; c++) {
            float xh = (xm[c] - a->mean[m]) * a->rstd[m];
            dxm[c] += a->rstd[m] * (dm[c] * a->w[c] - mg - xh * mgx);
        }
    }
}

void layernorm_backward(float* dx, const float* dout, const float* x, const float* mean,
                        const float* rstd, const float* w, int M, int C) {
    LayerNormBack a = {dx, dout, x, mean, rstd, w, C};
    parallel_for_work(M, (size_t)M * C * 8, layernorm_backward_rows, &a);
}

// ----------------------------------------------------------------------------------------------
// pointwise nonlinearities, each saving its input for backward.

// silu(x) = x·σ(x);  d/dx = σ(x)·(1 + x·(1 − σ(x)))
void silu_forward(float* out, const float* x, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = x[i] / (1.0f + expf(-x[i]));
}
void silu_backward(float* dx, const float* dout, const float* x, size_t n) {
    for (size_t i = 0; i < n; i++) dx[i] += dout[i] * silu_grad(x[i]);
}

// quick_gelu(x) = x·σ(1.702x) (CLIP);  d/dx = σ(1.702x)·(1 + 1.702x·(1 − σ(1.702x)))
void quick_gelu_forward(float* out, const float* x, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = x[i] / (1.0f + expf(-1.702f * x[i]));
}
void quick_gelu_backward(float* dx, const float* dout, const float* x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float s = 1.0f / (1.0f + expf(-1.702f * x[i]));
        dx[i] += dout[i] * s * (1.0f + 1.702f * x[i] * (1.0f - s));
    }
}

// gelu (gelu() and gelu_grad() are defined with the row kernels above)
void gelu_forward(float* out, const float* x, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = gelu(x[i]);
}
void gelu_backward(float* dx, const float* dout, const float* x, size_t n) {
    for (size_t i = 0; i < n; i++) dx[i] += dout[i] * gelu_grad(x[i]);
}

// geglu (diffusers GEGLU): proj[M, 2F] = (value | gate); out[M, F] = value ⊙ gelu(gate).
// dvalue = dout·gelu(gate);  dgate = dout·value·gelu'(gate). Threads split the rows.
typedef struct GegluArgs { float* out; float* dproj; const float* dout; const float* proj; int F; } GegluArgs;

static void geglu_rows(void* ctx, int m0, int m1) {
    const GegluArgs* a = ctx;
    size_t F = (size_t)a->F;
    for (int m = m0; m < m1; m++) {
        const float* v = a->proj + (size_t)m * 2 * F;
        if (a->out) row_ops()->geglu(a->out + m * F, v, v + F, a->F);
        else row_ops()->geglu_back(a->dproj + m * 2 * F, a->dproj + m * 2 * F + F, a->dout + m * F, v, v + F, a->F);
    }
}
void geglu_forward(float* out, const float* proj, int M, int F) {
    GegluArgs a = {out, NULL, NULL, proj, F};
    parallel_for_work(M, (size_t)M * F * 32, geglu_rows, &a);
}
void geglu_backward(float* dproj, const float* dout, const float* proj, int M, int F) {
    GegluArgs a = {NULL, dproj, dout, proj, F};
    parallel_for_work(M, (size_t)M * F * 64, geglu_rows, &a);
}

// ----------------------------------------------------------------------------------------------
// attention: heads indexed in place in (N, T, NH·HD) rows of stride ldq/ldk/ldv/ldo.
// out[n, i, h] = Σ_j softmax_j(scale · q_i·k_j) v_j, causal: only j ≤ i.
// Flash-style on the CPU (T. Dao et al., "FlashAttention", 2022: blocks of queries against blocks
// of keys, online softmax), arranged so that nothing is re-packed per block: each head's K and Vᵀ
// are packed once, block of keys by block of keys, into GEMM panels (sgemm_pack) that serve all
// its blocks of ATT_B queries. For a block of queries, key block by key block b:
//   Sᵀ = scale · K_b·Q_blkᵀ [kb, ATT_B]                 (one GEMM, K_b packed)
//   m' = max(m, max_j Sᵀ); P = exp(Sᵀ − m') in place   (down the columns, vectorised across queries)
//   Oᵀ ← e^(m − m')·Oᵀ + Vᵀ_b·P [HD, ATT_B]; l ← e^(m − m')·l + Σ_j P_j    (Vᵀ_b packed, and P is
//                                                       already one B panel of the product)
// and o_i = Oᵀ[:, i] / l_i. Saves lse[N, NH, Tq] = m + log l when non-NULL. A key block (ATT_KB
// keys) keeps its Sᵀ and its K, Vᵀ panels in L2; a thread's memory is one head's panels and one
// [kb, ATT_B] block, never a (Tq, Tk) matrix. Causal: key blocks past a query block are skipped.
#define ATT_KB 1024      // keys per block (512 measured 3% slower at 4096 keys, one block of 4096 2% faster)
#define ATT_MAX_KB 64    // key blocks per head at most (longer sequences get longer blocks)

static int attn_key_block(int Tk) {
    int kb = ATT_KB;
    while ((Tk + kb - 1) / kb > ATT_MAX_KB) kb *= 2;
    return kb;
}

// A [rows, ATT_B] block as sgemm's B operand: used in place when it is one panel of the product
// [M, ATT_B] (the usual case), else packed as a matrix.
static GemmOperand block_operand(GemmPacked* view, const float* blk, int rows, int n, int M) {
    if (sgemm_panel_width(M, ATT_B, 1) != ATT_B) return matrix(blk, ATT_B, 0);
    *view = (GemmPacked){blk, n, rows, ATT_B};
    return (GemmOperand){.packed = view};
}

// Per-thread state of the attention tasks: the panels of the head last packed, and the block buffers.
typedef struct AttnThread {
    float* mem;
    GemmPacked p[2 * ATT_MAX_KB];   // forward: K_b, Vᵀ_b of every key block; backward: four operands
    int head;
} AttnThread;

static size_t round64(size_t nfloats) { return (nfloats + 15) / 16 * 16; }   // keeps 64-byte alignment

// Packs X (an A operand of an M×ATT_B×K product) into the thread's memory at *off.
static void pack_head(AttnThread* t, int slot, size_t* off, GemmOperand X, int M, int K) {
    sgemm_pack(&t->p[slot], t->mem + *off, X, M, ATT_B, K, 0);
    *off += round64(sgemm_pack_floats(M, ATT_B, K, 0));
}

typedef struct AttnArgs {
    float* out; float* lse;
    const float* q; const float* k; const float* v;
    int N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal;
    float scale;
    float* bufs;          // [workers][per_worker]: K_b, Vᵀ_b panels, Sᵀ [kb, ATT_B], Oᵀ [HD, ATT_B]
    size_t per_worker;
    int tasks, workers;   // tasks = N·NH·ceil(Tq/ATT_B)
} AttnArgs;

// Floats of one head's K_b and Vᵀ_b panels, all key blocks.
static size_t attn_panel_floats(int Tk, int HD) {
    size_t n = 0;
    int kb = attn_key_block(Tk);
    for (int j0 = 0; j0 < Tk; j0 += kb) {
        int rows = Tk - j0 < kb ? Tk - j0 : kb;
        n += round64(sgemm_pack_floats(rows, ATT_B, HD, 0)) + round64(sgemm_pack_floats(HD, ATT_B, rows, 0));
    }
    return n;
}

static void attention_task(const AttnArgs* a, int task, AttnThread* t) {
    int nqb = (a->Tq + ATT_B - 1) / ATT_B, HD = a->HD, Tk = a->Tk, kb = attn_key_block(Tk);
    int n = task / (a->NH * nqb), h = (task / nqb) % a->NH, i0 = (task % nqb) * ATT_B;
    int bq = a->Tq - i0 < ATT_B ? a->Tq - i0 : ATT_B;
    if (t->head != n * a->NH + h) {
        t->head = n * a->NH + h;
        size_t off = 0;
        for (int j0 = 0, b = 0; j0 < Tk; j0 += kb, b++) {
            int rows = Tk - j0 < kb ? Tk - j0 : kb;
            const float* kj = a->k + ((size_t)n * Tk + j0) * a->ldk + (size_t)h * HD;
            const float* vj = a->v + ((size_t)n * Tk + j0) * a->ldv + (size_t)h * HD;
            pack_head(t, 2 * b, &off, (GemmOperand){.f32 = kj, .ld = a->ldk}, rows, HD);
            pack_head(t, 2 * b + 1, &off, (GemmOperand){.f32 = vj, .ld = a->ldv, .trans = 1}, HD, rows);
        }
    }
    float* St = t->mem + attn_panel_floats(Tk, HD);
    float* Ot = St + round64((size_t)kb * ATT_B);
    const float* q = a->q + ((size_t)n * a->Tq + i0) * a->ldq + (size_t)h * HD;
    float m[ATT_B], sum[ATT_B], block_sum[ATT_B], m_before[ATT_B];
    for (int c = 0; c < ATT_B; c++) m[c] = -FLT_MAX, sum[c] = 0.0f;
    for (int j0 = 0, b = 0; j0 < Tk; j0 += kb, b++) {
        if (a->causal && j0 > i0 + bq - 1) break;          // every key of this block comes after every query
        int rows = Tk - j0 < kb ? Tk - j0 : kb;
        sgemm_op(rows, bq, HD, a->scale, (GemmOperand){.packed = &t->p[2 * b]}, matrix(q, a->ldq, 1), 0.0f, NULL, 0, St, ATT_B);
        memcpy(m_before, m, sizeof m);
        row_ops()->col_softmax(St, rows, bq, i0 - j0, a->causal, m, block_sum);
        for (int c = 0; c < bq; c++) {                    // rescale what earlier blocks summed (online softmax)
            float r = b ? expf(m_before[c] - m[c]) : 0.0f;
            sum[c] = r * sum[c] + block_sum[c];
            if (b) for (int d = 0; d < HD; d++) Ot[(size_t)d * ATT_B + c] *= r;
        }
        GemmPacked view;
        sgemm_op(HD, bq, rows, 1.0f, (GemmOperand){.packed = &t->p[2 * b + 1]}, block_operand(&view, St, rows, bq, HD),
                 b ? 1.0f : 0.0f, NULL, 0, Ot, ATT_B);
    }
    float* o = a->out + ((size_t)n * a->Tq + i0) * a->ldo + (size_t)h * HD;
    for (int r = 0; r < bq; r++) {
        float inv = 1.0f / sum[r];
        for (int d = 0; d < HD; d++) o[(size_t)r * a->ldo + d] = Ot[(size_t)d * ATT_B + r] * inv;
        if (a->lse) a->lse[((size_t)n * a->NH + h) * a->Tq + i0 + r] = m[r] + logf(sum[r]);
    }
}

static void attention_worker(void* ctx, int w0, int w1) {
    const AttnArgs* a = ctx;
    for (int w = w0; w < w1; w++) {
        AttnThread t = {a->bufs + (size_t)w * a->per_worker, {{0}}, -1};
        int per = (a->tasks + a->workers - 1) / a->workers;
        for (int k = w * per; k < (w + 1) * per && k < a->tasks; k++) attention_task(a, k, &t);
    }
}

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       int N, int Tq, int Tk, int NH, int HD, int ldq, int ldk, int ldv, int ldo,
                       int causal, Arena* scratch) {
    if (g_device == DEVICE_CUDA) {
        attention_forward_cuda(out, lse, q, k, v, N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal, scratch);
        return;
    }
    AttnArgs a = {out, lse, q, k, v, N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal,
                  1.0f / sqrtf((float)HD), NULL, 0, 0, 0};
    a.tasks = N * NH * ((Tq + ATT_B - 1) / ATT_B);
    a.workers = threads_count() < a.tasks ? threads_count() : a.tasks;
    a.per_worker = attn_panel_floats(Tk, HD) + round64((size_t)attn_key_block(Tk) * ATT_B) + round64((size_t)HD * ATT_B);
    size_t mark = arena_mark(scratch);
    a.bufs = arena_alloc(scratch, (size_t)a.workers * a.per_worker);
    parallel_for(a.workers, attention_worker, &a);
    arena_reset(scratch, mark);
}

// Backward, flash-attention style: nothing of size (Tq, Tk) is kept; P is recomputed block by
// block from the saved lse. Forward: s_ij = scale·q_i·k_j, p_ij = exp(s_ij − lse_i), o_i = Σ_j p_ij v_j.
// With D_i = Σ_d do_i·o_i, dp_ij = do_i·v_j and ds_ij = p_ij·(dp_ij − D_i):
//   pass 1, threads own blocks of queries (K, V, Kᵀ of the head packed once):
//     Sᵀ = scale·K·Q_blkᵀ, dPᵀ = V·dO_blkᵀ [Tk, ATT_B]; dSᵀ;  dq_blkᵀ += scale·Kᵀ·dSᵀ [HD, ATT_B]
//   pass 2, threads own blocks of keys (Q, dO, Qᵀ, dOᵀ packed once):
//     S = scale·Q·K_blkᵀ, dP = dO·V_blkᵀ [Tq, ATT_B]; P, dS;  dv_blkᵀ += dOᵀ·P,  dk_blkᵀ += scale·Qᵀ·dS
// (each block is one B panel: no re-packing). Every output element is summed in one task in a
// fixed order: bitwise equal for any thread count. dq, dk, dv (strides ldq, ldk, ldv) may be NULL;
// dout and out have stride ldo.

typedef struct AttnBack {
    float* dq; float* dk; float* dv;
    const float* dout; const float* out; const float* lse; const float* q; const float* k; const float* v;
    int N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal;
    float scale;
    float* D;             // [N, NH, Tq]
    float* bufs;          // [workers][per_worker]
    size_t per_worker;
    int tasks, workers, pass;
} AttnBack;

// xᵀ-add: x[j, d] (row stride ld) += t[d, j] (row stride ATT_B) for j < nb, d < HD.
static void add_transposed(float* x, int ld, const float* t, int nb, int HD) {
    for (int j = 0; j < nb; j++)
        for (int d = 0; d < HD; d++) x[(size_t)j * ld + d] += t[(size_t)d * ATT_B + j];
}

// Pass 1, one block of queries i0..i0+bq−1 of head (n, h): Sᵀ, dPᵀ [Tk, ATT_B] → dq.
static void attention_back_queries(const AttnBack* a, int n, int h, int i0, int bq, AttnThread* t) {
    int HD = a->HD, Tk = a->Tk;
    const float* k = a->k + (size_t)n * Tk * a->ldk + (size_t)h * HD;
    size_t off = 0;
    if (t->head != n * a->NH + h) {
        t->head = n * a->NH + h;
        pack_head(t, 0, &off, (GemmOperand){.f32 = k, .ld = a->ldk}, Tk, HD);
        pack_head(t, 1, &off, (GemmOperand){.f32 = a->v + (size_t)n * Tk * a->ldv + (size_t)h * HD, .ld = a->ldv}, Tk, HD);
        pack_head(t, 2, &off, (GemmOperand){.f32 = k, .ld = a->ldk, .trans = 1}, HD, Tk);
    }
    float* St = t->mem + 2 * round64(sgemm_pack_floats(Tk, ATT_B, HD, 0)) + round64(sgemm_pack_floats(HD, ATT_B, Tk, 0));
    float* dPt = St + round64((size_t)Tk * ATT_B);
    float* dqt = dPt + round64((size_t)Tk * ATT_B);
    const float* q = a->q + ((size_t)n * a->Tq + i0) * a->ldq + (size_t)h * HD;
    const float* dout = a->dout + ((size_t)n * a->Tq + i0) * a->ldo + (size_t)h * HD;
    size_t row = ((size_t)n * a->NH + h) * a->Tq + i0;
    sgemm_op(Tk, bq, HD, a->scale, (GemmOperand){.packed = &t->p[0]}, matrix(q, a->ldq, 1), 0.0f, NULL, 0, St, ATT_B);
    sgemm_op(Tk, bq, HD, 1.0f, (GemmOperand){.packed = &t->p[1]}, matrix(dout, a->ldo, 1), 0.0f, NULL, 0, dPt, ATT_B);
    row_ops()->dsoftmax(St, dPt, Tk, bq, a->lse + row, a->D + row, 0, a->causal, i0);
    GemmPacked view;
    sgemm_op(HD, bq, Tk, a->scale, (GemmOperand){.packed = &t->p[2]}, block_operand(&view, dPt, Tk, bq, HD), 0.0f, NULL, 0,
             dqt, ATT_B);
    add_transposed(a->dq + ((size_t)n * a->Tq + i0) * a->ldq + (size_t)h * HD, a->ldq, dqt, bq, HD);
}

// Pass 2, one block of keys j0..j0+bk−1 of head (n, h): S, dP [Tq, ATT_B] → dk, dv.
static void attention_back_keys(const AttnBack* a, int n, int h, int j0, int bk, AttnThread* t) {
    int HD = a->HD, Tq = a->Tq;
    const float* q = a->q + (size_t)n * Tq * a->ldq + (size_t)h * HD;
    const float* dout = a->dout + (size_t)n * Tq * a->ldo + (size_t)h * HD;
    size_t off = 0;
    if (t->head != n * a->NH + h) {
        t->head = n * a->NH + h;
        pack_head(t, 0, &off, (GemmOperand){.f32 = q, .ld = a->ldq}, Tq, HD);
        pack_head(t, 1, &off, (GemmOperand){.f32 = dout, .ld = a->ldo}, Tq, HD);
        pack_head(t, 2, &off, (GemmOperand){.f32 = q, .ld = a->ldq, .trans = 1}, HD, Tq);
        pack_head(t, 3, &off, (GemmOperand){.f32 = dout, .ld = a->ldo, .trans = 1}, HD, Tq);
    }
    float* S = t->mem + 2 * round64(sgemm_pack_floats(Tq, ATT_B, HD, 0)) + 2 * round64(sgemm_pack_floats(HD, ATT_B, Tq, 0));
    float* dP = S + round64((size_t)Tq * ATT_B);
    float* dt = dP + round64((size_t)Tq * ATT_B);
    const float* k = a->k + ((size_t)n * a->Tk + j0) * a->ldk + (size_t)h * HD;
    const float* v = a->v + ((size_t)n * a->Tk + j0) * a->ldv + (size_t)h * HD;
    size_t row = ((size_t)n * a->NH + h) * Tq;
    sgemm_op(Tq, bk, HD, a->scale, (GemmOperand){.packed = &t->p[0]}, matrix(k, a->ldk, 1), 0.0f, NULL, 0, S, ATT_B);
    sgemm_op(Tq, bk, HD, 1.0f, (GemmOperand){.packed = &t->p[1]}, matrix(v, a->ldv, 1), 0.0f, NULL, 0, dP, ATT_B);
    row_ops()->dsoftmax(S, dP, Tq, bk, a->lse + row, a->D + row, 1, a->causal, j0);
    GemmPacked view;
    if (a->dv) {
        sgemm_op(HD, bk, Tq, 1.0f, (GemmOperand){.packed = &t->p[3]}, block_operand(&view, S, Tq, bk, HD), 0.0f, NULL, 0,
                 dt, ATT_B);
        add_transposed(a->dv + ((size_t)n * a->Tk + j0) * a->ldv + (size_t)h * HD, a->ldv, dt, bk, HD);
    }
    if (a->dk) {
        sgemm_op(HD, bk, Tq, a->scale, (GemmOperand){.packed = &t->p[2]}, block_operand(&view, dP, Tq, bk, HD), 0.0f, NULL,
                 0, dt, ATT_B);
        add_transposed(a->dk + ((size_t)n * a->Tk + j0) * a->ldk + (size_t)h * HD, a->ldk, dt, bk, HD);
    }
}

static void attention_back_worker(void* ctx, int w0, int w1) {
    const AttnBack* a = ctx;
    int T = a->pass == 1 ? a->Tq : a->Tk, nb = (T + ATT_B - 1) / ATT_B;
    for (int w = w0; w < w1; w++) {
        AttnThread t = {a->bufs + (size_t)w * a->per_worker, {{0}}, -1};
        int per = (a->tasks + a->workers - 1) / a->workers;
        for (int k = w * per; k < (w + 1) * per && k < a->tasks; k++) {
            int n = k / (a->NH * nb), h = (k / nb) % a->NH, x0 = (k % nb) * ATT_B;
            int bx = T - x0 < ATT_B ? T - x0 : ATT_B;
            if (a->pass == 1) attention_back_queries(a, n, h, x0, bx, &t);
            else attention_back_keys(a, n, h, x0, bx, &t);
        }
    }
}

// D_i = Σ_d do_i·o_i for the rows (n, h, i) in [r0, r1) of [N·NH·Tq].
static void attention_back_rows(void* ctx, int r0, int r1) {
    const AttnBack* a = ctx;
    for (int r = r0; r < r1; r++) {
        int n = r / (a->NH * a->Tq), h = r / a->Tq % a->NH, i = r % a->Tq;
        const float* o = a->out + ((size_t)n * a->Tq + i) * a->ldo + (size_t)h * a->HD;
        const float* g = a->dout + ((size_t)n * a->Tq + i) * a->ldo + (size_t)h * a->HD;
        float d = 0.0f;
        for (int e = 0; e < a->HD; e++) d += g[e] * o[e];
        a->D[r] = d;
    }
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                        const float* q, const float* k, const float* v, int N, int Tq, int Tk, int NH, int HD,
                        int ldq, int ldk, int ldv, int ldo, int causal, Arena* scratch) {
    if (g_device == DEVICE_CUDA) {
        attention_backward_cuda(dq, dk, dv, dout, out, lse, q, k, v, N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal, scratch);
        return;
    }
    AttnBack a = {dq, dk, dv, dout, out, lse, q, k, v, N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal,
                  1.0f / sqrtf((float)HD), NULL, NULL, 0, 0, 0, 0};
    size_t mark = arena_mark(scratch);
    a.D = arena_alloc(scratch, (size_t)N * NH * Tq);
    parallel_for_work(N * NH * Tq, (size_t)N * NH * Tq * HD * 2, attention_back_rows, &a);
    size_t pass1 = 2 * round64(sgemm_pack_floats(Tk, ATT_B, HD, 0)) + round64(sgemm_pack_floats(HD, ATT_B, Tk, 0)) +
                   2 * round64((size_t)Tk * ATT_B) + round64((size_t)HD * ATT_B);
    size_t pass2 = 2 * round64(sgemm_pack_floats(Tq, ATT_B, HD, 0)) + 2 * round64(sgemm_pack_floats(HD, ATT_B, Tq, 0)) +
                   2 * round64((size_t)Tq * ATT_B) + round64((size_t)HD * ATT_B);
    a.per_worker = pass1 > pass2 ? pass1 : pass2;
    int most = threads_count();
    a.bufs = arena_alloc(scratch, (size_t)most * a.per_worker);
    for (a.pass = 1; a.pass <= 2; a.pass++) {
        if (a.pass == 1 ? !dq : !dk && !dv) continue;
        a.tasks = N * NH * (((a.pass == 1 ? Tq : Tk) + ATT_B - 1) / ATT_B);
        a.workers = most < a.tasks ? most : a.tasks;
        parallel_for_work(a.workers, (size_t)N * NH * Tq * Tk * HD * 8, attention_back_worker, &a);
    }
    arena_reset(scratch, mark);
}

// ----------------------------------------------------------------------------------------------
// small shape ops

// nearest-neighbour resize x[N, C, H, W] → out[N, C, Ho, Wo] as torch's F.interpolate(mode=
// "nearest"): src = min(floor(dst · (H/Ho)), H − 1), the scale computed in float.
void upsample_nearest_forward(float* out, const float* x, int N, int C, int H, int W, int Ho, int Wo) {
    float sy = (float)H / (float)Ho, sx = (float)W / (float)Wo;
    for (size_t nc = 0; nc < (size_t)N * C; nc++)
        for (int y = 0; y < Ho; y++) {
            int iy = (int)floorf((float)y * sy);
            if (iy > H - 1) iy = H - 1;
            for (int xo = 0; xo < Wo; xo++) {
                int ix = (int)floorf((float)xo * sx);
                if (ix > W - 1) ix = W - 1;
                out[(nc * Ho + y) * Wo + xo] = x[(nc * H + iy) * W + ix];
            }
        }
}
// dx[src] += dout[dst] for every dst that read src.
void upsample_nearest_backward(float* dx, const float* dout, int N, int C, int H, int W, int Ho, int Wo) {
    float sy = (float)H / (float)Ho, sx = (float)W / (float)Wo;
    for (size_t nc = 0; nc < (size_t)N * C; nc++)
        for (int y = 0; y < Ho; y++) {
            int iy = (int)floorf((float)y * sy);
            if (iy > H - 1) iy = H - 1;
            for (int xo = 0; xo < Wo; xo++) {
                int ix = (int)floorf((float)xo * sx);
                if (ix > W - 1) ix = W - 1;
                dx[(nc * H + iy) * W + ix] += dout[(nc * Ho + y) * Wo + xo];
            }
        }
}

// [N, C, HW] ↔ [N, HW, C], in 16×16 tiles (both sides touch whole cache lines); threads split
// the tiles' rows of pixels.
#define TILE 16
typedef struct TransposeArgs { float* out; const float* x; int N, C, HW, to_nhwc; } TransposeArgs;

static void transpose_tiles(void* ctx, int t0, int t1) {
    const TransposeArgs* a = ctx;
    int np = (a->HW + TILE - 1) / TILE;
    for (int t = t0; t < t1; t++) {             // t = (n, pixel tile)
        int n = t / np, p0 = t % np * TILE, p1 = p0 + TILE < a->HW ? p0 + TILE : a->HW;
        const float* x = a->x + (size_t)n * a->C * a->HW;
        float* o = a->out + (size_t)n * a->C * a->HW;
        for (int c0 = 0; c0 < a->C; c0 += TILE) {
            int c1 = c0 + TILE < a->C ? c0 + TILE : a->C;
            if (a->to_nhwc)
                for (int p = p0; p < p1; p++)
                    for (int c = c0; c < c1; c++) o[(size_t)p * a->C + c] = x[(size_t)c * a->HW + p];
            else
                for (int c = c0; c < c1; c++)
                    for (int p = p0; p < p1; p++) o[(size_t)c * a->HW + p] = x[(size_t)p * a->C + c];
        }
    }
}
void nchw_to_nhwc(float* out, const float* x, int N, int C, int HW) {
    TransposeArgs a = {out, x, N, C, HW, 1};
    parallel_for_work(N * ((HW + TILE - 1) / TILE), (size_t)N * C * HW, transpose_tiles, &a);
}
void nhwc_to_nchw(float* out, const float* x, int N, int C, int HW) {
    TransposeArgs a = {out, x, N, C, HW, 0};
    parallel_for_work(N * ((HW + TILE - 1) / TILE), (size_t)N * C * HW, transpose_tiles, &a);
}

// y += x, threads split chunks of ADD_CHUNK elements.
#define ADD_CHUNK 16384
typedef struct AddArgs { float* y; const float* x; size_t n; } AddArgs;
static void add_chunks(void* ctx, int i0, int i1) {
    const AddArgs* a = ctx;
    size_t end = (size_t)i1 * ADD_CHUNK < a->n ? (size_t)i1 * ADD_CHUNK : a->n;
    for (size_t i = (size_t)i0 * ADD_CHUNK; i < end; i++) a->y[i] += a->x[i];
}
void add_inplace(float* y, const float* x, size_t n) {
    AddArgs a = {y, x, n};
    parallel_for_work((int)((n + ADD_CHUNK - 1) / ADD_CHUNK), n, add_chunks, &a);
}

// Sinusoidal timestep embedding (diffusers Timesteps, flip_sin_to_cos, downscale_freq_shift s):
// f_i = exp(−ln(10000)·i/(half − s)), out = [cos(t·f) | sin(t·f)] (or sin first when not flipped).
void timestep_embedding(float* out, const float* t, int N, int dim, int flip_sin_to_cos, float shift) {
    int half = dim / 2;
    for (int n = 0; n < N; n++) {
        float* o = out + (size_t)n * dim;
        for (int i = 0; i < half; i++) {
            float freq = expf(-logf(10000.0f) * (float)i / ((float)half - shift));
            float arg = t[n] * freq;
            o[flip_sin_to_cos ? i : half + i] = cosf(arg);
            o[flip_sin_to_cos ? half + i : i] = sinf(arg);
        }
        if (dim % 2) o[dim - 1] = 0.0f;
    }
}

#ifndef USE_CUDA
// ----------------------------------------------------------------------------------------------
// CUDA stubs (make CUDA=1 builds nn_cuda.cu instead)

__attribute__((noreturn)) static void no_cuda(const char* fn, ...) {
    fprintf(stderr, "error: %s: built without CUDA: rebuild with make CUDA=1\n", fn);
    exit(1);
}

void cuda_init(void) { no_cuda("cuda_init"); }
void cuda_shutdown(void) { no_cuda("cuda_shutdown"); }
void cuda_weights_frozen(const float* w, size_t n) { no_cuda("cuda_weights_frozen", w, n); }
void cuda_weights_release(void) { no_cuda("cuda_weights_release"); }
const char* cuda_device_name(void) { no_cuda("cuda_device_name"); }
const char* cuda_gemm_mode(void) { no_cuda("cuda_gemm_mode"); }
double cuda_peak_gflops(void) { no_cuda("cuda_peak_gflops"); }
size_t cuda_peak_bytes(void) { no_cuda("cuda_peak_bytes"); }
long cuda_calls(void) { no_cuda("cuda_calls"); }
double cuda_flop_count(void) { no_cuda("cuda_flop_count"); }
void sgemm_cuda(int transA, int transB, int M, int N, int K, float alpha, const float* A, int lda,
                const float* B, int ldb, float beta, float* C, int ldc) {
    no_cuda("sgemm_cuda", transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void linear_forward_cuda(float* out, const float* inp, const float* w, const float* b, int M, int IN, int OUT) {
    no_cuda("linear_forward_cuda", out, inp, w, b, M, IN, OUT);
}
void conv2d_forward_cuda(float* out, const float* inp, const float* w, const float* b, int N, int C,
                         int H, int W, int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch) {
    no_cuda("conv2d_forward_cuda", out, inp, w, b, N, C, H, W, OC, K, stride, pad_lo, pad_hi, scratch);
}
void conv2d_forward_up2_cuda(float* out, const float* inp, const float* w, const uint16_t* w16, const float* b, int N,
                             int C, int H, int W, int OC, int K, int pad) {
    no_cuda("conv2d_forward_up2_cuda", out, inp, w, w16, b, N, C, H, W, OC, K, pad);
}
void conv2d_backward_input_cuda(float* dinp, const float* dout, const float* w, int N, int C, int H, int W,
                                int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch) {
    no_cuda("conv2d_backward_input_cuda", dinp, dout, w, N, C, H, W, OC, K, stride, pad_lo, pad_hi, scratch);
}
void groupnorm_forward_cuda(float* out, float* mean, float* rstd, const float* x, const float* w,
                            const float* b, int N, int C, int HW, int G, float eps, int silu) {
    no_cuda("groupnorm_forward_cuda", out, mean, rstd, x, w, b, N, C, HW, G, eps, silu);
}
void layernorm_forward_cuda(float* out, float* mean, float* rstd, const float* x, const float* w,
                            const float* b, int M, int C, float eps) {
    no_cuda("layernorm_forward_cuda", out, mean, rstd, x, w, b, M, C, eps);
}
void attention_forward_cuda(float* out, float* lse, const float* q, const float* k, const float* v,
                            int N, int Tq, int Tk, int NH, int HD, int ldq, int ldk, int ldv, int ldo,
                            int causal, Arena* scratch) {
    no_cuda("attention_forward_cuda", out, lse, q, k, v, N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal, scratch);
}
void attention_backward_cuda(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                             const float* q, const float* k, const float* v, int N, int Tq, int Tk, int NH, int HD,
                             int ldq, int ldk, int ldv, int ldo, int causal, Arena* scratch) {
    no_cuda("attention_backward_cuda", dq, dk, dv, dout, out, lse, q, k, v, N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo,
            causal, scratch);
}
#endif
