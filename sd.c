// sd.c: the three networks of Stable Diffusion 1.5 and how they are loaded.
//
//   CLIP text encoder  transformers' CLIPTextModel: token + position embeddings, pre-LN layers
//                      x += attn(LN1(x)) (causal mask only), x += fc2(act(fc1(LN2(x)))), final LN.
//   UNet               diffusers' UNet2DConditionModel with SD 1.5's block types: sinusoidal time
//                      embedding + MLP, conv_in, CrossAttnDownBlock2D/DownBlock2D levels,
//                      UNetMidBlock2DCrossAttn, UpBlock2D/CrossAttnUpBlock2D levels with skip
//                      concatenation, GroupNorm + SiLU + conv_out.
//   VAE                diffusers' AutoencoderKL: Encoder → quant_conv → (mean, logvar);
//                      post_quant_conv → Decoder.
//
// Every width, head count, group count, eps and layer count comes from the config.json files
// (or SD 1.5's defaults for an LDM file without configs). Loading follows the module tree: each
// xxx_load builds its children's names and requires each tensor with its expected shape, so a
// tensor name appears once in this file. LDM single files are read through one rename table
// (diffusers name → LDM name), at the end of this file.
//
// Training (prompt refinement): unet_forward_train / clip_forward_train run the same code as the
// inference forwards and keep, in a `saved` arena, what unet_backward / clip_backward read. The
// backward computes activation gradients only, plus the gradients of the trainable tensors (attn2
// LoRA factors or K/V weights, the added-token rows); frozen weights never get gradients, and
// nothing flows into the time embedding or the VAE.
//
// Dimension letters: N batch, C channels, H W spatial, HW = H·W, T tokens, D context width,
// NH heads, HD head size, G groups. Activations are NCHW; token sequences (N, T, C).
// Left out: dropout (p = 0), attention masks for padding (SD passes none), other UNet variants.
#include "instastyle.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

// Builds a tensor name into a char array, failing loudly if it does not fit.
#define NAMEF(buf, ...) CHECK(snprintf(buf, sizeof buf, __VA_ARGS__) < (int)sizeof buf, "tensor name too long")

// ----------------------------------------------------------------------------------------------
// configs

static void read_config(const char* dir, const char* sub, Json** out) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s/%s", dir, sub,
             strcmp(sub, "scheduler") == 0 ? "scheduler_config.json" : "config.json");
    size_t len;
    char* text = file_read_all(path, &len, (size_t)1 << 20);
    CHECK(text, "%s", error_last());
    *out = json_parse(text, len);
    free(text);
    CHECK(*out && (*out)->type == JSON_OBJECT, "%s: not a JSON object: %s", path, error_last());
}

// Reads an integer field that must be present and in [lo, hi].
static int cfg_int(const Json* j, const char* key, int fallback, int lo, int hi, const char* what) {
    const Json* v = json_get(j, key);
    if (!v || v->type == JSON_NULL) return fallback;
    CHECK(v->type == JSON_NUMBER && v->number == floor(v->number) && v->number >= lo && v->number <= hi,
          "%s config: '%s' must be an integer in [%d, %d]", what, key, lo, hi);
    return (int)v->number;
}

static float cfg_float(const Json* j, const char* key, float fallback, const char* what) {
    const Json* v = json_get(j, key);
    if (!v || v->type == JSON_NULL) return fallback;
    CHECK(v->type == JSON_NUMBER && isfinite(v->number) && v->number >= 0, "%s config: '%s' must be a non-negative number", what, key);
    return (float)v->number;
}

// An int list field, or a single int broadcast to n entries. Returns the list length.
static int cfg_int_list(const Json* j, const char* key, int* out, int n_expected, int lo, int hi, const char* what) {
    const Json* v = json_get(j, key);
    CHECK(v && v->type != JSON_NULL, "%s config: missing '%s'", what, key);
    if (v->type == JSON_NUMBER) {
        CHECK(n_expected > 0, "%s config: '%s' must be a list", what, key);
        for (int i = 0; i < n_expected; i++) out[i] = cfg_int(j, key, 0, lo, hi, what);
        return n_expected;
    }
    CHECK(v->type == JSON_ARRAY && v->count >= 1 && v->count <= SD_MAX_LEVELS,
          "%s config: '%s' must be a list of 1..%d integers", what, key, SD_MAX_LEVELS);
    for (int i = 0; i < v->count; i++) {
        const Json* x = &v->items[i];
        CHECK(x->type == JSON_NUMBER && x->number == floor(x->number) && x->number >= lo && x->number <= hi,
              "%s config: '%s'[%d] must be an integer in [%d, %d]", what, key, i, lo, hi);
        out[i] = (int)x->number;
    }
    return v->count;
}

static void clip_config_read(ClipConfig* c, const Json* j) {
    const char* w = "text_encoder";
    c->vocab_size = cfg_int(j, "vocab_size", 49408, 1, 1 << 22, w);
    c->hidden = cfg_int(j, "hidden_size", 768, 1, 1 << 16, w);
    c->intermediate = cfg_int(j, "intermediate_size", 3072, 1, 1 << 18, w);
    c->layers = cfg_int(j, "num_hidden_layers", 12, 1, 256, w);
    c->heads = cfg_int(j, "num_attention_heads", 12, 1, 1024, w);
    c->max_positions = cfg_int(j, "max_position_embeddings", 77, 1, 4096, w);
    c->eps = cfg_float(j, "layer_norm_eps", 1e-5f, w);
    const char* act = json_get_string(j, "hidden_act", "quick_gelu");
    CHECK(strcmp(act, "quick_gelu") == 0 || strcmp(act, "gelu") == 0,
          "text_encoder config: hidden_act '%s' not supported (expected quick_gelu or gelu)", act);
    c->quick_gelu = strcmp(act, "quick_gelu") == 0;
    CHECK(c->hidden % c->heads == 0, "text_encoder config: hidden_size %d not divisible by %d heads", c->hidden, c->heads);
}

static int block_has_attn(const char* type, const char* down_or_up) {
    char plain[32], cross[40];
    snprintf(plain, sizeof plain, "%sBlock2D", down_or_up);
    snprintf(cross, sizeof cross, "CrossAttn%sBlock2D", down_or_up);
    if (strcmp(type, cross) == 0) return 1;
    CHECK(strcmp(type, plain) == 0, "unet config: block type '%s' is not SD 1.5's (%s or %s)", type, cross, plain);
    return 0;
}

static void unet_config_read(UNetConfig* c, const Json* j) {
    const char* w = "unet";
    c->in_channels = cfg_int(j, "in_channels", 4, 1, 64, w);
    c->out_channels = cfg_int(j, "out_channels", 4, 1, 64, w);
    c->levels = cfg_int_list(j, "block_out_channels", c->block_out, 0, 1, 1 << 14, w);
    c->layers_per_block = cfg_int(j, "layers_per_block", 2, 1, SD_MAX_LAYERS - 1, w);
    c->cross_dim = cfg_int(j, "cross_attention_dim", 768, 1, 1 << 16, w);
    c->groups = cfg_int(j, "norm_num_groups", 32, 1, 1 << 14, w);
    c->eps = cfg_float(j, "norm_eps", 1e-5f, w);
    c->flip_sin_to_cos = (int)json_get_number(j, "flip_sin_to_cos", 1);
    c->freq_shift = cfg_float(j, "freq_shift", 0, w);
    const Json* lin = json_get(j, "use_linear_projection");
    c->use_linear_projection = lin && lin->type == JSON_BOOL && lin->number != 0;
    // diffusers: num_attention_heads = num_attention_heads or attention_head_dim (a naming quirk:
    // SD 1.5's attention_head_dim 8 means 8 heads).
    const Json* nh = json_get(j, "num_attention_heads");
    cfg_int_list(j, nh && nh->type != JSON_NULL ? "num_attention_heads" : "attention_head_dim",
                 c->heads, c->levels, 1, 1 << 12, w);
    // transformer_layers_per_block: an int for every level or one per down level (diffusers: the mid
    // block takes the last, up level i the down level it mirrors); absent means 1.
    const Json* tl = json_get(j, "transformer_layers_per_block");
    if (!tl || tl->type == JSON_NULL) for (int i = 0; i < c->levels; i++) c->tlayers[i] = 1;
    else CHECK(cfg_int_list(j, "transformer_layers_per_block", c->tlayers, c->levels, 1, 16, w) == c->levels,
               "unet config: 'transformer_layers_per_block' must list %d levels", c->levels);
    const Json* rtl = json_get(j, "reverse_transformer_layers_per_block");
    CHECK(!rtl || rtl->type == JSON_NULL, "unet config: 'reverse_transformer_layers_per_block' is not supported (SD 1.5 has none)");
    const Json* down = json_get(j, "down_block_types");
    const Json* up = json_get(j, "up_block_types");
    CHECK(down && down->type == JSON_ARRAY && down->count == c->levels && up && up->type == JSON_ARRAY &&
          up->count == c->levels, "unet config: down_block_types/up_block_types must list %d blocks", c->levels);
    for (int i = 0; i < c->levels; i++) {
        CHECK(down->items[i].type == JSON_STRING && up->items[i].type == JSON_STRING, "unet config: block types must be strings");
        c->down_attn[i] = block_has_attn(down->items[i].string, "Down");
        c->up_attn[i] = block_has_attn(up->items[i].string, "Up");
    }
    const char* mid = json_get_string(j, "mid_block_type", "UNetMidBlock2DCrossAttn");
    CHECK(strcmp(mid, "UNetMidBlock2DCrossAttn") == 0, "unet config: mid_block_type '%s' is not SD 1.5's", mid);
    const char* tet = json_get_string(j, "time_embedding_type", "positional");
    CHECK(strcmp(tet, "positional") == 0, "unet config: time_embedding_type '%s' not supported", tet);
    for (int i = 0; i < c->levels; i++) {
        CHECK(c->block_out[i] % c->groups == 0, "unet config: %d channels not divisible by %d groups", c->block_out[i], c->groups);
        CHECK(c->block_out[i] % c->heads[i] == 0, "unet config: %d channels not divisible by %d heads", c->block_out[i], c->heads[i]);
    }
    c->time_dim = 4 * c->block_out[0];
}

static void vae_config_read(VaeConfig* c, const Json* j) {
    const char* w = "vae";
    c->in_channels = cfg_int(j, "in_channels", 3, 1, 64, w);
    c->out_channels = cfg_int(j, "out_channels", 3, 1, 64, w);
    c->latent_channels = cfg_int(j, "latent_channels", 4, 1, 64, w);
    c->levels = cfg_int_list(j, "block_out_channels", c->block_out, 0, 1, 1 << 14, w);
    c->layers_per_block = cfg_int(j, "layers_per_block", 2, 1, SD_MAX_LAYERS - 1, w);
    c->groups = cfg_int(j, "norm_num_groups", 32, 1, 1 << 14, w);
    c->scaling_factor = cfg_float(j, "scaling_factor", 0.18215f, w);
    CHECK(c->scaling_factor > 0, "vae config: scaling_factor must be positive");
    for (int i = 0; i < c->levels; i++)
        CHECK(c->block_out[i] % c->groups == 0, "vae config: %d channels not divisible by %d groups", c->block_out[i], c->groups);
}

static void scheduler_config_read(SchedulerConfig* s, const Json* j) {
    const char* w = "scheduler";
    s->train_steps = cfg_int(j, "num_train_timesteps", 1000, 2, 100000, w);
    s->steps_offset = cfg_int(j, "steps_offset", 1, 0, 1000, w);
    s->set_alpha_to_one = (int)json_get_number(j, "set_alpha_to_one", 0);
    s->beta_start = cfg_float(j, "beta_start", 0.00085f, w);
    s->beta_end = cfg_float(j, "beta_end", 0.012f, w);
    snprintf(s->beta_schedule, sizeof s->beta_schedule, "%s", json_get_string(j, "beta_schedule", "scaled_linear"));
    snprintf(s->spacing, sizeof s->spacing, "%s", json_get_string(j, "timestep_spacing", "leading"));
    snprintf(s->prediction, sizeof s->prediction, "%s", json_get_string(j, "prediction_type", "epsilon"));
    CHECK(strcmp(s->beta_schedule, "scaled_linear") == 0 || strcmp(s->beta_schedule, "linear") == 0,
          "scheduler config: beta_schedule '%s' not supported (scaled_linear or linear)", s->beta_schedule);
    CHECK(strcmp(s->spacing, "leading") == 0, "scheduler config: timestep_spacing '%s' not supported (leading)", s->spacing);
    CHECK(strcmp(s->prediction, "epsilon") == 0, "scheduler config: prediction_type '%s' not supported (epsilon)", s->prediction);
}

// SD 1.5's configs (runwayml/stable-diffusion-v1-5), for LDM files and the benchmark.
void sd_default_configs(ClipConfig* c, UNetConfig* u, VaeConfig* v, SchedulerConfig* s) {
    static const char* clip_json = "{\"vocab_size\":49408,\"hidden_size\":768,\"intermediate_size\":3072,"
        "\"num_hidden_layers\":12,\"num_attention_heads\":12,\"max_position_embeddings\":77,"
        "\"layer_norm_eps\":1e-5,\"hidden_act\":\"quick_gelu\"}";
    static const char* unet_json = "{\"in_channels\":4,\"out_channels\":4,\"block_out_channels\":[320,640,1280,1280],"
        "\"layers_per_block\":2,\"cross_attention_dim\":768,\"norm_num_groups\":32,\"norm_eps\":1e-5,"
        "\"attention_head_dim\":8,\"flip_sin_to_cos\":true,\"freq_shift\":0,"
        "\"down_block_types\":[\"CrossAttnDownBlock2D\",\"CrossAttnDownBlock2D\",\"CrossAttnDownBlock2D\",\"DownBlock2D\"],"
        "\"up_block_types\":[\"UpBlock2D\",\"CrossAttnUpBlock2D\",\"CrossAttnUpBlock2D\",\"CrossAttnUpBlock2D\"]}";
    static const char* vae_json = "{\"in_channels\":3,\"out_channels\":3,\"latent_channels\":4,"
        "\"block_out_channels\":[128,256,512,512],\"layers_per_block\":2,\"norm_num_groups\":32,\"scaling_factor\":0.18215}";
    Json* j;
    if (c) { j = json_parse(clip_json, strlen(clip_json)); clip_config_read(c, j); json_free(j); }
    if (u) { j = json_parse(unet_json, strlen(unet_json)); unet_config_read(u, j); json_free(j); }
    if (v) { j = json_parse(vae_json, strlen(vae_json)); vae_config_read(v, j); json_free(j); }
    if (s) { j = json_parse("{}", 2); scheduler_config_read(s, j); json_free(j); }
}

