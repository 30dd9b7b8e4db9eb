// instastyle.h: every type and prototype of instastyle, in sections named after the .c files.
// A reader opens this file and sees every struct and every entry point; anything not declared
// here is static to its file. The header is C and C++ compatible so nn_cuda.cu can include it.
#ifndef INSTASTYLE_H
#define INSTASTYLE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---------------------------------------------------------------------------------------------
// tensor.c: checks and errors, checked sizes, files, Tensor, Arena, JSON, safetensors, RNG, timer
// ---------------------------------------------------------------------------------------------

// CHECK(cond, fmt, ...): on failure print "error: <message> (file:line)" and exit(1).
// Used by the program for conditions that end the run (bad model, bad flag).
#define CHECK(cond, ...) do { if (!(cond)) check_fail(__FILE__, __LINE__, __VA_ARGS__); } while (0)
void check_fail(const char* file, int line, const char* fmt, ...)
    __attribute__((noreturn, format(printf, 3, 4)));

// Parsers of untrusted input (JSON, safetensors, images, tokenizer files) never exit: they
// return an error code and leave a one-line message here, so fuzzers and callers decide.
void error_set(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
const char* error_last(void);

void* xmalloc(size_t n);                     // exits with a message on failure
void* xcalloc(size_t count, size_t size);
void* malloc_large(size_t n);                // 64-byte aligned; from 2 MiB up 2 MiB aligned with huge pages advised; NULL if out of memory
void* xmalloc_large(size_t n);               // the same, exiting with a message on failure (both: free())
char* xstrdup(const char* s);
// Checked size arithmetic: return 0 on success, -1 on overflow (result untouched).
int size_mul(size_t a, size_t b, size_t* out);
int size_add(size_t a, size_t b, size_t* out);

// Whole file into memory, NUL-terminated. NULL + error_last() when missing or over max_len bytes.
char* file_read_all(const char* path, size_t* len, size_t max_len);
// Atomic output: write to "<path>.tmp" then rename; returns 0 or -1 with error_last().
int file_write_atomic(const char* path, const void* data, size_t len);
int path_is_dir(const char* path);

// Tensor: a float buffer with its shape, used at boundaries (weights, fixtures, files).
// Kernels never take a Tensor; they take float* and dims.
#define TENSOR_MAX_DIMS 4
typedef struct Tensor {
    float* data;
    int ndim;
    int shape[TENSOR_MAX_DIMS];
} Tensor;
size_t tensor_numel(const Tensor* t);

// Arena: chunked bump allocator; pointers stay valid until reset below them.
typedef struct ArenaChunk ArenaChunk;
typedef struct Arena {
    ArenaChunk* head;      // current chunk (newest)
    ArenaChunk* spare;     // chunks released by arena_reset, reused before any new malloc
    size_t used;           // bytes in use across all chunks
    size_t peak;           // largest `used` seen
    size_t chunk_size;     // default chunk capacity
} Arena;
void arena_init(Arena* a, size_t chunk_size);
float* arena_alloc(Arena* a, size_t nfloats);   // 64-byte aligned, uninitialised
float* arena_zalloc(Arena* a, size_t nfloats);  // zeroed
size_t arena_mark(const Arena* a);
void arena_reset(Arena* a, size_t mark);        // frees everything allocated after mark
void arena_free(Arena* a);

// JSON: a recursive-descent reader into a node tree (objects keep key order).
typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } JsonType;
typedef struct Json {
    JsonType type;
    double number;          // JSON_NUMBER, JSON_BOOL (0/1)
    char* string;           // JSON_STRING: UTF-8, NUL-terminated (may hold \u0000 as bytes: see len)
    size_t len;             // JSON_STRING: byte length
    int count;              // JSON_ARRAY / JSON_OBJECT: number of items
    struct Json* items;     // [count]
    char** keys;            // JSON_OBJECT: [count] NUL-terminated keys
} Json;
Json* json_parse(const char* text, size_t len);     // NULL + error_last() on bad input
void json_free(Json* j);
const Json* json_get(const Json* obj, const char* key);          // NULL when absent / not object
double json_get_number(const Json* obj, const char* key, double fallback);
const char* json_get_string(const Json* obj, const char* key, const char* fallback);

// safetensors: 8-byte little-endian header length, JSON header, data block.
typedef enum { DT_F32, DT_F16, DT_BF16, DT_I32, DT_I64, DT_U8 } DType;
typedef struct StEntry {
    char* name;
    DType dtype;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    size_t begin, end;      // byte offsets in the data block
    float* f32;             // float view (converted from F16/BF16/I32 on demand), or NULL
    int used;               // how many times the loader asked for it
} StEntry;
typedef struct SafeTensors {
    char* path;
    unsigned char* data;    // the data block (one allocation)
    size_t data_len;
    int n;
    StEntry* entries;       // sorted by name
    Json* metadata;         // the "__metadata__" object or NULL
    Json* header;
} SafeTensors;
int st_open(SafeTensors* st, const char* path);                         // 0 or -1 + error_last()
int st_open_mem(SafeTensors* st, const unsigned char* buf, size_t len, const char* label);
void st_close(SafeTensors* st);
StEntry* st_find(SafeTensors* st, const char* name);
const float* st_floats(SafeTensors* st, StEntry* e);     // F32 view of any float/int dtype
const char* st_meta(const SafeTensors* st, const char* key);   // metadata string or NULL
const char* dtype_name(DType d);
size_t dtype_size(DType d);

