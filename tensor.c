// tensor.c: the ground floor of instastyle.
//   - checks and errors: CHECK for fatal conditions; error_set/error_last for parsers of untrusted
//     input, which return an error code instead of exiting (so fuzzers can run them);
//   - checked size arithmetic, whole-file reads, atomic writes (path.tmp + rename);
//   - Arena: a chunked bump allocator for activations (mark / reset, peak counter);
//   - JSON: a small recursive-descent reader (objects, arrays, numbers, strings with \u escapes
//     and surrogate pairs, true/false/null);
//   - safetensors: a reader that validates everything before trusting it (header length inside
//     the file, JSON well-formed, known dtypes, shape × dtype size == byte length, offsets inside
//     the data block and non-overlapping, no integer overflow) and an atomic writer;
//   - RNG: MT19937, the generator behind torch's CPU randn, with its Box-Muller normals;
//   - fp16/bf16 conversion and a monotonic timer.
// Left out: any tensor algebra (kernels take float* in nn.c), memory mapping (one fread).
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE          // MADV_HUGEPAGE (Linux; optional)
#include "instastyle.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

// ----------------------------------------------------------------------------------------------
// checks and errors

void check_fail(const char* file, int line, const char* fmt, ...) {
    fflush(stdout);
    fprintf(stderr, "error: ");
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (%s:%d)\n", file, line);
    exit(1);
}

static char g_error[1024];

void error_set(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
}

const char* error_last(void) { return g_error[0] ? g_error : "unknown error"; }

void* xmalloc(size_t n) {
    void* p = malloc(n ? n : 1);
    CHECK(p, "out of memory allocating %zu bytes", n);
    return p;
}

