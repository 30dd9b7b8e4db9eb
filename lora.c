// lora.c: everything trainable in InstaStyle's prompt refinement.
//   - LoRA side paths on the cross-attention to_k / to_v: y = W·x + scale·B(A·x) (Hu et al. 2021,
//     eq. 3; scale = alpha / rank), never merged into W while training;
#include "instastyle.h"

#include <string.h>

void lora_forward(const LoraPair* lp, float* out, const float* x, int M, Arena* scratch) {
    size_t mark = arena_mark(scratch);
    float* h = arena_alloc(scratch, (size_t)M * lp->rank);
    linear_forward(h, x, lp->down, NULL, M, lp->in, lp->rank);
    sgemm(0, 1, M, lp->out, lp->rank, lp->scale, h, lp->rank, lp->up, lp->rank, 1.0f, out, lp->out);
    arena_reset(scratch, mark);
}