// Writer: collect named F32/I32 tensors and string metadata, then write atomically.
typedef struct StWriter StWriter;
StWriter* stw_new(void);
void stw_add(StWriter* w, const char* name, DType dtype, const void* data, int ndim, const int64_t* shape);
void stw_meta(StWriter* w, const char* key, const char* value);
int stw_write(StWriter* w, const char* path);           // 0 or -1 + error_last()
void stw_free(StWriter* w);

// RNG: MT19937 (torch's CPU generator) with Box-Muller normals as torch.randn draws them.
typedef struct Rng { uint32_t mt[624]; int index; } Rng;
void rng_seed(Rng* r, uint64_t seed);
uint32_t rng_u32(Rng* r);
float rng_uniform(Rng* r);                 // [0, 1)
void rng_normal(Rng* r, float* out, size_t n);

double time_now(void);                     // seconds, monotonic

// float16 / bfloat16 conversion
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float bf16_to_f32(uint16_t h);

// ---------------------------------------------------------------------------------------------
// gemm.c: the one matrix multiply everything hot stands on, and the thread pool
// ---------------------------------------------------------------------------------------------

// Row-major C[M,N] = alpha * op(A)[M,K] · op(B)[K,N] + beta * C.
// op(A) = A (lda >= K) or Aᵀ (A stored [K,M], lda >= M) when transA; likewise B.
// Each C element is summed in the same order for any thread count (bitwise reproducible).
void sgemm(int transA, int transB, int M, int N, int K, float alpha,
           const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc);
// The plain triple loop, kept as the reference the fast path is tested against.
void sgemm_ref(int transA, int transB, int M, int N, int K, float alpha,
               const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc);
// sgemm with described operands. A GemmOperand is a float matrix (f32, ld, trans as in sgemm),
// the same stored as IEEE fp16 (f16: frozen weights under --weights fp16, converted exactly to
// fp32 while packing), or, for B only, the im2col matrix of an image (implicit-GEMM convolution:
// packed straight from the image, never stored). Packing is all that differs, so the result
// equals sgemm on the materialised fp32 matrix bit for bit. bias (NULL: none) is added after the
// product, bias[i] to row i (bias_rows) or bias[j] to column j: C = alpha·op(A)·op(B) + beta·C + bias,
// the same additions as a pass over C afterwards, made by the microkernel as it stores each tile.
typedef struct GemmIm2col {            // rows k = (c, ky, kx) of C·K·K, columns p = (oy, ox) of Ho·Wo:
    const float* x;                    // X[c, oy·stride − pad + ky, ox·stride − pad + kx], 0 outside, where
    int C, H, W, K, stride, pad, Wo;   // X [C, H, W] = x [C, H/up, W/up] up-sampled by nearest neighbour
    int up;                            // (1: X = x); pad on top/left
} GemmIm2col;
// An operand packed once into the microkernel's panels, for many products with it (attention packs
// a head's K and V once for all of its query blocks): sgemm_pack packs op(A) (is_b = 0) or op(B)
// of an M×N×K product into buf (sgemm_pack_floats(M, N, K, is_b) floats, 64-byte aligned); a
// GemmOperand with `packed` set then uses it in place, in any product with the same K and rows.
typedef struct GemmPacked { const float* data; int rows, K, w; } GemmPacked;
typedef struct GemmOperand {
    const float* f32;
    const uint16_t* f16;
    const GemmIm2col* im2col;
    int ld, trans;
    const GemmPacked* packed;
} GemmOperand;
void sgemm_op(int M, int N, int K, float alpha, GemmOperand A, GemmOperand B, float beta, const float* bias,
              int bias_rows, float* C, int ldc);
size_t sgemm_pack_floats(int M, int N, int K, int is_b);
// The panel width w sgemm packs op(B) (is_b) or op(A) in for an M×N product. A row-major [K, w]
// matrix is already one packed B panel: {data, rows <= w, K, w} (attention's P blocks).
int sgemm_panel_width(int M, int N, int is_b);
void sgemm_pack(GemmPacked* p, float* buf, GemmOperand X, int M, int N, int K, int is_b);
const char* sgemm_kernel_name(void);      // "avx512", "avx2", "scalar"
double sgemm_flop_count(void);            // 2·M·N·K summed over every sgemm call so far

// Thread pool: persistent workers; parallel_for splits [0, n) into contiguous chunks.
// fn must write outputs that depend only on the index, never on the split.
void threads_init(int n);                  // n <= 0: number of online CPUs
int threads_count(void);
void parallel_for(int n, void (*fn)(void* ctx, int begin, int end), void* ctx);
// This machine's FP32 peak in GFLOP/s, measured by an FMA probe on `threads` threads
// (independent FMA chains in the widest vector unit the CPU has).
double cpu_peak_gflops(int threads);

// Where the hot kernels run. DEVICE_CUDA needs a build with CUDA=1 (nn_cuda.cu): each kernel
// that has a twin <op>_cuda (section nn_cuda.cu below) hands its call over in its first line.
// device_select: "cpu", "cuda", or NULL for $INSTASTYLE_DEVICE (unset: cpu); an unknown name, or
// cuda in a build without it, exits with a message. Call it after threads_init, before loading.
typedef enum { DEVICE_CPU = 0, DEVICE_CUDA = 1 } Device;
extern int g_device;
void device_select(const char* name);

