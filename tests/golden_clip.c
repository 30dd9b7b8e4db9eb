// Golden kinds of CLIP: preprocessing, vision tower, text embeddings, scores and selection.
// Not implemented yet: each reports SKIP.
#include "golden.h"

int kind_clip_preprocess(Case* c, Outputs* o) { (void)c; (void)o; return KIND_NOT_IMPLEMENTED; }
int kind_clip_vision(Case* c, Outputs* o) { (void)c; (void)o; return KIND_NOT_IMPLEMENTED; }
int kind_clip_text_embeds(Case* c, Outputs* o) { (void)c; (void)o; return KIND_NOT_IMPLEMENTED; }
int kind_clip_score(Case* c, Outputs* o) { (void)c; (void)o; return KIND_NOT_IMPLEMENTED; }