// ----------------------------------------------------------------------------------------------
// weight source: a safetensors file read under diffusers names, or through the LDM rename table,
// or random weights (bench). Every lookup checks the shape.

typedef enum { COMP_TEXT, COMP_UNET, COMP_VAE } Component;

typedef struct Loader {
    SafeTensors* st;          // NULL: random weights
    int ldm;
    Component comp;
    const UNetConfig* ucfg;   // for LDM UNet/VAE index formulas
    const VaeConfig* vcfg;
    uint64_t rng;             // random weights: generator state
    int f16;                  // keep frozen linear/conv weights in fp16 (SD_F16)
    int copy;                 // copy every tensor out of the file's data block (it is released after loading)
    int64_t nparams;
    StableDiffusion* sd;      // owner of converted and random tensors
} Loader;

static void ldm_name(const Loader* L, const char* name, char* out, size_t cap);

static void* own(Loader* L, size_t bytes) {
    StableDiffusion* sd = L->sd;
    if (sd->nowned == sd->capowned) {
        sd->capowned = sd->capowned ? 2 * sd->capowned : 256;
        sd->owned = realloc(sd->owned, (size_t)sd->capowned * sizeof(void*));
        CHECK(sd->owned, "out of memory");
    }
    return sd->owned[sd->nowned++] = xmalloc(bytes ? bytes : 1);
}

// Shapes equal up to trailing 1s (an LDM 1×1 conv [C, C, 1, 1] serves a linear [C, C]).
static int shape_matches(const StEntry* e, int ndim, const int* dims) {
    int a = e->ndim, b = ndim;
    while (a > 0 && e->shape[a - 1] == 1) a--;
    while (b > 0 && dims[b - 1] == 1) b--;
    if (a != b) return 0;
    for (int i = 0; i < a; i++) if (e->shape[i] != dims[i]) return 0;
    return 1;
}

// The file entry for a diffusers name, its dtype and shape checked; marks it used.
static StEntry* find_entry(Loader* L, const char* name, int ndim, const int* dims) {
    char key[512];
    if (L->ldm) ldm_name(L, name, key, sizeof key);
    else snprintf(key, sizeof key, "%s", name);
    StEntry* e = st_find(L->st, key);
    if (L->ldm && L->comp == COMP_UNET) {   // EMA weights preferred (LitEma drops the dots)
        char ema[512] = "model_ema.";
        size_t n = strlen(ema);
        for (const char* p = key + strlen("model."); *p && n + 1 < sizeof ema; p++) if (*p != '.') ema[n++] = *p;
        ema[n] = 0;
        StEntry* e2 = st_find(L->st, ema);
        if (e2) { if (e) e->used++; e = e2; }
    }
    CHECK(e, "%s: missing tensor '%s'%s", L->st->path, key, L->ldm ? "" : " (is this a diffusers folder of SD 1.5?)");
    CHECK(e->dtype == DT_F32 || e->dtype == DT_F16 || e->dtype == DT_BF16,
          "%s: tensor '%s' has dtype %s, expected F32, F16 or BF16", L->st->path, key, dtype_name(e->dtype));
    if (!shape_matches(e, ndim, dims)) {
        char want[64] = "", got[64] = "";
        for (int i = 0; i < ndim; i++) snprintf(want + strlen(want), sizeof want - strlen(want), i ? ", %d" : "%d", dims[i]);
        for (int i = 0; i < e->ndim; i++) snprintf(got + strlen(got), sizeof got - strlen(got), i ? ", %lld" : "%lld", (long long)e->shape[i]);
        check_fail(__FILE__, __LINE__, "%s: tensor '%s' has shape [%s], the config expects [%s]%s",
                   L->st->path, key, got, want, L->ldm ? ". Hint: for a single file that is not full-size SD 1.5, pass "
                   "--config DIR (a diffusers folder with the matching config.json files)" : " (config.json does not match the weights)");
    }
    e->used++;
    return e;
}

// Random weights (bench, --model random:sd15): matrices uniform with the variance of N(0, 1/fan_in)
// (xorshift64*: only the scale matters for timing, and it is fast), norm scales 1, biases 0.
static void random_fill(Loader* L, const char* name, float* w, size_t numel, int ndim, const int* dims) {
    int is_bias = strstr(name, ".bias") != NULL;
    if (ndim == 1) { for (size_t i = 0; i < numel; i++) w[i] = is_bias ? 0.0f : 1.0f; return; }
    float a = sqrtf(3.0f / (float)(numel / (size_t)dims[0]));
    uint64_t x = L->rng;
    for (size_t i = 0; i < numel; i++) {
        x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
        w[i] = a * ((float)((x * 0x2545F4914F6CDD1DULL) >> 40) * (2.0f / 16777216.0f) - 1.0f);
    }
    L->rng = x;
}

// A tensor as fp32 (f16 = 0) or, for a frozen weight matrix under SD_F16, as fp16 (f16 = 1).
// From a file, data already in the wanted type is used in place unless L->copy.
static const void* load_any(Loader* L, const char* name, int f16, int ndim, ...) {
    int dims[TENSOR_MAX_DIMS];
    size_t numel = 1;
    va_list ap;
    va_start(ap, ndim);
    for (int i = 0; i < ndim; i++) { dims[i] = va_arg(ap, int); numel *= (size_t)dims[i]; }
    va_end(ap);
    L->nparams += (int64_t)numel;
    if (!L->st) {
        float* w = f16 ? xmalloc(numel * sizeof(float)) : own(L, numel * sizeof(float));
        random_fill(L, name, w, numel, ndim, dims);
        if (!f16) return w;
        uint16_t* h = own(L, numel * sizeof(uint16_t));
        for (size_t i = 0; i < numel; i++) h[i] = f32_to_f16(w[i]);
        free(w);
        return h;
    }
    StEntry* e = find_entry(L, name, ndim, dims);
    const unsigned char* src = L->st->data + e->begin;
    if (!f16) {
        if (!L->copy || e->dtype != DT_F32) return st_floats(L->st, e);   // non-F32 data: a converted copy
        float* w = own(L, numel * sizeof(float));
        return memcpy(w, src, numel * sizeof(float));
    }
    if (e->dtype == DT_F16 && (uintptr_t)src % 2 == 0 && !L->copy) return src;
    uint16_t* h = own(L, numel * sizeof(uint16_t));
    for (size_t i = 0; i < numel; i++) {
        const unsigned char* b = src + i * dtype_size(e->dtype);
        uint16_t u = (uint16_t)(b[0] | b[1] << 8);
        float f;
        if (e->dtype == DT_F32) memcpy(&f, b, 4);
        h[i] = e->dtype == DT_F16 ? u : f32_to_f16(e->dtype == DT_F32 ? f : bf16_to_f32(u));
    }
    return h;
}
#define load_tensor(L, name, ...) ((const float*)load_any(L, name, 0, __VA_ARGS__))

// The frozen weight matrices are fp16 under SD_F16 (w16 set, w NULL), except where kv32: attn2's
// to_k / to_v stay fp32 (training replaces or reads them).
static void linear_load(Linear* l, Loader* L, const char* prefix, int in, int out, int bias, int kv32) {
    char n[512];
    int f16 = L->f16 && !kv32;
    NAMEF(n, "%s.weight", prefix);
    const void* w = load_any(L, n, f16, 2, out, in);
    *l = (Linear){f16 ? NULL : w, NULL, in, out, NULL, f16 ? w : NULL};
    if (g_device == DEVICE_CUDA && !f16 && !kv32) cuda_weights_frozen(w, (size_t)in * out);   // (kv32: training may change it)
    if (bias) { NAMEF(n, "%s.bias", prefix); l->b = load_tensor(L, n, 1, out); }
}

static void conv_load(Conv2d* c, Loader* L, const char* prefix, int in, int out, int k, int stride, int pad_lo, int pad_hi) {
    char n[512];
    NAMEF(n, "%s.weight", prefix);
    const void* w = load_any(L, n, L->f16, 4, out, in, k, k);
    *c = (Conv2d){L->f16 ? NULL : w, L->f16 ? w : NULL, NULL, in, out, k, stride, pad_lo, pad_hi};
    if (g_device == DEVICE_CUDA && !L->f16) cuda_weights_frozen(w, (size_t)out * in * k * k);
    NAMEF(n, "%s.bias", prefix);
    c->b = load_tensor(L, n, 1, out);
}

// Frozen layers with fp32 or fp16 (SD_F16) weights, dims from the layer.
// out[M, out] = inp[M, in]·wᵀ + b
static void linear_apply(const Linear* l, float* out, const float* inp, int M) {
    if (l->w16) linear_forward_f16(out, inp, l->w16, l->b, M, l->in, l->out);
    else linear_forward(out, inp, l->w, l->b, M, l->in, l->out);
}
// dinp[M, in] += dout[M, out]·w (the input gradient only; dinp NULL: not wanted)
static void linear_back(const Linear* l, float* dinp, const float* dout, int M) {
    if (!dinp) return;
    if (l->w16) linear_backward_f16(dinp, dout, l->w16, M, l->in, l->out);
    else linear_backward(dinp, NULL, NULL, dout, NULL, l->w, M, l->in, l->out);
}
// out[N, out, Ho, Wo] = conv(inp[N, in, H, W]) + b with the layer's kernel, stride and padding
static void conv_apply(const Conv2d* c, float* out, const float* inp, int N, int H, int W, Arena* scratch) {
    if (c->w16) conv2d_forward_f16(out, inp, c->w16, c->b, N, c->in, H, W, c->out, c->k, c->stride, c->pad_lo, c->pad_hi);
    else conv2d_forward(out, inp, c->w, c->b, N, c->in, H, W, c->out, c->k, c->stride, c->pad_lo, c->pad_hi, scratch);
}
// out[N, out, Ho, Wo] = conv(upsample_nearest(x[N, in, H, W], Ho, Wo)) (stride 1). At exactly 2× the
// up-sampled image is read on the fly; otherwise it is built in scratch.
static void conv_upsampled(const Conv2d* c, float* out, const float* x, int N, int H, int W, int Ho, int Wo,
                           Arena* scratch) {
    if (Ho == 2 * H && Wo == 2 * W && c->pad_lo == c->pad_hi) {
        conv2d_forward_up2(out, x, c->w, c->w16, c->b, N, c->in, H, W, c->out, c->k, c->pad_lo);
        return;
    }
    size_t mark = arena_mark(scratch);
    float* up = arena_alloc(scratch, (size_t)N * c->in * Ho * Wo);
    upsample_nearest_forward(up, x, N, c->in, H, W, Ho, Wo);
    conv_apply(c, out, up, N, Ho, Wo, scratch);
    arena_reset(scratch, mark);
}
// dinp[N, in, H, W] += convᵀ(dout)
static void conv_back(const Conv2d* c, float* dinp, const float* dout, int N, int H, int W, Arena* scratch) {
    if (c->w16) conv2d_backward_input_f16(dinp, dout, c->w16, N, c->in, H, W, c->out, c->k, c->stride, c->pad_lo, c->pad_hi, scratch);
    else conv2d_backward_input(dinp, dout, c->w, N, c->in, H, W, c->out, c->k, c->stride, c->pad_lo, c->pad_hi, scratch);
}

static void norm_load(Norm* nm, Loader* L, const char* prefix, int C, int G, float eps) {
    char n[512];
    nm->C = C;
    nm->G = G;
    nm->eps = eps;
    NAMEF(n, "%s.weight", prefix);
    nm->w = load_tensor(L, n, 1, C);
    NAMEF(n, "%s.bias", prefix);
    nm->b = load_tensor(L, n, 1, C);
}

// ----------------------------------------------------------------------------------------------
// ResBlock (diffusers ResnetBlock2D): h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb));
// h = conv2(silu(norm2(h))); out = shortcut(x) + h.

static void resblock_load(ResBlock* rb, Loader* L, const char* prefix, int in, int out, int time_dim, int G, float eps) {
    char n[512];
    NAMEF(n, "%s.norm1", prefix); norm_load(&rb->norm1, L, n, in, G, eps);
    NAMEF(n, "%s.conv1", prefix); conv_load(&rb->conv1, L, n, in, out, 3, 1, 1, 1);
    rb->has_temb = time_dim > 0;
    if (rb->has_temb) { NAMEF(n, "%s.time_emb_proj", prefix); linear_load(&rb->time_emb_proj, L, n, time_dim, out, 1, 0); }
    NAMEF(n, "%s.norm2", prefix); norm_load(&rb->norm2, L, n, out, G, eps);
    NAMEF(n, "%s.conv2", prefix); conv_load(&rb->conv2, L, n, out, out, 3, 1, 1, 1);
    rb->has_shortcut = in != out;
    if (rb->has_shortcut) { NAMEF(n, "%s.conv_shortcut", prefix); conv_load(&rb->conv_shortcut, L, n, in, out, 1, 1, 0, 0); }
}

// Training: each block forward takes its saved struct (NULL at inference, when nothing is kept)
// and the `saved` arena, and keeps exactly what its backward reads. Frozen linears and convs keep
// nothing; norms keep their input and stats; attention keeps q, k, v, its output and the lse.
// Memory (why no recomputation): for full-size SD 1.5 at 512² (64×64 latents) the saved arena
// peaks at 1.0 GiB per sample (0.28 GiB at 256²), plus 0.16 GiB of scratch, most of it the GEGLU
// projections and attention q/k/v/out of the 64×64 transformers. Block-level checkpointing would
// cut that to the block inputs at the cost of a second forward, a third more time per step.