// ---------------------------------------------------------------------------------------------
// nn.c: kernels, each forward with its backward (layouts, argument order: see nn.c's opening)
// ---------------------------------------------------------------------------------------------

void linear_forward(float* out, const float* inp, const float* w, const float* b, int M, int IN, int OUT);
void linear_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                     const float* w, int M, int IN, int OUT);
void conv2d_forward(float* out, const float* inp, const float* w, const float* b, int N, int C,
                    int H, int W, int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch);
void conv2d_backward_input(float* dinp, const float* dout, const float* w, int N, int C, int H, int W,
                           int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch);
// The same with frozen IEEE fp16 weights (--weights fp16), converted exactly while sgemm packs
// them: bitwise equal to the fp32 functions on the converted weights.
void linear_forward_f16(float* out, const float* inp, const uint16_t* w, const float* b, int M, int IN, int OUT);
void linear_backward_f16(float* dinp, const float* dout, const uint16_t* w, int M, int IN, int OUT);
void conv2d_forward_f16(float* out, const float* inp, const uint16_t* w, const float* b, int N, int C,
                        int H, int W, int OC, int K, int stride, int pad_lo, int pad_hi);
void conv2d_backward_input_f16(float* dinp, const float* dout, const uint16_t* w, int N, int C, int H, int W,
                               int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch);
// out[N, OC, 2H, 2W] = conv2d(upsample_nearest(inp[N, C, H, W], 2H, 2W)) with stride 1 and padding pad,
// w (fp32) or w16 (fp16, w NULL): the up-sampled image is read on the fly, never stored.
void conv2d_forward_up2(float* out, const float* inp, const float* w, const uint16_t* w16, const float* b, int N,
                        int C, int H, int W, int OC, int K, int pad);
void groupnorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w,
                       const float* b, int N, int C, int HW, int G, float eps, int silu);
void groupnorm_backward(float* dx, const float* dout, const float* x, const float* mean, const float* rstd,
                        const float* w, const float* b, int N, int C, int HW, int G, int silu);
void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w,
                       const float* b, int M, int C, float eps);
void layernorm_backward(float* dx, const float* dout, const float* x, const float* mean,
                        const float* rstd, const float* w, int M, int C);
void silu_forward(float* out, const float* x, size_t n);
void silu_backward(float* dx, const float* dout, const float* x, size_t n);
void quick_gelu_forward(float* out, const float* x, size_t n);
void quick_gelu_backward(float* dx, const float* dout, const float* x, size_t n);
void gelu_forward(float* out, const float* x, size_t n);
void gelu_backward(float* dx, const float* dout, const float* x, size_t n);
void geglu_forward(float* out, const float* proj, int M, int F);
void geglu_backward(float* dproj, const float* dout, const float* proj, int M, int F);
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       int N, int Tq, int Tk, int NH, int HD, int ldq, int ldk, int ldv, int ldo,
                       int causal, Arena* scratch);
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                        const float* q, const float* k, const float* v, int N, int Tq, int Tk, int NH, int HD,
                        int ldq, int ldk, int ldv, int ldo, int causal, Arena* scratch);
void upsample_nearest_forward(float* out, const float* x, int N, int C, int H, int W, int Ho, int Wo);
void upsample_nearest_backward(float* dx, const float* dout, int N, int C, int H, int W, int Ho, int Wo);
void nchw_to_nhwc(float* out, const float* x, int N, int C, int HW);
void nhwc_to_nchw(float* out, const float* x, int N, int C, int HW);
void add_inplace(float* y, const float* x, size_t n);
void timestep_embedding(float* out, const float* t, int N, int dim, int flip_sin_to_cos, float shift);

// ---------------------------------------------------------------------------------------------
// tokenizer.c: the CLIP BPE tokenizer (transformers' CLIPTokenizer)
// ---------------------------------------------------------------------------------------------

#define CLIP_MAX_LENGTH 77
typedef struct Tokenizer Tokenizer;       // defined in tokenizer.c
// Loads DIR/vocab.json and DIR/merges.txt. NULL + error_last() on failure.
Tokenizer* tokenizer_load(const char* dir);
void tokenizer_free(Tokenizer* tok);
int tokenizer_vocab_size(const Tokenizer* tok);       // base vocabulary (49408 for CLIP)
// Adds an exact-match token (e.g. "<style1>"); returns its id (vocab_size + k), or the
// existing id if already added.
int tokenizer_add_token(Tokenizer* tok, const char* text);
void tokenizer_clear_added(Tokenizer* tok);   // forgets every token added with tokenizer_add_token
// BOS, BPE ids, EOS, EOS-padding to max_len; truncated so EOS stays last.
// Returns the number of ids before padding, or -1 + error_last() (e.g. invalid UTF-8).
int tokenizer_encode(const Tokenizer* tok, const char* text, int* ids, int max_len);
// BPE ids of text without BOS/EOS/padding (for "is the style word one token?").
// Returns count written (<= cap), or -1 + error_last().
int tokenizer_encode_raw(const Tokenizer* tok, const char* text, int* ids, int cap);
const char* tokenizer_token_text(const Tokenizer* tok, int id);   // vocab string or NULL

