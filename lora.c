// lora.c: everything trainable in InstaStyle's prompt refinement (paper §3.3).
//   - LoRA side paths on the cross-attention to_k / to_v: y = W·x + scale·B(A·x) (Hu et al. 2021,
//     eq. 3; scale = alpha / rank), never merged into W while training; or, as the official code's
//     "custom diffusion" mode, the full to_k / to_v weights of every attn2;
//   - the rows of the added tokens <style1> (<style2>) in CLIP's embedding table;
//   - the loss: plain MSE, or the official masked loss ((l·mask).sum([1,2,3]) / mask.sum([1,2,3])).mean();
//   - torch.optim.AdamW (decoupled weight decay, bias correction) after torch's clip_grad_norm_;
//   - the train step, checkpoints that resume bit for bit, and files others load (kohya/A1111 LoRA,
//     one-tensor embeddings), read back by trained_apply.
// Left out: dropout on the LoRA input, per-module ranks, multi-vector embeddings, LoRA on other
// layers (imported files that carry them are reported, not applied).
#include "instastyle.h"

#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------------------------
// LoRA side path: out[M, out] += scale · h · upᵀ with h[M, r] = x[M, in] · downᵀ.

void lora_forward_save(const LoraPair* lp, float* out, float* h, const float* x, int M) {
    linear_forward(h, x, lp->down, NULL, M, lp->in, lp->rank);
    sgemm(0, 1, M, lp->out, lp->rank, lp->scale, h, lp->rank, lp->up, lp->rank, 1.0f, out, lp->out);
}

void lora_forward(const LoraPair* lp, float* out, const float* x, int M, Arena* scratch) {
    size_t mark = arena_mark(scratch);
    lora_forward_save(lp, out, arena_alloc(scratch, (size_t)M * lp->rank), x, M);
    arena_reset(scratch, mark);
}

// dup += scale·doutᵀ·h;  dh = scale·dout·up;  ddown += dhᵀ·x;  dx += dh·down.
void lora_backward(const LoraPair* lp, float* dx, const float* dout, const float* h, const float* x, int M,
                   Arena* scratch) {
    size_t mark = arena_mark(scratch);
    float* dh = arena_alloc(scratch, (size_t)M * lp->rank);
    if (lp->dup) sgemm(1, 0, lp->out, lp->rank, M, lp->scale, dout, lp->out, h, lp->rank, 1.0f, lp->dup, lp->rank);
    sgemm(0, 0, M, lp->rank, lp->out, lp->scale, dout, lp->out, lp->up, lp->rank, 0.0f, dh, lp->rank);
    linear_backward(dx, lp->ddown, NULL, dh, x, lp->down, M, lp->in, lp->rank);
    arena_reset(scratch, mark);
}

// ----------------------------------------------------------------------------------------------
// loss. Plain: L = Σ d² / (N·C·HW), dL/dpred = 2d / (N·C·HW), d = pred − target.
// Masked: L = (1/N) Σ_n Σ_{c,p} m_np·d² / Σ_p m_np, dL/dpred = 2·m·d / (N·Σ_p m_np).

float loss_mse(float* dpred, const float* pred, const float* target, const float* mask, int N, int C, int HW) {
    double total = 0;
    size_t per = (size_t)C * HW;
    for (int n = 0; n < N; n++) {
        double sum = 0, msum = mask ? 0 : (double)N * per;   // the plain loss's denominator, per sample
        if (mask) for (int p = 0; p < HW; p++) msum += mask[(size_t)n * HW + p];
        CHECK(msum > 0, "masked loss: the mask of sample %d is all zero", n);
        float coef = (float)(2.0 / (mask ? N * msum : msum));
        for (size_t i = 0; i < per; i++) {
            size_t e = (size_t)n * per + i;
            float m = mask ? mask[(size_t)n * HW + i % HW] : 1.0f, d = pred[e] - target[e];
            sum += (double)m * d * d;
            if (dpred) dpred[e] += coef * m * d;
        }
        total += mask ? sum / msum / N : sum / msum;
    }
    return (float)total;
}

// ----------------------------------------------------------------------------------------------
// trainable parameters

