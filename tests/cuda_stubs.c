// cuda_stubs.c: the block that goes at the end of nn.c, from "#ifndef USE_CUDA" to "#endif".
// Without make CUDA=1 every entry point of nn_cuda.cu exists and exits with one message, so a
// run that selects the GPU (--device cuda, INSTASTYLE_DEVICE=cuda) stops with the remedy. The
// arguments are handed to a variadic function, which uses them without a cast per parameter.
// This file is not built; the include below only lets it be compiled on its own as a check.
#include "instastyle.h"

#include <stdlib.h>

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