// Large buffers (activation arenas, GEMM pack buffers, tensor data read from files) start on a
// 2 MiB boundary and ask Linux for transparent huge pages: the convolutions read image rows a
// channel (often a power of two, 1 MiB) apart, and with 4 KiB pages every such row costs a TLB
// miss. Model weights copied at load stay in malloc'ed memory: rounding each tensor up to whole
// 2 MiB pages would cost ~300 MiB of RSS. Freed with free().
#define HUGE_PAGE ((size_t)2 << 20)
void* malloc_large(size_t n) {
    if (n < HUGE_PAGE) return aligned_alloc(64, (n + 63) / 64 * 64 + (n == 0) * 64);   // 64-byte aligned
    size_t rounded = (n + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    void* p = rounded >= n ? aligned_alloc(HUGE_PAGE, rounded) : NULL;
#ifdef MADV_HUGEPAGE
    if (p) madvise(p, rounded, MADV_HUGEPAGE);    // advice only: ignored where unsupported
#endif
    return p;
}

void* xmalloc_large(size_t n) {
    void* p = malloc_large(n);
    CHECK(p, "out of memory allocating %zu bytes", n);
    return p;
}

void* xcalloc(size_t count, size_t size) {
    void* p = calloc(count ? count : 1, size ? size : 1);
    CHECK(p, "out of memory allocating %zu x %zu bytes", count, size);
    return p;
}

char* xstrdup(const char* s) {
    size_t n = strlen(s) + 1;
    char* p = xmalloc(n);
    memcpy(p, s, n);
    return p;
}

int size_mul(size_t a, size_t b, size_t* out) {
    if (a != 0 && b > SIZE_MAX / a) return -1;
    *out = a * b;
    return 0;
}

int size_add(size_t a, size_t b, size_t* out) {
    if (b > SIZE_MAX - a) return -1;
    *out = a + b;
    return 0;
}

// ----------------------------------------------------------------------------------------------
// files

char* file_read_all(const char* path, size_t* len, size_t max_len) {
    FILE* f = fopen(path, "rb");
    if (!f) { error_set("cannot open %s: %s", path, strerror(errno)); return NULL; }
    size_t cap = 1 << 16, n = 0;
    char* buf = malloc(cap);
    if (!buf) { fclose(f); error_set("out of memory reading %s", path); return NULL; }
    for (;;) {
        if (n + 1 >= cap) {
            if (cap > max_len) {
                free(buf); fclose(f);
                error_set("%s: file larger than the limit of %zu bytes", path, max_len);
                return NULL;
            }
            char* nb = realloc(buf, cap * 2);
            if (!nb) { free(buf); fclose(f); error_set("out of memory reading %s", path); return NULL; }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - 1 - n, f);
        n += got;
        if (got == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) { free(buf); error_set("read error on %s", path); return NULL; }
    if (n > max_len) {
        free(buf);
        error_set("%s: file larger than the limit of %zu bytes", path, max_len);
        return NULL;
    }
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

int file_write_atomic(const char* path, const void* data, size_t len) {
    size_t plen = strlen(path);
    char* tmp = xmalloc(plen + 5);
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    FILE* f = fopen(tmp, "wb");
    if (!f) { error_set("cannot write %s: %s", tmp, strerror(errno)); free(tmp); return -1; }
    int ok = fwrite(data, 1, len, f) == len;
    ok = (fflush(f) == 0) && ok;
    ok = (fsync(fileno(f)) == 0 || errno == EINVAL) && ok;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        error_set("cannot write %s: %s", path, strerror(errno));
        remove(tmp);
        free(tmp);
        return -1;
    }
    free(tmp);
    return 0;
}

int path_is_dir(const char* path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

size_t tensor_numel(const Tensor* t) {
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

// ----------------------------------------------------------------------------------------------
// Arena: chunks form a list, newest first; `used` counts bytes handed out (plus alignment).

struct ArenaChunk {
    ArenaChunk* prev;
    size_t cap, used;     // bytes
    size_t base;          // arena->used when this chunk was started
    unsigned char* mem;
};

void arena_init(Arena* a, size_t chunk_size) {
    memset(a, 0, sizeof *a);
    a->chunk_size = chunk_size ? chunk_size : ((size_t)64 << 20);
}

float* arena_alloc(Arena* a, size_t nfloats) {
    size_t bytes;
    CHECK(size_mul(nfloats, sizeof(float), &bytes) == 0, "arena: %zu floats overflow", nfloats);
    bytes = (bytes + 63) & ~(size_t)63;
    ArenaChunk* c = a->head;
    if (!c || c->used + bytes > c->cap) {
        ArenaChunk** pick = &a->spare;    // a released chunk that is large enough, else a new one
        while (*pick && (*pick)->cap < bytes) pick = &(*pick)->prev;
        ArenaChunk* nc = *pick;
        if (nc) *pick = nc->prev;
        else {
            size_t cap = bytes > a->chunk_size ? bytes : a->chunk_size;
            nc = xmalloc(sizeof *nc);
            nc->mem = xmalloc_large(cap);       // 64-byte aligned at least
            nc->cap = cap;
        }
        nc->used = 0;
        nc->base = a->used;
        nc->prev = c;
        a->head = c = nc;
    }
    float* p = (float*)(c->mem + c->used);
    c->used += bytes;
    a->used += bytes;
    if (a->used > a->peak) a->peak = a->used;
    return p;
}

float* arena_zalloc(Arena* a, size_t nfloats) {
    float* p = arena_alloc(a, nfloats);
    memset(p, 0, nfloats * sizeof(float));
    return p;
}

size_t arena_mark(const Arena* a) { return a->used; }

void arena_reset(Arena* a, size_t mark) {
    // Release whole chunks started at or after the mark (kept for reuse: no page faults on the
    // next step), then rewind the one that holds it.
    while (a->head && a->head->base >= mark && a->head->prev) {
        ArenaChunk* c = a->head;
        a->head = c->prev;
        c->prev = a->spare;
        a->spare = c;
    }
    if (a->head) {
        ArenaChunk* c = a->head;
        size_t keep = mark > c->base ? mark - c->base : 0;
        if (keep < c->used) c->used = keep;
    }
    a->used = mark;
}

void arena_free(Arena* a) {
    ArenaChunk* lists[2] = {a->head, a->spare};
    for (int i = 0; i < 2; i++)
        while (lists[i]) {
            ArenaChunk* c = lists[i];
            lists[i] = c->prev;
            free(c->mem);
            free(c);
        }
    a->head = a->spare = NULL;
    a->used = 0;
}

// ----------------------------------------------------------------------------------------------
// JSON

#define JSON_MAX_DEPTH 64

typedef struct JsonParser {
    const char* s;
    size_t len, pos;
    int depth;
} JsonParser;

static void json_skip_ws(JsonParser* p) {
    while (p->pos < p->len) {
        char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int json_fail(JsonParser* p, const char* what) {
    error_set("JSON: %s at byte %zu", what, p->pos);
    return -1;
}

static int json_hex4(JsonParser* p, unsigned* out) {
    if (p->pos + 4 > p->len) return json_fail(p, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[p->pos++];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return json_fail(p, "bad hex digit in \\u escape");
    }
    *out = v;
    return 0;
}

static size_t utf8_put(char* out, unsigned cp) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 63)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12)); out[1] = (char)(0x80 | ((cp >> 6) & 63));
        out[2] = (char)(0x80 | (cp & 63));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18)); out[1] = (char)(0x80 | ((cp >> 12) & 63));
    out[2] = (char)(0x80 | ((cp >> 6) & 63)); out[3] = (char)(0x80 | (cp & 63));
    return 4;
}