static void tensor_add(TrainParams* tp, const char* name, size_t* off, int d0, int d1) {
    TrainTensor* t = &tp->t[tp->nt++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->off = *off;
    t->numel = (size_t)d0 * (d1 ? d1 : 1);
    t->ndim = d1 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1;
    *off += t->numel;
}

void train_params_init(TrainParams* tp, StableDiffusion* sd, TrainMode mode, int ntok, const int* init_ids,
                       int rank, float alpha, Rng* rng) {
    CHECK(ntok >= 0 && ntok <= TRAIN_MAX_TOKENS, "at most %d trained tokens, got %d", TRAIN_MAX_TOKENS, ntok);
    CHECK(mode == TRAIN_KV || (rank >= 0 && rank <= 1024), "LoRA rank must be in [0, 1024], got %d", rank);
    memset(tp, 0, sizeof *tp);
    tp->mode = mode;
    tp->ntok = ntok;
    tp->hidden = sd->clip.cfg.hidden;
    tp->rank = mode == TRAIN_LORA ? rank : 0;
    tp->alpha = alpha;
    tp->scale = tp->rank ? alpha / (float)tp->rank : 0.0f;
    for (int k = 0; k < ntok; k++) snprintf(tp->tokens[k], sizeof tp->tokens[k], "<style%d>", k + 1);
    int L = unet_cross_attentions(&sd->unet, NULL, NULL, 0);
    Attention** attn = xmalloc((size_t)(L + 1) * sizeof(Attention*));
    char (*paths)[128] = xmalloc((size_t)(L + 1) * sizeof *paths);
    unet_cross_attentions(&sd->unet, attn, paths, L);
    tp->nlayers = L;
    tp->attn = attn;
    tp->paths = paths;
    tp->lora = xcalloc((size_t)2 * L, sizeof(LoraPair));
    tp->kv = xcalloc((size_t)2 * L, sizeof(float*));
    tp->dkv = xcalloc((size_t)2 * L, sizeof(float*));
    tp->base = xcalloc((size_t)2 * L, sizeof(float*));
    tp->t = xcalloc((size_t)4 * L + 1, sizeof(TrainTensor));
    size_t off = 0;
    char name[160];
    if (ntok) tensor_add(tp, "token_embeddings", &off, ntok, tp->hidden);
    for (int l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++) {
            const Linear* lin = kv ? &attn[l]->to_v : &attn[l]->to_k;
            const char* which = kv ? "to_v" : "to_k";
            tp->base[2 * l + kv] = lin->w;
            if (mode == TRAIN_KV) {
                snprintf(name, sizeof name, "%s.%s.weight", paths[l], which);
                tensor_add(tp, name, &off, lin->out, lin->in);
            } else if (tp->rank) {
                tp->lora[2 * l + kv] = (LoraPair){NULL, NULL, NULL, NULL, tp->rank, lin->in, lin->out, tp->scale};
                snprintf(name, sizeof name, "%s.%s.lora_down", paths[l], which);
                tensor_add(tp, name, &off, tp->rank, lin->in);
                snprintf(name, sizeof name, "%s.%s.lora_up", paths[l], which);
                tensor_add(tp, name, &off, lin->out, tp->rank);
            }
        }
    tp->n = off;
    CHECK(size_mul(off, 4, &off) == 0, "trainable parameters: size overflow");
    tp->mem = xcalloc(off ? off : 1, sizeof(float));
    tp->values = tp->mem;
    tp->grads = tp->mem + tp->n;
    tp->m = tp->mem + 2 * tp->n;
    tp->v = tp->mem + 3 * tp->n;
    for (int i = 0; i < tp->nt; i++) { tp->t[i].val = tp->values + tp->t[i].off; tp->t[i].grad = tp->grads + tp->t[i].off; }
    int i = 0;
    if (ntok) {
        tp->tok = tp->t[0].val;
        tp->dtok = tp->t[0].grad;
        for (int k = 0; k < ntok && init_ids; k++) {
            CHECK(init_ids[k] >= 0 && init_ids[k] < sd->clip.cfg.vocab_size, "init token id %d outside the vocabulary", init_ids[k]);
            memcpy(tp->tok + (size_t)k * tp->hidden, sd->clip.token_embedding + (size_t)init_ids[k] * tp->hidden,
                   (size_t)tp->hidden * sizeof(float));
        }
        i = 1;
    }
    for (int l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++) {
            if (mode == TRAIN_KV) {   // start from the frozen weights
                TrainTensor* t = &tp->t[i++];
                memcpy(t->val, tp->base[2 * l + kv], t->numel * sizeof(float));
                tp->kv[2 * l + kv] = t->val;
                tp->dkv[2 * l + kv] = t->grad;
            } else if (tp->rank) {    // diffusers LoRALinearLayer: down ~ N(0, 1/rank²), up = 0
                LoraPair* lp = &tp->lora[2 * l + kv];
                TrainTensor *down = &tp->t[i++], *up = &tp->t[i++];
                lp->down = down->val; lp->ddown = down->grad;
                lp->up = up->val; lp->dup = up->grad;
                if (rng) {
                    rng_normal(rng, lp->down, down->numel);
                    for (size_t e = 0; e < down->numel; e++) lp->down[e] /= (float)tp->rank;
                }
            }
        }
}

void train_params_free(TrainParams* tp) {
    free(tp->mem); free(tp->attn); free(tp->paths); free(tp->lora); free(tp->kv); free(tp->dkv);
    free(tp->base); free(tp->t);
    memset(tp, 0, sizeof *tp);
}

void train_attach(TrainParams* tp, StableDiffusion* sd) {
    for (int l = 0; l < tp->nlayers; l++) {
        Attention* a = tp->attn[l];
        if (tp->mode == TRAIN_KV) {
            a->to_k.w = tp->kv[2 * l]; a->to_k.dw = tp->dkv[2 * l];
            a->to_v.w = tp->kv[2 * l + 1]; a->to_v.dw = tp->dkv[2 * l + 1];
        } else if (tp->rank) {
            a->lora_k = &tp->lora[2 * l];
            a->lora_v = &tp->lora[2 * l + 1];
        }
    }
    sd->clip.added = tp->ntok ? tp->tok : NULL;
    sd->clip.n_added = tp->ntok;
    if (sd->tok) tokenizer_clear_added(sd->tok);   // the trained tokens are the only added ones
    for (int k = 0; k < tp->ntok && sd->tok; k++) {
        int id = tokenizer_add_token(sd->tok, tp->tokens[k]);
        CHECK(id == tokenizer_vocab_size(sd->tok) + k, "token %s got id %d, expected %d (another added token is in the way)",
              tp->tokens[k], id, tokenizer_vocab_size(sd->tok) + k);
    }
    tp->attached = 1;
}

void train_detach(TrainParams* tp, StableDiffusion* sd) {
    if (!tp->attached) return;
    for (int l = 0; l < tp->nlayers; l++) {
        Attention* a = tp->attn[l];
        a->to_k.w = tp->base[2 * l]; a->to_k.dw = NULL;
        a->to_v.w = tp->base[2 * l + 1]; a->to_v.dw = NULL;
        a->lora_k = a->lora_v = NULL;
    }
    sd->clip.added = NULL;
    sd->clip.n_added = 0;
    tp->attached = 0;
}

// ----------------------------------------------------------------------------------------------
// train step: z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε (DDPMScheduler.add_noise), L = loss(ε_θ(z_t, t, c), ε).

float train_step(StableDiffusion* sd, TrainParams* tp, const float* alphas_cumprod, const TrainBatch* b,
                 Arena* scratch, Arena* saved) {
    const UNet* u = &sd->unet;
    int N = b->N, C = u->cfg.in_channels, HW = b->h * b->w, T = CLIP_MAX_LENGTH, D = u->cfg.cross_dim;
    size_t smark = arena_mark(saved), mark = arena_mark(scratch), n = (size_t)C * HW;
    CHECK(sd->clip.cfg.hidden == D, "text encoder width %d != UNet cross_attention_dim %d", sd->clip.cfg.hidden, D);
    CHECK(u->cfg.out_channels == C, "UNet predicts %d channels of noise for %d latent channels", u->cfg.out_channels, C);
    memset(tp->grads, 0, tp->n * sizeof(float));
    float* ctx = arena_alloc(saved, (size_t)N * T * D);
    ClipSaved* cs = NULL;
    if (tp->ntok) cs = clip_forward_train(&sd->clip, ctx, b->ids, N, T, scratch, saved);
    else clip_forward(&sd->clip, ctx, b->ids, N, T, scratch);
    float* noisy = arena_alloc(scratch, (size_t)N * n);
    float* t = arena_alloc(scratch, (size_t)N);
    for (int i = 0; i < N; i++) {
        CHECK(b->timesteps[i] >= 0 && b->timesteps[i] < sd->sched.train_steps, "timestep %d outside [0, %d)",
              b->timesteps[i], sd->sched.train_steps);
        float a = alphas_cumprod[b->timesteps[i]], sa = sqrtf(a), sb = sqrtf(1.0f - a);
        t[i] = (float)b->timesteps[i];
        for (size_t e = 0; e < n; e++) {
            float x0 = sa * b->latent0[i * n + e], ns = sb * b->noise[i * n + e];
            noisy[i * n + e] = x0 + ns;
        }
    }
    float* eps = arena_alloc(scratch, (size_t)N * u->cfg.out_channels * HW);
    UNetSaved* us = unet_forward_train(u, eps, noisy, t, ctx, N, b->h, b->w, T, scratch, saved);
    float* deps = arena_zalloc(scratch, (size_t)N * n);
    float loss = loss_mse(deps, eps, b->noise, b->mask, N, C, HW);
    float* dctx = tp->ntok ? arena_zalloc(scratch, (size_t)N * T * D) : NULL;
    unet_backward(u, us, dctx, deps, scratch);
    if (cs) clip_backward(&sd->clip, cs, tp->dtok, dctx, scratch);
    arena_reset(scratch, mark);
    arena_reset(saved, smark);
    return loss;
}

// ----------------------------------------------------------------------------------------------
// optimiser: torch.nn.utils.clip_grad_norm_ then torch.optim.AdamW.step (torch 1.13, foreach off),
// in float32 like the reference, with its Python-double scalars rounded to float where torch does.

AdamW adamw_defaults(void) { return (AdamW){1e-5, 0.9, 0.999, 1e-8, 0.0, 0.0, 0}; }

float grad_clip_norm(float* const* grads, const size_t* n, int P, float max_norm) {
    double total = 0;
    for (int i = 0; i < P; i++) {
        double s = 0;
        for (size_t e = 0; e < n[i]; e++) s += (double)grads[i][e] * grads[i][e];
        float norm = (float)sqrt(s);                 // torch.norm(g) per tensor
        total += (double)norm * norm;
    }
    float tn = (float)sqrt(total);                   // torch.norm(torch.stack(norms))
    if (max_norm > 0) {
        float c = max_norm / (tn + 1e-6f);
        if (c > 1.0f) c = 1.0f;
        for (int i = 0; i < P; i++)
            for (size_t e = 0; e < n[i]; e++) grads[i][e] *= c;
    }
    return tn;
}

// k = step: p ← p·(1 − lr·wd); m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
// p ← p − (lr / (1 − β1^k)) · m / (√v / √(1 − β2^k) + eps).
void adamw_update(float* p, const float* g, float* m, float* v, size_t n, const AdamW* o, double lr, int step) {
    float decay = (float)(1.0 - lr * o->weight_decay), b1 = (float)o->beta1, b2 = (float)o->beta2;
    float a1 = (float)(1.0 - o->beta1), a2 = (float)(1.0 - o->beta2), eps = (float)o->eps;
    float step_size = (float)(lr / (1.0 - pow(o->beta1, step)));
    float bc2_sqrt = (float)sqrt(1.0 - pow(o->beta2, step));
    for (size_t i = 0; i < n; i++) {
        p[i] *= decay;
        m[i] = m[i] * b1 + a1 * g[i];
        v[i] = v[i] * b2 + a2 * g[i] * g[i];
        float denom = sqrtf(v[i]) / bc2_sqrt + eps;
        p[i] += -step_size * m[i] / denom;
    }
}

float train_update(TrainParams* tp, const AdamW* opt) {
    float** g = xmalloc((size_t)(tp->nt + 1) * sizeof(float*));
    size_t* n = xmalloc((size_t)(tp->nt + 1) * sizeof(size_t));
    for (int i = 0; i < tp->nt; i++) { g[i] = tp->t[i].grad; n[i] = tp->t[i].numel; }
    float norm = grad_clip_norm(g, n, tp->nt, (float)opt->max_grad_norm);
    free(g);
    free(n);
    tp->step++;
    double lr = opt->warmup > 0 && tp->step < opt->warmup ? opt->lr * tp->step / opt->warmup : opt->lr;
    adamw_update(tp->values, tp->grads, tp->m, tp->v, tp->n, opt, lr, tp->step);
    return norm;
}

// ----------------------------------------------------------------------------------------------
// files. The checkpoint (format "instastyle-refine") holds every TrainTensor under its own name,
// "adamw.m.<name>" / "adamw.v.<name>", "rng" (I32 [625]: MT19937 state + index) and metadata
// mode, rank, alpha, tokens, step.

#define TRAIN_FORMAT "instastyle-refine"

static void add_f32(StWriter* w, const char* name, const float* data, int ndim, const int* shape) {
    int64_t s[2] = {shape[0], ndim > 1 ? shape[1] : 1};
    stw_add(w, name, DT_F32, data, ndim, s);
}

int train_save(const TrainParams* tp, const char* path, const Rng* rng, const char* const* meta) {
    StWriter* w = stw_new();
    char buf[256], name[200];
    stw_meta(w, "format", TRAIN_FORMAT);
    stw_meta(w, "mode", tp->mode == TRAIN_KV ? "kv" : "lora");
    snprintf(buf, sizeof buf, "%d", tp->rank); stw_meta(w, "rank", buf);
    snprintf(buf, sizeof buf, "%.9g", tp->alpha); stw_meta(w, "alpha", buf);
    snprintf(buf, sizeof buf, "%d", tp->step); stw_meta(w, "step", buf);
    snprintf(buf, sizeof buf, "[");
    for (int k = 0; k < tp->ntok; k++)
        snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "%s\"%s\"", k ? "," : "", tp->tokens[k]);
    snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "]");
    stw_meta(w, "tokens", buf);
    for (int i = 0; meta && meta[i] && meta[i + 1]; i += 2) stw_meta(w, meta[i], meta[i + 1]);
    for (int i = 0; i < tp->nt; i++) {
        const TrainTensor* t = &tp->t[i];
        add_f32(w, t->name, t->val, t->ndim, t->shape);
        snprintf(name, sizeof name, "adamw.m.%s", t->name);
        add_f32(w, name, tp->m + t->off, t->ndim, t->shape);
        snprintf(name, sizeof name, "adamw.v.%s", t->name);
        add_f32(w, name, tp->v + t->off, t->ndim, t->shape);
    }
    if (rng) {
        int32_t state[625];
        memcpy(state, rng->mt, sizeof rng->mt);
        state[624] = rng->index;
        int64_t shape[1] = {625};
        stw_add(w, "rng", DT_I32, state, 1, shape);
    }
    int rc = stw_write(w, path);
    stw_free(w);
    return rc;
}

