// golden.h: what the golden runner (run_golden.c) shares with the kind functions (golden_kinds.c).
#ifndef GOLDEN_H
#define GOLDEN_H
#include "../instastyle.h"

#define GOLDEN_MAX_OUTPUTS 256
#define KIND_NOT_IMPLEMENTED 77

typedef struct GoldenOutput { char name[256]; Tensor t; } GoldenOutput;
typedef struct Outputs { GoldenOutput items[GOLDEN_MAX_OUTPUTS]; int n; } Outputs;

typedef struct Case {
    char path[4200], root[4096], model[1024];
    SafeTensors st;
    Json* params;
} Case;

typedef int (*KindFn)(Case* c, Outputs* out);

void out_add(Outputs* o, const char* name, const float* data, int ndim, const int* shape);
void out_add4(Outputs* o, const char* name, const float* data, int d0, int d1, int d2, int d3);  // -1: absent dim
const float* case_input(Case* c, const char* name, Tensor* shape_out);
int case_has(Case* c, const char* name);
double param_number(Case* c, const char* key, double fallback);
const char* param_string(Case* c, const char* key, const char* fallback);
StableDiffusion* case_model(Case* c);
int case_added_tokens(Case* c, StableDiffusion* sd);

int kind_tokenizer(Case* c, Outputs* o);
int kind_text_encoder(Case* c, Outputs* o);
int kind_vae_encode(Case* c, Outputs* o);
int kind_vae_decode(Case* c, Outputs* o);
int kind_unet(Case* c, Outputs* o);
int kind_ddim_schedule(Case* c, Outputs* o);
int kind_snr(Case* c, Outputs* o);
int kind_ddim_step(Case* c, Outputs* o);
int kind_invert(Case* c, Outputs* o);
int kind_sample(Case* c, Outputs* o);
int kind_mix_sample(Case* c, Outputs* o);
int kind_lora_grad(Case* c, Outputs* o);
int kind_kv_grad(Case* c, Outputs* o);
int kind_adamw_step(Case* c, Outputs* o);
int kind_image_decode(Case* c, Outputs* o);     // golden_kinds.c (JPEG, image.c)
int kind_clip_preprocess(Case* c, Outputs* o);  // golden_clip.c
int kind_clip_vision(Case* c, Outputs* o);
int kind_clip_text_embeds(Case* c, Outputs* o);
int kind_clip_score(Case* c, Outputs* o);
#endif
