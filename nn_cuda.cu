// nn_cuda.cu: the optional GPU path (make CUDA=1). sgemm, linear, conv2d forward (also through 2×
// up-sampling) and backward-data, attention forward and backward, group and layer norm, on one GPU.
//
// Each <op>_cuda has exactly the parameters of its CPU twin (gemm.c, nn.c): host pointers in,
// host pointers out, same layouts, same BLAS/accumulate semantics. The CPU function calls it in
// its first line when g_device == DEVICE_CUDA. No model code lives here; no cuBLAS, no cuDNN, no
// managed memory (plain cudaMalloc).
//
// Memory. Frozen weights are declared with cuda_weights_frozen (by the loader), uploaded on first
// use and cached by host pointer in an open-addressing table; cuda_weights_release (sd_free) drops
// them. Every other operand (activations, LoRA factors, trainable K/V weights) is copied in and
// out on every call through grow-only device buffers: the simple first step, PCIe-bound. Keeping
// activations resident would give each Arena a device twin (arena_alloc handing out device memory
// under DEVICE_CUDA) and skip the copy for pointers cudaPointerGetAttributes calls device memory:
// only x, t and the context would go in and eps come out of a UNet call. The CPU loops between
// the hot ops (silu, geglu, adds, layout transposes, LoRA) would need GPU twins first.
//
// GEMM. One tiled kernel serves sgemm, linear and the convolutions: operands are read through small
// loader structs (implicit GEMM; the im2col matrix never exists, on the host or the device).
// Block tile 128×128×8, 256 threads, double-buffered shared tiles, register prefetch of the next
// tile. The arithmetic is chosen by INSTASTYLE_CUDA_GEMM (read once by cuda_init):
//   fp32    default: FP32 FMA, each thread an 8×8 register tile. Rounding like any FP32 GEMM.
//   3xtf32  tensor cores (WMMA m16n16k8): x = big + small, big = tf32(x), small = tf32(x − big);
//           a·b ≈ small·big + big·small + big·big. FP32-level accuracy (CUTLASS's 3xTF32).
//   tf32    one TF32 product per pair (10-bit mantissas): fastest, about 1e-3 relative.
// Attention (flash-style, T. Dao, "FlashAttention-2", 2023) always runs in FP32.
//
// Reproducibility: no atomics; every output element is summed by one thread in a fixed order,
// so results are bitwise equal from run to run. They differ from the CPU's in rounding only.
#include "instastyle.h"

#include <cuda_runtime.h>
#include <math.h>
#include <mma.h>
#include <mutex>
#include <stdlib.h>
#include <string.h>

// Every CUDA call is checked: on failure print the call, file:line and CUDA's message, exit 1.
#define CUDA_CHECK(call) do { cudaError_t err_ = (call); if (err_ != cudaSuccess) { \
    fprintf(stderr, "error: CUDA: %s (%s:%d: %s)\n", cudaGetErrorString(err_), __FILE__, __LINE__, #call); \
    exit(1); } } while (0)

// ---------------------------------------------------------------------------------------------
// state: device, GEMM mode, weight cache, per-call buffers

enum { MODE_FP32, MODE_TF32, MODE_3XTF32 };
static const char* const MODE_NAMES[] = {"fp32", "tf32", "3xtf32"};

typedef struct CacheEntry { const float* host; size_t n; float* dev; } CacheEntry;   // n floats
#define NBUF 12

static struct {
    int ready, mode;
    cudaDeviceProp prop;
    char name[320];
    CacheEntry* tab;           // open addressing, linear probing; cap a power of two
    size_t cap, count;
    float* buf[NBUF];          // per-call operand buffers, grow-only
    size_t bufn[NBUF];
    size_t bytes, peak;        // device bytes held by this file, and the most ever held
    long calls;                // <op>_cuda calls so far
    double flops;              // 2·M·N·K of every product, counted as the CPU path's sgemm calls count them
} g;
static std::mutex g_lock;      // the _cuda functions may be called from several host threads

static float* dev_alloc(size_t n) {
    float* p = NULL;
    CUDA_CHECK(cudaMalloc((void**)&p, (n ? n : 1) * sizeof(float)));
    g.bytes += n * sizeof(float);
    g.peak = g.bytes > g.peak ? g.bytes : g.peak;
    return p;
}
static void dev_free(float* p, size_t n) {
    if (!p) return;
    CUDA_CHECK(cudaFree(p));
    g.bytes -= n * sizeof(float);
}

static void init_locked(void) {
    if (g.ready) return;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        fprintf(stderr, "error: no CUDA device (%s) (%s:%d)\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "device count is 0", __FILE__, __LINE__);
        exit(1);
    }
    CUDA_CHECK(cudaSetDevice(0));      // CUDA_VISIBLE_DEVICES chooses which GPU is device 0
    CUDA_CHECK(cudaGetDeviceProperties(&g.prop, 0));
    const char* m = getenv("INSTASTYLE_CUDA_GEMM");
    g.mode = MODE_FP32;
    for (int i = 0; m && i < 3; i++) if (strcmp(m, MODE_NAMES[i]) == 0) g.mode = i;
    CHECK(!m || strcmp(m, MODE_NAMES[g.mode]) == 0, "INSTASTYLE_CUDA_GEMM=%s: expected fp32, tf32 or 3xtf32", m);
    snprintf(g.name, sizeof g.name, "%s (sm_%d%d, %d SMs, %.0f GiB)", g.prop.name, g.prop.major,
             g.prop.minor, g.prop.multiProcessorCount, g.prop.totalGlobalMem / 1073741824.0);
    g.ready = 1;
}

static size_t slot_of(const void* p, size_t cap) {
    uint64_t h = (uint64_t)(uintptr_t)p;
    h ^= h >> 33; h *= 0xff51afd7ed558ccdull; h ^= h >> 33;
    return (size_t)h & (cap - 1);
}
static CacheEntry* cache_find(const float* p) {          // the entry of p, or the empty slot for it
    size_t i = slot_of(p, g.cap);
    while (g.tab[i].host && g.tab[i].host != p) i = (i + 1) & (g.cap - 1);
    return &g.tab[i];
}

// The device copy of the frozen weight at host pointer p, if p was registered with at least n floats.
static const float* cache_lookup(const float* p, size_t n) {
    if (!g.count) return NULL;
    CacheEntry* e = cache_find(p);
    if (!e->host || e->n < n) return NULL;
    if (!e->dev) {
        e->dev = dev_alloc(e->n);
        CUDA_CHECK(cudaMemcpy(e->dev, p, e->n * sizeof(float), cudaMemcpyHostToDevice));
    }
    return e->dev;
}