// Parses a string body after the opening quote; output is never longer than the input.
static int json_string(JsonParser* p, char** out, size_t* out_len) {
    size_t start = p->pos, end = start;
    while (end < p->len && p->s[end] != '"') end += p->s[end] == '\\' ? 2 : 1;   // the closing quote
    if (end > p->len) end = p->len;
    char* buf = malloc(end - start + 1);
    if (!buf) return json_fail(p, "out of memory");
    size_t n = 0;
    while (1) {
        if (p->pos >= p->len) { free(buf); return json_fail(p, "unterminated string"); }
        unsigned char c = (unsigned char)p->s[p->pos++];
        if (c == '"') break;
        if (c < 0x20) { free(buf); return json_fail(p, "control character in string"); }
        if (c != '\\') { buf[n++] = (char)c; continue; }
        if (p->pos >= p->len) { free(buf); return json_fail(p, "truncated escape"); }
        char e = p->s[p->pos++];
        unsigned cp;
        switch (e) {
        case '"': buf[n++] = '"'; break;
        case '\\': buf[n++] = '\\'; break;
        case '/': buf[n++] = '/'; break;
        case 'b': buf[n++] = '\b'; break;
        case 'f': buf[n++] = '\f'; break;
        case 'n': buf[n++] = '\n'; break;
        case 'r': buf[n++] = '\r'; break;
        case 't': buf[n++] = '\t'; break;
        case 'u':
            if (json_hex4(p, &cp)) { free(buf); return -1; }
            if (cp >= 0xD800 && cp < 0xDC00) {   // high surrogate: a low one must follow
                unsigned lo;
                if (p->pos + 2 > p->len || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
                    free(buf); return json_fail(p, "lone high surrogate");
                }
                p->pos += 2;
                if (json_hex4(p, &lo)) { free(buf); return -1; }
                if (lo < 0xDC00 || lo > 0xDFFF) { free(buf); return json_fail(p, "bad low surrogate"); }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                free(buf); return json_fail(p, "lone low surrogate");
            }
            n += utf8_put(buf + n, cp);   // 6 or 12 input bytes always cover <= 4 output bytes
            break;
        default: free(buf); return json_fail(p, "unknown escape");
        }
    }
    buf[n] = 0;
    *out = buf;
    *out_len = n;
    return 0;
}

static int json_value(JsonParser* p, Json* out);

static int json_push(Json* j, int* cap) {
    if (j->count == *cap) {
        if (*cap > (1 << 24)) return -1;
        int nc = *cap ? *cap * 2 : 4;
        Json* ni = realloc(j->items, (size_t)nc * sizeof(Json));
        if (!ni) return -1;
        j->items = ni;
        if (j->type == JSON_OBJECT) {
            char** nk = realloc(j->keys, (size_t)nc * sizeof(char*));
            if (!nk) return -1;
            j->keys = nk;
        }
        *cap = nc;
    }
    return 0;
}

static int json_container(JsonParser* p, Json* out, int is_object) {
    char close = is_object ? '}' : ']';
    out->type = is_object ? JSON_OBJECT : JSON_ARRAY;
    if (++p->depth > JSON_MAX_DEPTH) return json_fail(p, "nesting too deep");
    int cap = 0;
    json_skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == close) { p->pos++; p->depth--; return 0; }
    while (1) {
        if (json_push(out, &cap)) return json_fail(p, "out of memory");
        json_skip_ws(p);
        char* key = NULL;
        if (is_object) {
            size_t klen;
            if (p->pos >= p->len || p->s[p->pos] != '"') return json_fail(p, "expected a key string");
            p->pos++;
            if (json_string(p, &key, &klen)) return -1;
            json_skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') { free(key); return json_fail(p, "expected ':'"); }
            p->pos++;
            out->keys[out->count] = key;
        }
        Json* item = &out->items[out->count];
        memset(item, 0, sizeof *item);
        out->count++;          // counted before parsing so json_free releases a partial item
        if (json_value(p, item)) return -1;
        json_skip_ws(p);
        if (p->pos >= p->len) return json_fail(p, "unterminated container");
        char c = p->s[p->pos++];
        if (c == close) break;
        if (c != ',') return json_fail(p, "expected ',' or a closing bracket");
    }
    p->depth--;
    return 0;
}

