// gemm.c: single-precision matrix multiply (sgemm) and the thread pool the hot kernels share.
//
// sgemm computes C[M,N] = alpha·op(A)[M,K]·op(B)[K,N] + beta·C, row-major, with BLAS semantics
// (beta == 0: C is written, never read). It follows the GotoBLAS/BLIS structure: K. Goto and
// R. van de Geijn, "Anatomy of High-Performance Matrix Multiplication", ACM TOMS 34(3), 2008;
// F. Van Zee and R. van de Geijn, "BLIS: A Framework for Rapidly Instantiating BLAS
// Functionality", ACM TOMS 41(3), 2015. Five loops surround a register-blocked microkernel:
//
//   for jc in [0, N) step NC                   columns of C
//     for pc in [0, K) step KC                 the summed dimension
//       pack op(B)[pc:+KC, jc:+NC] -> Bp       KC×NC, stays in L3, NR-wide micro-panels
//       for ic in [0, M) step MC               rows of C
//         pack op(A)[ic:+MC, pc:+KC] -> Ap     MC×KC, stays in L2, MR-tall micro-panels
//         for jr in [0, NC) step NR            one KC×NR micro-panel of Bp, reused MC/MR times
//           for ir in [0, MC) step MR          one MR×KC micro-panel of Ap, streamed from L2
//             C[MR×NR] = alpha·Ap·Bp + beta·C  microkernel, accumulators in registers
//
// Packing copies (and transposes) the operands into exactly the order the microkernel reads
// them, zero-padded to whole panels: the four transpose combinations and all edges live in the
// packing routine, and the microkernel sees only contiguous panels. Microkernels: AVX-512
// 12×32 and 8×48 (24 zmm accumulators each; sgemm takes the one that pads C least, e.g. 8×48
// for 128 rows), AVX2+FMA 6×16 and plain C 4×8, chosen at run time from the CPU's features;
// the build needs no -march flag. INSTASTYLE_GEMM=avx2|scalar in the environment selects a
// narrower kernel (tests use it). Blocking on a 2-core Zen 5 (48 KiB L1, 1 MiB L2): KC <= 768,
// MC·KC <= 384 KiB, KC·NC <= 2 MiB; prefetching the C tile and the rows being packed matters
// as much as the blocking (see the kernels).
//
// Operands (sgemm_op): besides float matrices, packing reads fp16 matrices (frozen weights under
// --weights fp16, converted exactly: _mm512_cvtph_ps), the im2col matrix of an image straight from
// the image (implicit-GEMM convolution; optionally through 2× nearest up-sampling), and operands
// packed once beforehand (sgemm_pack: attention's K and V of a head). A bias is added by the
// microkernel as it stores the finished tile. Since only packing differs, each variant gives the
// bits of sgemm on the materialised fp32 matrix.
//
// Reproducibility: each C element is summed over k in KC-blocks, in order, in one register
// lane, and each block is added to C as alpha·acc + beta·C (beta = 1 after the first block).
// KC and the microkernel depend only on the shape, and threads take disjoint sets of whole
// tiles, so every element sees the same operations for any thread count: results are bitwise
// identical for 1..n threads.
//
// Threads: a persistent pool; parallel_for hands each thread (the caller included) one
// contiguous chunk of [0, n). Workers spin ~50 µs after a job, then sleep on a condition
// variable. A parallel_for from inside a job (or while another job runs) runs serially.
// Built with -fopenmp, the same chunks run on OpenMP's threads instead.
//
// Left out: double and complex types, column-major C, sharing one packed B between threads
// (each thread packs what it uses; the redundancy is 1/M of the work for an M-split), and
// microkernels for very narrow C (attention computes its products transposed instead).
#define _POSIX_C_SOURCE 200809L
#include "instastyle.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GEMM_X86 1
#else
#define GEMM_X86 0
#endif

static int imin(int a, int b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------
// thread pool

static _Thread_local float* tl_pack;    // this thread's sgemm pack buffers (see pack_buffer)

#ifdef _OPENMP
// With -fopenmp the pool is OpenMP's: same chunks, nested calls serial.
void threads_init(int n) { omp_set_num_threads(n > 0 ? n : omp_get_num_procs()); }

int threads_count(void) { return omp_get_max_threads(); }

void parallel_for(int n, void (*fn)(void* ctx, int begin, int end), void* ctx) {
    if (n <= 0) return;
    if (n == 1 || omp_in_parallel() || omp_get_max_threads() == 1) {
        fn(ctx, 0, n);
        return;
    }
#pragma omp parallel
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int begin = (int)((long long)n * t / nt), end = (int)((long long)n * (t + 1) / nt);
        if (begin < end) fn(ctx, begin, end);
    }
}
#else

#define POOL_MAX 256
#define POOL_SPIN 2000    // polls (~50 µs) before a waiting thread sleeps on the condvar

static struct {
    atomic_int n;                   // threads including the caller; 0 until threads_init
    pthread_t tid[POOL_MAX];
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    atomic_uint gen;                // bumped to publish a job (or the stop request)
    unsigned gen0;                  // gen when the workers were created
    atomic_int left;                // workers still running the current job
    int stop;
    void (*fn)(void* ctx, int begin, int end);
    void* ctx;
    int total;
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
          .done = PTHREAD_COND_INITIALIZER};
static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER;   // one job (or init) at a time
static _Thread_local int pool_inside;                           // 1 while running a job

static void cpu_relax(void) {
#if GEMM_X86
    _mm_pause();
#endif
}

// Thread t of n gets [total·t/n, total·(t+1)/n): chunk sizes differ by at most one.
static void pool_run_chunk(int t, int n) {
    int begin = (int)((long long)pool.total * t / n);
    int end = (int)((long long)pool.total * (t + 1) / n);
    if (begin < end) pool.fn(pool.ctx, begin, end);
}

static void* pool_worker(void* arg) {
    int id = (int)(intptr_t)arg;
    unsigned seen = pool.gen0;
    pool_inside = 1;
    for (;;) {
        for (int s = 0; s < POOL_SPIN && atomic_load(&pool.gen) == seen; s++) cpu_relax();
        pthread_mutex_lock(&pool.mu);
        while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
        pthread_mutex_unlock(&pool.mu);
        seen = atomic_load(&pool.gen);
        if (pool.stop) break;
        pool_run_chunk(id, atomic_load(&pool.n));
        if (atomic_fetch_sub(&pool.left, 1) == 1) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.mu);
        }
    }
    free(tl_pack);
    return NULL;
}