// Per-call buffer `slot` with room for n floats.
static float* scratch_buf(int slot, size_t n) {
    if (g.bufn[slot] < n) {
        dev_free(g.buf[slot], g.bufn[slot]);
        g.bufn[slot] = n + n / 4;
        g.buf[slot] = dev_alloc(g.bufn[slot]);
    }
    return g.buf[slot];
}

// `rows` rows of `cols` floats with row stride ld, host ↔ device, the same stride on both sides
// (the gaps between rows are neither read nor written).
static void copy2d(float* dst, const float* src, size_t rows, size_t cols, size_t ld, cudaMemcpyKind kind) {
    if (cols == ld) CUDA_CHECK(cudaMemcpy(dst, src, rows * cols * sizeof(float), kind));
    else CUDA_CHECK(cudaMemcpy2D(dst, ld * sizeof(float), src, ld * sizeof(float), cols * sizeof(float), rows, kind));
}
static void download(float* h, const float* d, size_t rows, size_t cols, size_t ld) {
    copy2d(h, d, rows, cols, ld, cudaMemcpyDeviceToHost);
}
static float* upload(int slot, const float* h, size_t rows, size_t cols, size_t ld) {   // into buffer `slot`
    float* d = scratch_buf(slot, (rows - 1) * ld + cols);
    copy2d(d, h, rows, cols, ld, cudaMemcpyHostToDevice);
    return d;
}
// A read-only operand: the cached copy when h is a registered weight, else uploaded.
static const float* to_device(int slot, const float* h, size_t rows, size_t cols, size_t ld) {
    const float* d = cache_lookup(h, (rows - 1) * ld + cols);
    return d ? d : upload(slot, h, rows, cols, ld);
}

static std::unique_lock<std::mutex> op_begin(double flops) {    // every <op>_cuda: lock, initialise, count
    std::unique_lock<std::mutex> l(g_lock);
    init_locked();
    g.calls++;
    g.flops += flops;
    return l;
}

extern "C" void cuda_init(void) { std::lock_guard<std::mutex> l(g_lock); init_locked(); }

extern "C" void cuda_weights_frozen(const float* w, size_t n) {
    std::lock_guard<std::mutex> l(g_lock);
    if (2 * (g.count + 1) > g.cap) {                    // keep the table at most half full
        CacheEntry* old = g.tab;
        size_t oldcap = g.cap;
        g.cap = g.cap ? 2 * g.cap : 4096;
        g.tab = (CacheEntry*)xcalloc(g.cap, sizeof(CacheEntry));
        for (size_t i = 0; i < oldcap; i++) if (old[i].host) *cache_find(old[i].host) = old[i];
        free(old);
    }
    CacheEntry* e = cache_find(w);
    if (e->host && e->n != n) { dev_free(e->dev, e->n); e->dev = NULL; }
    if (!e->host) g.count++;
    e->host = w;
    e->n = n;
}

extern "C" void cuda_weights_release(void) {
    std::lock_guard<std::mutex> l(g_lock);
    for (size_t i = 0; i < g.cap; i++) dev_free(g.tab[i].dev, g.tab[i].n);
    free(g.tab);
    g.tab = NULL, g.cap = g.count = 0;
}

extern "C" void cuda_shutdown(void) {
    cuda_weights_release();
    std::lock_guard<std::mutex> l(g_lock);
    for (int i = 0; i < NBUF; i++) { dev_free(g.buf[i], g.bufn[i]); g.buf[i] = NULL; g.bufn[i] = 0; }
    g.ready = 0;
}

extern "C" const char* cuda_device_name(void) { cuda_init(); return g.name; }
extern "C" const char* cuda_gemm_mode(void) { cuda_init(); return MODE_NAMES[g.mode]; }
extern "C" size_t cuda_peak_bytes(void) { return g.peak; }
extern "C" long cuda_calls(void) { return g.calls; }
extern "C" double cuda_flop_count(void) { return g.flops; }

// ---------------------------------------------------------------------------------------------
// GEMM: C[z][M, N] = alpha · op(A)[M, K] · op(B)[K, N] + bias + beta · C[z], z = blockIdx.z, with
// bias[m] on row m (bias_rows) or bias[n] on column n.
// Grid (ceil(N/128), ceil(M/128), Z). Both operands are read as "mn by k": A as (m, k), B as
// (n, k), through a loader returning element (z, mn, k), 0 outside the matrix. Each thread
// fetches 4 elements of each 128×8 tile per step; fast_k says which index runs along memory, so
// that neighbouring threads read neighbouring addresses. Shared tiles are stored [k][mn].

#define GB 128                 // block tile, M and N
#define GK 8                   // block tile, K
#define GLD (GB + 4)           // padded shared row: conflict-free stores, 16-byte aligned rows
#define GTHREADS 256

struct Strided {               // p[z·zs + mn·smn + k·sk]: sgemm operands, the conv weight
    const float* p; size_t zs, smn, sk; int rows, K; bool fast_k;
    __device__ float operator()(int z, int mn, int k) const {
        return mn < rows && k < K ? p[z * zs + mn * smn + k * sk] : 0.0f;
    }
};

// conv2d_forward's B: k = (c, ky, kx), mn = output pixel (oy, ox) of image z, read from the image
// X [C, H, W] = x[z] [C, H >> sh, W >> sh] up-sampled 2^sh× by nearest neighbour (sh 0: X = x).
struct Im2col {
    const float* x; int C, H, W, K, stride, pad, Wo, HWo, sh; bool fast_k;
    __device__ float operator()(int z, int p, int k) const {
        int KK = K * K, Hs = H >> sh, Ws = W >> sh;
        if (p >= HWo || k >= C * KK) return 0.0f;
        int c = k / KK, r = k - c * KK, ky = r / K, kx = r - ky * K, oy = p / Wo, ox = p - oy * Wo;
        int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        if (iy < 0 || iy >= H || ix < 0 || ix >= W) return 0.0f;
        return x[((size_t)z * C + c) * Hs * Ws + (size_t)(iy >> sh) * Ws + (ix >> sh)];
    }
};