typedef struct NormSaved { const float* x; float* mean; float* rstd; } NormSaved;   // input, stats
typedef struct ResBlockSaved { NormSaved n1, n2; } ResBlockSaved;                  // n2.x = conv1 + temb
typedef struct AttnSaved {
    float *q, *k, *v, *o, *lse;   // projections, attention output (before to_out), lse [N, NH, Tq]
    const float* ctx;             // the context (cross-attention; owned by the caller)
    float *hk, *hv;               // LoRA rank-r intermediates ctx·downᵀ
} AttnSaved;
typedef struct BlockSaved { NormSaved n1, n2, n3; AttnSaved a1, a2; float* proj; } BlockSaved;
typedef struct TransformerSaved { NormSaved norm; BlockSaved* blocks; } TransformerSaved;

static void* saved_struct(Arena* saved, size_t bytes) {
    return memset(arena_alloc(saved, (bytes + sizeof(float) - 1) / sizeof(float)), 0, bytes);
}

// A norm's saved record: x (copied when `copy`, since the caller updates it in place), stats.
static NormSaved norm_keep(Arena* saved, const float* x, size_t n, size_t rows, int copy) {
    NormSaved s = {x, arena_alloc(saved, rows), arena_alloc(saved, rows)};
    if (copy) s.x = memcpy(arena_alloc(saved, n), x, n * sizeof(float));
    return s;
}

// out[N, out, H, W] = ResBlock(x[N, in, H, W], temb_act[N, time_dim] = silu(temb) or NULL).
// Saves x (by pointer: it must stay alive until backward), h = conv1(…) + temb, both norms' stats.
static void resblock_forward(const ResBlock* rb, ResBlockSaved* sv, float* out, const float* x, const float* temb_act,
                             int N, int H, int W, Arena* scratch, Arena* saved) {
    int in = rb->conv1.in, oc = rb->conv1.out, HW = H * W;
    size_t mark = arena_mark(scratch);
    float* a = arena_alloc(scratch, (size_t)N * (in > oc ? in : oc) * HW);
    float* h = arena_alloc(sv ? saved : scratch, (size_t)N * oc * HW);
    if (sv) {
        sv->n1 = norm_keep(saved, x, 0, (size_t)N * rb->norm1.G, 0);
        sv->n2 = norm_keep(saved, h, 0, (size_t)N * rb->norm2.G, 0);
    }
    groupnorm_forward(a, sv ? sv->n1.mean : NULL, sv ? sv->n1.rstd : NULL, x, rb->norm1.w, rb->norm1.b, N, in, HW,
                      rb->norm1.G, rb->norm1.eps, 1);
    conv_apply(&rb->conv1, h, a, N, H, W, scratch);
    if (rb->has_temb) {
        float* tp = arena_alloc(scratch, (size_t)N * oc);
        linear_apply(&rb->time_emb_proj, tp, temb_act, N);
        for (int n = 0; n < N; n++)
            for (int c = 0; c < oc; c++) {
                float* hc = h + ((size_t)n * oc + c) * HW;
                for (int p = 0; p < HW; p++) hc[p] += tp[n * oc + c];
            }
    }
    groupnorm_forward(a, sv ? sv->n2.mean : NULL, sv ? sv->n2.rstd : NULL, h, rb->norm2.w, rb->norm2.b, N, oc, HW,
                      rb->norm2.G, rb->norm2.eps, 1);
    conv_apply(&rb->conv2, out, a, N, H, W, scratch);
    if (rb->has_shortcut) {
        conv_apply(&rb->conv_shortcut, a, x, N, H, W, scratch);
        add_inplace(out, a, (size_t)N * oc * HW);
    } else {
        add_inplace(out, x, (size_t)N * oc * HW);
    }
    arena_reset(scratch, mark);
}

// Reads n1 (x, stats), n2 (h, stats). out = conv2(silu(GN2(h))) + shortcut(x), h = conv1(silu(GN1(x))) + temb:
// dx += shortcutᵀ(dout) + GN1ᵀ(silu'·conv1ᵀ(GN2ᵀ(silu'·conv2ᵀ(dout)))). No time-embedding gradient.
static void resblock_backward(const ResBlock* rb, const ResBlockSaved* sv, float* dx, const float* dout,
                              int N, int H, int W, Arena* scratch) {
    int in = rb->conv1.in, oc = rb->conv1.out, HW = H * W;
    size_t mark = arena_mark(scratch);
    if (rb->has_shortcut) conv_back(&rb->conv_shortcut, dx, dout, N, H, W, scratch);
    else add_inplace(dx, dout, (size_t)N * oc * HW);
    float* da = arena_zalloc(scratch, (size_t)N * (in > oc ? in : oc) * HW);
    float* dh = arena_zalloc(scratch, (size_t)N * oc * HW);
    conv_back(&rb->conv2, da, dout, N, H, W, scratch);
    groupnorm_backward(dh, da, sv->n2.x, sv->n2.mean, sv->n2.rstd, rb->norm2.w, rb->norm2.b, N, oc, HW, rb->norm2.G, 1);
    memset(da, 0, (size_t)N * in * HW * sizeof(float));
    conv_back(&rb->conv1, da, dh, N, H, W, scratch);
    groupnorm_backward(dx, da, sv->n1.x, sv->n1.mean, sv->n1.rstd, rb->norm1.w, rb->norm1.b, N, in, HW, rb->norm1.G, 1);
    arena_reset(scratch, mark);
}

// ----------------------------------------------------------------------------------------------
// Attention (diffusers Attention with AttnProcessor): q = to_q(x), k = to_k(ctx), v = to_v(ctx),
// out = to_out(softmax(q·kᵀ/√HD)·v) per head. LoRA side paths add to k and v (lora.c).

// cross: attn2, whose to_k / to_v stay fp32 under SD_F16 (training replaces them or reads them).
static void attention_load(Attention* a, Loader* L, const char* prefix, int C, int D, int heads, int cross) {
    char n[512];
    a->heads = heads;
    a->head_dim = C / heads;
    NAMEF(n, "%s.to_q", prefix); linear_load(&a->to_q, L, n, C, C, 0, 0);
    NAMEF(n, "%s.to_k", prefix); linear_load(&a->to_k, L, n, D, C, 0, cross);
    NAMEF(n, "%s.to_v", prefix); linear_load(&a->to_v, L, n, D, C, 0, cross);
    NAMEF(n, "%s.to_out.0", prefix); linear_load(&a->to_out, L, n, C, C, 1, 0);
    a->lora_k = a->lora_v = NULL;
}

// out[N·Tq, C] = Attention(x[N·Tq, C], ctx[N·Tk, D]); self-attention passes ctx == x.
// Saves q, k, v, o, lse, the LoRA intermediates, and ctx by pointer (cross-attention only).
static void attn_forward(const Attention* a, AttnSaved* sv, float* out, const float* x, const float* ctx,
                         int N, int Tq, int Tk, Arena* scratch, Arena* saved) {
    int C = a->to_q.out;
    size_t mark = arena_mark(scratch);
    Arena* keep = sv ? saved : scratch;
    float* q = arena_alloc(keep, (size_t)N * Tq * C);
    float* k = arena_alloc(keep, (size_t)N * Tk * C);
    float* v = arena_alloc(keep, (size_t)N * Tk * C);
    float* o = arena_alloc(keep, (size_t)N * Tq * C);
    float* lse = sv ? arena_alloc(saved, (size_t)N * a->heads * Tq) : NULL;
    linear_apply(&a->to_q, q, x, N * Tq);
    linear_apply(&a->to_k, k, ctx, N * Tk);
    linear_apply(&a->to_v, v, ctx, N * Tk);
    if (sv) *sv = (AttnSaved){q, k, v, o, lse, ctx == x ? NULL : ctx, NULL, NULL};
    if (a->lora_k && sv) lora_forward_save(a->lora_k, k, sv->hk = arena_alloc(saved, (size_t)N * Tk * a->lora_k->rank), ctx, N * Tk);
    else if (a->lora_k) lora_forward(a->lora_k, k, ctx, N * Tk, scratch);
    if (a->lora_v && sv) lora_forward_save(a->lora_v, v, sv->hv = arena_alloc(saved, (size_t)N * Tk * a->lora_v->rank), ctx, N * Tk);
    else if (a->lora_v) lora_forward(a->lora_v, v, ctx, N * Tk, scratch);
    attention_forward(o, lse, q, k, v, N, Tq, Tk, a->heads, a->head_dim, C, C, C, C, 0, scratch);
    linear_apply(&a->to_out, out, o, N * Tq);
    arena_reset(scratch, mark);
}

// dx[N·Tq, C] += ∂/∂x (NULL: not wanted), dctx[N·Tk, D] += ∂/∂ctx (NULL: not wanted; self-attention
// passes dctx == dx); trainable K/V weights (to_k.dw) and LoRA factors get their gradients.
static void attn_backward(const Attention* a, const AttnSaved* sv, float* dx, float* dctx, const float* dout,
                          int N, int Tq, int Tk, Arena* scratch) {
    int C = a->to_q.out, D = a->to_k.in;
    size_t mark = arena_mark(scratch), Mq = (size_t)N * Tq, Mk = (size_t)N * Tk;
    float* dO = arena_zalloc(scratch, Mq * C);
    float* dq = dx ? arena_zalloc(scratch, Mq * C) : NULL;
    float* dk = arena_zalloc(scratch, Mk * C);
    float* dv = arena_zalloc(scratch, Mk * C);
    linear_back(&a->to_out, dO, dout, (int)Mq);
    attention_backward(dq, dk, dv, dO, sv->o, sv->lse, sv->q, sv->k, sv->v, N, Tq, Tk, a->heads, a->head_dim,
                       C, C, C, C, 0, scratch);
    if (dx) linear_back(&a->to_q, dx, dq, (int)Mq);
    linear_back(&a->to_k, dctx, dk, (int)Mk);
    linear_back(&a->to_v, dctx, dv, (int)Mk);
    if (a->to_k.dw) linear_backward(NULL, a->to_k.dw, NULL, dk, sv->ctx, a->to_k.w, (int)Mk, D, C);   // trained K/V
    if (a->to_v.dw) linear_backward(NULL, a->to_v.dw, NULL, dv, sv->ctx, a->to_v.w, (int)Mk, D, C);
    if (a->lora_k) lora_backward(a->lora_k, dctx, dk, sv->hk, sv->ctx, (int)Mk, scratch);
    if (a->lora_v) lora_backward(a->lora_v, dctx, dv, sv->hv, sv->ctx, (int)Mk, scratch);
    arena_reset(scratch, mark);
}

// ----------------------------------------------------------------------------------------------
// Transformer2D (diffusers Transformer2DModel, one or more BasicTransformerBlocks):
// h = proj_in(GroupNorm(x)) as tokens (N, HW, C); per block: h += attn1(LN1(h));
// h += attn2(LN2(h), ctx); h += ff_out(GEGLU(ff_proj(LN3(h)))); out = x + proj_out(h).

static void transformer_load(Transformer2D* t, Loader* L, const char* prefix, int C, int heads, int nblocks,
                             const UNetConfig* cfg) {
    char n[512];
    t->C = C;
    t->nblocks = nblocks;
    t->blocks = xcalloc((size_t)t->nblocks, sizeof(TransformerBlock));
    NAMEF(n, "%s.norm", prefix); norm_load(&t->norm, L, n, C, cfg->groups, 1e-6f);
    NAMEF(n, "%s.proj_in", prefix); linear_load(&t->proj_in, L, n, C, C, 1, 0);
    for (int b = 0; b < t->nblocks; b++) {
        TransformerBlock* tb = &t->blocks[b];
        int F = 4 * C;
        NAMEF(n, "%s.transformer_blocks.%d.norm1", prefix, b); norm_load(&tb->norm1, L, n, C, 0, 1e-5f);
        NAMEF(n, "%s.transformer_blocks.%d.attn1", prefix, b); attention_load(&tb->attn1, L, n, C, C, heads, 0);
        NAMEF(n, "%s.transformer_blocks.%d.norm2", prefix, b); norm_load(&tb->norm2, L, n, C, 0, 1e-5f);
        NAMEF(n, "%s.transformer_blocks.%d.attn2", prefix, b); attention_load(&tb->attn2, L, n, C, cfg->cross_dim, heads, 1);
        NAMEF(n, "%s.transformer_blocks.%d.norm3", prefix, b); norm_load(&tb->norm3, L, n, C, 0, 1e-5f);
        NAMEF(n, "%s.transformer_blocks.%d.ff.net.0.proj", prefix, b); linear_load(&tb->ff_proj, L, n, C, 2 * F, 1, 0);
        NAMEF(n, "%s.transformer_blocks.%d.ff.net.2", prefix, b); linear_load(&tb->ff_out, L, n, F, C, 1, 0);
    }
    NAMEF(n, "%s.proj_out", prefix); linear_load(&t->proj_out, L, n, C, C, 1, 0);
}