static void pool_publish(void) {
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add(&pool.gen, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
}

// Called with pool_busy held.
static void pool_start(int n) {
    if (atomic_load(&pool.n) > 1) {             // stop and join the old workers
        pool.stop = 1;
        pool_publish();
        for (int t = 1; t < atomic_load(&pool.n); t++) pthread_join(pool.tid[t], NULL);
        pool.stop = 0;
    }
    if (n <= 0) n = (int)sysconf(_SC_NPROCESSORS_ONLN);
    n = n < 1 ? 1 : n > POOL_MAX ? POOL_MAX : n;
    atomic_store(&pool.n, n);
    pool.gen0 = atomic_load(&pool.gen);
    for (int t = 1; t < n; t++) {
        int err = pthread_create(&pool.tid[t], NULL, pool_worker, (void*)(intptr_t)t);
        CHECK(err == 0, "pthread_create failed for worker %d of %d (error %d)", t, n, err);
    }
}

void threads_init(int n) {
    CHECK(!pool_inside, "threads_init called from inside parallel_for");
    pthread_mutex_lock(&pool_busy);
    pool_start(n);
    pthread_mutex_unlock(&pool_busy);
}

int threads_count(void) {
    if (atomic_load(&pool.n) == 0) {
        pthread_mutex_lock(&pool_busy);
        if (atomic_load(&pool.n) == 0) pool_start(0);
        pthread_mutex_unlock(&pool_busy);
    }
    return atomic_load(&pool.n);
}

void parallel_for(int n, void (*fn)(void* ctx, int begin, int end), void* ctx) {
    if (n <= 0) return;
    int nt = threads_count();
    if (nt == 1 || n == 1 || pool_inside || pthread_mutex_trylock(&pool_busy) != 0) {
        fn(ctx, 0, n);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.total = n;
    atomic_store(&pool.left, nt - 1);
    pool_publish();
    pool_inside = 1;
    pool_run_chunk(0, nt);
    pool_inside = 0;
    for (int s = 0; s < POOL_SPIN && atomic_load(&pool.left) > 0; s++) cpu_relax();
    pthread_mutex_lock(&pool.mu);
    while (atomic_load(&pool.left) > 0) pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool_busy);
}
#endif

// ---------------------------------------------------------------------------------------------
// reference

void sgemm_ref(int transA, int transB, int M, int N, int K, float alpha,
               const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) {
    for (int i = 0; i < M; i++) {
        for (int j = 0; j < N; j++) {
            float sum = 0.0f;
            for (int k = 0; k < K; k++) {
                float a = transA ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                float b = transB ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                sum += a * b;
            }
            float* c = &C[(size_t)i * ldc + j];
            *c = beta == 0.0f ? alpha * sum : alpha * sum + beta * *c;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// blocking

// Cache blocks, in bytes of packed operand, and the largest KC. A KC-block of A (MC×KC) sits in
// the 1-2 MiB L2 of current cores, a KC-block of B (KC×NC) in L3; MC and NC follow from KC, so
// a short K (attention's 40) gets long blocks. KC is large because every KC-block costs one
// pass over the C tile (load, add, store). 2 MiB of B rather than 4 keeps more of the block
// being packed in L2 (+2-4% on the 128-row products of the VAE, measured with bench).
#define GEMM_KC_MAX 768
#define GEMM_A_BYTES (384 << 10)
#define GEMM_B_BYTES (2 << 20)
#define GEMM_PREFETCH_ROWS 8          // rows of B ahead when packing row by row
#define GEMM_SERIAL_WORK (1 << 18)    // M·N·K below this runs on the calling thread only

// Microkernel: C[m×n] = alpha·a·b + beta·C (+ br[i] or + bc[j] when non-NULL: the bias, added
// after) for one tile, m <= mr, n <= nr (beta == 0: C is not read). a: mr×kc panel, column k at
// a + k·mr; b: kc×nr panel, row k at b + k·nr, both 64-byte aligned and zero-padded.
typedef void (*MicroKernel)(int kc, const float* a, const float* b, float* c, int ldc,
                            float alpha, float beta, int m, int n, const float* br, const float* bc);

// Packs rows [0, mn) × columns [0, kc) of X(r,k) = x[r·rs + k·cs] into ceil(mn/w) panels:
// panel q holds X(q·w + r, k) at dst[q·w·kc + k·w + r], zero-padded to w rows. Rows are op(A)'s
// rows (w = mr) or op(B)'s columns (w = nr). Either rs or cs is 1. x holds floats, or IEEE fp16
// values (f16 = 1) that are converted exactly on the way.
typedef void (*PackFn)(const void* x, int f16, size_t rs, size_t cs, int mn, int kc, int w, float* dst);
// The same panels for B = the im2col matrix of an image: rows are output pixels p0 .. p0+mn−1,
// columns the (c, ky, kx) indices k0 .. k0+kc−1 (see GemmIm2col).
typedef void (*PackIm2colFn)(const GemmIm2col* g, int p0, int k0, int mn, int kc, int w, float* dst);

typedef struct GemmKernel {
    MicroKernel fn;
    int mr, nr;
} GemmKernel;

typedef struct GemmArch {
    const char* name;
    PackFn pack, pack16;       // float and fp16 operands (separate functions: each is compiled for its type)
    PackIm2colFn pack_im2col;
    GemmKernel kernels[2];   // sgemm takes the one that pads C least (the first on a tie)
} GemmArch;

static float load_elem(const void* x, int f16, size_t i) {
    return f16 ? f16_to_f32(((const uint16_t*)x)[i]) : ((const float*)x)[i];
}

static void pack_panels(const void* x, int f16, size_t rs, size_t cs, int mn, int kc, int w, float* dst) {
    size_t esz = f16 ? sizeof(uint16_t) : sizeof(float);
    if (rs == 1) {            // X's columns are contiguous: stream each across all panels
        for (int k = 0; k < kc; k++) {
            size_t src = (size_t)k * cs;
            float* d = dst + (size_t)k * w;
            if (k + GEMM_PREFETCH_ROWS < kc) __builtin_prefetch((const char*)x + (src + GEMM_PREFETCH_ROWS * cs) * esz);
            for (int q = 0; q < mn; q += w, d += (size_t)w * kc)
                for (int r = 0; r < w; r++) d[r] = q + r < mn ? load_elem(x, f16, src + q + r) : 0.0f;
        }
        return;
    }
    for (int q = 0; q < mn; q += w, dst += (size_t)w * kc) {   // X's rows are contiguous
        for (int r = 0; r < w; r++) {
            if (q + r >= mn) {
                for (int k = 0; k < kc; k++) dst[k * w + r] = 0.0f;
                continue;
            }
            size_t src = (size_t)(q + r) * rs;
            for (int k = 0; k < kc; k++) dst[k * w + r] = load_elem(x, f16, src + k);
        }
    }
}

// The im2col panels, element by element: output pixel p = (oy, ox) reads row oy·stride − pad + ky
// and column ox·stride − pad + kx of channel c of the (up-sampled) image, or 0 outside it.
static void pack_im2col_plain(const GemmIm2col* g, int p0, int k0, int mn, int kc, int w, float* dst) {
    size_t Hs = (size_t)g->H / g->up, Ws = (size_t)g->W / g->up;
    for (int q = 0; q < mn; q += w, dst += (size_t)w * kc)
        for (int r = 0; r < w; r++) {
            int p = p0 + q + r, iy0 = p / g->Wo * g->stride - g->pad, ix0 = p % g->Wo * g->stride - g->pad;
            int c = k0 / (g->K * g->K), ky = k0 / g->K % g->K, kx = k0 % g->K;
            for (int k = 0; k < kc; k++) {
                int iy = iy0 + ky, ix = ix0 + kx;
                int inside = q + r < mn && iy >= 0 && iy < g->H && ix >= 0 && ix < g->W;
                dst[k * w + r] = inside ? g->x[((size_t)c * Hs + (size_t)iy / g->up) * Ws + (size_t)ix / g->up] : 0.0f;
                if (++kx == g->K) { kx = 0; if (++ky == g->K) { ky = 0; c++; } }
            }
        }
}

// ---------------------------------------------------------------------------------------------
// microkernels

// The edge update of the scalar and AVX2 kernels: the same expression as the vector paths
// (alpha·acc + beta·c: two products and a sum), free of target attributes so that no compiler
// contracts it into an FMA.
static void tile_update(const float* t, int nr, float* c, int ldc, float alpha, float beta,
                        int m, int n, const float* br, const float* bc) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            float* cij = &c[(size_t)i * ldc + j];
            float x = beta == 0.0f ? alpha * t[i * nr + j] : alpha * t[i * nr + j] + beta * *cij;
            *cij = br ? x + br[i] : bc ? x + bc[j] : x;
        }
}

#define SCALAR_MR 4
#define SCALAR_NR 8
static void kernel_scalar(int kc, const float* a, const float* b, float* c, int ldc,
                          float alpha, float beta, int m, int n, const float* br, const float* bc) {
    float t[SCALAR_MR * SCALAR_NR] = {0};
    for (int k = 0; k < kc; k++, a += SCALAR_MR, b += SCALAR_NR)
        for (int i = 0; i < SCALAR_MR; i++)
            for (int j = 0; j < SCALAR_NR; j++) t[i * SCALAR_NR + j] += a[i] * b[j];
    tile_update(t, SCALAR_NR, c, ldc, alpha, beta, m, n, br, bc);
}

#if GEMM_X86
// Full unrolling of the register-tile loops keeps the accumulator arrays in registers.
#if defined(__clang__)
#define UNROLL _Pragma("unroll")
#else
#define UNROLL _Pragma("GCC unroll 16")
#endif

// 6×16: 12 ymm accumulators, two B vectors and a broadcast fill 15 of the 16 registers.
__attribute__((target("avx2,fma")))
static void kernel_avx2(int kc, const float* a, const float* b, float* c, int ldc,
                        float alpha, float beta, int m, int n, const float* br, const float* bc) {
    __m256 acc[6][2];
    UNROLL
    for (int i = 0; i < 6; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int k = 0; k < kc; k++, a += 6, b += 16) {
        __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
        UNROLL
        for (int i = 0; i < 6; i++) {
            __m256 ai = _mm256_broadcast_ss(a + i);
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    if (m < 6 || n < 16 || br || bc) {
        float t[6 * 16];
        UNROLL
        for (int i = 0; i < 6; i++) {
            _mm256_storeu_ps(t + 16 * i, acc[i][0]);
            _mm256_storeu_ps(t + 16 * i + 8, acc[i][1]);
        }
        tile_update(t, 16, c, ldc, alpha, beta, m, n, br, bc);
        return;
    }
    __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    UNROLL
    for (int i = 0; i < 6; i++) {
        float* ci = c + (size_t)i * ldc;
        __m256 x0 = _mm256_mul_ps(va, acc[i][0]), x1 = _mm256_mul_ps(va, acc[i][1]);
        if (beta != 0.0f) {
            x0 = _mm256_add_ps(x0, _mm256_mul_ps(vb, _mm256_loadu_ps(ci)));
            x1 = _mm256_add_ps(x1, _mm256_mul_ps(vb, _mm256_loadu_ps(ci + 8)));
        }
        _mm256_storeu_ps(ci, x0);
        _mm256_storeu_ps(ci + 8, x1);
    }
}

static __mmask16 mask16(int n) {          // the first n lanes (0..16)
    return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}

// AVX-512: MR rows × NV vectors of 16 columns, MR·NV = 24 accumulators (enough independent FMA
// chains for two FMA pipes of latency 4) plus NV B vectors and a broadcast. Inlined into each
// wrapper with constant MR and NV, so the loops unroll and the accumulators stay in registers.
// The C tile is prefetched first: its lines arrive while the k loop runs (for short K, as in
// attention, C traffic is the bottleneck).
__attribute__((target("avx512f"), always_inline))
static inline void kernel_avx512(int MR, int NV, int kc, const float* a, const float* b,
                                 float* c, int ldc, float alpha, float beta, int m, int n,
                                 const float* br, const float* bc) {
    __m512 acc[12][3];
    UNROLL
    for (int i = 0; i < MR; i++) {
        if (i < m) {
            UNROLL
            for (int v = 0; v < NV; v++) __builtin_prefetch(c + (size_t)i * ldc + 16 * v);
            __builtin_prefetch(c + (size_t)i * ldc + imin(n, 16 * NV) - 1);
        }
        UNROLL
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    }
    for (int k = 0; k < kc; k++, a += MR, b += 16 * NV) {
        __m512 bv[3];
        UNROLL
        for (int v = 0; v < NV; v++) bv[v] = _mm512_load_ps(b + 16 * v);
        UNROLL
        for (int i = 0; i < MR; i++) {
            __m512 ai = _mm512_set1_ps(a[i]);
            UNROLL
            for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
        }
    }
    // Masked loads and stores cover partial tiles; masked-off lanes are never touched. The bias
    // (the last K-block of a layer with one) has its own copy of the store loop.
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    if (br || bc) {
        UNROLL
        for (int i = 0; i < MR; i++) {
            UNROLL
            for (int v = 0; v < NV; v++) {
                __mmask16 mk = i < m ? mask16(n - 16 * v) : 0;
                if (!mk) continue;
                float* civ = c + (size_t)i * ldc + 16 * v;
                __m512 x = _mm512_mul_ps(va, acc[i][v]);
                if (beta != 0.0f)
                    x = _mm512_add_ps(x, _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(mk, civ)));
                x = _mm512_add_ps(x, br ? _mm512_set1_ps(br[i]) : _mm512_maskz_loadu_ps(mk, bc + 16 * v));
                _mm512_mask_storeu_ps(civ, mk, x);
            }
        }
        return;
    }
    UNROLL
    for (int i = 0; i < MR; i++) {
        UNROLL
        for (int v = 0; v < NV; v++) {
            __mmask16 mk = i < m ? mask16(n - 16 * v) : 0;
            if (!mk) continue;
            float* civ = c + (size_t)i * ldc + 16 * v;
            __m512 x = _mm512_mul_ps(va, acc[i][v]);
            if (beta != 0.0f)
                x = _mm512_add_ps(x, _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(mk, civ)));
            _mm512_mask_storeu_ps(civ, mk, x);
        }
    }
}

__attribute__((target("avx512f")))
static void kernel_avx512_12x32(int kc, const float* a, const float* b, float* c, int ldc,
                                float alpha, float beta, int m, int n, const float* br, const float* bc) {
    kernel_avx512(12, 2, kc, a, b, c, ldc, alpha, beta, m, n, br, bc);
}

__attribute__((target("avx512f")))
static void kernel_avx512_8x48(int kc, const float* a, const float* b, float* c, int ldc,
                               float alpha, float beta, int m, int n, const float* br, const float* bc) {
    kernel_avx512(8, 3, kc, a, b, c, ldc, alpha, beta, m, n, br, bc);
}

// r[i] = column i of the 16×16 block whose rows were r[0..15].
__attribute__((target("avx512f"), always_inline))
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    UNROLL
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    UNROLL
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    UNROLL
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
    }
    UNROLL
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}