// conv2d_backward_input as a GEMM over dinp[C, H·W]: dinp[c, iy, ix] += Σ_{oc,ky,kx} w[oc, c, ky, kx]
// · dout[oc, oy, ox] where iy = oy·s − pad + ky, ix = ox·s − pad + kx. A(c, k) with k = (oc, ky, kx):
struct ConvWT {
    const float* w; int C, OC, KK; bool fast_k;
    __device__ float operator()(int, int c, int k) const {
        if (c >= C || k >= OC * KK) return 0.0f;
        int oc = k / KK;
        return w[((size_t)oc * C + c) * KK + (k - oc * KK)];
    }
};
// B(k, p) for input pixel p = (iy, ix): the dout pixel that tap (ky, kx) maps it to, or 0.
struct Col2imT {
    const float* dout; int OC, K, stride, pad, Ho, Wo, W, HW; bool fast_k;
    __device__ float operator()(int z, int p, int k) const {
        int KK = K * K;
        if (p >= HW || k >= OC * KK) return 0.0f;
        int oc = k / KK, r = k - oc * KK, ky = r / K, kx = r - ky * K, iy = p / W, ix = p - iy * W;
        int ty = iy + pad - ky, tx = ix + pad - kx;
        if (ty < 0 || tx < 0 || ty % stride || tx % stride) return 0.0f;
        int oy = ty / stride, ox = tx / stride;
        if (oy >= Ho || ox >= Wo) return 0.0f;
        return dout[((size_t)z * OC + oc) * Ho * Wo + (size_t)oy * Wo + ox];
    }
};

template <class L>
__device__ __forceinline__ void tile_fetch(const L& op, int z, int mn0, int k0, float r[4]) {
    for (int e = 0; e < 4; e++) {
        int i = threadIdx.x + e * GTHREADS;
        r[e] = op.fast_k ? op(z, mn0 + i / GK, k0 + i % GK) : op(z, mn0 + i % GB, k0 + i / GB);
    }
}
__device__ __forceinline__ void tile_store(bool fast_k, float (*s)[GLD], const float r[4]) {
    for (int e = 0; e < 4; e++) {
        int i = threadIdx.x + e * GTHREADS;
        if (fast_k) s[i % GK][i / GK] = r[e];
        else s[i / GB][i % GB] = r[e];
    }
}

__device__ __forceinline__ void gemm_put(float* C, int ldc, int M, int N, int m, int n, float v, float alpha,
                                         float beta, const float* bias, int bias_rows) {
    if (m >= M || n >= N) return;
    v *= alpha;
    if (bias) v += bias[bias_rows ? m : n];
    float* c = C + (size_t)m * ldc + n;
    *c = beta == 0.0f ? v : v + beta * *c;          // beta == 0: C is not read (BLAS)
}

namespace wmma = nvcuda::wmma;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> FragA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> FragB;
typedef wmma::fragment<wmma::accumulator, 16, 16, 8, float> FragC;

// x → big = tf32(x) (round to nearest), and for 3xTF32 small = tf32(x − big).
template <int MODE, class F>
__device__ __forceinline__ void tf32_split(F& big, F& small) {
#pragma unroll
    for (int e = 0; e < big.num_elements; e++) {
        float x = big.x[e];
        big.x[e] = wmma::__float_to_tf32(x);
        if (MODE == MODE_3XTF32) small.x[e] = wmma::__float_to_tf32(x - big.x[e]);
    }
}

template <int MODE, class LA, class LB>
__global__ void __launch_bounds__(GTHREADS)
gemm_kernel(LA a, LB b, int M, int N, int K, float alpha, float beta, const float* bias, int bias_rows, float* C,
            int ldc, size_t zc) {
    __shared__ __align__(32) float As[2][GK][GLD];
    __shared__ __align__(32) float Bs[2][GK][GLD];
    int tid = threadIdx.x, z = blockIdx.z, m0 = blockIdx.y * GB, n0 = blockIdx.x * GB;
    int ntiles = (K + GK - 1) / GK;
    C += z * zc;
    float ra[4], rb[4];
    if (ntiles > 0) {
        tile_fetch(a, z, m0, 0, ra);
        tile_fetch(b, z, n0, 0, rb);
        tile_store(a.fast_k, As[0], ra);
        tile_store(b.fast_k, Bs[0], rb);
    }
    __syncthreads();
    if constexpr (MODE == MODE_FP32) {
        // thread (ty, tx) owns rows ty·4 + {0..3} and 64 + ty·4 + {0..3}, the same for columns with tx
        int tx = tid % 16, ty = tid / 16;
        float acc[8][8] = {};
        for (int t = 0; t < ntiles; t++) {
            int cur = t & 1;
            if (t + 1 < ntiles) { tile_fetch(a, z, m0, (t + 1) * GK, ra); tile_fetch(b, z, n0, (t + 1) * GK, rb); }
            for (int k = 0; k < GK; k++) {
                float4 a0 = *(const float4*)&As[cur][k][ty * 4], a1 = *(const float4*)&As[cur][k][64 + ty * 4];
                float4 b0 = *(const float4*)&Bs[cur][k][tx * 4], b1 = *(const float4*)&Bs[cur][k][64 + tx * 4];
                float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
                for (int i = 0; i < 8; i++)
                    for (int j = 0; j < 8; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
            }
            if (t + 1 < ntiles) { tile_store(a.fast_k, As[cur ^ 1], ra); tile_store(b.fast_k, Bs[cur ^ 1], rb); }
            __syncthreads();
        }
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < 8; j++)
                gemm_put(C, ldc, M, N, m0 + (i / 4) * 64 + ty * 4 + i % 4, n0 + (j / 4) * 64 + tx * 4 + j % 4,
                         acc[i][j], alpha, beta, bias, bias_rows);
    } else {
        // 8 warps as 2×4, each a 64×32 tile = 4×2 fragments of 16×16, acc[f] at (f / 2, f % 2)
        int warp = tid / 32, lane = tid % 32, wm = warp / 4, wn = warp % 4;
        FragC acc[8];
#pragma unroll
        for (int f = 0; f < 8; f++) wmma::fill_fragment(acc[f], 0.0f);
        for (int t = 0; t < ntiles; t++) {
            int cur = t & 1;
            if (t + 1 < ntiles) { tile_fetch(a, z, m0, (t + 1) * GK, ra); tile_fetch(b, z, n0, (t + 1) * GK, rb); }
            FragA fa[4], fa_small[4];
            FragB fb[2], fb_small[2];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                wmma::load_matrix_sync(fa[i], &As[cur][0][wm * 64 + i * 16], GLD);
                tf32_split<MODE>(fa[i], fa_small[i]);
            }
#pragma unroll
            for (int j = 0; j < 2; j++) {
                wmma::load_matrix_sync(fb[j], &Bs[cur][0][wn * 32 + j * 16], GLD);
                tf32_split<MODE>(fb[j], fb_small[j]);
            }
#pragma unroll
            for (int f = 0; f < 8; f++) {
                if (MODE == MODE_3XTF32) {          // the small terms first
                    wmma::mma_sync(acc[f], fa_small[f / 2], fb[f % 2], acc[f]);
                    wmma::mma_sync(acc[f], fa[f / 2], fb_small[f % 2], acc[f]);
                }
                wmma::mma_sync(acc[f], fa[f / 2], fb[f % 2], acc[f]);
            }
            if (t + 1 < ntiles) { tile_store(a.fast_k, As[cur ^ 1], ra); tile_store(b.fast_k, Bs[cur ^ 1], rb); }
            __syncthreads();
        }
        // each warp stages one 16×16 fragment at a time in (now unused) As, then applies alpha/bias/beta
        float* stage = &As[0][0][0] + warp * 256;
#pragma unroll
        for (int f = 0; f < 8; f++) {
            wmma::store_matrix_sync(stage, acc[f], 16, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32)
                gemm_put(C, ldc, M, N, m0 + wm * 64 + (f / 2) * 16 + e / 16, n0 + wn * 32 + (f % 2) * 16 + e % 16,
                         stage[e], alpha, beta, bias, bias_rows);
            __syncwarp();
        }
    }
}