// h[M = N·T, C] updated in place by one BasicTransformerBlock; ctx [N·Tc, D].
// Saves each LayerNorm's input (a copy: h changes in place) and stats, both attentions, the GEGLU input.
static void transformer_block_forward(const TransformerBlock* tb, BlockSaved* sv, float* h, const float* ctx,
                                      int N, int T, int Tc, Arena* scratch, Arena* saved) {
    int C = tb->norm1.C, F = tb->ff_out.in;
    size_t M = (size_t)N * T, mark = arena_mark(scratch);
    float* nrm = arena_alloc(scratch, M * C);
    float* tmp = arena_alloc(scratch, M * C);
    if (sv) sv->n1 = norm_keep(saved, h, M * C, M, 1);
    layernorm_forward(nrm, sv ? sv->n1.mean : NULL, sv ? sv->n1.rstd : NULL, h, tb->norm1.w, tb->norm1.b, (int)M, C, tb->norm1.eps);
    attn_forward(&tb->attn1, sv ? &sv->a1 : NULL, tmp, nrm, nrm, N, T, T, scratch, saved);
    add_inplace(h, tmp, M * C);
    if (sv) sv->n2 = norm_keep(saved, h, M * C, M, 1);
    layernorm_forward(nrm, sv ? sv->n2.mean : NULL, sv ? sv->n2.rstd : NULL, h, tb->norm2.w, tb->norm2.b, (int)M, C, tb->norm2.eps);
    attn_forward(&tb->attn2, sv ? &sv->a2 : NULL, tmp, nrm, ctx, N, T, Tc, scratch, saved);
    add_inplace(h, tmp, M * C);
    if (sv) sv->n3 = norm_keep(saved, h, M * C, M, 1);
    layernorm_forward(nrm, sv ? sv->n3.mean : NULL, sv ? sv->n3.rstd : NULL, h, tb->norm3.w, tb->norm3.b, (int)M, C, tb->norm3.eps);
    float* proj = arena_alloc(sv ? saved : scratch, M * 2 * F);
    float* gated = arena_alloc(scratch, M * F);
    if (sv) sv->proj = proj;
    linear_apply(&tb->ff_proj, proj, nrm, (int)M);
    geglu_forward(gated, proj, (int)M, F);
    linear_apply(&tb->ff_out, tmp, gated, (int)M);
    add_inplace(h, tmp, M * C);
    arena_reset(scratch, mark);
}

// dh[M, C]: in, ∂L/∂(block output); out, ∂L/∂(block input) when need_dx (else it stops after
// attn2, whose K/V gradients are all that is wanted). dctx [N·Tc, D] += the context gradient.
static void transformer_block_backward(const TransformerBlock* tb, const BlockSaved* sv, float* dh, float* dctx,
                                       int N, int T, int Tc, int need_dx, Arena* scratch) {
    int C = tb->norm1.C, F = tb->ff_out.in;
    size_t M = (size_t)N * T, mark = arena_mark(scratch);
    float* dg = arena_zalloc(scratch, M * F);
    float* dproj = arena_zalloc(scratch, M * 2 * F);
    float* dn = arena_zalloc(scratch, M * C);
    linear_back(&tb->ff_out, dg, dh, (int)M);       // h += ff_out(geglu(proj))
    geglu_backward(dproj, dg, sv->proj, (int)M, F);
    linear_back(&tb->ff_proj, dn, dproj, (int)M);    // proj = ff_proj(LN3(h))
    layernorm_backward(dh, dn, sv->n3.x, sv->n3.mean, sv->n3.rstd, tb->norm3.w, (int)M, C);
    memset(dn, 0, M * C * sizeof(float));
    attn_backward(&tb->attn2, &sv->a2, need_dx ? dn : NULL, dctx, dh, N, T, Tc, scratch);   // h += attn2(LN2(h), ctx)
    if (need_dx) {
        layernorm_backward(dh, dn, sv->n2.x, sv->n2.mean, sv->n2.rstd, tb->norm2.w, (int)M, C);
        memset(dn, 0, M * C * sizeof(float));
        attn_backward(&tb->attn1, &sv->a1, dn, dn, dh, N, T, T, scratch);               // h += attn1(LN1(h))
        layernorm_backward(dh, dn, sv->n1.x, sv->n1.mean, sv->n1.rstd, tb->norm1.w, (int)M, C);
    }
    arena_reset(scratch, mark);
}

// out[N, C, H, W] = Transformer2D(x[N, C, H, W], ctx[N, Tc, D]); out may alias x.
// Saves a copy of x (the GroupNorm input) with its stats, and every block's record.
static void transformer_forward(const Transformer2D* t, TransformerSaved* sv, float* out, const float* x, const float* ctx,
                                int N, int H, int W, int Tc, Arena* scratch, Arena* saved) {
    int C = t->C, HW = H * W;
    size_t M = (size_t)N * HW, mark = arena_mark(scratch);
    float* a = arena_alloc(scratch, M * C);
    float* tok = arena_alloc(scratch, M * C);
    float* h = arena_alloc(scratch, M * C);
    if (sv) {
        sv->norm = norm_keep(saved, x, M * C, (size_t)N * t->norm.G, 1);
        sv->blocks = saved_struct(saved, (size_t)t->nblocks * sizeof(BlockSaved));
    }
    groupnorm_forward(a, sv ? sv->norm.mean : NULL, sv ? sv->norm.rstd : NULL, x, t->norm.w, t->norm.b, N, C, HW,
                      t->norm.G, t->norm.eps, 0);
    nchw_to_nhwc(tok, a, N, C, HW);
    linear_apply(&t->proj_in, h, tok, (int)M);
    for (int b = 0; b < t->nblocks; b++)
        transformer_block_forward(&t->blocks[b], sv ? &sv->blocks[b] : NULL, h, ctx, N, HW, Tc, scratch, saved);
    linear_apply(&t->proj_out, tok, h, (int)M);
    nhwc_to_nchw(a, tok, N, C, HW);
    if (out != x) memcpy(out, x, M * C * sizeof(float));
    add_inplace(out, a, M * C);                                  // out = x + a
    arena_reset(scratch, mark);
}

// dx[N, C, H, W]: in, ∂L/∂out; out, ∂L/∂x (in place: the residual passes dout through). With
// need_dx = 0 (nothing upstream is trainable) it stops inside the first block, after attn2.
static void transformer_backward(const Transformer2D* t, const TransformerSaved* sv, float* dx, float* dctx,
                                 int N, int H, int W, int Tc, int need_dx, Arena* scratch) {
    int C = t->C, HW = H * W;
    size_t M = (size_t)N * HW, mark = arena_mark(scratch);
    float* tok = arena_zalloc(scratch, M * C);
    float* dh = arena_zalloc(scratch, M * C);
    nchw_to_nhwc(tok, dx, N, C, HW);
    linear_back(&t->proj_out, dh, tok, (int)M);
    for (int b = t->nblocks - 1; b >= 0; b--)
        transformer_block_backward(&t->blocks[b], &sv->blocks[b], dh, dctx, N, HW, Tc, need_dx || b > 0, scratch);
    if (need_dx) {
        memset(tok, 0, M * C * sizeof(float));
        linear_back(&t->proj_in, tok, dh, (int)M);
        nhwc_to_nchw(dh, tok, N, C, HW);
        groupnorm_backward(dx, dh, sv->norm.x, sv->norm.mean, sv->norm.rstd, t->norm.w, t->norm.b, N, C, HW, t->norm.G, 0);
    }
    arena_reset(scratch, mark);
}

// ----------------------------------------------------------------------------------------------
// UNet

int unet_down_size(int n) { return (n + 2 - 3) / 2 + 1; }

static void unet_load(UNet* u, Loader* L) {
    const UNetConfig* c = &u->cfg;
    int C0 = c->block_out[0], lpb = c->layers_per_block, td = c->time_dim;
    char n[512], p[512];
    linear_load(&u->time_lin1, L, "time_embedding.linear_1", C0, td, 1, 0);
    linear_load(&u->time_lin2, L, "time_embedding.linear_2", td, td, 1, 0);
    conv_load(&u->conv_in, L, "conv_in", c->in_channels, C0, 3, 1, 1, 1);
    for (int i = 0; i < c->levels; i++) {      // down: resnets (+ transformers), downsampler
        Level* lv = &u->down[i];
        lv->in = i ? c->block_out[i - 1] : C0;
        lv->out = c->block_out[i];
        lv->nres = lpb;
        lv->has_attn = c->down_attn[i];
        lv->has_sampler = i < c->levels - 1;
        for (int j = 0; j < lpb; j++) {
            NAMEF(p, "down_blocks.%d.resnets.%d", i, j);
            resblock_load(&lv->res[j], L, p, j ? lv->out : lv->in, lv->out, td, c->groups, c->eps);
            if (lv->has_attn) {
                NAMEF(p, "down_blocks.%d.attentions.%d", i, j);
                transformer_load(&lv->attn[j], L, p, lv->out, c->heads[i], c->tlayers[i], c);
            }
        }
        if (lv->has_sampler) {
            NAMEF(n, "down_blocks.%d.downsamplers.0.conv", i);
            conv_load(&lv->sampler, L, n, lv->out, lv->out, 3, 2, 1, 1);
        }
    }
    int top = c->block_out[c->levels - 1];
    u->mid = (Level){.nres = 2, .has_attn = 1, .in = top, .out = top};
    resblock_load(&u->mid.res[0], L, "mid_block.resnets.0", top, top, td, c->groups, c->eps);
    transformer_load(&u->mid.attn[0], L, "mid_block.attentions.0", top, c->heads[c->levels - 1], c->tlayers[c->levels - 1], c);
    resblock_load(&u->mid.res[1], L, "mid_block.resnets.1", top, top, td, c->groups, c->eps);
    for (int i = 0; i < c->levels; i++) {      // up: lpb+1 resnets on [h, skip] (+ transformers), upsampler
        Level* lv = &u->up[i];
        int r = c->levels - 1 - i;             // the down level this one mirrors
        int prev_out = i ? c->block_out[r + 1] : top;
        int skip_in = c->block_out[r > 0 ? r - 1 : 0];
        lv->in = prev_out;
        lv->out = c->block_out[r];
        lv->nres = lpb + 1;
        lv->has_attn = c->up_attn[i];
        lv->has_sampler = i < c->levels - 1;
        for (int j = 0; j < lv->nres; j++) {
            int res_skip = j == lv->nres - 1 ? skip_in : lv->out;
            int res_in = j ? lv->out : prev_out;
            NAMEF(p, "up_blocks.%d.resnets.%d", i, j);
            resblock_load(&lv->res[j], L, p, res_in + res_skip, lv->out, td, c->groups, c->eps);
            if (lv->has_attn) {
                NAMEF(p, "up_blocks.%d.attentions.%d", i, j);
                transformer_load(&lv->attn[j], L, p, lv->out, c->heads[r], c->tlayers[r], c);
            }
        }
        if (lv->has_sampler) {
            NAMEF(n, "up_blocks.%d.upsamplers.0.conv", i);
            conv_load(&lv->sampler, L, n, lv->out, lv->out, 3, 1, 1, 1);
        }
    }
    norm_load(&u->norm_out, L, "conv_norm_out", C0, c->groups, c->eps);
    conv_load(&u->conv_out, L, "conv_out", C0, c->out_channels, 3, 1, 1, 1);
}

static void unet_free(UNet* u) {
    for (int i = 0; i < SD_MAX_LEVELS; i++)
        for (int j = 0; j < SD_MAX_LAYERS; j++) { free(u->down[i].attn[j].blocks); free(u->up[i].attn[j].blocks); }
    free(u->mid.attn[0].blocks);
}

// Appends the attn2 of every block of t under "<prefix>.transformer_blocks.<b>.attn2".
static int cross_attentions_of(Transformer2D* t, const char* prefix, Attention** out, char (*paths)[128], int n, int cap) {
    for (int b = 0; b < t->nblocks; b++, n++)
        if (n < cap) {
            out[n] = &t->blocks[b].attn2;
            NAMEF(paths[n], "%s.transformer_blocks.%d.attn2", prefix, b);
        }
    return n;
}

int unet_cross_attentions(UNet* u, Attention** out, char (*paths)[128], int cap) {
    int n = 0;
    char p[96];
    for (int i = 0; i < u->cfg.levels; i++)
        for (int j = 0; u->down[i].has_attn && j < u->down[i].nres; j++) {
            NAMEF(p, "down_blocks.%d.attentions.%d", i, j);
            n = cross_attentions_of(&u->down[i].attn[j], p, out, paths, n, cap);
        }
    n = cross_attentions_of(&u->mid.attn[0], "mid_block.attentions.0", out, paths, n, cap);
    for (int i = 0; i < u->cfg.levels; i++)
        for (int j = 0; u->up[i].has_attn && j < u->up[i].nres; j++) {
            NAMEF(p, "up_blocks.%d.attentions.%d", i, j);
            n = cross_attentions_of(&u->up[i].attn[j], p, out, paths, n, cap);
        }
    return n;
}

static void tap(const UNet* u, const char* name, const float* x, int N, int C, int H, int W) {
    if (u->tap) u->tap(u->tap_ctx, name, x, N, C, H, W);
}

// A skip tensor saved on the way down: [N, C, H, W].
typedef struct Skip { float* x; int C, H, W; } Skip;
#define UNET_MAX_SKIPS (SD_MAX_LEVELS * (SD_MAX_LAYERS + 1) + 1)

// What unet_backward reads: per level, each resnet's and transformer's record and the level's size.
typedef struct LevelSaved {
    ResBlockSaved res[SD_MAX_LAYERS];
    TransformerSaved attn[SD_MAX_LAYERS];
    int H, W;                  // size of the level's resnets (up levels: before up-sampling)
} LevelSaved;
struct UNetSaved {
    int N, H, W, Tc, ns;
    Skip skips[UNET_MAX_SKIPS];
    LevelSaved down[SD_MAX_LEVELS], mid, up[SD_MAX_LEVELS];
    NormSaved out;             // conv_norm_out's input and stats
};

// The down path: fills skips (conv_in output, then every resnet/transformer output and every
// downsampler output), returns the final hidden state in *h with its size. Training (sv non-NULL)
// allocates the hidden states in `saved`, where the blocks' records point.
static int unet_down(const UNet* u, UNetSaved* sv, Skip* skips, float** h, int* H, int* W, const float* temb_act,
                     const float* ctx, int N, int Tc, Arena* scratch, Arena* saved) {
    Arena* act = sv ? saved : scratch;
    int ns = 0;
    skips[ns++] = (Skip){*h, u->cfg.block_out[0], *H, *W};
    for (int i = 0; i < u->cfg.levels; i++) {
        const Level* lv = &u->down[i];
        LevelSaved* ls = sv ? &sv->down[i] : NULL;
        if (ls) { ls->H = *H; ls->W = *W; }
        for (int j = 0; j < lv->nres; j++) {
            float* o = arena_alloc(act, (size_t)N * lv->out * *H * *W);
            resblock_forward(&lv->res[j], ls ? &ls->res[j] : NULL, o, *h, temb_act, N, *H, *W, scratch, saved);
            if (lv->has_attn) transformer_forward(&lv->attn[j], ls ? &ls->attn[j] : NULL, o, o, ctx, N, *H, *W, Tc, scratch, saved);
            *h = o;
            skips[ns++] = (Skip){o, lv->out, *H, *W};
        }
        if (lv->has_sampler) {
            int Ho = unet_down_size(*H), Wo = unet_down_size(*W);
            float* o = arena_alloc(act, (size_t)N * lv->out * Ho * Wo);
            conv_apply(&lv->sampler, o, *h, N, *H, *W, scratch);
            *h = o; *H = Ho; *W = Wo;
            skips[ns++] = (Skip){o, lv->out, *H, *W};
        }
        char name[32];
        snprintf(name, sizeof name, "down_blocks.%d", i);
        tap(u, name, *h, N, lv->out, *H, *W);
    }
    return ns;
}