static int json_number(JsonParser* p, Json* out) {
    size_t start = p->pos;
    if (p->pos < p->len && p->s[p->pos] == '-') p->pos++;
    size_t digits = p->pos;
    while (p->pos < p->len && strchr("0123456789+-.eE", p->s[p->pos])) p->pos++;
    if (p->pos == digits || p->pos - start > 64) return json_fail(p, "bad number");
    char tmp[72];
    memcpy(tmp, p->s + start, p->pos - start);
    tmp[p->pos - start] = 0;
    char* end;
    out->type = JSON_NUMBER;
    out->number = strtod(tmp, &end);
    if (*end != 0) return json_fail(p, "bad number");
    return 0;
}

static int json_literal(JsonParser* p, const char* word) {
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n) != 0) return json_fail(p, "unexpected token");
    p->pos += n;
    return 0;
}

static int json_value(JsonParser* p, Json* out) {
    json_skip_ws(p);
    if (p->pos >= p->len) return json_fail(p, "unexpected end");
    char c = p->s[p->pos];
    if (c == '{' || c == '[') { p->pos++; return json_container(p, out, c == '{'); }
    if (c == '"') { p->pos++; out->type = JSON_STRING; return json_string(p, &out->string, &out->len); }
    if (c == 't') { out->type = JSON_BOOL; out->number = 1; return json_literal(p, "true"); }
    if (c == 'f') { out->type = JSON_BOOL; out->number = 0; return json_literal(p, "false"); }
    if (c == 'n') { out->type = JSON_NULL; return json_literal(p, "null"); }
    return json_number(p, out);
}

static void json_free_inner(Json* j) {
    if (j->type == JSON_STRING) free(j->string);
    if (j->type == JSON_ARRAY || j->type == JSON_OBJECT) {
        for (int i = 0; i < j->count; i++) {
            json_free_inner(&j->items[i]);
            if (j->keys) free(j->keys[i]);
        }
        free(j->items);
        free(j->keys);
    }
}

Json* json_parse(const char* text, size_t len) {
    JsonParser p = {text, len, 0, 0};
    Json* j = calloc(1, sizeof *j);
    if (!j) { error_set("out of memory"); return NULL; }
    if (json_value(&p, j) == 0) {
        json_skip_ws(&p);
        if (p.pos == p.len) return j;
        json_fail(&p, "trailing characters");
    }
    json_free_inner(j);
    free(j);
    return NULL;
}

void json_free(Json* j) {
    if (!j) return;
    json_free_inner(j);
    free(j);
}

const Json* json_get(const Json* obj, const char* key) {
    if (!obj || obj->type != JSON_OBJECT) return NULL;
    for (int i = 0; i < obj->count; i++)
        if (strcmp(obj->keys[i], key) == 0) return &obj->items[i];
    return NULL;
}

double json_get_number(const Json* obj, const char* key, double fallback) {
    const Json* v = json_get(obj, key);
    return v && (v->type == JSON_NUMBER || v->type == JSON_BOOL) ? v->number : fallback;
}

const char* json_get_string(const Json* obj, const char* key, const char* fallback) {
    const Json* v = json_get(obj, key);
    return v && v->type == JSON_STRING ? v->string : fallback;
}

// ----------------------------------------------------------------------------------------------
// float16 / bfloat16