// 16 consecutive elements of x from index i (lanes outside m read as 0), floats or fp16.
__attribute__((target("avx512f"), always_inline))
static inline __m512 load16(const void* x, int f16, size_t i, __mmask16 m) {
    if (!f16) return _mm512_maskz_loadu_ps(m, (const float*)x + i);
    const uint16_t* h = (const uint16_t*)x + i;
    if (m == 0xFFFF) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)h));
    uint16_t t[16] = {0};
    for (int l = 0; l < 16; l++) if (m >> l & 1) t[l] = h[l];
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)t));
}

// pack_panels with vectors: columns are copied 16 at a time; rows (A without transA, B with
// transB) go through 16×16 transposes, while the next panel's rows are prefetched. Inlined into
// a float and an fp16 version.
__attribute__((target("avx512f"), always_inline))
static inline void pack_avx512_any(const void* x, int f16, size_t rs, size_t cs, int mn, int kc, int w, float* dst) {
    size_t esz = f16 ? sizeof(uint16_t) : sizeof(float);
    if (rs == 1) {
        for (int k = 0; k < kc; k++) {
            size_t src = (size_t)k * cs;
            float* d = dst + (size_t)k * w;
            for (int q = 0; q < mn; q += w, d += (size_t)w * kc)
                for (int r0 = 0; r0 < w; r0 += 16) {
                    __m512 v = _mm512_setzero_ps();
                    if (q + r0 < mn) {
                        if (k + GEMM_PREFETCH_ROWS < kc)
                            __builtin_prefetch((const char*)x + (src + GEMM_PREFETCH_ROWS * cs + q + r0) * esz);
                        v = load16(x, f16, src + q + r0, mask16(mn - q - r0));
                    }
                    _mm512_mask_storeu_ps(d + r0, mask16(w - r0), v);
                }
        }
        return;
    }
    for (int q = 0; q < mn; q += w, dst += (size_t)w * kc) {
        for (int r0 = 0; r0 < w; r0 += 16) {
            size_t xr = (size_t)q * rs;                   // row q + r0 + r at xr + (r0 + r)·rs
            float* d = dst + r0;
            int rows = mn - q - r0;                       // valid rows from r0 (may exceed 16)
            __mmask16 out = mask16(w - r0);               // lanes inside the panel
            for (int k0 = 0; k0 < kc; k0 += 16) {
                __m512 v[16];
                __mmask16 kin = mask16(kc - k0);
                UNROLL
                for (int r = 0; r < 16; r++) {
                    if (r + w < rows) __builtin_prefetch((const char*)x + (xr + (size_t)(r0 + r + w) * rs + k0) * esz);
                    v[r] = r < rows ? load16(x, f16, xr + (size_t)(r0 + r) * rs + k0, kin) : _mm512_setzero_ps();
                }
                transpose16(v);
                UNROLL
                for (int k = 0; k < 16; k++)
                    if (k0 + k < kc) _mm512_mask_storeu_ps(d + (size_t)(k0 + k) * w, out, v[k]);
            }
        }
    }
}