// Copies st's tensor `name` into dst (numel floats); -1 + error_last() when missing or mis-shaped.
static int st_copy(SafeTensors* st, const char* name, float* dst, size_t numel) {
    StEntry* e = st_find(st, name);
    size_t have = 1;
    for (int d = 0; e && d < e->ndim; d++) have *= (size_t)e->shape[d];
    if (!e || have != numel) {
        error_set("%s: tensor '%s' %s (expected %zu values)", st->path, name, e ? "has the wrong size" : "is missing", numel);
        return -1;
    }
    e->used++;
    memcpy(dst, st_floats(st, e), numel * sizeof(float));
    return 0;
}

static int tokens_from_meta(SafeTensors* st, char tokens[][32], int cap) {
    const char* js = st_meta(st, "tokens");
    Json* j = js ? json_parse(js, strlen(js)) : NULL;
    int n = 0;
    for (int i = 0; j && j->type == JSON_ARRAY && i < j->count && n < cap; i++)
        if (j->items[i].type == JSON_STRING && j->items[i].len < 32) snprintf(tokens[n++], 32, "%s", j->items[i].string);
    json_free(j);
    return n;
}

// Rebuilds tp from an opened checkpoint; optimiser state and rng only when `resume`.
static int train_from_st(TrainParams* tp, StableDiffusion* sd, SafeTensors* st, Rng* rng, int resume) {
    const char* mode = st_meta(st, "mode");
    char tokens[TRAIN_MAX_TOKENS][32];
    int ntok = tokens_from_meta(st, tokens, TRAIN_MAX_TOKENS);
    int rank = atoi(st_meta(st, "rank") ? st_meta(st, "rank") : "0");
    float alpha = (float)atof(st_meta(st, "alpha") ? st_meta(st, "alpha") : "1");
    if (!mode || (strcmp(mode, "lora") && strcmp(mode, "kv")) || rank < 0 || rank > 1024) {
        error_set("%s: not a checkpoint of 'refine' (metadata mode/rank missing or wrong)", st->path);
        return -1;
    }
    train_params_init(tp, sd, strcmp(mode, "kv") == 0 ? TRAIN_KV : TRAIN_LORA, ntok, NULL, rank, alpha, NULL);
    for (int k = 0; k < ntok; k++) memcpy(tp->tokens[k], tokens[k], sizeof tokens[k]);
    tp->step = atoi(st_meta(st, "step") ? st_meta(st, "step") : "0");
    char name[200];
    for (int i = 0; i < tp->nt; i++) {
        TrainTensor* t = &tp->t[i];
        if (st_copy(st, t->name, t->val, t->numel)) goto fail;
        snprintf(name, sizeof name, "adamw.m.%s", t->name);
        if (resume && st_copy(st, name, tp->m + t->off, t->numel)) goto fail;
        snprintf(name, sizeof name, "adamw.v.%s", t->name);
        if (resume && st_copy(st, name, tp->v + t->off, t->numel)) goto fail;
    }
    if (resume && rng) {
        StEntry* e = st_find(st, "rng");
        if (!e || e->dtype != DT_I32 || e->ndim != 1 || e->shape[0] != 625) {
            error_set("%s: no RNG state ('rng', I32 [625]) to resume from", st->path);
            goto fail;
        }
        memcpy(rng->mt, st->data + e->begin, sizeof rng->mt);
        memcpy(&rng->index, st->data + e->begin + sizeof rng->mt, sizeof(int32_t));
    }
    return 0;
fail:
    train_params_free(tp);
    return -1;
}