float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {   // subnormal: normalise
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 1024));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 1023) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7F800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t f32_to_f16(float f) {   // round to nearest even, as numpy and torch do
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, exp = (x >> 23) & 255, man = x & 0x7FFFFF;
    if (exp == 255) return (uint16_t)(sign | 0x7C00 | (man ? 0x200 : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7C00);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000;
        int shift = 14 - e;
        uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;   // may carry into exponent: fine
    return (uint16_t)(sign | half);
}

float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// ----------------------------------------------------------------------------------------------
// safetensors reader

#define ST_MAX_HEADER ((size_t)100 << 20)

static const char* DTYPE_NAMES[] = {"F32", "F16", "BF16", "I32", "I64", "U8"};
static const size_t DTYPE_SIZES[] = {4, 2, 2, 4, 8, 1};

const char* dtype_name(DType d) { return DTYPE_NAMES[d]; }
size_t dtype_size(DType d) { return DTYPE_SIZES[d]; }

static int dtype_parse(const char* s, DType* out) {
    for (int i = 0; i < 6; i++)
        if (strcmp(s, DTYPE_NAMES[i]) == 0) { *out = (DType)i; return 0; }
    return -1;
}

static int entry_cmp(const void* a, const void* b) {
    return strcmp(((const StEntry*)a)->name, ((const StEntry*)b)->name);
}

static int offset_cmp(const void* a, const void* b) {
    const StEntry* x = *(const StEntry* const*)a;
    const StEntry* y = *(const StEntry* const*)b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : 0;
}

// One header entry: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}.
static int st_parse_entry(SafeTensors* st, StEntry* e, const char* name, const Json* v) {
    const char* where = st->path;
    if (v->type != JSON_OBJECT) { error_set("%s: tensor '%s': header entry is not an object", where, name); return -1; }
    const char* dt = json_get_string(v, "dtype", NULL);
    const Json* shape = json_get(v, "shape");
    const Json* offs = json_get(v, "data_offsets");
    if (!dt || dtype_parse(dt, &e->dtype)) {
        error_set("%s: tensor '%s': dtype '%s' not supported (expected F32, F16, BF16, I32, I64 or U8)",
                  where, name, dt ? dt : "(missing)");
        return -1;
    }
    if (!shape || shape->type != JSON_ARRAY || shape->count > TENSOR_MAX_DIMS) {
        error_set("%s: tensor '%s': shape missing or more than %d dims", where, name, TENSOR_MAX_DIMS);
        return -1;
    }
    if (!offs || offs->type != JSON_ARRAY || offs->count != 2) {
        error_set("%s: tensor '%s': data_offsets must be [begin, end]", where, name);
        return -1;
    }
    size_t numel = 1;
    e->ndim = shape->count;
    for (int d = 0; d < shape->count; d++) {
        double x = shape->items[d].number;
        if (shape->items[d].type != JSON_NUMBER || x < 0 || x > 1e15 || x != floor(x)) {
            error_set("%s: tensor '%s': bad dimension %d", where, name, d);
            return -1;
        }
        e->shape[d] = (int64_t)x;
        if (size_mul(numel, (size_t)x, &numel)) { error_set("%s: tensor '%s': size overflows", where, name); return -1; }
    }
    double b = offs->items[0].number, en = offs->items[1].number;
    if (offs->items[0].type != JSON_NUMBER || offs->items[1].type != JSON_NUMBER || b < 0 || en < b ||
        en > (double)st->data_len || b != floor(b) || en != floor(en)) {
        error_set("%s: tensor '%s': data_offsets [%.0f, %.0f] outside the data block of %zu bytes",
                  where, name, b, en, st->data_len);
        return -1;
    }
    e->begin = (size_t)b;
    e->end = (size_t)en;
    size_t bytes = 0;
    if (size_mul(numel, dtype_size(e->dtype), &bytes) || bytes != e->end - e->begin) {
        error_set("%s: tensor '%s': shape × dtype size = %zu bytes but data_offsets span %zu",
                  where, name, bytes, e->end - e->begin);
        return -1;
    }
    e->name = xstrdup(name);
    return 0;
}

static int st_parse_header(SafeTensors* st) {
    const Json* h = st->header;
    if (h->type != JSON_OBJECT) { error_set("%s: header is not a JSON object", st->path); return -1; }
    st->entries = xcalloc((size_t)h->count + 1, sizeof(StEntry));
    for (int i = 0; i < h->count; i++) {
        if (strcmp(h->keys[i], "__metadata__") == 0) {
            const Json* m = &h->items[i];
            if (m->type != JSON_OBJECT) { error_set("%s: __metadata__ is not an object", st->path); return -1; }
            for (int k = 0; k < m->count; k++)
                if (m->items[k].type != JSON_STRING) {
                    error_set("%s: __metadata__ value '%s' is not a string", st->path, m->keys[k]);
                    return -1;
                }
            st->metadata = (Json*)m;
            continue;
        }
        if (st_parse_entry(st, &st->entries[st->n], h->keys[i], &h->items[i])) return -1;
        st->n++;
    }
    qsort(st->entries, (size_t)st->n, sizeof(StEntry), entry_cmp);
    for (int i = 1; i < st->n; i++)
        if (strcmp(st->entries[i - 1].name, st->entries[i].name) == 0) {
            error_set("%s: tensor '%s' appears twice", st->path, st->entries[i].name);
            return -1;
        }
    // Non-overlapping: sort by begin and check each ends before the next begins.
    StEntry** byoff = xmalloc(((size_t)st->n + 1) * sizeof(StEntry*));
    for (int i = 0; i < st->n; i++) byoff[i] = &st->entries[i];
    qsort(byoff, (size_t)st->n, sizeof(StEntry*), offset_cmp);
    int bad = -1;
    for (int i = 1; i < st->n && bad < 0; i++)
        if (byoff[i]->begin < byoff[i - 1]->end && byoff[i]->end > byoff[i]->begin) bad = i;
    if (bad >= 0) error_set("%s: tensors '%s' and '%s' overlap in the data block", st->path,
                            byoff[bad - 1]->name, byoff[bad]->name);
    free(byoff);
    return bad >= 0 ? -1 : 0;
}

int st_open_mem(SafeTensors* st, const unsigned char* buf, size_t len, const char* label) {
    memset(st, 0, sizeof *st);
    st->path = xstrdup(label ? label : "(memory)");
    if (len < 8) { error_set("%s: %zu bytes is too short for a safetensors file", st->path, len); goto fail; }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | buf[i];
    if (hlen > ST_MAX_HEADER || hlen > len - 8) {
        error_set("%s: header length %llu exceeds the file (%zu bytes) or the %zu MiB limit; "
                  "truncated or not a safetensors file", st->path, (unsigned long long)hlen, len,
                  ST_MAX_HEADER >> 20);
        goto fail;
    }
    st->header = json_parse((const char*)buf + 8, (size_t)hlen);
    if (!st->header) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", error_last());
        error_set("%s: bad header: %s", st->path, msg);
        goto fail;
    }
    st->data_len = len - 8 - (size_t)hlen;
    st->data = xmalloc_large(st->data_len);
    memcpy(st->data, buf + 8 + hlen, st->data_len);
    if (st_parse_header(st)) goto fail;
    return 0;
fail:
    st_close(st);
    return -1;
}