__attribute__((target("avx512f")))
static void pack_avx512(const void* x, int f16, size_t rs, size_t cs, int mn, int kc, int w, float* dst) {
    (void)f16;
    pack_avx512_any(x, 0, rs, cs, mn, kc, w, dst);
}
__attribute__((target("avx512f")))
static void pack16_avx512(const void* x, int f16, size_t rs, size_t cs, int mn, int kc, int w, float* dst) {
    (void)f16;
    pack_avx512_any(x, 1, rs, cs, mn, kc, w, dst);
}

// pack_im2col_plain with vectors, 16 pixels at a time. With stride 1 and the 16 pixels in one
// output row (always, when Wo is a multiple of 16 and panels start at multiples of 16), their
// inputs are 16 consecutive floats of one input row: one masked load, the mask cutting the
// zero padding; through 2× up-sampling, 8 or 9 floats spread over the lanes by a permutation.
// The masks depend only on (group, kx), so they are made once per panel, and the input row
// once per (c, ky). Other groups (row-crossing, stride 2) take a masked gather.
//
// Channels of a large image lie a power of two apart (512² floats = 1 MiB), so the same input
// row of successive channels falls into the same cache sets and evicts itself before the next
// panel comes back to it: the rows are prefetched a few (c, ky) steps ahead within the panel
// instead, just before they are read.
#define GEMM_MAX_NR 48
#define GEMM_MAX_K 16        // kernel widths up to this take the fast path
#define GEMM_IM2COL_AHEAD 4  // (c, ky) rows
__attribute__((target("avx512f")))
static void pack_im2col_avx512(const GemmIm2col* g, int p0, int k0, int mn, int kc, int w, float* dst) {
    enum { NG = GEMM_MAX_NR / 16 };
    int K = g->K, KK = K * K, Hs = g->H / g->up, Ws = g->W / g->up, ng = w / 16;
    int ush = g->up == 2;              // the fast path divides by up (1 or 2) as a shift
    int span = (15 + K - 1) >> ush;    // last source float a group of 16 pixels reads, from its first
    size_t HWs = (size_t)Hs * Ws;
    const __m512i half_lane[2] = {   // lane l of 2× up-sampled columns base.. reads source (base&1 + l) / 2
        _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0),
        _mm512_set_epi32(8, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0)};
    for (int q = 0; q < mn; q += w, dst += (size_t)w * kc) {
        int row[NG], fast[NG], off[NG][GEMM_MAX_K], par[NG][GEMM_MAX_K];
        __mmask16 in[NG], cm[NG][GEMM_MAX_K], sm[NG][GEMM_MAX_K];
        __m512i viy[NG], vix[NG];
        for (int v = 0; v < ng; v++) {     // per group: input row/column of each lane at ky = kx = 0
            int p = p0 + q + 16 * v, oy = p / g->Wo, ox = p % g->Wo;
            in[v] = mask16(mn - q - 16 * v);
            fast[v] = g->stride == 1 && g->up <= 2 && K <= GEMM_MAX_K && ox + 15 < g->Wo;
            row[v] = oy - g->pad;
            for (int kx = 0; fast[v] && kx < K; kx++) {   // lanes inside [0, W), source offset and lanes
                int ix = ox - g->pad + kx, lo = ix < 0 ? -ix : 0, hi = g->W - ix < 16 ? g->W - ix : 16;
                cm[v][kx] = in[v] & (__mmask16)(mask16(hi) & ~mask16(lo));
                off[v][kx] = g->up == 1 ? ix : ix >> 1;
                par[v][kx] = ix & 1;
                int s0 = ix >> 1, slo = s0 < 0 ? -s0 : 0, shi = Ws - s0 < 9 ? Ws - s0 : 9;
                sm[v][kx] = (__mmask16)(mask16(shi) & ~mask16(slo));
            }
            int32_t t[16], u[16];           // each lane's output row and column (gather path)
            for (int l = 0; l < 16; l++) { t[l] = (p + l) / g->Wo; u[l] = (p + l) % g->Wo; }
            __m512i voy = _mm512_loadu_si512(t), vox = _mm512_loadu_si512(u);
            viy[v] = _mm512_sub_epi32(_mm512_mullo_epi32(voy, _mm512_set1_epi32(g->stride)), _mm512_set1_epi32(g->pad));
            vix[v] = _mm512_sub_epi32(_mm512_mullo_epi32(vox, _mm512_set1_epi32(g->stride)), _mm512_set1_epi32(g->pad));
        }
        int c = k0 / KK, ky = k0 / K % K, kx = k0 % K;
        int pc = c, pky = ky;              // the (c, ky) row prefetched, GEMM_IM2COL_AHEAD rows ahead
        for (int a = 0; a < GEMM_IM2COL_AHEAD; a++)
            if (++pky == K) { pky = 0; pc++; }
        for (int k = 0; k < kc;) {         // one (c, ky) at a time: kx runs along an input row
            const float* xc = g->x + (size_t)c * HWs;
            const float* rowp[NG];
            for (int v = 0; v < ng; v++) {
                int iy = row[v] + ky;
                rowp[v] = fast[v] && in[v] && iy >= 0 && iy < g->H ? xc + (size_t)(iy >> ush) * Ws : NULL;
                int piy = row[v] + pky;     // the lines this group reads a few rows on (see above)
                if (fast[v] && in[v] && piy >= 0 && piy < g->H && pc < g->C) {
                    const float* pp = g->x + (size_t)pc * HWs + (size_t)(piy >> ush) * Ws + off[v][0];
                    __builtin_prefetch(pp);
                    __builtin_prefetch(pp + span);
                }
            }
            if (++pky == K) { pky = 0; pc++; }
            for (; kx < K && k < kc; kx++, k++) {
                float* d = dst + (size_t)k * w;
                for (int v = 0; v < ng; v++) {
                    __m512 val = _mm512_setzero_ps();
                    if (rowp[v] && g->up == 1)
                        val = _mm512_maskz_loadu_ps(cm[v][kx], rowp[v] + off[v][kx]);
                    else if (rowp[v])
                        val = _mm512_maskz_permutexvar_ps(cm[v][kx], half_lane[par[v][kx]],
                                                          _mm512_maskz_loadu_ps(sm[v][kx], rowp[v] + off[v][kx]));
                    else if (!fast[v] && in[v]) {
                        __m512i iy = _mm512_add_epi32(viy[v], _mm512_set1_epi32(ky));
                        __m512i ix = _mm512_add_epi32(vix[v], _mm512_set1_epi32(kx));
                        __mmask16 m = in[v] & _mm512_cmpge_epi32_mask(iy, _mm512_setzero_si512()) &
                                      _mm512_cmplt_epi32_mask(iy, _mm512_set1_epi32(g->H)) &
                                      _mm512_cmpge_epi32_mask(ix, _mm512_setzero_si512()) &
                                      _mm512_cmplt_epi32_mask(ix, _mm512_set1_epi32(g->W));
                        if (g->up > 1) {   // masked lanes are non-negative: divide lane by lane
                            int32_t a[16], b[16];
                            _mm512_storeu_si512(a, iy);
                            _mm512_storeu_si512(b, ix);
                            for (int l = 0; l < 16; l++) { a[l] = a[l] >= 0 ? a[l] / g->up : 0; b[l] = b[l] >= 0 ? b[l] / g->up : 0; }
                            iy = _mm512_loadu_si512(a);
                            ix = _mm512_loadu_si512(b);
                        }
                        __m512i idx = _mm512_add_epi32(_mm512_mullo_epi32(iy, _mm512_set1_epi32(Ws)), ix);
                        val = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, xc, 4);
                    }
                    _mm512_store_ps(d + 16 * v, val);
                }
            }
            kx = 0;
            if (++ky == K) { ky = 0; c++; }
        }
    }
}
#endif