// cat[N, C1 + C2, HW] = [a[N, C1, HW], b[N, C2, HW]] along channels
static void concat_channels(float* cat, const float* a, const float* b, int N, int C1, int C2, int HW) {
    for (int n = 0; n < N; n++) {
        memcpy(cat + (size_t)n * (C1 + C2) * HW, a + (size_t)n * C1 * HW, (size_t)C1 * HW * sizeof(float));
        memcpy(cat + ((size_t)n * (C1 + C2) + C1) * HW, b + (size_t)n * C2 * HW, (size_t)C2 * HW * sizeof(float));
    }
}

// The UNet forward for inference (sv = NULL) and training (sv non-NULL: records in `saved`).
static void unet_run(const UNet* u, UNetSaved* sv, float* eps, const float* x, const float* t, const float* context,
                     int N, int H, int W, int Tc, Arena* scratch, Arena* saved) {
    const UNetConfig* c = &u->cfg;
    int C0 = c->block_out[0], td = c->time_dim, H0 = H, W0 = W;
    Arena* act = sv ? saved : scratch;
    size_t mark = arena_mark(scratch);
    // time embedding: sinusoidal → linear_1 → SiLU → linear_2; resnets use silu(temb)
    float* tproj = arena_alloc(scratch, (size_t)N * C0);
    float* t1 = arena_alloc(scratch, (size_t)N * td);
    float* temb = arena_alloc(scratch, (size_t)N * td);
    timestep_embedding(tproj, t, N, C0, c->flip_sin_to_cos, c->freq_shift);
    tap(u, "time_proj", tproj, N, C0, 1, 1);
    linear_apply(&u->time_lin1, t1, tproj, N);
    silu_forward(t1, t1, (size_t)N * td);
    linear_apply(&u->time_lin2, temb, t1, N);
    tap(u, "time_emb", temb, N, td, 1, 1);
    silu_forward(t1, temb, (size_t)N * td);
    const float* temb_act = t1;

    float* h = arena_alloc(act, (size_t)N * C0 * H * W);
    conv_apply(&u->conv_in, h, x, N, H, W, scratch);
    tap(u, "conv_in", h, N, C0, H, W);
    Skip local[UNET_MAX_SKIPS];
    Skip* skips = sv ? sv->skips : local;
    int ns = unet_down(u, sv, skips, &h, &H, &W, temb_act, context, N, Tc, scratch, saved);
    if (sv) { sv->ns = ns; sv->mid.H = H; sv->mid.W = W; }

    int top = u->mid.out;
    LevelSaved* ms = sv ? &sv->mid : NULL;
    float* m = arena_alloc(act, (size_t)N * top * H * W);
    resblock_forward(&u->mid.res[0], ms ? &ms->res[0] : NULL, m, h, temb_act, N, H, W, scratch, saved);
    transformer_forward(&u->mid.attn[0], ms ? &ms->attn[0] : NULL, m, m, context, N, H, W, Tc, scratch, saved);
    h = arena_alloc(act, (size_t)N * top * H * W);
    resblock_forward(&u->mid.res[1], ms ? &ms->res[1] : NULL, h, m, temb_act, N, H, W, scratch, saved);
    tap(u, "mid_block", h, N, top, H, W);

    int Ch = top;
    for (int i = 0; i < c->levels; i++) {
        const Level* lv = &u->up[i];
        LevelSaved* ls = sv ? &sv->up[i] : NULL;
        if (ls) { ls->H = H; ls->W = W; }
        for (int j = 0; j < lv->nres; j++) {
            Skip s = skips[--ns];
            float* cat = arena_alloc(act, (size_t)N * (Ch + s.C) * H * W);
            concat_channels(cat, h, s.x, N, Ch, s.C, H * W);
            float* o = arena_alloc(act, (size_t)N * lv->out * H * W);
            resblock_forward(&lv->res[j], ls ? &ls->res[j] : NULL, o, cat, temb_act, N, H, W, scratch, saved);
            if (lv->has_attn) transformer_forward(&lv->attn[j], ls ? &ls->attn[j] : NULL, o, o, context, N, H, W, Tc, scratch, saved);
            h = o;
            Ch = lv->out;
        }
        if (lv->has_sampler) {   // nearest up-sampling to the next skip's size, then conv 3×3
            int Ho = skips[ns - 1].H, Wo = skips[ns - 1].W;
            float* o = arena_alloc(act, (size_t)N * Ch * Ho * Wo);
            conv_upsampled(&lv->sampler, o, h, N, H, W, Ho, Wo, scratch);
            h = o; H = Ho; W = Wo;
        }
        char name[32];
        snprintf(name, sizeof name, "up_blocks.%d", i);
        tap(u, name, h, N, Ch, H, W);
    }
    CHECK(H == H0 && W == W0 && ns == 0, "internal: UNet up path ended at %dx%d", H, W);
    float* a = arena_alloc(scratch, (size_t)N * C0 * H * W);
    if (sv) sv->out = norm_keep(saved, h, 0, (size_t)N * u->norm_out.G, 0);
    groupnorm_forward(a, sv ? sv->out.mean : NULL, sv ? sv->out.rstd : NULL, h, u->norm_out.w, u->norm_out.b, N, C0,
                      H * W, u->norm_out.G, u->norm_out.eps, 1);
    conv_apply(&u->conv_out, eps, a, N, H, W, scratch);
    arena_reset(scratch, mark);
}

void unet_forward(const UNet* u, float* eps, const float* x, const float* t, const float* context,
                  int N, int H, int W, int Tc, Arena* scratch) {
    unet_run(u, NULL, eps, x, t, context, N, H, W, Tc, scratch, NULL);
}

UNetSaved* unet_forward_train(const UNet* u, float* eps, const float* x, const float* t, const float* context,
                              int N, int H, int W, int Tc, Arena* scratch, Arena* saved) {
    UNetSaved* sv = saved_struct(saved, sizeof(UNetSaved));
    *sv = (UNetSaved){.N = N, .H = H, .W = W, .Tc = Tc};
    unet_run(u, sv, eps, x, t, context, N, H, W, Tc, scratch, saved);
    return sv;
}

// Does this transformer hold anything trainable (LoRA / K/V weights on attn2, or the context)?
static int transformer_trainable(const Transformer2D* t, const float* dctx) {
    int any = dctx != NULL;
    for (int b = 0; b < t->nblocks; b++) {
        const Attention* a = &t->blocks[b].attn2;
        any |= a->lora_k || a->lora_v || a->to_k.dw || a->to_v.dw;
    }
    return any;
}

// The up path read bottom-up: dh (∂L/∂ up output, [N, C0, H, W]) is carried to the mid block's
// output; each concatenation's gradient is split, its skip half added to dskip[s].
static float* unet_backward_up(const UNet* u, const UNetSaved* sv, float* dh, float* spare, float** dskip,
                               float* dctx, Arena* scratch) {
    int N = sv->N, Tc = sv->Tc, s = 0, H = sv->H, W = sv->W;
    for (int i = u->cfg.levels - 1; i >= 0; i--) {
        const Level* lv = &u->up[i];
        const LevelSaved* ls = &sv->up[i];
        int Ch = lv->out;
        size_t mark = arena_mark(scratch);
        if (lv->has_sampler) {   // h' = conv(upsample(h)): conv transpose, then sum over the copies
            float* dup = arena_zalloc(scratch, (size_t)N * Ch * H * W);
            conv_back(&lv->sampler, dup, dh, N, H, W, scratch);
            memset(spare, 0, (size_t)N * Ch * ls->H * ls->W * sizeof(float));
            upsample_nearest_backward(spare, dup, N, Ch, ls->H, ls->W, H, W);
            float* t = dh; dh = spare; spare = t;
        }
        arena_reset(scratch, mark);
        H = ls->H; W = ls->W;
        for (int j = lv->nres - 1; j >= 0; j--, s++) {
            if (lv->has_attn) transformer_backward(&lv->attn[j], &ls->attn[j], dh, dctx, N, H, W, Tc, 1, scratch);
            const Skip* sk = &sv->skips[s];
            int Cin = lv->res[j].conv1.in - sk->C, HW = H * W;   // h = [h_prev, skip] along channels
            float* dcat = arena_zalloc(scratch, (size_t)N * (Cin + sk->C) * HW);
            resblock_backward(&lv->res[j], &ls->res[j], dcat, dh, N, H, W, scratch);
            for (int n = 0; n < N; n++) {
                const float* d = dcat + (size_t)n * (Cin + sk->C) * HW;
                memcpy(spare + (size_t)n * Cin * HW, d, (size_t)Cin * HW * sizeof(float));
                add_inplace(dskip[s] + (size_t)n * sk->C * HW, d + (size_t)Cin * HW, (size_t)sk->C * HW);
            }
            float* t = dh; dh = spare; spare = t;
            arena_reset(scratch, mark);
        }
    }
    return dh;
}

// unet_forward read bottom-up from deps [N, out, H, W]. dcontext [N, Tc, D] += ∂L/∂context
// (NULL: not wanted), summed over every cross-attention; LoRA / K/V gradients accumulate through
// attn2's pointers. No time-embedding gradient; the down path stops at the first transformer that
// holds anything trainable (in SD 1.5: conv_in and down_blocks.0.resnets.0 are never reached).
void unet_backward(const UNet* u, const UNetSaved* sv, float* dcontext, const float* deps, Arena* scratch) {
    const UNetConfig* c = &u->cfg;
    int N = sv->N, H = sv->H, W = sv->W, Tc = sv->Tc, C0 = c->block_out[0], ns = sv->ns;
    size_t mark = arena_mark(scratch), most = 0;
    float* dskip[UNET_MAX_SKIPS];
    for (int s = 0; s < ns; s++) {
        const Skip* k = &sv->skips[s];
        dskip[s] = arena_zalloc(scratch, (size_t)N * k->C * k->H * k->W);
        for (int i = 0; i < c->levels; i++) {
            size_t n = (size_t)N * c->block_out[i] * k->H * k->W;
            most = n > most ? n : most;
        }
    }
    float* dh = arena_zalloc(scratch, most);
    float* spare = arena_zalloc(scratch, most);
    {   // eps = conv_out(silu(GN_out(h)))
        size_t m2 = arena_mark(scratch);
        float* da = arena_zalloc(scratch, (size_t)N * C0 * H * W);
        conv_back(&u->conv_out, da, deps, N, H, W, scratch);
        groupnorm_backward(dh, da, sv->out.x, sv->out.mean, sv->out.rstd, u->norm_out.w, u->norm_out.b, N, C0, H * W,
                           u->norm_out.G, 1);
        arena_reset(scratch, m2);
    }
    dh = unet_backward_up(u, sv, dh, spare, dskip, dcontext, scratch);
    // mid: h = res1(attn(res0(x)))
    const LevelSaved* ms = &sv->mid;
    int top = u->mid.out, Hm = ms->H, Wm = ms->W;
    float* d2 = arena_zalloc(scratch, (size_t)N * top * Hm * Wm);
    resblock_backward(&u->mid.res[1], &ms->res[1], d2, dh, N, Hm, Wm, scratch);
    transformer_backward(&u->mid.attn[0], &ms->attn[0], d2, dcontext, N, Hm, Wm, Tc, 1, scratch);
    resblock_backward(&u->mid.res[0], &ms->res[0], dskip[ns - 1], d2, N, Hm, Wm, scratch);
    // down: skip b = block_b(skip b−1), so block b's input gradient is added to dskip[b−1].
    int first = ns, b = 1;   // skip index of the first down block whose transformer is trainable
    for (int i = 0; i < c->levels && first == ns; i++) {
        for (int j = 0; j < u->down[i].nres && first == ns; j++, b++)
            if (u->down[i].has_attn && transformer_trainable(&u->down[i].attn[j], dcontext)) first = b;
        b += u->down[i].has_sampler;
    }
    b = ns - 1;
    for (int i = c->levels - 1; i >= 0 && b >= first; i--) {
        const Level* lv = &u->down[i];
        const LevelSaved* ls = &sv->down[i];
        if (lv->has_sampler) {
            conv_back(&lv->sampler, dskip[b - 1], dskip[b], N, ls->H, ls->W, scratch);
            b--;
        }
        for (int j = lv->nres - 1; j >= 0 && b >= first; j--, b--) {
            if (lv->has_attn) transformer_backward(&lv->attn[j], &ls->attn[j], dskip[b], dcontext, N, ls->H, ls->W, Tc, b > first, scratch);
            if (b > first) resblock_backward(&lv->res[j], &ls->res[j], dskip[b - 1], dskip[b], N, ls->H, ls->W, scratch);
        }
    }
    arena_reset(scratch, mark);
}

// ----------------------------------------------------------------------------------------------
// VAE (diffusers AutoencoderKL; all GroupNorms eps 1e-6)

#define VAE_EPS 1e-6f

int vae_down_factor(const Vae* v) { return 1 << (v->cfg.levels - 1); }

