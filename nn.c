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
// The matrix multiplies all go through sgemm (gemm.c). Norm statistics are accumulated in double.
// What is deliberately left out: dropout (inference and SD fine-tuning use p = 0), affine-parameter
// gradients of norms (all norms are frozen in InstaStyle), bias gradients of frozen layers.
#include "instastyle.h"

#include <float.h>
#include <math.h>
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

typedef struct RowOps {
    float (*max)(const float* x, int n);
    float (*exp_sum)(float* x, int n, float shift);             // x ← e^(x − shift); returns Σ x
    void (*affine)(float* out, const float* x, int n, float scale, float shift, int silu);  // (x·scale + shift), SiLU
} RowOps;

static float max_plain(const float* x, int n) {
    float m = -FLT_MAX;
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}
static float exp_sum_plain(float* x, int n, float shift) {
    float sum = 0;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - shift); sum += x[i]; }
    return sum;
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
AVX512 static float max_avx512(const float* x, int n) {
    __m512 m = _mm512_set1_ps(-FLT_MAX);
    int i = 0;
    for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
    if (i < n) m = _mm512_mask_max_ps(m, (__mmask16)((1u << (n - i)) - 1), m, _mm512_maskz_loadu_ps((__mmask16)((1u << (n - i)) - 1), x + i));
    return _mm512_reduce_max_ps(m);
}
AVX512 static float exp_sum_avx512(float* x, int n, float shift) {
    __m512 acc = _mm512_setzero_ps(), sh = _mm512_set1_ps(shift);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), sh));
        _mm512_mask_storeu_ps(x + i, k, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
    }
    return _mm512_reduce_add_ps(acc);
}
AVX512 static void affine_avx512(float* out, const float* x, int n, float scale, float shift, int silu) {
    __m512 a = _mm512_set1_ps(scale), b = _mm512_set1_ps(shift), one = _mm512_set1_ps(1.0f);
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x + i), a, b);
        if (silu) v = _mm512_div_ps(v, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), v))));
        _mm512_mask_storeu_ps(out + i, k, v);
    }
}
#endif

static const RowOps* row_ops(void) {
    static RowOps ops;
    static int ready;
    if (!ready) {
        RowOps o = {max_plain, exp_sum_plain, affine_plain};
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && !getenv("INSTASTYLE_NO_AVX512")) o = (RowOps){max_avx512, exp_sum_avx512, affine_avx512};
#endif
        ops = o;
        ready = 1;
    }
    return &ops;
}

// ----------------------------------------------------------------------------------------------
// linear: out[M, OUT] = inp[M, IN] · w[OUT, IN]ᵀ + b[OUT]   (b may be NULL)
// Frozen weights may be fp16 (the _f16 variants, --weights fp16): sgemm converts them exactly
// while packing, so an fp16 weight gives the same bits as its fp32 conversion.

static GemmOperand matrix(const float* x, int ld, int trans) { return (GemmOperand){x, NULL, NULL, ld, trans}; }
static GemmOperand weight(const float* w, const uint16_t* w16, int ld, int trans) {
    return (GemmOperand){w16 ? NULL : w, w16, NULL, ld, trans};
}

static void linear_run(float* out, const float* inp, GemmOperand w, const float* b, int M, int IN, int OUT) {
    sgemm_op(M, OUT, IN, 1.0f, matrix(inp, IN, 0), w, 0.0f, b, 0, out, OUT);
}
void linear_forward(float* out, const float* inp, const float* w, const float* b, int M, int IN, int OUT) {
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

static void conv_run(float* out, const float* inp, GemmOperand w, const float* b, int N, int C, int H, int W,
                     int OC, int K, int stride, int pad_lo, int pad_hi) {
    int Ho = (H + pad_lo + pad_hi - K) / stride + 1, Wo = (W + pad_lo + pad_hi - K) / stride + 1;
    size_t HWo = (size_t)Ho * Wo, CKK = (size_t)C * K * K;
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C * H * W;
        float* o = out + (size_t)n * OC * HWo;
        GemmIm2col im = {x, C, H, W, K, stride, pad_lo, Wo};
        int plain = K == 1 && stride == 1 && pad_lo == 0 && pad_hi == 0;
        sgemm_op(OC, (int)HWo, (int)CKK, 1.0f, w, plain ? matrix(x, (int)HWo, 0) : (GemmOperand){NULL, NULL, &im, 0, 0},
                 0.0f, b, 1, o, (int)HWo);
    }
}