// ---------------------------------------------------------------------------------------------
// kernel choice

static const GemmArch ARCH_SCALAR = {"scalar", pack_panels, pack_panels, pack_im2col_plain,
                                     {{kernel_scalar, SCALAR_MR, SCALAR_NR}}};
#if GEMM_X86
static const GemmArch ARCH_AVX2 = {"avx2", pack_panels, pack_panels, pack_im2col_plain, {{kernel_avx2, 6, 16}}};
static const GemmArch ARCH_AVX512 = {"avx512", pack_avx512, pack16_avx512, pack_im2col_avx512,
                                     {{kernel_avx512_12x32, 12, 32}, {kernel_avx512_8x48, 8, 48}}};
#endif
static const GemmArch* gemm_arch_chosen;
static pthread_once_t gemm_arch_once = PTHREAD_ONCE_INIT;

static void gemm_arch_choose(void) {
    const char* want = getenv("INSTASTYLE_GEMM");
    gemm_arch_chosen = &ARCH_SCALAR;
    if (want && strcmp(want, "scalar") == 0) return;
#if GEMM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        gemm_arch_chosen = &ARCH_AVX2;
    if (want && strcmp(want, "avx2") == 0) return;
    if (__builtin_cpu_supports("avx512f")) gemm_arch_chosen = &ARCH_AVX512;
#endif
}