static void vae_attention_load(VaeAttention* a, Loader* L, const char* prefix, int C, int G) {
    char n[512];
    NAMEF(n, "%s.group_norm", prefix); norm_load(&a->group_norm, L, n, C, G, VAE_EPS);
    NAMEF(n, "%s.to_q", prefix); linear_load(&a->to_q, L, n, C, C, 1, 0);
    NAMEF(n, "%s.to_k", prefix); linear_load(&a->to_k, L, n, C, C, 1, 0);
    NAMEF(n, "%s.to_v", prefix); linear_load(&a->to_v, L, n, C, C, 1, 0);
    NAMEF(n, "%s.to_out.0", prefix); linear_load(&a->to_out, L, n, C, C, 1, 0);
}

// x[N, C, H, W] += to_out(attention(q, k, v)) over all HW pixels with one head of width C.
static void vae_attention_forward(const VaeAttention* a, float* x, int N, int H, int W, Arena* scratch) {
    int C = a->group_norm.C, HW = H * W;
    size_t M = (size_t)N * HW, mark = arena_mark(scratch);
    float* g = arena_alloc(scratch, M * C);
    float* tok = arena_alloc(scratch, M * C);
    float* q = arena_alloc(scratch, M * C);
    float* k = arena_alloc(scratch, M * C);
    float* v = arena_alloc(scratch, M * C);
    groupnorm_forward(g, NULL, NULL, x, a->group_norm.w, a->group_norm.b, N, C, HW, a->group_norm.G, a->group_norm.eps, 0);
    nchw_to_nhwc(tok, g, N, C, HW);
    linear_apply(&a->to_q, q, tok, (int)M);
    linear_apply(&a->to_k, k, tok, (int)M);
    linear_apply(&a->to_v, v, tok, (int)M);
    attention_forward(g, NULL, q, k, v, N, HW, HW, 1, C, C, C, C, C, 0, scratch);
    linear_apply(&a->to_out, tok, g, (int)M);
    nhwc_to_nchw(g, tok, N, C, HW);
    add_inplace(x, g, M * C);
    arena_reset(scratch, mark);
}

static void vae_mid_load(ResBlock* res, VaeAttention* attn, Loader* L, const char* prefix, int C, int G) {
    char n[512];
    NAMEF(n, "%s.mid_block.resnets.0", prefix); resblock_load(&res[0], L, n, C, C, 0, G, VAE_EPS);
    NAMEF(n, "%s.mid_block.attentions.0", prefix); vae_attention_load(attn, L, n, C, G);
    NAMEF(n, "%s.mid_block.resnets.1", prefix); resblock_load(&res[1], L, n, C, C, 0, G, VAE_EPS);
}

// The VAE's ResBlock (no time embedding, inference only): resblock_forward's operations in an
// order that consumes x[N, in, H, W] (overwritten: the caller no longer needs it), so that no
// normalised copy of x is held beside it: 256 MiB less at the decoder's 512² level. The sums are
// the same (a + b = b + a), so are the bits.
static void vae_resblock(const ResBlock* rb, float* out, float* x, int N, int H, int W, Arena* scratch) {
    int in = rb->conv1.in, oc = rb->conv1.out, HW = H * W;
    size_t mark = arena_mark(scratch), n = (size_t)N * oc * HW;
    float* h = arena_alloc(scratch, n);
    if (rb->has_shortcut) conv_apply(&rb->conv_shortcut, out, x, N, H, W, scratch);
    else memcpy(out, x, n * sizeof(float));
    groupnorm_forward(x, NULL, NULL, x, rb->norm1.w, rb->norm1.b, N, in, HW, rb->norm1.G, rb->norm1.eps, 1);
    conv_apply(&rb->conv1, h, x, N, H, W, scratch);
    float* a = in >= oc ? x : arena_alloc(scratch, n);
    groupnorm_forward(a, NULL, NULL, h, rb->norm2.w, rb->norm2.b, N, oc, HW, rb->norm2.G, rb->norm2.eps, 1);
    conv_apply(&rb->conv2, h, a, N, H, W, scratch);
    add_inplace(out, h, n);
    arena_reset(scratch, mark);
}

// x[N, C, H, W] (consumed) → out: resnet, attention, resnet
static void vae_mid_forward(const ResBlock* res, const VaeAttention* attn, float* out, float* x,
                            int N, int H, int W, Arena* scratch) {
    int C = res[0].conv1.in;
    size_t mark = arena_mark(scratch);
    float* t = arena_alloc(scratch, (size_t)N * C * H * W);
    vae_resblock(&res[0], t, x, N, H, W, scratch);
    vae_attention_forward(attn, t, N, H, W, scratch);
    vae_resblock(&res[1], out, t, N, H, W, scratch);
    arena_reset(scratch, mark);
}

static void vae_load(Vae* v, Loader* L) {
    const VaeConfig* c = &v->cfg;
    int G = c->groups, lpb = c->layers_per_block, top = c->block_out[c->levels - 1], Lc = c->latent_channels;
    char p[512];
    conv_load(&v->enc_conv_in, L, "encoder.conv_in", c->in_channels, c->block_out[0], 3, 1, 1, 1);
    for (int i = 0; i < c->levels; i++) {
        Level* lv = &v->enc_down[i];
        lv->in = i ? c->block_out[i - 1] : c->block_out[0];
        lv->out = c->block_out[i];
        lv->nres = lpb;
        lv->has_sampler = i < c->levels - 1;
        for (int j = 0; j < lpb; j++) {
            NAMEF(p, "encoder.down_blocks.%d.resnets.%d", i, j);
            resblock_load(&lv->res[j], L, p, j ? lv->out : lv->in, lv->out, 0, G, VAE_EPS);
        }
        if (lv->has_sampler) {   // pad (right 1, bottom 1), then a stride-2 conv without padding
            NAMEF(p, "encoder.down_blocks.%d.downsamplers.0.conv", i);
            conv_load(&lv->sampler, L, p, lv->out, lv->out, 3, 2, 0, 1);
        }
    }
    vae_mid_load(v->enc_mid_res, &v->enc_mid_attn, L, "encoder", top, G);
    norm_load(&v->enc_norm_out, L, "encoder.conv_norm_out", top, G, VAE_EPS);
    conv_load(&v->enc_conv_out, L, "encoder.conv_out", top, 2 * Lc, 3, 1, 1, 1);
    conv_load(&v->quant_conv, L, "quant_conv", 2 * Lc, 2 * Lc, 1, 1, 0, 0);
    conv_load(&v->post_quant_conv, L, "post_quant_conv", Lc, Lc, 1, 1, 0, 0);
    conv_load(&v->dec_conv_in, L, "decoder.conv_in", Lc, top, 3, 1, 1, 1);
    vae_mid_load(v->dec_mid_res, &v->dec_mid_attn, L, "decoder", top, G);
    for (int i = 0; i < c->levels; i++) {
        Level* lv = &v->dec_up[i];
        lv->in = i ? c->block_out[c->levels - i] : top;
        lv->out = c->block_out[c->levels - 1 - i];
        lv->nres = lpb + 1;
        lv->has_sampler = i < c->levels - 1;
        for (int j = 0; j < lv->nres; j++) {
            NAMEF(p, "decoder.up_blocks.%d.resnets.%d", i, j);
            resblock_load(&lv->res[j], L, p, j ? lv->out : lv->in, lv->out, 0, G, VAE_EPS);
        }
        if (lv->has_sampler) {
            NAMEF(p, "decoder.up_blocks.%d.upsamplers.0.conv", i);
            conv_load(&lv->sampler, L, p, lv->out, lv->out, 3, 1, 1, 1);
        }
    }
    norm_load(&v->dec_norm_out, L, "decoder.conv_norm_out", c->block_out[0], G, VAE_EPS);
    conv_load(&v->dec_conv_out, L, "decoder.conv_out", c->block_out[0], c->out_channels, 3, 1, 1, 1);
}

// Replaces everything allocated since `mark` by a copy of x[n] (x may lie in that region): the
// VAE keeps only its current activation between blocks, which bounds its working set at 512².
static float* arena_keep(Arena* a, size_t mark, const float* x, size_t n) {
    arena_reset(a, mark);
    float* k = arena_alloc(a, n);
    if (k != x) memmove(k, x, n * sizeof(float));
    return k;
}

// The resnets of one level on h (allocated at `base`); returns the output, kept at `base`.
static float* level_resnets(const Level* lv, float* h, size_t base, int N, int H, int W, Arena* scratch) {
    for (int j = 0; j < lv->nres; j++) {
        float* o = arena_alloc(scratch, (size_t)N * lv->out * H * W);
        vae_resblock(&lv->res[j], o, h, N, H, W, scratch);
        h = arena_keep(scratch, base, o, (size_t)N * lv->out * H * W);
    }
    return h;
}

void vae_encode(const Vae* v, float* mean, float* logvar, const float* image, int N, int H, int W, Arena* scratch) {
    const VaeConfig* c = &v->cfg;
    int Lc = c->latent_channels, top = c->block_out[c->levels - 1];
    size_t mark = arena_mark(scratch);
    float* h = arena_alloc(scratch, (size_t)N * c->block_out[0] * H * W);
    conv_apply(&v->enc_conv_in, h, image, N, H, W, scratch);
    for (int i = 0; i < c->levels; i++) {
        const Level* lv = &v->enc_down[i];
        h = level_resnets(lv, h, mark, N, H, W, scratch);
        if (lv->has_sampler) {   // pad (right 1, bottom 1), conv 3×3 stride 2
            int Ho = (H + 1 - 3) / 2 + 1, Wo = (W + 1 - 3) / 2 + 1;
            CHECK(Ho >= 1 && Wo >= 1, "vae_encode: image too small for %d down-samplings", c->levels - 1);
            float* d = arena_alloc(scratch, (size_t)N * lv->out * Ho * Wo);
            conv_apply(&lv->sampler, d, h, N, H, W, scratch);
            H = Ho; W = Wo;
            h = arena_keep(scratch, mark, d, (size_t)N * lv->out * H * W);
        }
    }
    float* m = arena_alloc(scratch, (size_t)N * top * H * W);
    vae_mid_forward(v->enc_mid_res, &v->enc_mid_attn, m, h, N, H, W, scratch);
    groupnorm_forward(m, NULL, NULL, m, v->enc_norm_out.w, v->enc_norm_out.b, N, top, H * W, v->enc_norm_out.G, v->enc_norm_out.eps, 1);
    float* moments = arena_alloc(scratch, (size_t)N * 2 * Lc * H * W);
    float* q = arena_alloc(scratch, (size_t)N * 2 * Lc * H * W);
    conv_apply(&v->enc_conv_out, moments, m, N, H, W, scratch);
    conv_apply(&v->quant_conv, q, moments, N, H, W, scratch);
    size_t hw = (size_t)H * W;
    for (int n = 0; n < N; n++) {   // moments = (mean | logvar) along channels; logvar clamped to [-30, 20]
        memcpy(mean + (size_t)n * Lc * hw, q + (size_t)n * 2 * Lc * hw, Lc * hw * sizeof(float));
        const float* lv = q + ((size_t)n * 2 * Lc + Lc) * hw;
        for (size_t i = 0; i < Lc * hw; i++) {
            float x = lv[i] < -30.0f ? -30.0f : lv[i] > 20.0f ? 20.0f : lv[i];
            if (logvar) logvar[(size_t)n * Lc * hw + i] = x;
        }
    }
    arena_reset(scratch, mark);
}

void vae_decode(const Vae* v, float* image, const float* latent, int N, int h, int w, Arena* scratch) {
    const VaeConfig* c = &v->cfg;
    int Lc = c->latent_channels, top = c->block_out[c->levels - 1], H = h, W = w;
    size_t mark = arena_mark(scratch);
    float* z = arena_alloc(scratch, (size_t)N * Lc * H * W);
    for (size_t i = 0; i < (size_t)N * Lc * H * W; i++) z[i] = latent[i] / c->scaling_factor;
    float* zq = arena_alloc(scratch, (size_t)N * Lc * H * W);
    conv_apply(&v->post_quant_conv, zq, z, N, H, W, scratch);
    float* x = arena_alloc(scratch, (size_t)N * top * H * W);
    conv_apply(&v->dec_conv_in, x, zq, N, H, W, scratch);
    float* hcur = arena_alloc(scratch, (size_t)N * top * H * W);
    vae_mid_forward(v->dec_mid_res, &v->dec_mid_attn, hcur, x, N, H, W, scratch);
    hcur = arena_keep(scratch, mark, hcur, (size_t)N * top * H * W);
    for (int i = 0; i < c->levels; i++) {
        const Level* lv = &v->dec_up[i];
        hcur = level_resnets(lv, hcur, mark, N, H, W, scratch);
        if (lv->has_sampler) {   // nearest ×2, conv 3×3
            float* d = arena_alloc(scratch, (size_t)N * lv->out * 4 * H * W);
            conv_upsampled(&lv->sampler, d, hcur, N, H, W, 2 * H, 2 * W, scratch);
            H *= 2; W *= 2;
            hcur = arena_keep(scratch, mark, d, (size_t)N * lv->out * H * W);
        }
    }
    int C0 = c->block_out[0];
    groupnorm_forward(hcur, NULL, NULL, hcur, v->dec_norm_out.w, v->dec_norm_out.b, N, C0, H * W, v->dec_norm_out.G, v->dec_norm_out.eps, 1);
    conv_apply(&v->dec_conv_out, image, hcur, N, H, W, scratch);
    arena_reset(scratch, mark);
}

// ----------------------------------------------------------------------------------------------
// CLIP text encoder