template <class LA, class LB>
static void gemm_launch(const LA& a, const LB& b, int M, int N, int K, float alpha, float beta, const float* bias,
                        int bias_rows, float* C, int ldc, size_t zc, int Z) {
    dim3 grid((N + GB - 1) / GB, (M + GB - 1) / GB, Z);
    void (*kern)(LA, LB, int, int, int, float, float, const float*, int, float*, int, size_t) =
        g.mode == MODE_FP32 ? gemm_kernel<MODE_FP32, LA, LB> : g.mode == MODE_TF32 ? gemm_kernel<MODE_TF32, LA, LB>
                                                                                  : gemm_kernel<MODE_3XTF32, LA, LB>;
    kern<<<grid, GTHREADS>>>(a, b, M, N, K, alpha, beta, bias, bias_rows, C, ldc, zc);
    CUDA_CHECK(cudaGetLastError());
}

// sgemm: row-major C[M,N] = alpha·op(A)[M,K]·op(B)[K,N] + beta·C, BLAS semantics (gemm.c).
extern "C" void sgemm_cuda(int transA, int transB, int M, int N, int K, float alpha, const float* A, int lda,
                           const float* B, int ldb, float beta, float* C, int ldc) {
    CHECK(M >= 0 && N >= 0 && K >= 0 && ldc >= N && lda >= (transA ? M : K) && ldb >= (transB ? K : N),
          "sgemm_cuda: bad sizes M=%d N=%d K=%d lda=%d ldb=%d ldc=%d", M, N, K, lda, ldb, ldc);
    if (M == 0 || N == 0) return;
    std::unique_lock<std::mutex> l = op_begin(alpha == 0.0f ? 0.0 : 2.0 * M * N * K);
    if (alpha == 0.0f) K = 0;                       // BLAS: A and B are not read
    const float* dA = K ? to_device(0, A, transA ? K : M, transA ? M : K, lda) : NULL;
    const float* dB = K ? to_device(1, B, transB ? N : K, transB ? K : N, ldb) : NULL;
    float* dC = beta != 0.0f ? upload(2, C, M, N, ldc) : scratch_buf(2, (size_t)(M - 1) * ldc + N);
    Strided a = {dA, 0, transA ? (size_t)1 : (size_t)lda, transA ? (size_t)lda : (size_t)1, M, K, !transA};
    Strided b = {dB, 0, transB ? (size_t)ldb : (size_t)1, transB ? (size_t)1 : (size_t)ldb, N, K, transB != 0};
    gemm_launch(a, b, M, N, K, alpha, beta, NULL, 0, dC, ldc, 0, 1);
    download(C, dC, M, N, ldc);
}

// linear: out[M, OUT] = inp[M, IN] · w[OUT, IN]ᵀ + b[OUT]   (b may be NULL)
extern "C" void linear_forward_cuda(float* out, const float* inp, const float* w, const float* b, int M, int IN,
                                    int OUT) {
    CHECK(M > 0 && IN > 0 && OUT > 0, "linear_forward_cuda: bad shape M=%d IN=%d OUT=%d", M, IN, OUT);
    std::unique_lock<std::mutex> l = op_begin(2.0 * M * IN * OUT);
    Strided a = {to_device(0, inp, M, IN, IN), 0, (size_t)IN, 1, M, IN, true};
    Strided bw = {to_device(1, w, OUT, IN, IN), 0, (size_t)IN, 1, OUT, IN, true};
    float* dy = scratch_buf(3, (size_t)M * OUT);
    gemm_launch(a, bw, M, OUT, IN, 1.0f, 0.0f, b ? to_device(2, b, 1, OUT, OUT) : NULL, 0, dy, OUT, 0, 1);
    download(out, dy, M, OUT, OUT);
}

// conv2d: out[N, OC, Ho, Wo] = w[OC, C, K, K] ⊛ X + b, stride, zero padding pad_lo (top/left) and
// pad_hi (bottom/right), X [N, C, H·2^sh, W·2^sh] = inp[N, C, H, W] up-sampled by nearest neighbour.
// Per image a GEMM [OC, C·K·K] × im2col(X) [C·K·K, Ho·Wo].
static void conv_forward(float* out, const float* inp, const float* w, const float* b, int N, int C, int H, int W,
                         int OC, int K, int stride, int pad_lo, int pad_hi, int sh) {
    int Hu = H << sh, Wu = W << sh;
    int Ho = (Hu + pad_lo + pad_hi - K) / stride + 1, Wo = (Wu + pad_lo + pad_hi - K) / stride + 1;
    CHECK(N > 0 && C > 0 && OC > 0 && K > 0 && stride > 0 && Ho > 0 && Wo > 0, "conv2d_forward_cuda: bad shape");
    int HWo = Ho * Wo, CKK = C * K * K;
    std::unique_lock<std::mutex> l = op_begin(2.0 * N * OC * HWo * CKK);
    const float* dx = to_device(0, inp, 1, (size_t)N * C * H * W, (size_t)N * C * H * W);
    const float* dw = to_device(1, w, 1, (size_t)OC * CKK, (size_t)OC * CKK);
    const float* db = b ? to_device(2, b, 1, OC, OC) : NULL;
    float* dout = scratch_buf(3, (size_t)N * OC * HWo);
    Strided a = {dw, 0, (size_t)CKK, 1, OC, CKK, true};
    Im2col im = {dx, C, Hu, Wu, K, stride, pad_lo, Wo, HWo, sh, false};
    gemm_launch(a, im, OC, HWo, CKK, 1.0f, 0.0f, db, 1, dout, HWo, (size_t)OC * HWo, N);
    download(out, dout, 1, (size_t)N * OC * HWo, (size_t)N * OC * HWo);
}

extern "C" void conv2d_forward_cuda(float* out, const float* inp, const float* w, const float* b, int N, int C,
                                    int H, int W, int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch) {
    (void)scratch;                                   // no im2col buffer on the GPU
    conv_forward(out, inp, w, b, N, C, H, W, OC, K, stride, pad_lo, pad_hi, 0);
}