// ---------------------------------------------------------------------------------------------
// sd.c: configs, blocks, CLIP text encoder, UNet, VAE, loading (diffusers folder or LDM file)
// ---------------------------------------------------------------------------------------------

#define SD_MAX_LEVELS 8      // UNet / VAE resolution levels (SD 1.5: 4)
#define SD_MAX_LAYERS 8      // resnets per block (SD 1.5: 2 down, 3 up)

typedef struct ClipConfig {
    int vocab_size, hidden, intermediate, layers, heads, max_positions;
    float eps;
    int quick_gelu;          // hidden_act "quick_gelu" (SD 1.5) or "gelu"
} ClipConfig;

typedef struct UNetConfig {
    int in_channels, out_channels, levels, block_out[SD_MAX_LEVELS], layers_per_block;
    int down_attn[SD_MAX_LEVELS], up_attn[SD_MAX_LEVELS];   // Cross-attention block or plain
    int heads[SD_MAX_LEVELS];        // per level (diffusers' attention_head_dim quirk resolved)
    int tlayers[SD_MAX_LEVELS];      // transformer blocks per Transformer2D of each down level
    int cross_dim, groups, use_linear_projection, flip_sin_to_cos;
    float eps, freq_shift;
    int time_dim;                    // 4 · block_out[0]
} UNetConfig;

typedef struct VaeConfig {
    int in_channels, out_channels, latent_channels, levels, block_out[SD_MAX_LEVELS];
    int layers_per_block, groups;
    float scaling_factor;
} VaeConfig;

// primitives: pointers into the loaded weights
// A frozen weight is fp32 (w) or, loaded with SD_F16, IEEE fp16 (w16; w NULL).
typedef struct Linear {
    const float* w; const float* b; int in, out;   // w (out, in)
    float* dw;                                     // gradient of w when trained (K/V mode), else NULL
    const uint16_t* w16;                           // w in fp16 (SD_F16), else NULL
} Linear;
typedef struct Conv2d {
    const float* w; const uint16_t* w16; const float* b;   // w (out, in, k, k), or w16 under SD_F16
    int in, out, k, stride, pad_lo, pad_hi;
} Conv2d;
typedef struct Norm { const float* w; const float* b; int C, G; float eps; } Norm;  // G = 0: LayerNorm

typedef struct ResBlock {
    Norm norm1;              // *.resnets.*.norm1 (in)
    Conv2d conv1;            // *.resnets.*.conv1 (out, in, 3, 3)
    Linear time_emb_proj;    // *.resnets.*.time_emb_proj (out, time_dim); absent in the VAE
    Norm norm2;              // *.resnets.*.norm2 (out)
    Conv2d conv2;            // *.resnets.*.conv2 (out, out, 3, 3)
    Conv2d conv_shortcut;    // *.resnets.*.conv_shortcut (out, in, 1, 1) when in != out
    int has_temb, has_shortcut;
} ResBlock;

typedef struct LoraPair LoraPair;   // lora.c
typedef struct Attention {
    Linear to_q, to_k, to_v, to_out;   // *.attn{1,2}.to_q (inner, C), to_k/to_v (inner, D), to_out.0 (C, inner)
    int heads, head_dim;
    LoraPair* lora_k;                  // side paths on to_k / to_v (NULL: none)
    LoraPair* lora_v;
} Attention;

typedef struct TransformerBlock {
    Norm norm1; Attention attn1;       // self-attention
    Norm norm2; Attention attn2;       // cross-attention on the text context
    Norm norm3; Linear ff_proj, ff_out;  // ff.net.0.proj (2F, C), ff.net.2 (C, F): GEGLU
} TransformerBlock;

typedef struct Transformer2D {
    Norm norm;                         // *.attentions.*.norm (C), eps 1e-6
    Linear proj_in, proj_out;          // 1×1 conv or linear (C, C)
    TransformerBlock* blocks;
    int nblocks, C;
} Transformer2D;

// A UNet / VAE level: resnets, optional transformers (one after each resnet), optional sampler.
typedef struct Level {
    ResBlock res[SD_MAX_LAYERS];
    Transformer2D attn[SD_MAX_LAYERS];
    int nres, has_attn, has_sampler;
    Conv2d sampler;                    // downsamplers.0.conv (stride 2) or upsamplers.0.conv
    int in, out;
} Level;

typedef void (*TapFn)(void* ctx, const char* name, const float* x, int N, int C, int H, int W);

typedef struct UNet {
    UNetConfig cfg;
    Linear time_lin1, time_lin2;       // time_embedding.linear_1 (4C0, C0), linear_2 (4C0, 4C0)
    Conv2d conv_in;                    // conv_in (C0, in, 3, 3)
    Level down[SD_MAX_LEVELS], mid, up[SD_MAX_LEVELS];
    Norm norm_out;                     // conv_norm_out (C0)
    Conv2d conv_out;                   // conv_out (out, C0, 3, 3)
    TapFn tap;                         // optional observer of intermediates (golden tests)
    void* tap_ctx;
} UNet;

typedef struct VaeAttention {          // mid_block.attentions.0: one head over all pixels
    Norm group_norm;
    Linear to_q, to_k, to_v, to_out;   // (C, C) each, with bias
} VaeAttention;