static void clip_load(ClipTextModel* m, Loader* L) {
    const ClipConfig* c = &m->cfg;
    int Hd = c->hidden, I = c->intermediate;
    char p[512];
    m->token_embedding = load_tensor(L, "text_model.embeddings.token_embedding.weight", 2, c->vocab_size, Hd);
    m->position_embedding = load_tensor(L, "text_model.embeddings.position_embedding.weight", 2, c->max_positions, Hd);
    m->layers = xcalloc((size_t)c->layers, sizeof(ClipLayer));
    for (int l = 0; l < c->layers; l++) {
        ClipLayer* y = &m->layers[l];
        NAMEF(p, "text_model.encoder.layers.%d.layer_norm1", l); norm_load(&y->ln1, L, p, Hd, 0, c->eps);
        NAMEF(p, "text_model.encoder.layers.%d.self_attn.q_proj", l); linear_load(&y->q, L, p, Hd, Hd, 1, 0);
        NAMEF(p, "text_model.encoder.layers.%d.self_attn.k_proj", l); linear_load(&y->k, L, p, Hd, Hd, 1, 0);
        NAMEF(p, "text_model.encoder.layers.%d.self_attn.v_proj", l); linear_load(&y->v, L, p, Hd, Hd, 1, 0);
        NAMEF(p, "text_model.encoder.layers.%d.self_attn.out_proj", l); linear_load(&y->o, L, p, Hd, Hd, 1, 0);
        NAMEF(p, "text_model.encoder.layers.%d.layer_norm2", l); norm_load(&y->ln2, L, p, Hd, 0, c->eps);
        NAMEF(p, "text_model.encoder.layers.%d.mlp.fc1", l); linear_load(&y->fc1, L, p, Hd, I, 1, 0);
        NAMEF(p, "text_model.encoder.layers.%d.mlp.fc2", l); linear_load(&y->fc2, L, p, I, Hd, 1, 0);
    }
    norm_load(&m->final_ln, L, "text_model.final_layer_norm", Hd, 0, c->eps);
}

// What a CLIP layer's backward reads: both LayerNorms' inputs (copies) and stats, q, k, v, the
// attention output and lse, and fc1's output before the activation.
typedef struct ClipLayerSaved { NormSaved ln1, ln2; float *q, *k, *v, *o, *lse, *pre; } ClipLayerSaved;
struct ClipSaved { int N, T; int* ids; ClipLayerSaved* layers; NormSaved final; };

// x[M, H] += out_proj(causal_attention(q, k, v)) with q, k, v = proj(LN1(x)); then the MLP.
static void clip_layer_forward(const ClipLayer* y, const ClipConfig* c, ClipLayerSaved* sv, float* x, int N, int T,
                               Arena* scratch, Arena* saved) {
    int Hd = c->hidden, I = c->intermediate;
    size_t M = (size_t)N * T, mark = arena_mark(scratch);
    Arena* keep = sv ? saved : scratch;
    float* a = arena_alloc(scratch, M * Hd);
    float* t = arena_alloc(scratch, M * Hd);
    float* q = arena_alloc(keep, M * Hd);
    float* k = arena_alloc(keep, M * Hd);
    float* v = arena_alloc(keep, M * Hd);
    float* o = sv ? arena_alloc(saved, M * Hd) : a;
    float* f = arena_alloc(scratch, M * I);
    float* pre = sv ? arena_alloc(saved, M * I) : f;
    if (sv) {
        *sv = (ClipLayerSaved){norm_keep(saved, x, M * Hd, M, 1), {0}, q, k, v, o, arena_alloc(saved, M * c->heads), pre};
    }
    layernorm_forward(a, sv ? sv->ln1.mean : NULL, sv ? sv->ln1.rstd : NULL, x, y->ln1.w, y->ln1.b, (int)M, Hd, y->ln1.eps);
    linear_apply(&y->q, q, a, (int)M);
    linear_apply(&y->k, k, a, (int)M);
    linear_apply(&y->v, v, a, (int)M);
    attention_forward(o, sv ? sv->lse : NULL, q, k, v, N, T, T, c->heads, Hd / c->heads, Hd, Hd, Hd, Hd, 1, scratch);
    linear_apply(&y->o, t, o, (int)M);
    add_inplace(x, t, M * Hd);
    if (sv) sv->ln2 = norm_keep(saved, x, M * Hd, M, 1);
    layernorm_forward(a, sv ? sv->ln2.mean : NULL, sv ? sv->ln2.rstd : NULL, x, y->ln2.w, y->ln2.b, (int)M, Hd, y->ln2.eps);
    linear_apply(&y->fc1, pre, a, (int)M);
    if (c->quick_gelu) quick_gelu_forward(f, pre, M * I);
    else gelu_forward(f, pre, M * I);
    linear_apply(&y->fc2, t, f, (int)M);
    add_inplace(x, t, M * Hd);
    arena_reset(scratch, mark);
}

// dx[M, H]: in, ∂L/∂(layer output); out, ∂L/∂(layer input) (both residuals pass dx through).
static void clip_layer_backward(const ClipLayer* y, const ClipConfig* c, const ClipLayerSaved* sv, float* dx,
                                int N, int T, Arena* scratch) {
    int Hd = c->hidden, I = c->intermediate;
    size_t M = (size_t)N * T, mark = arena_mark(scratch);
    float* df = arena_zalloc(scratch, M * I);
    float* dpre = arena_zalloc(scratch, M * I);
    float* dn = arena_zalloc(scratch, M * Hd);
    linear_back(&y->fc2, df, dx, (int)M);      // x += fc2(act(fc1(LN2(x))))
    if (c->quick_gelu) quick_gelu_backward(dpre, df, sv->pre, M * I);
    else gelu_backward(dpre, df, sv->pre, M * I);
    linear_back(&y->fc1, dn, dpre, (int)M);
    layernorm_backward(dx, dn, sv->ln2.x, sv->ln2.mean, sv->ln2.rstd, y->ln2.w, (int)M, Hd);
    float* dO = arena_zalloc(scratch, M * Hd);                                 // x += o(attention(q, k, v))
    float* dq = arena_zalloc(scratch, M * Hd);
    float* dk = arena_zalloc(scratch, M * Hd);
    float* dv = arena_zalloc(scratch, M * Hd);
    linear_back(&y->o, dO, dx, (int)M);
    attention_backward(dq, dk, dv, dO, sv->o, sv->lse, sv->q, sv->k, sv->v, N, T, T, c->heads, Hd / c->heads,
                       Hd, Hd, Hd, Hd, 1, scratch);
    memset(dn, 0, M * Hd * sizeof(float));
    linear_back(&y->q, dn, dq, (int)M);         // q, k, v = proj(LN1(x))
    linear_back(&y->k, dn, dk, (int)M);
    linear_back(&y->v, dn, dv, (int)M);
    layernorm_backward(dx, dn, sv->ln1.x, sv->ln1.mean, sv->ln1.rstd, y->ln1.w, (int)M, Hd);
    arena_reset(scratch, mark);
}

static void clip_run(const ClipTextModel* m, ClipSaved* sv, float* hidden, const int* ids, int N, int T,
                     Arena* scratch, Arena* saved) {
    const ClipConfig* c = &m->cfg;
    int Hd = c->hidden;
    CHECK(T <= c->max_positions, "text encoder: %d tokens exceed the %d positions", T, c->max_positions);
    size_t mark = arena_mark(scratch);
    float* x = arena_alloc(scratch, (size_t)N * T * Hd);
    for (int i = 0; i < N * T; i++) {   // token embedding (or an added token's row) + position
        int id = ids[i];
        CHECK(id >= 0 && id < c->vocab_size + m->n_added, "text encoder: token id %d outside the vocabulary (%d + %d added)",
              id, c->vocab_size, m->n_added);
        const float* e = id < c->vocab_size ? m->token_embedding + (size_t)id * Hd : m->added + (size_t)(id - c->vocab_size) * Hd;
        const float* p = m->position_embedding + (size_t)(i % T) * Hd;
        for (int d = 0; d < Hd; d++) x[(size_t)i * Hd + d] = e[d] + p[d];
    }
    for (int l = 0; l < c->layers; l++) clip_layer_forward(&m->layers[l], c, sv ? &sv->layers[l] : NULL, x, N, T, scratch, saved);
    if (sv) sv->final = norm_keep(saved, x, (size_t)N * T * Hd, (size_t)N * T, 1);
    layernorm_forward(hidden, sv ? sv->final.mean : NULL, sv ? sv->final.rstd : NULL, x, m->final_ln.w, m->final_ln.b,
                      N * T, Hd, m->final_ln.eps);
    arena_reset(scratch, mark);
}

void clip_forward(const ClipTextModel* m, float* hidden, const int* ids, int N, int T, Arena* scratch) {
    clip_run(m, NULL, hidden, ids, N, T, scratch, NULL);
}

ClipSaved* clip_forward_train(const ClipTextModel* m, float* hidden, const int* ids, int N, int T, Arena* scratch,
                              Arena* saved) {
    ClipSaved* sv = saved_struct(saved, sizeof(ClipSaved));
    sv->N = N;
    sv->T = T;
    sv->ids = memcpy(saved_struct(saved, (size_t)N * T * sizeof(int)), ids, (size_t)N * T * sizeof(int));
    sv->layers = saved_struct(saved, (size_t)m->cfg.layers * sizeof(ClipLayerSaved));
    clip_run(m, sv, hidden, ids, N, T, scratch, saved);
    return sv;
}

// dadded[n_added, H] += ∂L/∂(added-token rows) from dhidden [N, T, H]: through the final LayerNorm
// and every layer down to the embedding lookup, where only rows of added ids are accumulated (the
// vocabulary and the position embeddings are frozen).
void clip_backward(const ClipTextModel* m, const ClipSaved* sv, float* dadded, const float* dhidden, Arena* scratch) {
    const ClipConfig* c = &m->cfg;
    int Hd = c->hidden, M = sv->N * sv->T;
    size_t mark = arena_mark(scratch);
    float* dx = arena_zalloc(scratch, (size_t)M * Hd);
    layernorm_backward(dx, dhidden, sv->final.x, sv->final.mean, sv->final.rstd, m->final_ln.w, M, Hd);
    for (int l = c->layers - 1; l >= 0; l--) clip_layer_backward(&m->layers[l], c, &sv->layers[l], dx, sv->N, sv->T, scratch);
    for (int i = 0; i < M; i++)
        if (sv->ids[i] >= c->vocab_size) add_inplace(dadded + (size_t)(sv->ids[i] - c->vocab_size) * Hd, dx + (size_t)i * Hd, Hd);
    arena_reset(scratch, mark);
}

// ----------------------------------------------------------------------------------------------
// LDM single-file names (CompVis layout, SD 1.5 only): diffusers name → LDM name.
// UNet: input_blocks.{(lpb+1)·i + j + 1}.{0 resnet | 1 transformer}, the downsampler at
// input_blocks.{(lpb+1)·(i+1)}.0.op; output_blocks.{(lpb+1)·i + j}.{0 | 1}, the upsampler at
// output_blocks.{(lpb+1)·i + lpb}.{1 or 2}.conv; middle_block.{0, 1, 2}. ResBlock parts are renamed
// (in_layers, emb_layers, out_layers, skip_connection). VAE: down.i.block.j, up.{levels−1−i}.block.j,
// mid.block_1/attn_1/block_2, nin_shortcut, norm_out, attention q/k/v/proj_out/norm.

static const char* RESNET_PARTS[][2] = {
    {"norm1", "in_layers.0"}, {"conv1", "in_layers.2"}, {"time_emb_proj", "emb_layers.1"},
    {"norm2", "out_layers.0"}, {"conv2", "out_layers.3"}, {"conv_shortcut", "skip_connection"}};
static const char* VAE_RESNET_PARTS[][2] = {{"conv_shortcut", "nin_shortcut"}};
static const char* VAE_ATTN_PARTS[][2] = {
    {"group_norm", "norm"}, {"to_q", "q"}, {"to_k", "k"}, {"to_v", "v"}, {"to_out.0", "proj_out"}};

// Replaces a leading part of `rest` by the table's LDM name ("norm1.weight" → "in_layers.0.weight").
static void rename_part(char* out, size_t cap, const char* head, const char* rest, const char* (*table)[2], int n) {
    for (int i = 0; i < n; i++) {
        size_t len = strlen(table[i][0]);
        if (strncmp(rest, table[i][0], len) == 0 && rest[len] == '.') {
            snprintf(out, cap, "%s%s%s", head, table[i][1], rest + len);
            return;
        }
    }
    snprintf(out, cap, "%s%s", head, rest);
}

static void ldm_unet_name(const UNetConfig* c, const char* n, char* out, size_t cap) {
    int i, j, off = 0, s = c->layers_per_block + 1;
    char head[128];
    const char* pre = "model.diffusion_model.";
    if (strncmp(n, "time_embedding.linear_1.", 24) == 0) snprintf(out, cap, "%stime_embed.0.%s", pre, n + 24);
    else if (strncmp(n, "time_embedding.linear_2.", 24) == 0) snprintf(out, cap, "%stime_embed.2.%s", pre, n + 24);
    else if (strncmp(n, "conv_in.", 8) == 0) snprintf(out, cap, "%sinput_blocks.0.0.%s", pre, n + 8);
    else if (strncmp(n, "conv_norm_out.", 14) == 0) snprintf(out, cap, "%sout.0.%s", pre, n + 14);
    else if (strncmp(n, "conv_out.", 9) == 0) snprintf(out, cap, "%sout.2.%s", pre, n + 9);
    else if (sscanf(n, "down_blocks.%d.resnets.%d.%n", &i, &j, &off) == 2 && off) {
        snprintf(head, sizeof head, "%sinput_blocks.%d.0.", pre, s * i + j + 1);
        rename_part(out, cap, head, n + off, RESNET_PARTS, 6);
    } else if (sscanf(n, "down_blocks.%d.attentions.%d.%n", &i, &j, &off) == 2 && off)
        snprintf(out, cap, "%sinput_blocks.%d.1.%s", pre, s * i + j + 1, n + off);
    else if (sscanf(n, "down_blocks.%d.downsamplers.0.conv.%n", &i, &off) == 1 && off)
        snprintf(out, cap, "%sinput_blocks.%d.0.op.%s", pre, s * (i + 1), n + off);
    else if (sscanf(n, "mid_block.resnets.%d.%n", &j, &off) == 1 && off) {
        snprintf(head, sizeof head, "%smiddle_block.%d.", pre, 2 * j);
        rename_part(out, cap, head, n + off, RESNET_PARTS, 6);
    } else if (strncmp(n, "mid_block.attentions.0.", 23) == 0) snprintf(out, cap, "%smiddle_block.1.%s", pre, n + 23);
    else if (sscanf(n, "up_blocks.%d.resnets.%d.%n", &i, &j, &off) == 2 && off) {
        snprintf(head, sizeof head, "%soutput_blocks.%d.0.", pre, s * i + j);
        rename_part(out, cap, head, n + off, RESNET_PARTS, 6);
    } else if (sscanf(n, "up_blocks.%d.attentions.%d.%n", &i, &j, &off) == 2 && off)
        snprintf(out, cap, "%soutput_blocks.%d.1.%s", pre, s * i + j, n + off);
    else if (sscanf(n, "up_blocks.%d.upsamplers.0.conv.%n", &i, &off) == 1 && off)
        snprintf(out, cap, "%soutput_blocks.%d.%d.conv.%s", pre, s * i + s - 1, c->up_attn[i] ? 2 : 1, n + off);
    else snprintf(out, cap, "%s%s", pre, n);
}