// out[N, OC, 2H, 2W] = conv(upsample_nearest_2×(inp[N, C, H, W])), stride 1, padding pad each side.
extern "C" void conv2d_forward_up2_cuda(float* out, const float* inp, const float* w, const uint16_t* w16,
                                        const float* b, int N, int C, int H, int W, int OC, int K, int pad) {
    CHECK(!w16, "conv2d_forward_up2_cuda: fp16 weights (--weights fp16) are CPU-only; use fp32 weights on CUDA");
    conv_forward(out, inp, w, b, N, C, H, W, OC, K, 1, pad, pad, 1);
}

// Backward-data: dinp[N, C, H, W] += wᵀ ⊛ dout[N, OC, Ho, Wo] (the transposed convolution),
// one GEMM per image [C, OC·K·K] × [OC·K·K, H·W] that gathers instead of scattering (no col2im).
extern "C" void conv2d_backward_input_cuda(float* dinp, const float* dout, const float* w, int N, int C, int H,
                                           int W, int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch) {
    (void)scratch;
    int Ho = (H + pad_lo + pad_hi - K) / stride + 1, Wo = (W + pad_lo + pad_hi - K) / stride + 1;
    CHECK(N > 0 && C > 0 && OC > 0 && K > 0 && stride > 0 && Ho > 0 && Wo > 0, "conv2d_backward_input_cuda: bad shape");
    size_t nx = (size_t)N * C * H * W, ny = (size_t)N * OC * Ho * Wo;
    std::unique_lock<std::mutex> l = op_begin(2.0 * ny * C * K * K);
    const float* dy = to_device(0, dout, 1, ny, ny);
    const float* dw = to_device(1, w, 1, (size_t)OC * C * K * K, (size_t)OC * C * K * K);
    float* dx = upload(3, dinp, 1, nx, nx);
    ConvWT a = {dw, C, OC, K * K, true};
    Col2imT b = {dy, OC, K, stride, pad_lo, Ho, Wo, W, H * W, false};
    gemm_launch(a, b, C, H * W, OC * K * K, 1.0f, 1.0f, NULL, 0, dx, H * W, (size_t)C * H * W, N);
    download(dinp, dx, 1, nx, nx);
}

// ---------------------------------------------------------------------------------------------
// norms: statistics in double in two passes (mean, then Σ(x − μ)²), as nn.c.

// Sum over the block (blockDim a multiple of 32), the same total in every thread, fixed order.
__device__ double block_sum(double v, double* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();                                  // red may still be read by a previous call
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    double t = 0;
    for (int w = 0; w < (int)blockDim.x / 32; w++) t += red[w];
    return t;
}

// x[N, C, HW] in G groups; one block per (n, g) normalises its C/G·HW values: mean μ and
// rstd = 1/√(σ² + eps) (saved [N, G] when non-NULL), out = (x − μ)·rstd·w[c] + b[c], then SiLU
// when `silu`. layernorm over x[M, C] is the case N = M, HW = 1, G = 1 (`layer`: in nn.c's
// layernorm expression; groupnorm folds it into x·scale + shift, as nn.c does).
__global__ void norm_kernel(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b,
                            int C, int HW, int G, float eps, int silu, int layer) {
    __shared__ double red[32];
    int i = blockIdx.x, g = i % G, cg = C / G;
    size_t off = ((size_t)(i / G) * C + (size_t)g * cg) * HW, cnt = (size_t)cg * HW;
    const float* xg = x + off;
    double s = 0;
    for (size_t j = threadIdx.x; j < cnt; j += blockDim.x) s += xg[j];
    double mu = block_sum(s, red) / (double)cnt, q = 0;
    for (size_t j = threadIdx.x; j < cnt; j += blockDim.x) { double d = xg[j] - mu; q += d * d; }
    float r = (float)(1.0 / sqrt(block_sum(q, red) / (double)cnt + eps)), m = (float)mu;
    if (mean && threadIdx.x == 0) { mean[i] = m; rstd[i] = r; }
    for (size_t j = threadIdx.x; j < cnt; j += blockDim.x) {
        int ch = g * cg + (int)(j / HW);
        float scale = r * w[ch], shift = b[ch] - m * scale;
        float v = layer ? (xg[j] - m) * r * w[ch] + b[ch] : xg[j] * scale + shift;
        out[off + j] = silu ? v / (1.0f + expf(-v)) : v;
    }
}

static void norm_run(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b, int N,
                     int C, int HW, int G, float eps, int silu, int layer) {
    size_t n = (size_t)N * C * HW, ns = (size_t)N * G;
    std::unique_lock<std::mutex> l = op_begin(0);
    const float* dx = to_device(0, x, 1, n, n);
    const float *dw = to_device(1, w, 1, C, C), *db = to_device(2, b, 1, C, C);
    float *dy = scratch_buf(3, n), *dst = mean ? scratch_buf(4, 2 * ns) : NULL;
    norm_kernel<<<N * G, 256>>>(dy, dst, dst ? dst + ns : NULL, dx, dw, db, C, HW, G, eps, silu, layer);
    CUDA_CHECK(cudaGetLastError());
    download(out, dy, 1, n, n);
    if (mean) { download(mean, dst, 1, ns, ns); download(rstd, dst + ns, 1, ns, ns); }
}

extern "C" void groupnorm_forward_cuda(float* out, float* mean, float* rstd, const float* x, const float* w,
                                       const float* b, int N, int C, int HW, int G, float eps, int silu) {
    CHECK(N > 0 && G > 0 && C % G == 0 && HW > 0, "groupnorm_forward_cuda: bad shape C=%d G=%d", C, G);
    norm_run(out, mean, rstd, x, w, b, N, C, HW, G, eps, silu, 0);
}

extern "C" void layernorm_forward_cuda(float* out, float* mean, float* rstd, const float* x, const float* w,
                                       const float* b, int M, int C, float eps) {
    CHECK(M > 0 && C > 0, "layernorm_forward_cuda: bad shape M=%d C=%d", M, C);
    norm_run(out, mean, rstd, x, w, b, M, C, 1, 1, eps, 0, 1);
}

// ---------------------------------------------------------------------------------------------
// attention: q[N, Tq, ·], k, v[N, Tk, ·], out[N, Tq, ·], head h at columns h·HD .. h·HD+HD−1 of
// rows of stride ldq/ldk/ldv/ldo. s_ij = scale·q_i·k_j (scale = 1/√HD), causal: j ≤ i only;
// p_ij = softmax_j(s_ij), out_i = Σ_j p_ij v_j, lse[N, NH, Tq] = log Σ_j exp(s_ij).
// A block owns ATT_BR rows (queries, or keys in the backward's second pass) of one (n, h): grid
// (ceil(rows/64), NH, N). It walks over blocks of ATT_BC columns; 256 threads as 16×16: thread
// (ty, tx) owns rows ty·4+{0..3} and, of a score tile, columns tx and tx+16; of a [rows, HD]
// accumulator, columns tx + 16·c, c < DC (so HD <= 16·DC). Shared rows are padded to HD+1
// floats, so the column reads of the score products are free of bank conflicts.