static const GemmArch* gemm_arch(void) {
    pthread_once(&gemm_arch_once, gemm_arch_choose);
    return gemm_arch_chosen;
}

const char* sgemm_kernel_name(void) { return gemm_arch()->name; }

// ---------------------------------------------------------------------------------------------
// the blocked loops

// An operand as the packing routines read it: X(r, k) = x[r·rs + k·cs] (floats, or fp16 when
// f16), or the im2col matrix im (B only; r = pixel, k = (c, ky, kx)). r runs over op(A)'s rows
// or op(B)'s columns.
typedef struct Operand {
    const void* x;
    int f16;
    const GemmIm2col* im;
    const GemmPacked* packed;   // already in panels: used in place
    size_t rs, cs;
} Operand;

// One sgemm call.
typedef struct Gemm {
    const GemmArch* arch;
    GemmKernel kern;
    int M, N, K;
    float alpha, beta;
    Operand A, B;
    const float* bias;    // added after the product: bias[i] to row i (bias_rows), or bias[j] to column j
    int bias_rows;
    float* C;
    int ldc;
    int split_m;          // threads split rows (1) or columns (0) into whole micro-tiles
} Gemm;

// C[m×n] += bias (K = 0 or alpha = 0; otherwise the microkernel adds it as it stores each tile).
static void tile_bias(float* c, int ldc, const float* bias, int bias_rows, int m, int n) {
    for (int i = 0; i < m; i++) {
        float* ci = c + (size_t)i * ldc;
        if (bias_rows) for (int j = 0; j < n; j++) ci[j] += bias[i];
        else for (int j = 0; j < n; j++) ci[j] += bias[j];
    }
}

// Packs rows [r0, r0+mn) × columns [k0, k0+kc) of the operand into w-wide panels; returns dst, or
// for a packed operand the panels where they already are (KC-block at k0 starts at k0·rows
// rounded up to w; rows r0.. of it at r0·kc).
static const float* pack_operand(const GemmArch* g, const Operand* o, int r0, int k0, int mn, int kc, int w, float* dst) {
    if (o->packed) {
        const GemmPacked* pk = o->packed;
        return pk->data + (size_t)k0 * ((pk->rows + pk->w - 1) / pk->w * pk->w) + (size_t)r0 * kc;
    }
    if (o->im) {
        g->pack_im2col(o->im, r0, k0, mn, kc, w, dst);
        return dst;
    }
    size_t off = (size_t)r0 * o->rs + (size_t)k0 * o->cs;
    const void* x = o->f16 ? (const void*)((const uint16_t*)o->x + off) : (const void*)((const float*)o->x + off);
    (o->f16 ? g->pack16 : g->pack)(x, o->f16, o->rs, o->cs, mn, kc, w, dst);
    return dst;
}

// Each thread's pack buffers, allocated on its first sgemm (freed when a worker exits).
static float* pack_buffer(void) {
    if (!tl_pack) tl_pack = xmalloc_large(GEMM_A_BYTES + GEMM_B_BYTES + 64);
    return (float*)(((uintptr_t)tl_pack + 63) & ~(uintptr_t)63);
}

static int round_down(int x, int to) { return x / to * to; }

static int kc_block(int K) {         // KC-blocks of near-equal size, from K alone
    int kblocks = (K + GEMM_KC_MAX - 1) / GEMM_KC_MAX;
    return (K + kblocks - 1) / kblocks;
}

// The five loops over C[i0:i1, j0:j1].
static void gemm_blocked(const Gemm* p, int i0, int i1, int j0, int j1) {
    int mr = p->kern.mr, nr = p->kern.nr;
    int kcb = kc_block(p->K);
    int mcb = round_down(GEMM_A_BYTES / (int)sizeof(float) / kcb, mr);
    int ncb = round_down(GEMM_B_BYTES / (int)sizeof(float) / kcb, nr);
    if (p->A.packed) mcb = i1 - i0;           // packed panels need no blocking copy
    if (p->B.packed) ncb = j1 - j0;
    float* Abuf = pack_buffer();
    float* Bbuf = Abuf + GEMM_A_BYTES / sizeof(float);
    for (int jc = j0; jc < j1; jc += ncb) {
        int nc = imin(ncb, j1 - jc);
        for (int pc = 0; pc < p->K; pc += kcb) {
            int kc = imin(kcb, p->K - pc);
            float beta = pc == 0 ? p->beta : 1.0f;
            const float* Bp = pack_operand(p->arch, &p->B, jc, pc, nc, kc, nr, Bbuf);
            for (int ic = i0; ic < i1; ic += mcb) {
                int mc = imin(mcb, i1 - ic);
                const float* Ap = pack_operand(p->arch, &p->A, ic, pc, mc, kc, mr, Abuf);
                for (int jr = 0; jr < nc; jr += nr)
                    for (int ir = 0; ir < mc; ir += mr) {
                        float* c = p->C + (size_t)(ic + ir) * p->ldc + jc + jr;
                        int m = imin(mr, mc - ir), n = imin(nr, nc - jr);
                        const float* bias = p->bias && pc + kc == p->K ? p->bias : NULL;   // after the last block
                        p->kern.fn(kc, Ap + (size_t)ir * kc, Bp + (size_t)jr * kc, c, p->ldc, p->alpha, beta, m, n,
                                   bias && p->bias_rows ? bias + ic + ir : NULL, bias && !p->bias_rows ? bias + jc + jr : NULL);
                    }
            }
        }
    }
}