typedef struct Vae {
    VaeConfig cfg;
    Conv2d enc_conv_in, enc_conv_out, quant_conv, post_quant_conv, dec_conv_in, dec_conv_out;
    Level enc_down[SD_MAX_LEVELS], dec_up[SD_MAX_LEVELS];
    ResBlock enc_mid_res[2], dec_mid_res[2];
    VaeAttention enc_mid_attn, dec_mid_attn;
    Norm enc_norm_out, dec_norm_out;
} Vae;

typedef struct ClipLayer {
    Norm ln1; Linear q, k, v, o;       // text_model.encoder.layers.*.layer_norm1, self_attn.{q,k,v,out}_proj
    Norm ln2; Linear fc1, fc2;         // layer_norm2, mlp.fc1 (I, H), mlp.fc2 (H, I)
} ClipLayer;

typedef struct ClipTextModel {
    ClipConfig cfg;
    const float* token_embedding;      // text_model.embeddings.token_embedding (V, H)
    const float* position_embedding;   // text_model.embeddings.position_embedding (P, H)
    ClipLayer* layers;
    Norm final_ln;                     // text_model.final_layer_norm (H)
    const float* added;                // rows of added tokens (ids V, V+1, ...) [n_added, H] or NULL
    int n_added;
} ClipTextModel;

typedef struct SchedulerConfig {
    int train_steps, steps_offset, set_alpha_to_one;
    float beta_start, beta_end;
    char beta_schedule[32], spacing[32], prediction[32];
} SchedulerConfig;

// Components to load; SD_F16 (--weights fp16) keeps the frozen linear and conv weights in fp16
// (half the memory; sgemm converts them while packing). Norms, biases, embeddings and attn2's
// to_k / to_v (which training replaces or reads) stay fp32.
enum { SD_TEXT = 1, SD_UNET = 2, SD_VAE = 4, SD_TOKENIZER = 8, SD_ALL = 15, SD_F16 = 16 };

typedef struct StableDiffusion {
    ClipTextModel clip;
    UNet unet;
    Vae vae;
    Tokenizer* tok;
    SchedulerConfig sched;
    SafeTensors files[3];
    int nfiles, ldm, loaded;           // loaded: SD_* mask
    char* path;
    int64_t params[3];                 // parameter counts: text, unet, vae
    int f16;                           // loaded with SD_F16
    void** owned;                      // converted and random tensors, freed by sd_free
    int nowned, capowned;
    struct TrainParams* trained;       // applied by trained_apply (lora.c), freed by sd_free
} StableDiffusion;

// path: a diffusers folder or an LDM single-file .safetensors, or "random:sd15" (full-size SD 1.5
// with random weights, for timing and memory measurements; needs tokenizer_dir); tokenizer_dir:
// folder with vocab.json + merges.txt (NULL: <path>/tokenizer); config_dir: a diffusers folder whose
// config.json files describe an LDM file (NULL: SD 1.5's defaults). components: SD_* mask, with
// SD_F16 for fp16 weights. Exits with a message on error.
void sd_load(StableDiffusion* sd, const char* path, const char* tokenizer_dir, const char* config_dir,
             int components, int verbose);
void sd_free(StableDiffusion* sd);
// Full-size SD 1.5 with random weights (bench): no file needed. components as for sd_load.
void sd_build_random(StableDiffusion* sd, int components, uint64_t seed);
void sd_default_configs(ClipConfig* c, UNetConfig* u, VaeConfig* v, SchedulerConfig* s);

// hidden[N, T, H] = CLIP(ids[N, T]), T <= max_positions.
void clip_forward(const ClipTextModel* m, float* hidden, const int* ids, int N, int T, Arena* scratch);
// Training: the same forward, keeping in `saved` what clip_backward reads. The backward runs from
// dhidden [N, T, H] to the embedding lookup and accumulates only the added-token rows dadded [n_added, H].
typedef struct ClipSaved ClipSaved;       // defined in sd.c
ClipSaved* clip_forward_train(const ClipTextModel* m, float* hidden, const int* ids, int N, int T, Arena* scratch,
                              Arena* saved);
void clip_backward(const ClipTextModel* m, const ClipSaved* sv, float* dadded, const float* dhidden, Arena* scratch);
// eps[N, out, H, W] = UNet(x[N, in, H, W], t[N], context[N, Tc, cross_dim]).
void unet_forward(const UNet* u, float* eps, const float* x, const float* t, const float* context,
                  int N, int H, int W, int Tc, Arena* scratch);
// Training: the same forward, keeping in `saved` what unet_backward reads (context must stay alive).
// The backward takes deps [N, out, H, W] and accumulates dcontext [N, Tc, D] (NULL: not wanted) and
// the gradients of attn2's LoRA factors / trainable K/V weights (through their pointers).
typedef struct UNetSaved UNetSaved;       // defined in sd.c
UNetSaved* unet_forward_train(const UNet* u, float* eps, const float* x, const float* t, const float* context,
                              int N, int H, int W, int Tc, Arena* scratch, Arena* saved);