// Reads the header first, then the data block straight into its own allocation (no copy of
// the whole file), so a 4 GB checkpoint needs 4 GB, not 8.
int st_open(SafeTensors* st, const char* path) {
    memset(st, 0, sizeof *st);
    st->path = xstrdup(path);
    FILE* f = fopen(path, "rb");
    unsigned char* hbuf = NULL;
    if (!f) { error_set("cannot open %s: %s", path, strerror(errno)); goto fail; }
    if (fseeko(f, 0, SEEK_END) != 0) { error_set("%s: cannot seek", path); goto fail; }
    off_t flen = ftello(f);
    rewind(f);
    unsigned char lenbytes[8];
    if (flen < 8 || fread(lenbytes, 1, 8, f) != 8) {
        error_set("%s: %lld bytes is too short for a safetensors file", path, (long long)flen);
        goto fail;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | lenbytes[i];
    if (hlen > ST_MAX_HEADER || hlen > (uint64_t)flen - 8) {
        error_set("%s: header length %llu exceeds the file (%lld bytes) or the %zu MiB limit; "
                  "truncated or not a safetensors file", path, (unsigned long long)hlen,
                  (long long)flen, ST_MAX_HEADER >> 20);
        goto fail;
    }
    hbuf = xmalloc((size_t)hlen + 1);
    if (fread(hbuf, 1, (size_t)hlen, f) != hlen) { error_set("%s: truncated header", path); goto fail; }
    st->header = json_parse((const char*)hbuf, (size_t)hlen);
    if (!st->header) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", error_last());
        error_set("%s: bad header: %s", path, msg);
        goto fail;
    }
    st->data_len = (size_t)((uint64_t)flen - 8 - hlen);
    st->data = malloc_large(st->data_len);
    if (!st->data) { error_set("%s: out of memory for %zu bytes of tensor data", path, st->data_len); goto fail; }
    if (fread(st->data, 1, st->data_len, f) != st->data_len) { error_set("%s: read error", path); goto fail; }
    fclose(f);
    free(hbuf);
    if (st_parse_header(st)) { st_close(st); return -1; }
    return 0;
fail:
    if (f) fclose(f);
    free(hbuf);
    st_close(st);
    return -1;
}