// parallel_for body: [begin, end) counts micro-tile rows (split_m) or columns.
static void gemm_task(void* ctx, int begin, int end) {
    const Gemm* p = ctx;
    if (p->split_m)
        gemm_blocked(p, begin * p->kern.mr, imin(end * p->kern.mr, p->M), 0, p->N);
    else
        gemm_blocked(p, 0, p->M, begin * p->kern.nr, imin(end * p->kern.nr, p->N));
}

static atomic_ullong gemm_flops;      // 2·M·N·K over all calls

double sgemm_flop_count(void) {    // the GPU's GEMM-shaped calls count there
    return (double)atomic_load(&gemm_flops) + (g_device == DEVICE_CUDA ? cuda_flop_count() : 0.0);
}

// ---------------------------------------------------------------------------------------------
// device choice (see instastyle.h)

int g_device = DEVICE_CPU;

void device_select(const char* name) {
    if (!name) name = getenv("INSTASTYLE_DEVICE");
    if (!name || !*name || strcmp(name, "cpu") == 0) { g_device = DEVICE_CPU; return; }
    CHECK(strcmp(name, "cuda") == 0, "unknown device '%s' (expected cpu or cuda)", name);
    cuda_init();                       // without CUDA=1: exits naming the remedy
    g_device = DEVICE_CUDA;
}

static double padded_area(int M, int N, GemmKernel k) {
    return (double)((M + k.mr - 1) / k.mr * k.mr) * ((N + k.nr - 1) / k.nr * k.nr);
}

static Operand operand(GemmOperand o, int is_b, int rows, int cols) {
    int ld = o.trans ? rows : cols;      // the stored matrix is rows×cols, or its transpose
    CHECK(!o.im2col || is_b, "sgemm_op: an im2col operand must be B");
    if (o.packed) {
        CHECK(o.packed->rows == (is_b ? cols : rows) && o.packed->K == (is_b ? rows : cols),
              "sgemm_op: packed %s is %d×%d, the product needs %d×%d", is_b ? "B" : "A", o.packed->rows, o.packed->K,
              is_b ? cols : rows, is_b ? rows : cols);
        return (Operand){NULL, 0, NULL, o.packed, 0, 0};
    }
    CHECK(o.im2col || o.ld >= ld, "sgemm_op: leading dimension %d of %s too small (needs %d)", o.ld, is_b ? "B" : "A", ld);
    if (o.im2col) return (Operand){NULL, 0, o.im2col, NULL, 0, 0};
    size_t along = o.trans ? 1 : (size_t)o.ld, across = o.trans ? (size_t)o.ld : 1;   // op(X)(i, j) strides
    const void* x = o.f16 ? (const void*)o.f16 : (const void*)o.f32;
    // packing reads A by (row, k) and B by (column, k)
    return is_b ? (Operand){x, o.f16 != NULL, NULL, NULL, across, along} : (Operand){x, o.f16 != NULL, NULL, NULL, along, across};
}

// The microkernel for an M×N product: the one that pads C least, or the one whose panels a
// packed operand already has.
static GemmKernel choose_kernel(const GemmArch* g, int M, int N, const GemmPacked* pa, const GemmPacked* pb) {
    GemmKernel kern = g->kernels[0];
    if (g->kernels[1].fn && padded_area(M, N, g->kernels[1]) < padded_area(M, N, kern)) kern = g->kernels[1];
    for (int i = 0; i < 2 && (pa || pb); i++)
        if (g->kernels[i].fn && (!pa || pa->w == g->kernels[i].mr) && (!pb || pb->w == g->kernels[i].nr)) return g->kernels[i];
    CHECK(!pa && !pb, "sgemm_op: packed operands of panel widths %d, %d fit no %s kernel", pa ? pa->w : 0, pb ? pb->w : 0, g->name);
    return kern;
}

int sgemm_panel_width(int M, int N, int is_b) {
    GemmKernel kern = choose_kernel(gemm_arch(), M, N, NULL, NULL);
    return is_b ? kern.nr : kern.mr;
}

size_t sgemm_pack_floats(int M, int N, int K, int is_b) {
    const GemmArch* g = gemm_arch();
    GemmKernel kern = choose_kernel(g, M, N, NULL, NULL);
    int w = is_b ? kern.nr : kern.mr, rows = is_b ? N : M;
    return (size_t)(rows + w - 1) / w * w * K;
}

void sgemm_pack(GemmPacked* p, float* buf, GemmOperand X, int M, int N, int K, int is_b) {
    const GemmArch* g = gemm_arch();
    GemmKernel kern = choose_kernel(g, M, N, NULL, NULL);
    int w = is_b ? kern.nr : kern.mr, rows = is_b ? N : M, rows_pad = (rows + w - 1) / w * w, kcb = kc_block(K);
    Operand o = operand(X, is_b, is_b ? K : M, is_b ? N : K);
    CHECK((uintptr_t)buf % 64 == 0, "sgemm_pack: buffer not 64-byte aligned");
    *p = (GemmPacked){buf, rows, K, w};
    for (int pc = 0; pc < K; pc += kcb)
        pack_operand(g, &o, 0, pc, rows, imin(kcb, K - pc), w, buf + (size_t)pc * rows_pad);
}