// Token names come from files: each must become a new id (vocab_size + k), so a name that is a
// word of the vocabulary, or a repeated name, is refused here rather than mis-wired later.
static int tokens_check(const TrainParams* tp, StableDiffusion* sd, const char* path) {
    if (!sd->tok) return 0;
    tokenizer_clear_added(sd->tok);
    int ok = 1;
    for (int k = 0; k < tp->ntok && ok; k++) {
        int id = tokenizer_add_token(sd->tok, tp->tokens[k]);
        if (id != tokenizer_vocab_size(sd->tok) + k) {
            error_set("%s: token name '%s' is a word of the vocabulary, repeated, or not valid UTF-8; "
                      "expected a new token such as <style1>", path, tp->tokens[k]);
            ok = 0;
        }
    }
    tokenizer_clear_added(sd->tok);
    return ok ? 0 : -1;
}

int train_load(TrainParams* tp, StableDiffusion* sd, const char* path, Rng* rng) {
    SafeTensors st;
    if (st_open(&st, path)) return -1;
    int rc = train_from_st(tp, sd, &st, rng, 1);
    st_close(&st);
    if (rc == 0 && tokens_check(tp, sd, path) != 0) { train_params_free(tp); return -1; }
    return rc;
}

// "down_blocks.0.attentions.0.transformer_blocks.0.attn2" + "to_k" → kohya's
// "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k".
static void kohya_name(char* out, size_t cap, const char* path, const char* which) {
    snprintf(out, cap, "lora_unet_%s_%s", path, which);
    for (char* p = out; *p; p++) if (*p == '.') *p = '_';
}