void unet_backward(const UNet* u, const UNetSaved* sv, float* dcontext, const float* deps, Arena* scratch);
// The cross-attention (attn2) modules in forward order with their diffusers paths
// ("down_blocks.0.attentions.0.transformer_blocks.0.attn2"); returns the count (only the first
// cap are written).
int unet_cross_attentions(UNet* u, Attention** out, char (*paths)[128], int cap);
// mean, logvar [N, L, h, w] of the posterior for image[N, 3, H, W] in [-1, 1].
void vae_encode(const Vae* v, float* mean, float* logvar, const float* image, int N, int H, int W, Arena* scratch);
// image[N, 3, 8h, 8w] = decode(latent / scaling_factor), unclamped.
void vae_decode(const Vae* v, float* image, const float* latent, int N, int h, int w, Arena* scratch);
int vae_down_factor(const Vae* v);
// ctx[n, 77, D] = CLIP(tokenize(prompts)); exits with a message naming a bad prompt.
void sd_encode_prompts(StableDiffusion* sd, const char* const* prompts, int n, float* ctx, Arena* scratch);     // 2^(levels−1)
// Spatial size after the UNet/VAE down-sampling convs (k3, s2): pad 1 each side / pad (0, 1).
int unet_down_size(int n);

// ---------------------------------------------------------------------------------------------
// ddim.c: schedule, DDIM step and its inverse, inversion, guided sampling, noise mixing, SNR
// ---------------------------------------------------------------------------------------------

typedef struct Schedule {
    int train_steps;          // T (1000)
    float* alphas_cumprod;    // ᾱ [T], float32 as diffusers computes it
    float final_alpha;        // ᾱ before step 0
    int n, step_ratio;        // S inference steps, T / S
    int* timesteps;           // [S], descending
} Schedule;
typedef void (*DdimProgress)(void* ctx, int step, int total);

void schedule_init(Schedule* s, const SchedulerConfig* cfg, int steps);
void schedule_free(Schedule* s);
void ddim_step(const Schedule* s, float* prev, const float* x, const float* eps, int t, size_t n);
void ddim_inverse_step(const Schedule* s, float* next, const float* x, const float* eps, int t, size_t n);
void snr_curve(const Schedule* s, double* snr);            // snr[T−1], eq. 8
void noise_mix(float* out, const float* z1, const float* z2, const float* mask, int C, int h, int w);
void noise_mask_draw(float* mask, int h, int w, float alpha, Rng* rng);
// z ← (1−scale)·z + scale·(fresh noise renormalised per channel to z's mean and std)
void noise_rand_scale(float* z, int C, int h, int w, float scale, Rng* rng);
// z[C, h, w] ← inverted for nsteps (<= S) steps with cond[1, Tc, D]; latents [nsteps+1, C, h, w] or NULL.
void ddim_invert(const UNet* u, const Schedule* s, float* z, float* latents, const float* cond, int Tc,
                 int h, int w, int nsteps, DdimProgress progress, void* pctx, Arena* scratch);
// z[C, h, w] ← sampled from timesteps[first..S−1] with K contexts ctx[K, Tc, D] (ctx[0]
// unconditional) and guidance g[K]: ε = ε₀ + Σ_{k≥1} g_k (ε_k − ε₀). latents [S−first+1, ...] or NULL.
void ddim_sample(const UNet* u, const Schedule* s, float* z, float* latents, const float* ctx, int K,
                 const float* guidance, int Tc, int h, int w, int first, DdimProgress progress, void* pctx,
                 Arena* scratch);
// Noise files ("latent" F32 [1, C, h, w], h, w <= NOISE_MAX_SIDE): the latent (caller frees), or
// NULL + error_last() for anything else (missing tensor, wrong dtype/shape, NaN/Inf).
#define NOISE_MAX_SIDE 512
float* noise_from_st(SafeTensors* st, int C, int* h, int* w);
float* noise_load(const char* path, int C, int* h, int* w);

// ---------------------------------------------------------------------------------------------
// lora.c: trainable parameters (added-token rows, LoRA on attn2 to_k/to_v, or full K/V), loss,
// AdamW, the train step, checkpoints, export and import of A1111/kohya/diffusers files
// ---------------------------------------------------------------------------------------------

// A LoRA side path on a frozen linear W (out, in): y = W·x + scale · up·(down·x).
struct LoraPair {
    float* down;     // A (rank, in)
    float* up;       // B (out, rank)
    float* ddown;    // gradients (same layout), NULL when not training
    float* dup;
    int rank, in, out;
    float scale;     // alpha / rank
};
// out[M, out] += scale · (x[M, in] · downᵀ) · upᵀ
void lora_forward(const LoraPair* lp, float* out, const float* x, int M, Arena* scratch);
// The same, keeping h[M, rank] = x · downᵀ for the backward.
void lora_forward_save(const LoraPair* lp, float* out, float* h, const float* x, int M);
// From dout[M, out]: dx[M, in] += (NULL: not wanted); lp->ddown, lp->dup += (NULL: frozen).
void lora_backward(const LoraPair* lp, float* dx, const float* dout, const float* h, const float* x, int M,
                   Arena* scratch);

// pred, target [N, C, HW]. mask NULL: mean over N·C·HW of (pred − target)². mask [N, 1, HW]:
// InstaStyle's mean_n(Σ_{c,hw} mask·(pred − target)² / Σ_hw mask) (the denominator sums the
// one-channel mask). Returns the loss; dpred (if non-NULL) += ∂loss/∂pred.
float loss_mse(float* dpred, const float* pred, const float* target, const float* mask, int N, int C, int HW);