void st_close(SafeTensors* st) {
    for (int i = 0; i < st->n; i++) {
        free(st->entries[i].name);
        if (st->entries[i].f32 && (st->entries[i].dtype != DT_F32 ||
            (void*)st->entries[i].f32 != (void*)(st->data + st->entries[i].begin)))
            free(st->entries[i].f32);
    }
    free(st->entries);
    json_free(st->header);
    free(st->data);
    free(st->path);
    memset(st, 0, sizeof *st);
}

StEntry* st_find(SafeTensors* st, const char* name) {
    StEntry key;
    key.name = (char*)name;
    return bsearch(&key, st->entries, (size_t)st->n, sizeof(StEntry), entry_cmp);
}

const float* st_floats(SafeTensors* st, StEntry* e) {
    if (e->f32) return e->f32;
    const unsigned char* src = st->data + e->begin;
    size_t n = (e->end - e->begin) / dtype_size(e->dtype);
    if (e->dtype == DT_F32 && ((uintptr_t)src % 4) == 0) { e->f32 = (float*)src; return e->f32; }
    float* out = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        const unsigned char* b = src + i * dtype_size(e->dtype);
        switch (e->dtype) {
        case DT_F32: memcpy(&out[i], b, 4); break;
        case DT_F16: out[i] = f16_to_f32((uint16_t)(b[0] | b[1] << 8)); break;
        case DT_BF16: out[i] = bf16_to_f32((uint16_t)(b[0] | b[1] << 8)); break;
        case DT_I32: { int32_t v; memcpy(&v, b, 4); out[i] = (float)v; break; }
        case DT_I64: { int64_t v; memcpy(&v, b, 8); out[i] = (float)v; break; }
        case DT_U8: out[i] = b[0]; break;
        }
    }
    e->f32 = out;
    return out;
}

const char* st_meta(const SafeTensors* st, const char* key) {
    return json_get_string(st->metadata, key, NULL);
}

// ----------------------------------------------------------------------------------------------
// safetensors writer

typedef struct StItem { char* name; DType dtype; int ndim; int64_t shape[TENSOR_MAX_DIMS]; void* data; size_t bytes; } StItem;
struct StWriter {
    StItem* items; int n, cap;
    char** meta; int nmeta;       // key, value pairs
};

StWriter* stw_new(void) { return xcalloc(1, sizeof(StWriter)); }

void stw_add(StWriter* w, const char* name, DType dtype, const void* data, int ndim, const int64_t* shape) {
    CHECK(ndim >= 0 && ndim <= TENSOR_MAX_DIMS, "stw_add: %d dims", ndim);
    if (w->n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 16;
        w->items = realloc(w->items, (size_t)w->cap * sizeof(StItem));
        CHECK(w->items, "out of memory");
    }
    StItem* it = &w->items[w->n++];
    it->name = xstrdup(name);
    it->dtype = dtype;
    it->ndim = ndim;
    size_t numel = 1;
    for (int d = 0; d < ndim; d++) { it->shape[d] = shape[d]; numel *= (size_t)shape[d]; }
    it->bytes = numel * dtype_size(dtype);
    it->data = xmalloc(it->bytes);
    memcpy(it->data, data, it->bytes);
}

void stw_meta(StWriter* w, const char* key, const char* value) {
    w->meta = realloc(w->meta, (size_t)(w->nmeta + 1) * 2 * sizeof(char*));
    CHECK(w->meta, "out of memory");
    w->meta[2 * w->nmeta] = xstrdup(key);
    w->meta[2 * w->nmeta + 1] = xstrdup(value);
    w->nmeta++;
}

// Appends s as a JSON string literal to buf.
static void json_put_string(char** buf, size_t* len, size_t* cap, const char* s) {
    size_t need = *len + strlen(s) * 6 + 3;
    if (need > *cap) {
        while (*cap < need) *cap *= 2;
        *buf = realloc(*buf, *cap);
        CHECK(*buf, "out of memory");
    }
    char* o = *buf + *len;
    *o++ = '"';
    for (const unsigned char* p = (const unsigned char*)s; *p; p++) {
        if (*p == '"' || *p == '\\') { *o++ = '\\'; *o++ = (char)*p; }
        else if (*p < 0x20) o += sprintf(o, "\\u%04x", *p);
        else *o++ = (char)*p;
    }
    *o++ = '"';
    *len = (size_t)(o - *buf);
}

static void buf_printf(char** buf, size_t* len, size_t* cap, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char tmp[256];
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    while (*len + (size_t)n + 1 > *cap) { *cap *= 2; *buf = realloc(*buf, *cap); CHECK(*buf, "out of memory"); }
    memcpy(*buf + *len, tmp, (size_t)n);
    *len += (size_t)n;
}