int train_export_lora(const TrainParams* tp, const char* path) {
    if (tp->mode == TRAIN_LORA && !tp->rank) { error_set("no LoRA to export (rank 0)"); return -1; }
    StWriter* w = stw_new();
    char base[200], name[240], buf[64];
    snprintf(buf, sizeof buf, "%d", tp->rank);
    if (tp->mode == TRAIN_LORA) { stw_meta(w, "ss_network_dim", buf); snprintf(buf, sizeof buf, "%.9g", tp->alpha); stw_meta(w, "ss_network_alpha", buf); }
    for (int l = 0; l < tp->nlayers; l++)
        for (int kv = 0; kv < 2; kv++) {
            kohya_name(base, sizeof base, tp->paths[l], kv ? "to_v" : "to_k");
            if (tp->mode == TRAIN_KV) {   // .diff = trained − frozen
                const Linear* lin = kv ? &tp->attn[l]->to_v : &tp->attn[l]->to_k;
                size_t n = (size_t)lin->out * lin->in;
                float* d = xmalloc(n * sizeof(float));
                for (size_t e = 0; e < n; e++) d[e] = tp->kv[2 * l + kv][e] - tp->base[2 * l + kv][e];
                snprintf(name, sizeof name, "%s.diff", base);
                add_f32(w, name, d, 2, (int[2]){lin->out, lin->in});
                free(d);
            } else {
                const LoraPair* lp = &tp->lora[2 * l + kv];
                snprintf(name, sizeof name, "%s.lora_down.weight", base);
                add_f32(w, name, lp->down, 2, (int[2]){lp->rank, lp->in});
                snprintf(name, sizeof name, "%s.lora_up.weight", base);
                add_f32(w, name, lp->up, 2, (int[2]){lp->out, lp->rank});
                snprintf(name, sizeof name, "%s.alpha", base);
                stw_add(w, name, DT_F32, &tp->alpha, 0, NULL);
            }
        }
    int rc = stw_write(w, path);
    stw_free(w);
    return rc;
}