typedef enum { TRAIN_LORA, TRAIN_KV } TrainMode;   // the paper's LoRA, or the official full K/V
#define TRAIN_MAX_TOKENS 2

// One named trainable tensor: a view of the value / gradient buffers.
typedef struct TrainTensor { char name[160]; float* val; float* grad; size_t off, numel; int ndim, shape[2]; } TrainTensor;

// Everything trainable (llm.c's ParameterTensors): one allocation holds values | grads | AdamW m |
// AdamW v, each n floats in the same layout: token rows [ntok, hidden], then per attn2 layer l
// to_k then to_v, each LoRA down (rank, in) + up (out, rank), or the full weight (out, in).
typedef struct TrainParams {
    TrainMode mode;
    int ntok, hidden, nlayers, rank;  // rank 0 in LoRA mode: token rows only
    float alpha, scale;               // LoRA scale = alpha / rank
    char tokens[TRAIN_MAX_TOKENS][32];// "<style1>", "<style2>"
    size_t n;
    float* mem;                       // [4n]
    float *values, *grads, *m, *v;
    float *tok, *dtok;                // [ntok, hidden]
    LoraPair* lora;                   // [2·nlayers]: to_k of layer l at 2l, to_v at 2l + 1
    float **kv, **dkv;                // [2·nlayers]: full to_k / to_v weights (K/V mode)
    Attention** attn;                 // [nlayers] the UNet's attn2 modules, forward order
    char (*paths)[128];               // [nlayers] their diffusers paths
    const float** base;               // [2·nlayers] the frozen to_k / to_v weights
    TrainTensor* t;
    int nt, step, attached;           // step: optimiser steps taken
} TrainParams;

// Builds the layout for sd's UNet. Token rows start as the embedding of init_ids[k] (NULL: zeros);
// LoRA down ~ N(0, 1/rank²) from rng (NULL: zeros), up = 0, so the model is unchanged bit for bit;
// K/V mode starts from copies of the frozen weights. Tokens are named "<style1>", "<style2>".
void train_params_init(TrainParams* tp, StableDiffusion* sd, TrainMode mode, int ntok, const int* init_ids,
                       int rank, float alpha, Rng* rng);
void train_params_free(TrainParams* tp);
// Hooks tp into sd: LoRA side paths or K/V weights on every attn2, the token rows as CLIP's added
// rows, the token names registered with the tokenizer (ids vocab_size + k). Detach undoes it.
void train_attach(TrainParams* tp, StableDiffusion* sd);
void train_detach(TrainParams* tp, StableDiffusion* sd);

typedef struct TrainBatch {
    int N, h, w;                // latents [N, C, h, w]
    const float* latent0;       // clean latents (VAE mean × scaling factor)
    const float* noise;         // ε
    const int* timesteps;       // [N] train timesteps
    const float* mask;          // [N, 1, h, w] for the masked loss, or NULL
    const int* ids;             // [N, 77] token ids (added tokens included)
} TrainBatch;
// Zeroes the grads, runs CLIP → noisy = √ᾱ·z0 + √(1−ᾱ)·ε → UNet → loss → backward; gradients in
// tp->grads. alphas_cumprod [train_steps]. Returns the loss. Both arenas are back at their marks.
float train_step(StableDiffusion* sd, TrainParams* tp, const float* alphas_cumprod, const TrainBatch* b,
                 Arena* scratch, Arena* saved);

typedef struct AdamW {          // double, as torch's Python scalars (rounded to float where torch does)
    double lr, beta1, beta2, eps, weight_decay;
    double max_grad_norm;       // <= 0: no clipping
    int warmup;                 // linear warm-up steps (0: constant lr)
} AdamW;
AdamW adamw_defaults(void);     // the paper: lr 1e-5, betas (0.9, 0.999), eps 1e-8, no decay, no clip
// torch's clip_grad_norm_ over P tensors: returns the total norm before clipping and scales every
// gradient by min(1, max_norm / (total + 1e-6)) when max_norm > 0.
float grad_clip_norm(float* const* grads, const size_t* n, int P, float max_norm);
// torch.optim.AdamW's step (decoupled decay, bias correction) for step number `step` (1-based).
void adamw_update(float* p, const float* g, float* m, float* v, size_t n, const AdamW* opt, double lr, int step);
// Clip + AdamW over all of tp, lr warmed up; returns the gradient norm before clipping.
float train_update(TrainParams* tp, const AdamW* opt);

// Checkpoint: trainable tensors, AdamW m and v, step, tokens and the RNG state (if non-NULL) in one
// safetensors file, written atomically; meta: NULL-terminated key, value pairs (or NULL).
int train_save(const TrainParams* tp, const char* path, const Rng* rng, const char* const* meta);
// Rebuilds tp for sd from a train_save file and restores the optimiser and rng (if non-NULL).
int train_load(TrainParams* tp, StableDiffusion* sd, const char* path, Rng* rng);
// kohya/A1111 LoRA names (lora_unet_<path>.lora_down.weight, .lora_up.weight, .alpha), or in K/V
// mode lora_unet_<path>.diff = trained − base weight.
int train_export_lora(const TrainParams* tp, const char* path);
// Token k as a one-tensor embedding file "emb_params" [1, hidden] (A1111, diffusers, sd.cpp).
int train_export_embedding(const TrainParams* tp, int k, const char* path);
// Loads a file written by 'refine' (or an exported LoRA / embedding) into sd: registers the
// learned tokens with the tokenizer, sets their embedding rows, attaches LoRA or K/V weights.
// 0, or -1 + error_last().
int trained_apply(StableDiffusion* sd, const char* path);
// Ctrl-C: the first sets a flag the training loop checks between steps (to save a checkpoint and
// stop); the second exits at once.
void train_catch_sigint(void);
int train_interrupted(void);
// One LoRA training step of full-size SD 1.5 with random weights (fp16 frozen weights when f16)
// at size×size, timed after one untimed step; seconds, or -1 when training is not available.
double train_bench_step(int size, int batch, int f16);