static void ldm_vae_name(const VaeConfig* c, const char* n, char* out, size_t cap) {
    int i, j, off = 0;
    char head[128];
    const char* pre = "first_stage_model.";
    const char* part = strncmp(n, "encoder.", 8) == 0 ? "encoder" : "decoder";
    const char* rest = n + 8;
    if (strncmp(n, "encoder.", 8) && strncmp(n, "decoder.", 8)) { snprintf(out, cap, "%s%s", pre, n); return; }
    if (sscanf(rest, "down_blocks.%d.resnets.%d.%n", &i, &j, &off) == 2 && off) {
        snprintf(head, sizeof head, "%s%s.down.%d.block.%d.", pre, part, i, j);
        rename_part(out, cap, head, rest + off, VAE_RESNET_PARTS, 1);
    } else if (sscanf(rest, "down_blocks.%d.downsamplers.0.conv.%n", &i, &off) == 1 && off)
        snprintf(out, cap, "%s%s.down.%d.downsample.conv.%s", pre, part, i, rest + off);
    else if (sscanf(rest, "up_blocks.%d.resnets.%d.%n", &i, &j, &off) == 2 && off) {
        snprintf(head, sizeof head, "%s%s.up.%d.block.%d.", pre, part, c->levels - 1 - i, j);
        rename_part(out, cap, head, rest + off, VAE_RESNET_PARTS, 1);
    } else if (sscanf(rest, "up_blocks.%d.upsamplers.0.conv.%n", &i, &off) == 1 && off)
        snprintf(out, cap, "%s%s.up.%d.upsample.conv.%s", pre, part, c->levels - 1 - i, rest + off);
    else if (sscanf(rest, "mid_block.resnets.%d.%n", &j, &off) == 1 && off) {
        snprintf(head, sizeof head, "%s%s.mid.block_%d.", pre, part, j + 1);
        rename_part(out, cap, head, rest + off, VAE_RESNET_PARTS, 1);
    } else if (strncmp(rest, "mid_block.attentions.0.", 23) == 0) {
        snprintf(head, sizeof head, "%s%s.mid.attn_1.", pre, part);
        rename_part(out, cap, head, rest + 23, VAE_ATTN_PARTS, 5);
    } else if (strncmp(rest, "conv_norm_out.", 14) == 0) snprintf(out, cap, "%s%s.norm_out.%s", pre, part, rest + 14);
    else snprintf(out, cap, "%s%s", pre, n);
}

static void ldm_name(const Loader* L, const char* name, char* out, size_t cap) {
    if (L->comp == COMP_UNET) ldm_unet_name(L->ucfg, name, out, cap);
    else if (L->comp == COMP_VAE) ldm_vae_name(L->vcfg, name, out, cap);
    else snprintf(out, cap, "cond_stage_model.transformer.%s", name);
}

// ----------------------------------------------------------------------------------------------
// loading a whole model

static int is_known_buffer(const char* name) {   // LDM entries that are not weights of the three nets
    static const char* prefixes[] = {"model_ema.", "betas", "alphas_cumprod", "sqrt_", "log_one_minus",
        "posterior_", "logvar", "model.diffusion_model.betas", "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "text_model.embeddings.position_ids"};
    for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++)
        if (strncmp(name, prefixes[i], strlen(prefixes[i])) == 0) return 1;
    return 0;
}

// An LDM entry belongs to a component that was not asked for (e.g. the VAE when only the UNet loads).
static int ldm_other_component(const char* name, int components) {
    static const char* prefixes[3] = {"cond_stage_model.", "model.diffusion_model.", "first_stage_model."};
    for (int c = 0; c < 3; c++)
        if (!(components & (1 << c)) && strncmp(name, prefixes[c], strlen(prefixes[c])) == 0) return 1;
    return 0;
}

static void report_unused(SafeTensors* st, int ldm_components, int verbose) {
    int unused = 0;
    for (int i = 0; i < st->n; i++)
        if (!st->entries[i].used && !is_known_buffer(st->entries[i].name) &&
            !(ldm_components && ldm_other_component(st->entries[i].name, ldm_components))) {
            if (unused < 20) fprintf(stderr, "warning: %s: unused tensor '%s'\n", st->path, st->entries[i].name);
            unused++;
        }
    if (unused > 20) fprintf(stderr, "warning: %s: %d unused tensors in all\n", st->path, unused);
    if (verbose && !unused) fprintf(stderr, "%s: all %d tensors used\n", st->path, st->n);
}

// Under SD_F16 a file with F32 or BF16 weights is copied out (converted) and its data block
// released once loaded; an F16 file's weights are used in place.
static int file_converted(const SafeTensors* st, int f16) {
    for (int i = 0; f16 && i < st->n; i++)
        if (st->entries[i].dtype == DT_F32 || st->entries[i].dtype == DT_BF16) return 1;
    return 0;
}

static void release_block(SafeTensors* st) {
    for (int i = 0; i < st->n; i++) {
        StEntry* e = &st->entries[i];
        if (e->dtype == DT_F32 && e->f32 && (const void*)e->f32 == (const void*)(st->data + e->begin)) e->f32 = NULL;
    }
    free(st->data);
    st->data = NULL;
    st->data_len = 0;
}

static void load_component(StableDiffusion* sd, Component comp, SafeTensors* st, int ldm, int verbose) {
    Loader L = {st, ldm, comp, &sd->unet.cfg, &sd->vae.cfg, 0, sd->f16, file_converted(st, sd->f16), 0, sd};
    if (comp == COMP_TEXT) clip_load(&sd->clip, &L);
    if (comp == COMP_UNET) unet_load(&sd->unet, &L);
    if (comp == COMP_VAE) vae_load(&sd->vae, &L);
    sd->params[comp] = L.nparams;
    if (!ldm) report_unused(st, 0, verbose);
}

static const char* COMPONENT_DIRS[] = {"text_encoder", "unet", "vae"};
static const char* COMPONENT_FILES[] = {"model.safetensors", "diffusion_pytorch_model.safetensors",
                                        "diffusion_pytorch_model.safetensors"};

static void configs_from_dir(StableDiffusion* sd, const char* dir, int components) {
    Json* j;
    if (components & SD_TEXT) { read_config(dir, "text_encoder", &j); clip_config_read(&sd->clip.cfg, j); json_free(j); }
    if (components & SD_UNET) { read_config(dir, "unet", &j); unet_config_read(&sd->unet.cfg, j); json_free(j); }
    if (components & SD_VAE) { read_config(dir, "vae", &j); vae_config_read(&sd->vae.cfg, j); json_free(j); }
    char path[4096];
    snprintf(path, sizeof path, "%s/scheduler/scheduler_config.json", dir);
    FILE* f = fopen(path, "rb");
    if (f) { fclose(f); read_config(dir, "scheduler", &j); scheduler_config_read(&sd->sched, j); json_free(j); }
}

static void tokenizer_for(StableDiffusion* sd, const char* path, const char* tokenizer_dir) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", tokenizer_dir ? tokenizer_dir : path);
    if (!tokenizer_dir) snprintf(dir, sizeof dir, "%s/tokenizer", path);
    sd->tok = tokenizer_load(dir);
    CHECK(sd->tok, "%s", error_last());
}

#define SD_RANDOM_MODEL "random:sd15"
static void build_random(StableDiffusion* sd, int components, uint64_t seed, const char* config_dir);

void sd_load(StableDiffusion* sd, const char* path, const char* tokenizer_dir, const char* config_dir,
             int components, int verbose) {
    if (strcmp(path, SD_RANDOM_MODEL) == 0) {
        CHECK(tokenizer_dir || !(components & SD_TOKENIZER), "%s has no tokenizer. Hint: pass --tokenizer DIR (a folder "
              "with vocab.json and merges.txt, e.g. the tokenizer/ folder of a diffusers model)", path);
        build_random(sd, components, 1, config_dir);
        if (components & SD_TOKENIZER) tokenizer_for(sd, path, tokenizer_dir);
        sd->loaded = components & ~SD_F16;
        return;
    }
    memset(sd, 0, sizeof *sd);
    sd->path = xstrdup(path);
    sd->f16 = (components & SD_F16) != 0;
    sd_default_configs(&sd->clip.cfg, &sd->unet.cfg, &sd->vae.cfg, &sd->sched);
    sd->ldm = !path_is_dir(path);
    if (sd->ldm) {
        if (config_dir) configs_from_dir(sd, config_dir, components & 7);
        else if (components & 7) fprintf(stderr, "note: %s is a single-file (LDM) checkpoint without configs: using SD 1.5's defaults\n", path);
        CHECK(tokenizer_dir || !(components & SD_TOKENIZER),
              "%s is a single-file checkpoint and carries no tokenizer. Hint: pass --tokenizer DIR "
              "(a folder with vocab.json and merges.txt, e.g. the tokenizer/ folder of a diffusers model)", path);
        if (components & 7) {
            CHECK(st_open(&sd->files[0], path) == 0, "%s", error_last());
            sd->nfiles = 1;
            int convert = file_converted(&sd->files[0], sd->f16);
            for (int c = 0; c < 3; c++)
                if (components & (1 << c)) load_component(sd, (Component)c, &sd->files[0], 1, verbose);
            report_unused(&sd->files[0], components & 7, verbose);
            if (convert) release_block(&sd->files[0]);
        }
    } else {
        configs_from_dir(sd, config_dir ? config_dir : path, components & 7);
        for (int c = 0; c < 3; c++) {
            if (!(components & (1 << c))) continue;
            char fp[4096];
            snprintf(fp, sizeof fp, "%s/%s/%s", path, COMPONENT_DIRS[c], COMPONENT_FILES[c]);
            CHECK(st_open(&sd->files[sd->nfiles], fp) == 0, "%s%s", error_last(),
                  strstr(error_last(), "cannot open") ? ". Hint: a diffusers folder needs <component>/*.safetensors; "
                  "convert .bin files with convert/convert.py" : "");
            load_component(sd, (Component)c, &sd->files[sd->nfiles], 0, verbose);
            if (file_converted(&sd->files[sd->nfiles], sd->f16)) release_block(&sd->files[sd->nfiles]);
            sd->nfiles++;
        }
    }
    if (components & SD_TOKENIZER) tokenizer_for(sd, path, tokenizer_dir);
    sd->loaded = components & ~SD_F16;
}

// Random weights for SD 1.5's configs, or for those of config_dir (a diffusers folder) when set.
static void build_random(StableDiffusion* sd, int components, uint64_t seed, const char* config_dir) {
    memset(sd, 0, sizeof *sd);
    sd->path = xstrdup(SD_RANDOM_MODEL);
    sd->f16 = (components & SD_F16) != 0;
    sd_default_configs(&sd->clip.cfg, &sd->unet.cfg, &sd->vae.cfg, &sd->sched);
    if (config_dir) configs_from_dir(sd, config_dir, components & 7);
    Loader L = {NULL, 0, COMP_TEXT, &sd->unet.cfg, &sd->vae.cfg, seed * 0x9E3779B97F4A7C15ULL + 1, sd->f16, 0, 0, sd};
    if (components & SD_TEXT) { L.comp = COMP_TEXT; L.nparams = 0; clip_load(&sd->clip, &L); sd->params[0] = L.nparams; }
    if (components & SD_UNET) { L.comp = COMP_UNET; L.nparams = 0; unet_load(&sd->unet, &L); sd->params[1] = L.nparams; }
    if (components & SD_VAE) { L.comp = COMP_VAE; L.nparams = 0; vae_load(&sd->vae, &L); sd->params[2] = L.nparams; }
    sd->loaded = components & 7;
}

void sd_build_random(StableDiffusion* sd, int components, uint64_t seed) { build_random(sd, components, seed, NULL); }

void sd_free(StableDiffusion* sd) {
    if (g_device == DEVICE_CUDA) cuda_weights_release();    // the cache is keyed by the pointers freed below
    for (int i = 0; i < sd->nowned; i++) free(sd->owned[i]);
    free(sd->owned);
    for (int i = 0; i < sd->nfiles; i++) st_close(&sd->files[i]);
    if (sd->trained) { train_params_free(sd->trained); free(sd->trained); }
    if (sd->loaded & SD_UNET) unet_free(&sd->unet);
    free(sd->clip.layers);
    if (sd->tok) tokenizer_free(sd->tok);
    free(sd->path);
    memset(sd, 0, sizeof *sd);
}

// ctx[n, 77, D] = CLIP(tokenize(prompts[i])) for n prompts (added tokens must be registered with
// the tokenizer and their rows set in sd->clip.added). Exits with a message on a bad prompt.
void sd_encode_prompts(StableDiffusion* sd, const char* const* prompts, int n, float* ctx, Arena* scratch) {
    CHECK(sd->tok, "internal: tokenizer not loaded");
    int ids[CLIP_MAX_LENGTH];
    for (int i = 0; i < n; i++) {   // one prompt at a time: CLIP's output rows are independent
        CHECK(tokenizer_encode(sd->tok, prompts[i], ids, CLIP_MAX_LENGTH) >= 0, "prompt \"%.60s\": %s", prompts[i], error_last());
        clip_forward(&sd->clip, ctx + (size_t)i * CLIP_MAX_LENGTH * sd->clip.cfg.hidden, ids, 1, CLIP_MAX_LENGTH, scratch);
    }
}