int stw_write(StWriter* w, const char* path) {
    size_t cap = 4096, len = 0, offset = 0;
    char* h = xmalloc(cap);
    buf_printf(&h, &len, &cap, "{");
    if (w->nmeta) {
        buf_printf(&h, &len, &cap, "\"__metadata__\":{");
        for (int i = 0; i < w->nmeta; i++) {
            if (i) buf_printf(&h, &len, &cap, ",");
            json_put_string(&h, &len, &cap, w->meta[2 * i]);
            buf_printf(&h, &len, &cap, ":");
            json_put_string(&h, &len, &cap, w->meta[2 * i + 1]);
        }
        buf_printf(&h, &len, &cap, "}");
    }
    for (int i = 0; i < w->n; i++) {
        StItem* it = &w->items[i];
        if (i || w->nmeta) buf_printf(&h, &len, &cap, ",");
        json_put_string(&h, &len, &cap, it->name);
        buf_printf(&h, &len, &cap, ":{\"dtype\":\"%s\",\"shape\":[", dtype_name(it->dtype));
        for (int d = 0; d < it->ndim; d++) buf_printf(&h, &len, &cap, d ? ",%lld" : "%lld", (long long)it->shape[d]);
        buf_printf(&h, &len, &cap, "],\"data_offsets\":[%zu,%zu]}", offset, offset + it->bytes);
        offset += it->bytes;
    }
    buf_printf(&h, &len, &cap, "}");
    while (len % 8) buf_printf(&h, &len, &cap, " ");
    size_t total = 8 + len + offset;
    unsigned char* out = xmalloc(total);
    for (int i = 0; i < 8; i++) out[i] = (unsigned char)(((uint64_t)len >> (8 * i)) & 255);
    memcpy(out + 8, h, len);
    size_t pos = 8 + len;
    for (int i = 0; i < w->n; i++) { memcpy(out + pos, w->items[i].data, w->items[i].bytes); pos += w->items[i].bytes; }
    int rc = file_write_atomic(path, out, total);
    free(out);
    free(h);
    return rc;
}

void stw_free(StWriter* w) {
    if (!w) return;
    for (int i = 0; i < w->n; i++) { free(w->items[i].name); free(w->items[i].data); }
    for (int i = 0; i < 2 * w->nmeta; i++) free(w->meta[i]);
    free(w->items);
    free(w->meta);
    free(w);
}

// ----------------------------------------------------------------------------------------------
// RNG: MT19937 as in torch's CPUGeneratorImpl, normals as torch's normal_fill (Box-Muller on
// blocks of 16 uniforms: the first 8 give radii, the last 8 angles).

void rng_seed(Rng* r, uint64_t seed) {
    r->mt[0] = (uint32_t)(seed & 0xffffffffu);
    for (int i = 1; i < 624; i++) r->mt[i] = 1812433253u * (r->mt[i - 1] ^ (r->mt[i - 1] >> 30)) + (uint32_t)i;
    r->index = 624;
}

uint32_t rng_u32(Rng* r) {
    if (r->index >= 624) {
        for (int i = 0; i < 624; i++) {
            uint32_t y = (r->mt[i] & 0x80000000u) | (r->mt[(i + 1) % 624] & 0x7fffffffu);
            r->mt[i] = r->mt[(i + 397) % 624] ^ (y >> 1) ^ ((y & 1) ? 0x9908b0dfu : 0);
        }
        r->index = 0;
    }
    uint32_t y = r->mt[r->index++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

float rng_uniform(Rng* r) { return (float)(rng_u32(r) & ((1u << 24) - 1)) * (1.0f / 16777216.0f); }

static void normal_block16(Rng* r, float* out) {
    float u[16];
    for (int i = 0; i < 16; i++) u[i] = rng_uniform(r);
    for (int i = 0; i < 8; i++) {
        float radius = sqrtf(-2.0f * logf(1.0f - u[i]));
        float theta = 2.0f * 3.14159265358979323846f * u[i + 8];
        out[i] = radius * cosf(theta);
        out[i + 8] = radius * sinf(theta);
    }
}

void rng_normal(Rng* r, float* out, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) normal_block16(r, out + i);
    if (i < n) {
        float tail[16];
        normal_block16(r, tail);
        memcpy(out + i, tail, (n - i) * sizeof(float));
    }
}

double time_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