#define ATT_BR 64
#define ATT_BC 32
#define ATT_LDP (ATT_BC + 1)
#define ATT_THREADS 256

typedef struct AttnArgs {
    float *out, *lse, *dq, *dk, *dv;         // outputs (gradients accumulate; NULL: not wanted); lse: the
    const float *q, *k, *v, *o, *dout, *D;   // forward writes it, the backward reads it. o, dout stride ldo,
    int Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal;   // D [N, NH, Tq]: backward only
    float scale;
} AttnArgs;

// dst[r, :HD] = src row row0 + r (stride lds) for r < nr, zero rows past `rows`.
__device__ __forceinline__ void load_rows(float* dst, int ld, const float* src, int lds, int row0, int rows, int nr, int HD) {
    for (int e = threadIdx.x; e < nr * HD; e += ATT_THREADS) {
        int r = e / HD, d = e - r * HD;
        dst[r * ld + d] = row0 + r < rows ? src[(size_t)(row0 + r) * lds + d] : 0.0f;
    }
}
// s[r][c] = Σ_d X[ty·4 + r, d] · Y[tx + 16c, d]   (score tile [ATT_BR, ATT_BC])
__device__ __forceinline__ void tile_dot(float (&s)[4][2], const float* X, const float* Y, int ld, int HD) {
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int r = 0; r < 4; r++) s[r][0] = s[r][1] = 0.0f;
    for (int d = 0; d < HD; d++) {
        float y0 = Y[tx * ld + d], y1 = Y[(tx + 16) * ld + d];
        for (int r = 0; r < 4; r++) {
            float x = X[(ty * 4 + r) * ld + d];
            s[r][0] = fmaf(x, y0, s[r][0]);
            s[r][1] = fmaf(x, y1, s[r][1]);
        }
    }
}
// o[r][c] += Σ_j P[ty·4 + r, j] · Z[j, tx + 16c], j < ATT_BC (P stride ATT_LDP, Z stride ld)
template <int DC>
__device__ __forceinline__ void tile_acc(float (&o)[4][DC], const float* P, const float* Z, int ld, int HD) {
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int j = 0; j < ATT_BC; j++) {
        float z[DC];
        for (int c = 0; c < DC; c++) z[c] = tx + 16 * c < HD ? Z[j * ld + tx + 16 * c] : 0.0f;
        for (int r = 0; r < 4; r++) {
            float p = P[(ty * 4 + r) * ATT_LDP + j];
            for (int c = 0; c < DC; c++) o[r][c] = fmaf(p, z[c], o[r][c]);
        }
    }
}
// rows [n, :, h·HD ..] of a [N, T, ld] buffer
__device__ __forceinline__ const float* head(const float* x, int n, int T, int ld, int h, int HD) {
    return x + (size_t)n * T * ld + (size_t)h * HD;
}

// Forward. Shared: Q [64, HD+1], K then V of the key block [32, HD+1], P [64, 33], per-row rescale
// and 1/l [64] each. Online softmax: per key block the row max m and sum l are updated
// (m' = max(m, max_j s), l' = l·e^(m−m') + Σ_j e^(s−m')) and the accumulator rescaled by e^(m−m');
// the 4 threads of a row share this step (shuffles), each keeping m and l in registers.
template <int DC>
__global__ void __launch_bounds__(ATT_THREADS) attention_forward_kernel(AttnArgs a) {
    extern __shared__ float sm[];
    int ld = a.HD + 1, tid = threadIdx.x, tx = tid % 16, ty = tid / 16, HD = a.HD;
    int i0 = blockIdx.x * ATT_BR, h = blockIdx.y, n = blockIdx.z;
    float *Qs = sm, *KVs = Qs + ATT_BR * ld, *Ps = KVs + ATT_BC * ld, *corr = Ps + ATT_BR * ATT_LDP, *inv = corr + ATT_BR;
    load_rows(Qs, ld, head(a.q, n, a.Tq, a.ldq, h, HD), a.ldq, i0, a.Tq, ATT_BR, HD);
    float o[4][DC] = {}, m_run = -INFINITY, l_run = 0.0f;   // m_run, l_run: row tid/4
    int kend = a.causal ? min(a.Tk, i0 + ATT_BR) : a.Tk;
    for (int j0 = 0; j0 < kend; j0 += ATT_BC) {
        load_rows(KVs, ld, head(a.k, n, a.Tk, a.ldk, h, HD), a.ldk, j0, a.Tk, ATT_BC, HD);
        __syncthreads();
        float s[4][2];
        tile_dot(s, Qs, KVs, ld, HD);
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 2; c++) {
                int i = i0 + ty * 4 + r, j = j0 + tx + 16 * c;
                Ps[(ty * 4 + r) * ATT_LDP + tx + 16 * c] = j < a.Tk && (!a.causal || j <= i) ? a.scale * s[r][c] : -INFINITY;
            }
        __syncthreads();
        {   // row r = tid/4, its columns part·8 .. part·8+7
            int r = tid / 4;
            float* pr = Ps + r * ATT_LDP + (tid % 4) * 8;
            float mx = -INFINITY, sum = 0.0f;
            for (int e = 0; e < 8; e++) mx = fmaxf(mx, pr[e]);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float m_new = fmaxf(m_run, mx);
            for (int e = 0; e < 8; e++) {
                float p = m_new == -INFINITY ? 0.0f : expf(pr[e] - m_new);
                pr[e] = p;
                sum += p;
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            float c = m_new == -INFINITY ? 1.0f : expf(m_run - m_new);
            l_run = l_run * c + sum;
            m_run = m_new;
            if (tid % 4 == 0) corr[r] = c;
        }
        load_rows(KVs, ld, head(a.v, n, a.Tk, a.ldv, h, HD), a.ldv, j0, a.Tk, ATT_BC, HD);   // K is no longer read
        __syncthreads();
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < DC; c++) o[r][c] *= corr[ty * 4 + r];
        tile_acc<DC>(o, Ps, KVs, ld, HD);
        __syncthreads();
    }
    if (tid % 4 == 0) {
        int r = tid / 4;
        inv[r] = 1.0f / l_run;
        if (a.lse && i0 + r < a.Tq) a.lse[((size_t)n * a.NH + h) * a.Tq + i0 + r] = m_run + logf(l_run);
    }
    __syncthreads();
    for (int r = 0; r < 4; r++) {
        int i = i0 + ty * 4 + r;
        if (i >= a.Tq) continue;
        float* orow = a.out + ((size_t)n * a.Tq + i) * a.ldo + (size_t)h * HD;
        for (int c = 0; c < DC; c++)
            if (tx + 16 * c < HD) orow[tx + 16 * c] = o[r][c] * inv[ty * 4 + r];
    }
}