void sgemm_op(int M, int N, int K, float alpha, GemmOperand A, GemmOperand B, float beta, const float* bias,
              int bias_rows, float* C, int ldc) {
    CHECK(M >= 0 && N >= 0 && K >= 0, "sgemm: negative size M=%d N=%d K=%d", M, N, K);
    CHECK(ldc >= N, "sgemm: leading dimension of C too small (N=%d ldc=%d)", N, ldc);
    if (M == 0 || N == 0) return;
    atomic_fetch_add(&gemm_flops, 2ull * (unsigned long long)M * N * K);
    if (K == 0 || alpha == 0.0f) {        // BLAS: A and B are not read, C = beta·C
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float* c = &C[(size_t)i * ldc + j];
                *c = beta == 0.0f ? 0.0f : beta * *c;
            }
        if (bias) tile_bias(C, ldc, bias, bias_rows, M, N);
        return;
    }
    if (B.im2col) {
        const GemmIm2col* g = B.im2col;
        CHECK(K == g->C * g->K * g->K && g->Wo > 0 && g->stride > 0 && g->up >= 1 && g->H % g->up == 0 && g->W % g->up == 0,
              "sgemm_op: im2col of %d×%d×%d (k %d, up %d) for K=%d", g->C, g->H, g->W, g->K, g->up, K);
    }
    const GemmArch* g = gemm_arch();
    GemmKernel kern = choose_kernel(g, M, N, A.packed, B.packed);
    Gemm p = {g, kern, M, N, K, alpha, beta, operand(A, 0, M, K), operand(B, 1, K, N), bias, bias_rows, C, ldc, 1};
    int nt = (double)M * N * K < GEMM_SERIAL_WORK ? 1 : threads_count();
    if (nt == 1) {
        gemm_blocked(&p, 0, M, 0, N);
        return;
    }
    // Split the dimension that leaves the slowest thread the least padded tile area; within 3%,
    // split the longer side (every thread packs all of the other operand).
    int pm = (M + kern.mr - 1) / kern.mr, pn = (N + kern.nr - 1) / kern.nr;
    double work_m = (double)((pm + nt - 1) / nt) * kern.mr * pn * kern.nr;
    double work_n = (double)((pn + nt - 1) / nt) * kern.nr * pm * kern.mr;
    p.split_m = work_m < 0.97 * work_n || (work_n >= 0.97 * work_m && M >= N);
    parallel_for(p.split_m ? pm : pn, gemm_task, &p);
}

void sgemm(int transA, int transB, int M, int N, int K, float alpha,
           const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) {
    CHECK(M >= 0 && N >= 0 && K >= 0, "sgemm: negative size M=%d N=%d K=%d", M, N, K);
    CHECK(ldc >= N && lda >= (transA ? M : K) && ldb >= (transB ? K : N),
          "sgemm: leading dimension too small (M=%d N=%d K=%d lda=%d ldb=%d ldc=%d)",
          M, N, K, lda, ldb, ldc);
    if (g_device == DEVICE_CUDA) { sgemm_cuda(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); return; }
    sgemm_op(M, N, K, alpha, (GemmOperand){.f32 = A, .ld = lda, .trans = transA}, (GemmOperand){.f32 = B, .ld = ldb, .trans = transB},
             beta, NULL, 0, C, ldc);
}

// ---------------------------------------------------------------------------------------------
// peak probe: 12 independent FMA chains (enough to cover latency × pipes on current cores)

#define PROBE_CHAINS 12

// Each probe runs iters × PROBE_CHAINS multiply-adds and returns a sum of the chains (so that
// the loop is not optimised away).
static float probe_scalar(long iters) {
    float acc[PROBE_CHAINS], m = 0.999f, x = 1e-3f, sum = 0.0f;
    for (int i = 0; i < PROBE_CHAINS; i++) acc[i] = (float)i;
    for (long it = 0; it < iters; it++)
        for (int i = 0; i < PROBE_CHAINS; i++) acc[i] = acc[i] * m + x;
    for (int i = 0; i < PROBE_CHAINS; i++) sum += acc[i];
    return sum;
}

#if GEMM_X86
__attribute__((target("avx2,fma")))
static float probe_avx2(long iters) {
    __m256 acc[PROBE_CHAINS], m = _mm256_set1_ps(0.999f), x = _mm256_set1_ps(1e-3f);
    float sum = 0.0f;
    for (int i = 0; i < PROBE_CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
    for (long it = 0; it < iters; it++) {
        UNROLL
        for (int i = 0; i < PROBE_CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], m, x);
    }
    float lanes[8];
    for (int i = 1; i < PROBE_CHAINS; i++) acc[0] = _mm256_add_ps(acc[0], acc[i]);
    _mm256_storeu_ps(lanes, acc[0]);
    for (int l = 0; l < 8; l++) sum += lanes[l];
    return sum;
}

__attribute__((target("avx512f")))
static float probe_avx512(long iters) {
    __m512 acc[PROBE_CHAINS], m = _mm512_set1_ps(0.999f), x = _mm512_set1_ps(1e-3f);
    float sum = 0.0f;
    for (int i = 0; i < PROBE_CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    for (long it = 0; it < iters; it++) {
        UNROLL
        for (int i = 0; i < PROBE_CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], m, x);
    }
    float lanes[16];
    for (int i = 1; i < PROBE_CHAINS; i++) acc[0] = _mm512_add_ps(acc[0], acc[i]);
    _mm512_storeu_ps(lanes, acc[0]);
    for (int l = 0; l < 16; l++) sum += lanes[l];
    return sum;
}
#endif

typedef struct Probe {
    float (*fn)(long iters);
    double lanes;        // floats per multiply-add
    long iters;
} Probe;

static void probe_task(void* ctx, int begin, int end) {
    const Probe* pr = ctx;
    for (int i = begin; i < end; i++) {
        volatile float sink = pr->fn(pr->iters);
        (void)sink;
    }
}

// Best of 5 runs of ~40 ms on `threads` pool threads (threads beyond threads_count() share
// cores); the best run is the one least disturbed by other processes.
double cpu_peak_gflops(int threads) {
    Probe pr = {probe_scalar, 1, 1 << 12};
#if GEMM_X86
    const char* name = sgemm_kernel_name();
    if (strcmp(name, "avx2") == 0) pr = (Probe){probe_avx2, 8, 1 << 12};
    if (strcmp(name, "avx512") == 0) pr = (Probe){probe_avx512, 16, 1 << 12};
#endif
    double t;
    for (;;) {                             // calibrate to ~40 ms (this also warms up)
        t = time_now();
        probe_task(&pr, 0, 1);
        t = time_now() - t;
        if (t > 0.01) break;
        pr.iters *= 2;
    }
    pr.iters = (long)(pr.iters * 0.04 / t);
    if (threads < 1) threads = 1;
    double best = 0.0;
    for (int run = 0; run < 5; run++) {
        t = time_now();
        parallel_for(threads, probe_task, &pr);
        t = time_now() - t;
        double gflops = 2.0 * PROBE_CHAINS * pr.lanes * pr.iters * threads / t * 1e-9;
        if (gflops > best) best = gflops;
    }
    return best;
}