int train_export_embedding(const TrainParams* tp, int k, const char* path) {
    if (k < 0 || k >= tp->ntok) { error_set("no trained token %d to export", k + 1); return -1; }
    StWriter* w = stw_new();
    stw_meta(w, "format", "instastyle-embedding");
    stw_meta(w, "token", tp->tokens[k]);
    add_f32(w, "emb_params", tp->tok + (size_t)k * tp->hidden, 2, (int[2]){1, tp->hidden});
    int rc = stw_write(w, path);
    stw_free(w);
    return rc;
}

// ----------------------------------------------------------------------------------------------
// trained_apply: a refine checkpoint replaces whatever was applied; a LoRA / .diff file replaces
// the adapter and keeps applied tokens; an embedding file adds a token and keeps the rest.

// dst ← src's token rows (the first min(ntok) of them, names included) and, when `adapter`, every
// LoRA / K/V tensor of the same name and size.
static void train_copy(TrainParams* dst, const TrainParams* src, int adapter) {
    for (int k = 0; k < src->ntok && k < dst->ntok; k++) {
        memcpy(dst->tok + (size_t)k * dst->hidden, src->tok + (size_t)k * src->hidden, (size_t)dst->hidden * sizeof(float));
        memcpy(dst->tokens[k], src->tokens[k], sizeof dst->tokens[k]);
    }
    for (int i = 0; adapter && i < dst->nt; i++)
        for (int j = 0; j < src->nt; j++)
            if (strcmp(dst->t[i].name, "token_embeddings") && strcmp(dst->t[i].name, src->t[j].name) == 0 &&
                dst->t[i].numel == src->t[j].numel)
                memcpy(dst->t[i].val, src->t[j].val, dst->t[i].numel * sizeof(float));
    if (adapter)
        for (int i = 0; i < 2 * dst->nlayers && dst->mode == TRAIN_LORA && dst->rank == src->rank; i++)
            dst->lora[i].scale = src->lora[i].scale;
}