// ---------------------------------------------------------------------------------------------
// image.c: PPM/BMP/PNG I/O, centre crop and resize, NCHW conversion, contact sheet
// ---------------------------------------------------------------------------------------------

typedef struct Image { int w, h; unsigned char* rgb; } Image;   // h*w*3 bytes, top row first
#define IMAGE_MAX_SIDE 16384
// Reads PPM (P6/P3), BMP (24/32-bit) or PNG (8-bit gray/RGB/RGBA/gray+alpha, non-interlaced),
// detected by content. 0 or -1 + error_last().
int image_read(Image* img, const char* path);
int image_read_mem(Image* img, const unsigned char* data, size_t len);
// Format by extension (.ppm, .bmp, .png). PNG gets one tEXt chunk per key/value pair
// (text: NULL-terminated list "key", "value", ..., NULL; may be NULL). Atomic.
int image_write(const Image* img, const char* path, const char* const* text);
void image_free(Image* img);
Image image_alloc(int w, int h);
// Centre-crop to the target aspect ratio, then bicubic resize (PIL's filter) to w x h.
Image image_center_crop_resize(const Image* src, int w, int h);
void image_to_nchw(const Image* img, float* out);            // [3,h,w] in [-1, 1]
Image image_from_nchw(const float* x, int h, int w);         // clamps (x+1)/2 to [0,1]
// Grid of n equally sized images with a label drawn on each (labels may be NULL).
Image image_contact_sheet(const Image* imgs, const char* const* labels, int n, int cols);
void image_draw_text(Image* img, int x, int y, const char* text, int scale,
                     unsigned char r, unsigned char g, unsigned char b);
// The candidates manifest (manifest.tsv: "number\tobject\tprompt\tfile" lines, a header first):
// finds candidate `number`, copies its object and file name. 0, or -1 + error_last() (absent,
// malformed, or a file name that leaves the folder).
int manifest_lookup(const char* text, size_t len, long number, char* object, size_t ocap, char* file, size_t fcap);

// ---------------------------------------------------------------------------------------------
// nn_cuda.cu: the GPU twins (make CUDA=1; without it each entry point exits with a message).
// Same parameters and semantics as the CPU functions; host pointers in and out.
// ---------------------------------------------------------------------------------------------

void cuda_init(void);                                   // picks device 0, reads INSTASTYLE_CUDA_GEMM
void cuda_shutdown(void);
void cuda_weights_frozen(const float* w, size_t n);     // w (n floats) never changes: upload once, cache
void cuda_weights_release(void);                        // forget every cached weight (sd_free)
const char* cuda_device_name(void);
const char* cuda_gemm_mode(void);                       // "fp32", "3xtf32", "tf32"
double cuda_peak_gflops(void);                          // FP32 FMA probe on the GPU
size_t cuda_peak_bytes(void);                           // device memory high-water mark
long cuda_calls(void);                                  // <op>_cuda calls so far
double cuda_flop_count(void);                           // 2·M·N·K of the GEMM-shaped calls so far
void sgemm_cuda(int transA, int transB, int M, int N, int K, float alpha, const float* A, int lda,
                const float* B, int ldb, float beta, float* C, int ldc);
void linear_forward_cuda(float* out, const float* inp, const float* w, const float* b, int M, int IN, int OUT);
void conv2d_forward_cuda(float* out, const float* inp, const float* w, const float* b, int N, int C,
                         int H, int W, int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch);
void conv2d_forward_up2_cuda(float* out, const float* inp, const float* w, const uint16_t* w16, const float* b, int N,
                             int C, int H, int W, int OC, int K, int pad);
void conv2d_backward_input_cuda(float* dinp, const float* dout, const float* w, int N, int C, int H, int W,
                                int OC, int K, int stride, int pad_lo, int pad_hi, Arena* scratch);
void groupnorm_forward_cuda(float* out, float* mean, float* rstd, const float* x, const float* w,
                            const float* b, int N, int C, int HW, int G, float eps, int silu);
void layernorm_forward_cuda(float* out, float* mean, float* rstd, const float* x, const float* w,
                            const float* b, int M, int C, float eps);
void attention_forward_cuda(float* out, float* lse, const float* q, const float* k, const float* v,
                            int N, int Tq, int Tk, int NH, int HD, int ldq, int ldk, int ldv, int ldo,
                            int causal, Arena* scratch);
void attention_backward_cuda(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                             const float* q, const float* k, const float* v, int N, int Tq, int Tk, int NH, int HD,
                             int ldq, int ldk, int ldv, int ldo, int causal, Arena* scratch);

#ifdef __cplusplus
}
#endif
#endif // INSTASTYLE_H