// Backward, FlashAttention-2's recomputation: p_ij = exp(s_ij − lse_i), dp_ij = do_i·v_j,
// D_i = do_i·o_i, ds_ij = p_ij·(dp_ij − D_i); dq_i += scale·Σ_j ds_ij k_j, dv_j += Σ_i p_ij do_i,
// dk_j += scale·Σ_i ds_ij q_i. As nn.c, two passes so that each output has one owner (no atomics).

// D[n, h, i] = Σ_d dout[n, i, h·HD + d] · o[n, i, h·HD + d]; one thread per (n, h, i), N·NH·Tq threads.
__global__ void attention_rowdot_kernel(float* D, AttnArgs a, size_t total) {
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    int i = (int)(t % a.Tq), h = (int)(t / a.Tq % a.NH), n = (int)(t / ((size_t)a.Tq * a.NH));
    const float* g = head(a.dout, n, a.Tq, a.ldo, h, a.HD) + (size_t)i * a.ldo;
    const float* o = head(a.o, n, a.Tq, a.ldo, h, a.HD) + (size_t)i * a.ldo;
    float d = 0.0f;
    for (int e = 0; e < a.HD; e++) d = fmaf(g[e], o[e], d);
    D[t] = d;
}

// One backward pass over a block of 64 rows, walking blocks of 32 columns:
//   KEYS false (pass 1): rows = queries, columns = keys; acc = Σ_j ds_ij k_j, dq += scale·acc.
//   KEYS true (pass 2): rows = keys, columns = queries (causal: from the first query block that
//   can see the row block); acc = Σ_i ds_ij q_i, acc2 = Σ_i p_ij do_i; dk += scale·acc, dv += acc2.
// In both, s = X1·Y1ᵀ and dp = X2·Y2ᵀ with (X1, X2, Y1, Y2) = (q, do, k, v) or (k, v, q, do).
// Shared: X1, X2 [64, HD+1], Y1, Y2 [32, HD+1], P and dS [64, 33], lse and D of the block's queries.
template <int DC, bool KEYS>
__global__ void __launch_bounds__(ATT_THREADS) attention_backward_kernel(AttnArgs a) {
    extern __shared__ float sm[];
    int ld = a.HD + 1, tx = threadIdx.x % 16, ty = threadIdx.x / 16, HD = a.HD, h = blockIdx.y, n = blockIdx.z;
    int r0 = blockIdx.x * ATT_BR, TR = KEYS ? a.Tk : a.Tq, TC = KEYS ? a.Tq : a.Tk;
    float *X1 = sm, *X2 = X1 + ATT_BR * ld, *Y1 = X2 + ATT_BR * ld, *Y2 = Y1 + ATT_BC * ld;
    float *P = Y2 + ATT_BC * ld, *dS = P + ATT_BR * ATT_LDP, *L = dS + ATT_BR * ATT_LDP, *D = L + ATT_BR;
    const float *q = head(a.q, n, a.Tq, a.ldq, h, HD), *k = head(a.k, n, a.Tk, a.ldk, h, HD);
    const float *v = head(a.v, n, a.Tk, a.ldv, h, HD), *g = head(a.dout, n, a.Tq, a.ldo, h, HD);
    size_t nh = ((size_t)n * a.NH + h) * a.Tq;
    load_rows(X1, ld, KEYS ? k : q, KEYS ? a.ldk : a.ldq, r0, TR, ATT_BR, HD);
    load_rows(X2, ld, KEYS ? v : g, KEYS ? a.ldv : a.ldo, r0, TR, ATT_BR, HD);
    float acc[4][DC] = {}, acc2[4][DC] = {};
    int c_end = !KEYS && a.causal ? min(TC, r0 + ATT_BR) : TC;
    for (int c0 = KEYS && a.causal ? r0 - r0 % ATT_BC : 0; c0 < c_end; c0 += ATT_BC) {
        load_rows(Y1, ld, KEYS ? q : k, KEYS ? a.ldq : a.ldk, c0, TC, ATT_BC, HD);
        load_rows(Y2, ld, KEYS ? g : v, KEYS ? a.ldo : a.ldv, c0, TC, ATT_BC, HD);
        int q0 = KEYS ? c0 : r0;                          // the block's first query
        for (int t = threadIdx.x; t < (KEYS ? ATT_BC : ATT_BR); t += ATT_THREADS) {
            L[t] = q0 + t < a.Tq ? a.lse[nh + q0 + t] : 0.0f;
            D[t] = q0 + t < a.Tq ? a.D[nh + q0 + t] : 0.0f;
        }
        __syncthreads();
        float s[4][2], dp[4][2];
        tile_dot(s, X1, Y1, ld, HD);
        tile_dot(dp, X2, Y2, ld, HD);
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 2; c++) {
                int rr = ty * 4 + r, cc = tx + 16 * c, t = KEYS ? cc : rr;     // t: the query within the block
                int i = q0 + t, j = KEYS ? r0 + rr : c0 + cc;
                float p = i < a.Tq && j < a.Tk && (!a.causal || j <= i) ? expf(a.scale * s[r][c] - L[t]) : 0.0f;
                P[rr * ATT_LDP + cc] = p;
                dS[rr * ATT_LDP + cc] = p * (dp[r][c] - D[t]);
            }
        __syncthreads();
        tile_acc<DC>(acc, dS, Y1, ld, HD);
        if (KEYS) tile_acc<DC>(acc2, P, Y2, ld, HD);
        __syncthreads();
    }
    for (int r = 0; r < 4; r++) {
        size_t row = (size_t)n * TR + r0 + ty * 4 + r;
        for (int c = 0; c < DC && r0 + ty * 4 + r < TR; c++) {
            int d = tx + 16 * c;
            if (d >= HD) continue;
            if (!KEYS) a.dq[row * a.ldq + (size_t)h * HD + d] += a.scale * acc[r][c];
            if (KEYS && a.dk) a.dk[row * a.ldk + (size_t)h * HD + d] += a.scale * acc[r][c];
            if (KEYS && a.dv) a.dv[row * a.ldv + (size_t)h * HD + d] += acc2[r][c];
        }
    }
}