static int ends_with(const char* s, const char* tail) {
    size_t a = strlen(s), b = strlen(tail);
    return a > b && strcmp(s + a - b, tail) == 0;
}

// A kohya LoRA (or .diff) file: rank from the first lora_down, per-module alpha into each pair's scale.
static int import_lora(TrainParams* tp, StableDiffusion* sd, SafeTensors* st, const TrainParams* old) {
    int rank = -1, is_diff = 0, total = 0, applied = 0;
    for (int i = 0; i < st->n; i++) {
        const StEntry* e = &st->entries[i];
        if (ends_with(e->name, ".lora_down.weight")) { total++; if (rank < 0 && e->ndim >= 1) rank = (int)e->shape[0]; }
        if (ends_with(e->name, ".diff")) { total++; is_diff = 1; }
    }
    if (rank < 0 && !is_diff) rank = 0;
    train_params_init(tp, sd, is_diff ? TRAIN_KV : TRAIN_LORA, old ? old->ntok : 0, NULL, is_diff ? 0 : rank, (float)rank, NULL);
    if (old) train_copy(tp, old, 0);
    char base[200], name[240];
    for (int l = 0; l < tp->nlayers; l++)
        for (int kv = 0; kv < 2; kv++) {
            kohya_name(base, sizeof base, tp->paths[l], kv ? "to_v" : "to_k");
            if (is_diff) {
                const Linear* lin = kv ? &tp->attn[l]->to_v : &tp->attn[l]->to_k;
                size_t n = (size_t)lin->out * lin->in;
                snprintf(name, sizeof name, "%s.diff", base);
                if (!st_find(st, name)) continue;
                if (st_copy(st, name, tp->kv[2 * l + kv], n)) return -1;
                for (size_t e = 0; e < n; e++) tp->kv[2 * l + kv][e] += tp->base[2 * l + kv][e];
                applied++;
                continue;
            }
            LoraPair* lp = &tp->lora[2 * l + kv];
            snprintf(name, sizeof name, "%s.lora_down.weight", base);
            if (!st_find(st, name)) continue;
            if (st_copy(st, name, lp->down, (size_t)lp->rank * lp->in)) return -1;
            snprintf(name, sizeof name, "%s.lora_up.weight", base);
            if (st_copy(st, name, lp->up, (size_t)lp->out * lp->rank)) return -1;
            snprintf(name, sizeof name, "%s.alpha", base);
            StEntry* a = st_find(st, name);
            if (a) {
                a->used++;
                lp->scale = st_floats(st, a)[0] / (float)lp->rank;
                if (!applied) tp->alpha = st_floats(st, a)[0];
            }
            applied++;
        }
    fprintf(stderr, "%s: applied %d / %d LoRA modules%s\n", st->path, applied, total,
            applied < total ? " (only attn2 to_k / to_v are supported; the others are ignored)" : "");
    if (!applied) { error_set("%s: no attn2 to_k / to_v module of this UNet in the file", st->path); return -1; }
    return 0;
}

// A one-tensor embedding ([hidden] or [1, hidden]; "emb_params", "string_to_param.*" or any name).
static int import_embedding(TrainParams* tp, StableDiffusion* sd, SafeTensors* st, const TrainParams* old) {
    const StEntry* e = st->n == 1 ? &st->entries[0] : st_find(st, "emb_params");
    int H = sd->clip.cfg.hidden, ntok = (old ? old->ntok : 0) + 1;
    if (!e || e->ndim < 1 || e->shape[e->ndim - 1] != H || (e->ndim == 2 && e->shape[0] != 1) || e->ndim > 2) {
        error_set("%s: not a LoRA, a refine checkpoint or a one-vector embedding of width %d", st->path, H);
        return -1;
    }
    if (ntok > TRAIN_MAX_TOKENS) { error_set("%s: at most %d trained tokens can be applied", st->path, TRAIN_MAX_TOKENS); return -1; }
    train_params_init(tp, sd, old ? old->mode : TRAIN_LORA, ntok, NULL, old ? old->rank : 0, old ? old->alpha : 1.0f, NULL);
    if (old) train_copy(tp, old, 1);
    memcpy(tp->tok + (size_t)(ntok - 1) * H, st_floats(st, (StEntry*)e), (size_t)H * sizeof(float));
    const char* name = st_meta(st, "token");
    if (name && strlen(name) < 32) snprintf(tp->tokens[ntok - 1], 32, "%s", name);
    fprintf(stderr, "%s: applied 1 / 1 embedding as %s\n", st->path, tp->tokens[ntok - 1]);
    return 0;
}