void conv2d_forward(float* out, const float* inp, const float* w, const float* b, int N, int C,
                    int H, int W, int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch) {
    (void)scratch;
    conv_run(out, inp, weight(w, NULL, C * K * K, 0), b, N, C, H, W, OC, K, stride, pad_lo, pad_hi);
}
void conv2d_forward_f16(float* out, const float* inp, const uint16_t* w, const float* b, int N, int C,
                        int H, int W, int OC, int K, int stride, int pad_lo, int pad_hi) {
    conv_run(out, inp, weight(NULL, w, C * K * K, 0), b, N, C, H, W, OC, K, stride, pad_lo, pad_hi);
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
            GemmIm2col im = {dout + (size_t)n * OC * HWo, OC, Ho, Wo, K, 1, K - 1 - pad_lo, W};
            sgemm_op(C, H * W, OC * K * K, 1.0f, matrix(f.wf, OC * K * K, 0), (GemmOperand){NULL, NULL, &im, 0, 0},
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
        double sum = 0, sq = 0;
        for (size_t j = 0; j < cnt; j++) sum += x[j];
        double mu = sum / (double)cnt;
        for (size_t j = 0; j < cnt; j++) { double d = x[j] - mu; sq += d * d; }
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

static float silu_grad(float y) {
    float s = 1.0f / (1.0f + expf(-y));
    return s * (1.0f + y * (1.0f - s));
}

static void groupnorm_backward_groups(void* ctx, int i0, int i1) {
    const GroupNormBack* a = ctx;
    int cg = a->C / a->G, HW = a->HW;
    for (int i = i0; i < i1; i++) {              // i = n·G + g
        int n = i / a->G, g = i % a->G;
        size_t off = ((size_t)n * a->C + (size_t)g * cg) * HW, cnt = (size_t)cg * HW;
        float mu = a->mean[i], rs = a->rstd[i];
        double sg = 0, sgx = 0;
        for (int pass = 0; pass < 2; pass++) {
            float mg = (float)(sg / (double)cnt), mgx = (float)(sgx / (double)cnt);
            for (int c = 0; c < cg; c++) {
                int ch = g * cg + c;
                float wc = a->w[ch], bc = a->b[ch];
                for (int j = 0; j < HW; j++) {
                    size_t k = off + (size_t)c * HW + j;
                    float xh = (a->x[k] - mu) * rs, gk = a->dout[k] * wc;
                    if (a->silu) gk *= silu_grad(xh * wc + bc);
                    if (pass == 0) { sg += gk; sgx += gk * xh; }
                    else a->dx[k] += rs * (gk - mg - xh * mgx);
                }
            }
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

void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w,
                       const float* b, int M, int C, float eps) {
    for (int m = 0; m < M; m++) {
        const float* xm = x + (size_t)m * C;
        double sum = 0, sq = 0;
        for (int c = 0; c < C; c++) sum += xm[c];
        double mu = sum / C;
        for (int c = 0; c < C; c++) { double d = xm[c] - mu; sq += d * d; }
        float r = (float)(1.0 / sqrt(sq / C + eps)), mf = (float)mu;
        if (mean) { mean[m] = mf; rstd[m] = r; }
        float* om = out + (size_t)m * C;
        for (int c = 0; c < C; c++) om[c] = (xm[c] - mf) * r * w[c] + b[c];
    }
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

// gelu(x) = x·Φ(x) = ½x(1 + erf(x/√2));  d/dx = Φ(x) + x·φ(x)
static float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
static float gelu_grad(float x) {
    return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) + x * 0.39894228040143268f * expf(-0.5f * x * x);
}
void gelu_forward(float* out, const float* x, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = gelu(x[i]);
}
void gelu_backward(float* dx, const float* dout, const float* x, size_t n) {
    for (size_t i = 0; i < n; i++) dx[i] += dout[i] * gelu_grad(x[i]);
}

// geglu (diffusers GEGLU): proj[M, 2F] = (value | gate); out[M, F] = value ⊙ gelu(gate).
void geglu_forward(float* out, const float* proj, int M, int F) {
    for (int m = 0; m < M; m++) {
        const float* v = proj + (size_t)m * 2 * F;
        for (int f = 0; f < F; f++) out[(size_t)m * F + f] = v[f] * gelu(v[F + f]);
    }
}
// dvalue = dout·gelu(gate);  dgate = dout·value·gelu'(gate)
void geglu_backward(float* dproj, const float* dout, const float* proj, int M, int F) {
    for (int m = 0; m < M; m++) {
        const float* v = proj + (size_t)m * 2 * F;
        float* dv = dproj + (size_t)m * 2 * F;
        for (int f = 0; f < F; f++) {
            float d = dout[(size_t)m * F + f];
            dv[f] += d * gelu(v[F + f]);
            dv[F + f] += d * v[f] * gelu_grad(v[F + f]);
        }
    }
}

// ----------------------------------------------------------------------------------------------
// attention: heads indexed in place in (N, T, NH·HD) rows of stride ldq/ldk/ldv/ldo.
// out[n, i, h] = Σ_j softmax_j(scale · q_i·k_j) v_j, causal: only j ≤ i.
// Flash-style on the CPU: blocks of ATT_BQ queries; for each, S = q·kᵀ [BQ, Tk] (one GEMM),
// row softmax in place, O = P·v (one GEMM). Saves lse[N, NH, Tq] = log Σ_j exp(s_ij) when non-NULL.
// Memory: one [BQ, Tk] block per thread, never a (Tq, Tk) matrix.

#define ATT_BQ 64

typedef struct AttnArgs {
    float* out; float* lse;
    const float* q; const float* k; const float* v;
    int N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal;
    float scale;
    float* bufs;          // [workers][ATT_BQ · Tk]
    int tasks, workers;   // tasks = N·NH·ceil(Tq/BQ)
} AttnArgs;

static void attention_task(const AttnArgs* a, int task, float* S) {
    int nqb = (a->Tq + ATT_BQ - 1) / ATT_BQ;
    int n = task / (a->NH * nqb), h = (task / nqb) % a->NH, i0 = (task % nqb) * ATT_BQ;
    int bq = a->Tq - i0 < ATT_BQ ? a->Tq - i0 : ATT_BQ;
    const float* q = a->q + ((size_t)n * a->Tq + i0) * a->ldq + (size_t)h * a->HD;
    const float* k = a->k + (size_t)n * a->Tk * a->ldk + (size_t)h * a->HD;
    const float* v = a->v + (size_t)n * a->Tk * a->ldv + (size_t)h * a->HD;
    float* o = a->out + ((size_t)n * a->Tq + i0) * a->ldo + (size_t)h * a->HD;
    sgemm(0, 1, bq, a->Tk, a->HD, a->scale, q, a->ldq, k, a->ldk, 0.0f, S, a->Tk);
    // P = exp(S − rowmax) unnormalised; O = P·v, then each row of O is divided by Σ_j P_ij
    // (HD divisions per row instead of Tk).
    const RowOps* ops = row_ops();
    float inv[ATT_BQ];
    for (int r = 0; r < bq; r++) {
        float* s = S + (size_t)r * a->Tk;
        int valid = a->causal ? i0 + r + 1 : a->Tk;
        if (valid > a->Tk) valid = a->Tk;
        float mx = ops->max(s, valid);
        float sum = ops->exp_sum(s, valid, mx);
        if (valid < a->Tk) memset(s + valid, 0, (size_t)(a->Tk - valid) * sizeof(float));
        inv[r] = 1.0f / sum;
        if (a->lse) a->lse[((size_t)n * a->NH + h) * a->Tq + i0 + r] = mx + logf(sum);
    }
    sgemm(0, 0, bq, a->HD, a->Tk, 1.0f, S, a->Tk, v, a->ldv, 0.0f, o, a->ldo);
    for (int r = 0; r < bq; r++)
        for (int d = 0; d < a->HD; d++) o[(size_t)r * a->ldo + d] *= inv[r];
}

static void attention_worker(void* ctx, int w0, int w1) {
    const AttnArgs* a = ctx;
    for (int w = w0; w < w1; w++) {
        float* S = a->bufs + (size_t)w * ATT_BQ * a->Tk;
        int per = (a->tasks + a->workers - 1) / a->workers;
        for (int t = w * per; t < (w + 1) * per && t < a->tasks; t++) attention_task(a, t, S);
    }
}

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       int N, int Tq, int Tk, int NH, int HD, int ldq, int ldk, int ldv, int ldo,
                       int causal, Arena* scratch) {
    AttnArgs a = {out, lse, q, k, v, N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal,
                  1.0f / sqrtf((float)HD), NULL, 0, 0};
    a.tasks = N * NH * ((Tq + ATT_BQ - 1) / ATT_BQ);
    a.workers = threads_count() < a.tasks ? threads_count() : a.tasks;
    size_t mark = arena_mark(scratch);
    a.bufs = arena_alloc(scratch, (size_t)a.workers * ATT_BQ * Tk);
    parallel_for(a.workers, attention_worker, &a);
    arena_reset(scratch, mark);
}

// Backward, flash-attention style: nothing of size (Tq, Tk) is kept; P is recomputed block by
// block from the saved lse. Forward: s_ij = scale·q_i·k_j, p_ij = exp(s_ij − lse_i), o_i = Σ_j p_ij v_j.
// With D_i = Σ_d do_i·o_i, dp_ij = do_i·v_j and ds_ij = p_ij·(dp_ij − D_i):
//   dq_i += scale·Σ_j ds_ij k_j     (pass 1: threads own blocks of queries)
//   dv_j += Σ_i p_ij do_i,  dk_j += scale·Σ_i ds_ij q_i   (pass 2: threads own blocks of keys)
// Every output element is summed in one task in a fixed order: bitwise equal for any thread count.
// dq, dk, dv (strides ldq, ldk, ldv) may be NULL; dout and out have stride ldo.

typedef struct AttnBack {
    float* dq; float* dk; float* dv;
    const float* dout; const float* out; const float* lse; const float* q; const float* k; const float* v;
    int N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal;
    float scale;
    float* D;             // [N, NH, Tq]
    float* bufs;          // [workers][2 · ATT_BQ · max(Tq, Tk)]
    int tasks, workers, pass;
} AttnBack;

// Pass 1, one block of queries i0..i0+bq−1 of head h: S, dP [bq, Tk] → dq.
static void attention_back_queries(const AttnBack* a, int n, int h, int i0, int bq, float* S, float* dP) {
    const float* q = a->q + ((size_t)n * a->Tq + i0) * a->ldq + (size_t)h * a->HD;
    const float* k = a->k + (size_t)n * a->Tk * a->ldk + (size_t)h * a->HD;
    const float* v = a->v + (size_t)n * a->Tk * a->ldv + (size_t)h * a->HD;
    const float* dout = a->dout + ((size_t)n * a->Tq + i0) * a->ldo + (size_t)h * a->HD;
    const float* lse = a->lse + ((size_t)n * a->NH + h) * a->Tq + i0;
    const float* D = a->D + ((size_t)n * a->NH + h) * a->Tq + i0;
    sgemm(0, 1, bq, a->Tk, a->HD, a->scale, q, a->ldq, k, a->ldk, 0.0f, S, a->Tk);
    sgemm(0, 1, bq, a->Tk, a->HD, 1.0f, dout, a->ldo, v, a->ldv, 0.0f, dP, a->Tk);
    for (int r = 0; r < bq; r++)
        for (int j = 0; j < a->Tk; j++) {
            size_t e = (size_t)r * a->Tk + j;
            float p = a->causal && j > i0 + r ? 0.0f : expf(S[e] - lse[r]);
            S[e] = p * (dP[e] - D[r]);
        }
    float* dq = a->dq + ((size_t)n * a->Tq + i0) * a->ldq + (size_t)h * a->HD;
    sgemm(0, 0, bq, a->HD, a->Tk, a->scale, S, a->Tk, k, a->ldk, 1.0f, dq, a->ldq);
}

// Pass 2, one block of keys j0..j0+bk−1 of head h: Sᵀ, dPᵀ [bk, Tq] → dk, dv.
static void attention_back_keys(const AttnBack* a, int n, int h, int j0, int bk, float* St, float* dPt) {
    const float* q = a->q + (size_t)n * a->Tq * a->ldq + (size_t)h * a->HD;
    const float* k = a->k + ((size_t)n * a->Tk + j0) * a->ldk + (size_t)h * a->HD;
    const float* v = a->v + ((size_t)n * a->Tk + j0) * a->ldv + (size_t)h * a->HD;
    const float* dout = a->dout + (size_t)n * a->Tq * a->ldo + (size_t)h * a->HD;
    const float* lse = a->lse + ((size_t)n * a->NH + h) * a->Tq;
    const float* D = a->D + ((size_t)n * a->NH + h) * a->Tq;
    sgemm(0, 1, bk, a->Tq, a->HD, a->scale, k, a->ldk, q, a->ldq, 0.0f, St, a->Tq);
    sgemm(0, 1, bk, a->Tq, a->HD, 1.0f, v, a->ldv, dout, a->ldo, 0.0f, dPt, a->Tq);
    for (int r = 0; r < bk; r++)
        for (int i = 0; i < a->Tq; i++) {
            size_t e = (size_t)r * a->Tq + i;
            float p = a->causal && j0 + r > i ? 0.0f : expf(St[e] - lse[i]);
            St[e] = p;                        // Pᵀ
            dPt[e] = p * (dPt[e] - D[i]);     // dSᵀ
        }
    if (a->dv) sgemm(0, 0, bk, a->HD, a->Tq, 1.0f, St, a->Tq, dout, a->ldo, 1.0f,
                     a->dv + ((size_t)n * a->Tk + j0) * a->ldv + (size_t)h * a->HD, a->ldv);
    if (a->dk) sgemm(0, 0, bk, a->HD, a->Tq, a->scale, dPt, a->Tq, q, a->ldq, 1.0f,
                     a->dk + ((size_t)n * a->Tk + j0) * a->ldk + (size_t)h * a->HD, a->ldk);
}

static void attention_back_worker(void* ctx, int w0, int w1) {
    const AttnBack* a = ctx;
    int T = a->pass == 1 ? a->Tq : a->Tk, nb = (T + ATT_BQ - 1) / ATT_BQ;
    size_t len = (size_t)ATT_BQ * (a->Tq > a->Tk ? a->Tq : a->Tk);
    for (int w = w0; w < w1; w++) {
        float* b0 = a->bufs + (size_t)w * 2 * len;
        int per = (a->tasks + a->workers - 1) / a->workers;
        for (int t = w * per; t < (w + 1) * per && t < a->tasks; t++) {
            int n = t / (a->NH * nb), h = (t / nb) % a->NH, x0 = (t % nb) * ATT_BQ;
            int bx = T - x0 < ATT_BQ ? T - x0 : ATT_BQ;
            if (a->pass == 1) attention_back_queries(a, n, h, x0, bx, b0, b0 + len);
            else attention_back_keys(a, n, h, x0, bx, b0, b0 + len);
        }
    }
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                        const float* q, const float* k, const float* v, int N, int Tq, int Tk, int NH, int HD,
                        int ldq, int ldk, int ldv, int ldo, int causal, Arena* scratch) {
    AttnBack a = {dq, dk, dv, dout, out, lse, q, k, v, N, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal,
                  1.0f / sqrtf((float)HD), NULL, NULL, 0, 0, 0};
    size_t mark = arena_mark(scratch);
    a.D = arena_alloc(scratch, (size_t)N * NH * Tq);
    for (int n = 0; n < N; n++)
        for (int h = 0; h < NH; h++)
            for (int i = 0; i < Tq; i++) {
                const float* o = out + ((size_t)n * Tq + i) * ldo + (size_t)h * HD;
                const float* g = dout + ((size_t)n * Tq + i) * ldo + (size_t)h * HD;
                float d = 0.0f;
                for (int e = 0; e < HD; e++) d += g[e] * o[e];
                a.D[((size_t)n * NH + h) * Tq + i] = d;
            }
    int most = threads_count();
    size_t len = (size_t)ATT_BQ * (Tq > Tk ? Tq : Tk);
    a.bufs = arena_alloc(scratch, (size_t)most * 2 * len);
    for (a.pass = 1; a.pass <= 2; a.pass++) {
        if (a.pass == 1 ? !dq : !dk && !dv) continue;
        a.tasks = N * NH * (((a.pass == 1 ? Tq : Tk) + ATT_BQ - 1) / ATT_BQ);
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

// [N, C, HW] ↔ [N, HW, C]
void nchw_to_nhwc(float* out, const float* x, int N, int C, int HW) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            for (int p = 0; p < HW; p++) out[((size_t)n * HW + p) * C + c] = x[((size_t)n * C + c) * HW + p];
}
void nhwc_to_nchw(float* out, const float* x, int N, int C, int HW) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            for (int p = 0; p < HW; p++) out[((size_t)n * C + c) * HW + p] = x[((size_t)n * HW + p) * C + c];
}

void add_inplace(float* y, const float* x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
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