template <int DC>
static void att_launch(int which, dim3 grid, size_t bytes, const AttnArgs& a) {
    void (*kern)(AttnArgs) = attention_forward_kernel<DC>;
    if constexpr (DC <= 10) kern = which == 1 ? attention_backward_kernel<DC, false> : which == 2 ? attention_backward_kernel<DC, true> : kern;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    kern<<<grid, ATT_THREADS, bytes>>>(a);
    CUDA_CHECK(cudaGetLastError());
}

// which: 0 forward, 1 dq, 2 dk/dv. DC is the smallest instantiated width with 16·DC >= HD; the
// forward goes to HD 512 (the VAE's single 512-wide head), the backward to 160 (the UNet's widest).
static void att_run(int which, const AttnArgs& a, int N) {
    int HD = a.HD, most = which == 0 ? 512 : 160, dc = (HD + 15) / 16;
    CHECK(HD > 0 && HD <= most, "attention on CUDA: head size %d, at most %d here", HD, most);
    size_t rows = which == 0 ? ATT_BR + ATT_BC : 2 * (ATT_BR + ATT_BC);      // the layouts above
    size_t bytes = (rows * (HD + 1) + (which ? 2 : 1) * ATT_BR * ATT_LDP + 2 * ATT_BR) * sizeof(float);
    CHECK(bytes <= g.prop.sharedMemPerBlockOptin, "attention on CUDA: head size %d needs %zu bytes of shared memory, "
          "this GPU has %zu", HD, bytes, (size_t)g.prop.sharedMemPerBlockOptin);
    dim3 grid(((which == 2 ? a.Tk : a.Tq) + ATT_BR - 1) / ATT_BR, a.NH, N);
    if (dc <= 3) att_launch<3>(which, grid, bytes, a);
    else if (dc <= 4) att_launch<4>(which, grid, bytes, a);
    else if (dc <= 5) att_launch<5>(which, grid, bytes, a);
    else if (dc <= 10) att_launch<10>(which, grid, bytes, a);
    else att_launch<32>(which, grid, bytes, a);
}

extern "C" void attention_forward_cuda(float* out, float* lse, const float* q, const float* k, const float* v,
                                       int N, int Tq, int Tk, int NH, int HD, int ldq, int ldk, int ldv, int ldo,
                                       int causal, Arena* scratch) {
    (void)scratch;
    CHECK(N > 0 && Tq > 0 && Tk > 0 && NH > 0, "attention_forward_cuda: bad shape");
    size_t C = (size_t)NH * HD, nq = (size_t)N * Tq, nk = (size_t)N * Tk, nl = nq * NH;
    std::unique_lock<std::mutex> l = op_begin(4.0 * nl * Tk * HD);              // S = q·kᵀ and P·v, causal or not
    AttnArgs a = {scratch_buf(3, (nq - 1) * ldo + C), lse ? scratch_buf(4, nl) : NULL, NULL, NULL, NULL,
                  to_device(0, q, nq, C, ldq), to_device(1, k, nk, C, ldk), to_device(2, v, nk, C, ldv), NULL, NULL,
                  NULL, Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal, 1.0f / sqrtf((float)HD)};
    att_run(0, a, N);
    download(out, a.out, nq, C, ldo);
    if (lse) download(lse, a.lse, 1, nl, nl);
}

extern "C" void attention_backward_cuda(float* dq, float* dk, float* dv, const float* dout, const float* out,
                                        const float* lse, const float* q, const float* k, const float* v, int N,
                                        int Tq, int Tk, int NH, int HD, int ldq, int ldk, int ldv, int ldo,
                                        int causal, Arena* scratch) {
    (void)scratch;
    CHECK(N > 0 && Tq > 0 && Tk > 0 && NH > 0, "attention_backward_cuda: bad shape");
    if (!dq && !dk && !dv) return;
    size_t C = (size_t)NH * HD, nq = (size_t)N * Tq, nk = (size_t)N * Tk, nl = nq * NH;
    std::unique_lock<std::mutex> l = op_begin(2.0 * nl * Tk * HD * ((dq ? 3 : 0) + (dk || dv ? 2 : 0) + !!dk + !!dv));
    AttnArgs a = {NULL, (float*)to_device(5, lse, 1, nl, nl), dq ? upload(7, dq, nq, C, ldq) : NULL,
                  dk ? upload(8, dk, nk, C, ldk) : NULL, dv ? upload(9, dv, nk, C, ldv) : NULL,
                  to_device(0, q, nq, C, ldq), to_device(1, k, nk, C, ldk), to_device(2, v, nk, C, ldv),
                  to_device(4, out, nq, C, ldo), to_device(3, dout, nq, C, ldo), scratch_buf(6, nl),
                  Tq, Tk, NH, HD, ldq, ldk, ldv, ldo, causal, 1.0f / sqrtf((float)HD)};
    attention_rowdot_kernel<<<(unsigned)((nl + 255) / 256), 256>>>((float*)a.D, a, nl);
    CUDA_CHECK(cudaGetLastError());
    if (dq) att_run(1, a, N);
    if (dk || dv) att_run(2, a, N);
    if (dq) download(dq, a.dq, nq, C, ldq);
    if (dk) download(dk, a.dk, nk, C, ldk);
    if (dv) download(dv, a.dv, nk, C, ldv);
}

// ---------------------------------------------------------------------------------------------
// peak: FP32 FMA probe (8 independent chains per thread, 8 blocks of 256 threads per SM), the
// GPU twin of cpu_peak_gflops, for bench's "fraction of peak".

__global__ void fma_probe_kernel(float* out, int iters) {
    float x[8];
    for (int c = 0; c < 8; c++) x[c] = threadIdx.x * 1e-3f + c;
    for (int it = 0; it < iters; it++)
        for (int c = 0; c < 8; c++) x[c] = fmaf(x[c], 0.999999f, 1e-6f);
    if (x[0] + x[1] + x[2] + x[3] + x[4] + x[5] + x[6] + x[7] == 12345.0f) out[0] = 1.0f;   // never true: keeps the chains
}

extern "C" double cuda_peak_gflops(void) {
    std::lock_guard<std::mutex> l(g_lock);
    init_locked();
    int blocks = 8 * g.prop.multiProcessorCount, iters = 1 << 16;
    fma_probe_kernel<<<blocks, 256>>>(scratch_buf(0, 1), 256);      // warm-up: clocks up, module loaded
    CUDA_CHECK(cudaDeviceSynchronize());
    double t0 = time_now();
    fma_probe_kernel<<<blocks, 256>>>(scratch_buf(0, 1), iters);
    CUDA_CHECK(cudaDeviceSynchronize());
    return 2.0 * 8 * iters * (double)blocks * 256 / (time_now() - t0) / 1e9;
}