int trained_apply(StableDiffusion* sd, const char* path) {
    SafeTensors st;
    if (st_open(&st, path)) return -1;
    TrainParams* old = sd->trained;
    TrainParams* tp = xcalloc(1, sizeof *tp);
    const char* fmt = st_meta(&st, "format");
    int lora = 0, rc;
    for (int i = 0; i < st.n; i++) lora |= ends_with(st.entries[i].name, ".lora_down.weight") || ends_with(st.entries[i].name, ".diff");
    if (old) train_detach(old, sd);
    if (fmt && strcmp(fmt, TRAIN_FORMAT) == 0) {
        rc = train_from_st(tp, sd, &st, NULL, 0);
        if (!rc) fprintf(stderr, "%s: applied %d token(s) and %s\n", path, tp->ntok,
                         tp->mode == TRAIN_KV ? "K/V weights" : tp->rank ? "LoRA" : "no adapter");
    } else {
        rc = lora ? import_lora(tp, sd, &st, old) : import_embedding(tp, sd, &st, old);
    }
    st_close(&st);
    if (!rc) rc = tokens_check(tp, sd, path);
    if (rc) {
        if (tp->mem) train_params_free(tp);
        free(tp);
        if (old) train_attach(old, sd);
        return -1;
    }
    if (old) { train_params_free(old); free(old); }
    train_attach(tp, sd);
    sd->trained = tp;
    return 0;
}

// ----------------------------------------------------------------------------------------------
// Ctrl-C and the benchmark

static volatile sig_atomic_t g_interrupted;

static void on_sigint(int sig) {
    g_interrupted = 1;
    signal(sig, SIG_DFL);   // a second Ctrl-C ends the program at once
}

void train_catch_sigint(void) { signal(SIGINT, on_sigint); }
int train_interrupted(void) { return g_interrupted != 0; }

double train_bench_step(int size, int batch, int f16) {
    StableDiffusion sd;
    sd_build_random(&sd, SD_TEXT | SD_UNET | (f16 ? SD_F16 : 0), 7);
    Schedule s;
    schedule_init(&s, &sd.sched, 1);
    int f = 8, h = size / f, w = size / f, C = sd.unet.cfg.in_channels, T = CLIP_MAX_LENGTH;
    int init = 1000;
    Rng rng;
    rng_seed(&rng, 3);
    TrainParams tp;
    train_params_init(&tp, &sd, TRAIN_LORA, 1, &init, 4, 4.0f, &rng);
    train_attach(&tp, &sd);
    size_t n = (size_t)batch * C * h * w;
    float* lat = xmalloc(2 * n * sizeof(float));
    int* ids = xmalloc((size_t)batch * T * sizeof(int));
    int* ts = xmalloc((size_t)batch * sizeof(int));
    rng_normal(&rng, lat, 2 * n);
    for (int i = 0; i < batch * T; i++) ids[i] = i % T == 0 ? 49406 : i % T == 5 ? sd.clip.cfg.vocab_size : i % T > 6 ? 49407 : 320 + i % T;
    for (int i = 0; i < batch; i++) ts[i] = 500;
    TrainBatch b = {batch, h, w, lat, lat + n, ts, NULL, ids};
    Arena scratch, saved;
    arena_init(&scratch, (size_t)256 << 20);
    arena_init(&saved, (size_t)256 << 20);
    AdamW opt = adamw_defaults();
    train_step(&sd, &tp, s.alphas_cumprod, &b, &scratch, &saved);     // warm-up: arena pages, pack buffers
    train_update(&tp, &opt);
    double t0 = time_now();
    train_step(&sd, &tp, s.alphas_cumprod, &b, &scratch, &saved);
    train_update(&tp, &opt);
    double dt = time_now() - t0;
    fprintf(stderr, "train step %dx%d batch %d: saved arena peak %.0f MiB, scratch peak %.0f MiB\n", size, size, batch,
            saved.peak / 1048576.0, scratch.peak / 1048576.0);
    arena_free(&scratch); arena_free(&saved);
    free(lat); free(ids); free(ts);
    train_detach(&tp, &sd);
    train_params_free(&tp);
    schedule_free(&s);
    sd_free(&sd);
    return dt;
}
