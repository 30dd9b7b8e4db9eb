// tokenizer.c: the CLIP BPE tokenizer, id for id with transformers' slow CLIPTokenizer (4.39)
// running with ftfy 6.1.1 installed, the tokenizer diffusers' StableDiffusionPipeline uses.
//
// encode(text), following PreTrainedTokenizer.tokenize and CLIPTokenizer._tokenize / bpe:
//   1. Split on exact, case-sensitive occurrences of the added tokens: those of
//      tokenizer_add_token ("<style1>", also inside words) and "<|startoftext|>"/"<|endoftext|>",
//      which transformers registers as added tokens too. Leftmost, then longest, as its Trie.
//      An added token becomes its id directly.
//   2. Every other piece: ftfy.fix_text (below), each whitespace run (str.isspace) -> one space,
//      strip, str.lower() (full Unicode mapping, U+0130 -> "i\u0307", final-sigma rule).
//   3. CLIP's pre-split regex, written out as a scanner:
//      <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
//      (re.IGNORECASE: after lower() only "ſ" ~ "s" and U+0345 matching nothing still matter).
//      Digits are single tokens.
//   4. UTF-8 bytes of each match -> GPT-2's byte->unicode symbols; "</w>" joins the last symbol.
//   5. BPE: merge every occurrence of the lowest-ranked adjacent pair (left to right), repeat.
//      Done with a heap and a linked list (rank by rank, in batches), so a 1 MB word is
//      O(n log n), with exactly the pair-by-pair result of the reference loop.
//   6. BOS, ids truncated to max_len - 2, EOS, EOS padding. Unknown symbols -> "<|endoftext|>".
// Loading follows CLIPTokenizer.__init__: vocab.json (ids must be 0..n-1, each once), merges.txt
// stripped, split on "\n", its first line (the version header) skipped, lines 1..48894 ranked in
// order, a repeated pair keeping its last rank, lines not made of two symbols still using a rank.
//
// ftfy.fix_text (6.1.1, default config) IMPLEMENTED, step by step as ftfy does it: segments of
// one line (at most 1e6 code points); the "auto" HTML rule (once a segment holds a literal '<',
// no unescaping from there on); per segment, until nothing changes: unescape_html (ftfy's table
// of HTML5 entities plus upper-cased names, html.unescape's numeric rules, only "&...;" forms),
// fix_encoding (the ftfy.badness heuristic; re-encode as latin-1, sloppy-windows-1252/1251/1250/
// 1253/1254, iso-8859-2, macroman, cp437 and decode as UTF-8/CESU-8 ("utf-8-variants") with
// restore_byte_a0 and replace_lossy_sequences; then decode_inconsistent_utf8, Latin-1 read as
// cp1252, fix_c1_controls; repeated until stable), fix_c1_controls, fix_latin_ligatures,
// fix_character_width, uncurl_quotes, fix_line_breaks, remove_terminal_escapes,
// remove_control_chars, NFC (full canonical decomposition, ordering and composition, Hangul).
// APPROXIMATED: the heuristic's tables (ftfy.badness rules and categories, the UTF-8 clue classes,
// ALTERED_UTF8_RE) were rebuilt from ftfy's 6.x sources, not diffed against the 6.1.1 wheel;
// remove_terminal_escapes accepts ASCII digits only (Python's \d: any Nd digit); the "until
// stable" loops stop after FTFY_MAX_ROUNDS rounds and decode_inconsistent_utf8 recursion after
// FTFY_MAX_DEPTH (ftfy has no bound; only pathological text gets there). fix_surrogates is left
// out: valid UTF-8 holds no surrogates. Unicode data is Python 3.11's (Unicode 14); the regex
// module's newer tables differ only on code points unassigned in 14. Checked: the golden cases,
// and 36k random prompts (mojibake, entities, marks, scripts, long words) against a Python
// model of the above.
// Tables come from unicode_tables.h (convert/gen_unicode_tables.py).
#include "instastyle.h"

#include <math.h>
#include "unicode_tables.h"

#include <stdlib.h>
#include <string.h>

#define TOK_MAX_VOCAB_FILE (64u << 20)  // vocab.json size limit (CLIP's: 1.6 MB)
#define TOK_MAX_MERGES_FILE (16u << 20) // merges.txt size limit (CLIP's: 0.5 MB)
#define TOK_MAX_VOCAB (1 << 22)         // entries of vocab.json (CLIP's: 49408)
#define TOK_MAX_MERGES 48894            // 49152 - 256 - 2, CLIPTokenizer's slice of merges.txt
#define FTFY_SEGMENT 1000000            // ftfy max_decode_length
#define FTFY_MAX_ROUNDS 64              // guard for ftfy's "until nothing changes" loops
#define FTFY_MAX_DEPTH 4                // guard for decode_inconsistent_utf8's recursion

// ---------------------------------------------------------------------------------------------
// Code point buffers, UTF-8
// ---------------------------------------------------------------------------------------------

typedef struct { uint32_t* v; size_t n, cap; } U32Buf;

static void ub_reserve(U32Buf* b, size_t need) {
    if (need <= b->cap) return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) cap *= 2;
    uint32_t* v = realloc(b->v, cap * sizeof *v);
    CHECK(v != NULL, "out of memory (%zu code points)", cap);
    b->v = v;
    b->cap = cap;
}
static void ub_push(U32Buf* b, uint32_t c) { ub_reserve(b, b->n + 1); b->v[b->n++] = c; }
static void ub_append(U32Buf* b, const uint32_t* v, size_t n) {
    ub_reserve(b, b->n + n);
    if (n) memcpy(b->v + b->n, v, n * sizeof *v);
    b->n += n;
}
static void ub_swap(U32Buf* a, U32Buf* b) { U32Buf t = *a; *a = *b; *b = t; }
static int ub_equal(const U32Buf* a, const U32Buf* b) {
    return a->n == b->n && (a->n == 0 || memcmp(a->v, b->v, a->n * sizeof *a->v) == 0);
}

// Strict UTF-8 (what Python's decoder accepts). cesu: also ftfy's "utf-8-variants" forms,
// CESU-8 surrogate pairs and C0 80 for U+0000. Returns 0, or -1 at the first bad byte (*at).
static int utf8_decode(const unsigned char* s, size_t n, int cesu, U32Buf* out, size_t* at) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) { ub_push(out, c); i++; continue; }
        if (cesu && c == 0xC0 && i + 1 < n && s[i + 1] == 0x80) { ub_push(out, 0); i += 2; continue; }
        if (cesu && c == 0xED && i + 5 < n && s[i + 1] >= 0xA0 && s[i + 1] <= 0xAF && (s[i + 2] & 0xC0) == 0x80 &&
            s[i + 3] == 0xED && s[i + 4] >= 0xB0 && s[i + 4] <= 0xBF && (s[i + 5] & 0xC0) == 0x80) {
            ub_push(out, 0x10000 + ((s[i + 1] & 0x0Fu) << 16) + ((s[i + 2] & 0x3Fu) << 10) +
                         ((s[i + 4] & 0x0Fu) << 6) + (s[i + 5] & 0x3Fu));
            i += 6;
            continue;
        }
        int len = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
        if (!len || i + (size_t)len > n) { if (at) *at = i; return -1; }
        unsigned lo = 0x80, hi = 0xBF;                 // allowed range of the second byte
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;                      // no surrogates
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;                      // <= U+10FFFF
        if (s[i + 1] < lo || s[i + 1] > hi) { if (at) *at = i; return -1; }
        uint32_t cp = c & (0xFFu >> (len + 1));
        for (int k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) { if (at) *at = i; return -1; }
            cp = (cp << 6) | (s[i + k] & 0x3Fu);
        }
        ub_push(out, cp);
        i += (size_t)len;
    }
    return 0;
}

static int utf8_put(char* o, uint32_t c) {
    if (c < 0x80) { o[0] = (char)c; return 1; }
    if (c < 0x800) { o[0] = (char)(0xC0 | (c >> 6)); o[1] = (char)(0x80 | (c & 0x3F)); return 2; }
    if (c < 0x10000) {
        o[0] = (char)(0xE0 | (c >> 12)); o[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        o[2] = (char)(0x80 | (c & 0x3F)); return 3;
    }
    o[0] = (char)(0xF0 | (c >> 18)); o[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((c >> 6) & 0x3F)); o[3] = (char)(0x80 | (c & 0x3F)); return 4;
}

// Is c one of the characters of the UTF-8 literal set? (Keeps character classes readable.)
static int in_set(uint32_t c, const char* set) {
    for (const unsigned char* s = (const unsigned char*)set; *s;) {
        uint32_t x = *s++;
        int extra = x >= 0xF0 ? 3 : x >= 0xE0 ? 2 : x >= 0xC0 ? 1 : 0;
        x &= extra ? 0x7Fu >> (extra + 1) : 0x7Fu;
        while (extra-- > 0 && *s) x = (x << 6) | (*s++ & 0x3Fu);
        if (x == c) return 1;
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Character properties (unicode_tables.h)
// ---------------------------------------------------------------------------------------------

static int in_ranges(const URange* r, int n, uint32_t c) {
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (c < r[mid].lo) hi = mid - 1;
        else if (c > r[mid].hi) lo = mid + 1;
        else return 1;
    }
    return 0;
}
static int is_letter(uint32_t c) {
    if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
    return in_ranges(UT_LETTER, UT_LETTER_N, c);
}
static int is_number(uint32_t c) {
    if (c < 0x80) return c >= '0' && c <= '9';
    return in_ranges(UT_NUMBER, UT_NUMBER_N, c);
}
static int is_space(uint32_t c) {
    if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F);
    return in_ranges(UT_SPACE, UT_SPACE_N, c);
}
static int is_word(uint32_t c) { return c == '_' || is_letter(c) || is_number(c); }   // Python's \w
static int is_ascii_alpha(uint32_t c) { return (c | 0x20) >= 'a' && (c | 0x20) <= 'z'; }

static uint32_t moji_mask(uint32_t c) {
    if (c < 0x80) return c == ' ' ? MJ_CONT : 0;
    int lo = 0, hi = UT_MOJI_N - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (UT_MOJI[mid].cp == c) return UT_MOJI[mid].mask;
        if (UT_MOJI[mid].cp < c) lo = mid + 1; else hi = mid - 1;
    }
    return 0;
}

static uint32_t lower_simple(uint32_t c) {
    if (c < 0x80) return c >= 'A' && c <= 'Z' ? c + 32 : c;
    int lo = 0, hi = UT_LOWER_N - 1, at = -1;
    while (lo <= hi) {                                  // last run with run.lo <= c
        int mid = (lo + hi) / 2;
        if (UT_LOWER[mid].lo <= c) { at = mid; lo = mid + 1; } else hi = mid - 1;
    }
    if (at < 0) return c;
    const ULowerRun* r = &UT_LOWER[at];
    if (c > r->hi || (c - r->lo) % r->step) return c;
    return (uint32_t)((int32_t)c + r->delta);
}

// str.lower(): out = lower(in). Capital sigma is final (ς) after a cased letter that no cased
// letter follows, case-ignorable characters skipped both ways (CPython's handle_capital_sigma).
static void unicode_lower(const U32Buf* in, U32Buf* out) {
    out->n = 0;
    for (size_t i = 0; i < in->n; i++) {
        uint32_t c = in->v[i];
        if (c == 0x130) { ub_push(out, 'i'); ub_push(out, 0x307); continue; }
        if (c == 0x3A3) {
            size_t j = i;
            while (j > 0 && in_ranges(UT_CASE_IGNORABLE, UT_CASE_IGNORABLE_N, in->v[j - 1])) j--;
            int final = j > 0 && in_ranges(UT_CASED, UT_CASED_N, in->v[j - 1]);
            if (final) {
                size_t k = i + 1;
                while (k < in->n && in_ranges(UT_CASE_IGNORABLE, UT_CASE_IGNORABLE_N, in->v[k])) k++;
                final = k == in->n || !in_ranges(UT_CASED, UT_CASED_N, in->v[k]);
            }
            ub_push(out, final ? 0x3C2 : 0x3C3);
            continue;
        }
        ub_push(out, lower_simple(c));
    }
}

// ---------------------------------------------------------------------------------------------
// NFC: canonical decomposition, canonical ordering, canonical composition (UAX #15)
// ---------------------------------------------------------------------------------------------

enum { H_SBASE = 0xAC00, H_LBASE = 0x1100, H_VBASE = 0x1161, H_TBASE = 0x11A7,
       H_LCOUNT = 19, H_VCOUNT = 21, H_TCOUNT = 28, H_NCOUNT = 588, H_SCOUNT = 11172 };

static uint32_t ccc_of(uint32_t c) {
    if (c < 0x300) return 0;
    int lo = 0, hi = UT_CCC_N - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (c < UT_CCC[mid].lo) hi = mid - 1;
        else if (c > UT_CCC[mid].hi) lo = mid + 1;
        else return UT_CCC[mid].ccc;
    }
    return 0;
}

static void decompose(uint32_t c, U32Buf* out, int depth) {
    if (c >= H_SBASE && c < H_SBASE + H_SCOUNT) {
        uint32_t s = c - H_SBASE;
        ub_push(out, H_LBASE + s / H_NCOUNT);
        ub_push(out, H_VBASE + (s % H_NCOUNT) / H_TCOUNT);
        if (s % H_TCOUNT) ub_push(out, H_TBASE + s % H_TCOUNT);
        return;
    }
    if (c >= 0xC0 && depth < 8) {
        int lo = 0, hi = UT_DECOMP_N - 1;
        while (lo <= hi) {
            int mid = (lo + hi) / 2;
            if (UT_DECOMP[mid].cp == c) {
                decompose(UT_DECOMP[mid].a, out, depth + 1);
                if (UT_DECOMP[mid].b) decompose(UT_DECOMP[mid].b, out, depth + 1);
                return;
            }
            if (UT_DECOMP[mid].cp < c) lo = mid + 1; else hi = mid - 1;
        }
    }
    ub_push(out, c);
}

static uint32_t compose_pair(uint32_t a, uint32_t b) {
    if (a >= H_LBASE && a < H_LBASE + H_LCOUNT && b >= H_VBASE && b < H_VBASE + H_VCOUNT)
        return H_SBASE + ((a - H_LBASE) * H_VCOUNT + (b - H_VBASE)) * H_TCOUNT;
    if (a >= H_SBASE && a < H_SBASE + H_SCOUNT && (a - H_SBASE) % H_TCOUNT == 0 &&
        b > H_TBASE && b < H_TBASE + H_TCOUNT)
        return a + (b - H_TBASE);
    int lo = 0, hi = UT_COMPOSE_N - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        const UCompose* e = &UT_COMPOSE[mid];
        if (e->a == a && e->b == b) return e->c;
        if (e->a < a || (e->a == a && e->b < b)) lo = mid + 1; else hi = mid - 1;
    }
    return 0;
}

static void nfc(U32Buf* text, U32Buf* tmp) {
    int plain = 1;                                     // quick check: nothing to do below U+0300
    for (size_t i = 0; i < text->n && plain; i++) plain = text->v[i] < 0x300;
    if (plain) return;
    tmp->n = 0;
    for (size_t i = 0; i < text->n; i++) decompose(text->v[i], tmp, 0);
    uint32_t* d = tmp->v;
    size_t n = tmp->n;
    for (size_t i = 1; i < n; i++) {                   // stable sort of each run of non-starters
        uint32_t c = d[i], cc = ccc_of(c);
        if (!cc) continue;
        size_t j = i;
        while (j > 0 && ccc_of(d[j - 1]) > cc) { d[j] = d[j - 1]; j--; }
        d[j] = c;
    }
    size_t w = 0;                                      // compose in place: d[0..w) is the output
    long starter = -1;                                 // index in d of the last starter, if any
    for (size_t i = 0; i < n; i++) {
        uint32_t c = d[i], cc = ccc_of(c);
        // c reaches the starter unless a character between them has a class >= its own (the
        // ones between are sorted non-starters, so the last one decides)
        if (starter >= 0 && (w == (size_t)starter + 1 || ccc_of(d[w - 1]) < cc)) {
            uint32_t comp = compose_pair(d[starter], c);
            if (comp) { d[starter] = comp; continue; }
        }
        if (cc == 0) starter = (long)w;
        d[w++] = c;
    }
    tmp->n = w;
    ub_swap(text, tmp);
}

// ---------------------------------------------------------------------------------------------
// ftfy: unescape_html
// ---------------------------------------------------------------------------------------------

static int entity_cmp(const void* key, const void* e) { return strcmp(key, ((const UEntity*)e)->name); }

// The replacement of one "&body;" (body: 1..24 ASCII letters/digits, optional leading '#'),
// as ftfy's _unescape_fixup. Returns the number of code points written to rep (0..3), or -1
// to keep the text as it is.
static int html_entity(const uint32_t* body, size_t n, uint32_t rep[3]) {
    char name[32];
    for (size_t i = 0; i < n; i++) name[i] = (char)body[i];
    name[n] = 0;
    const UEntity* e = bsearch(name, UT_ENTITY, UT_ENTITY_N, sizeof *e, entity_cmp);
    if (e) {
        int k = 0;
        while (k < 3 && e->cp[k]) { rep[k] = e->cp[k]; k++; }
        return k;
    }
    if (name[0] != '#') return -1;
    // html.unescape: "#" digits or "#x" hex digits up to the ';'; anything else leaves a ';'
    int hex = name[1] == 'x' || name[1] == 'X';
    size_t start = hex ? 2 : 1;
    if (start >= n) return -1;
    uint64_t num = 0;
    for (size_t i = start; i < n; i++) {
        int c = name[i], lc = c | 0x20;
        int v = c >= '0' && c <= '9' ? c - '0' : hex && lc >= 'a' && lc <= 'f' ? lc - 'a' + 10 : -1;
        if (v < 0) return -1;
        num = num * (hex ? 16 : 10) + (uint64_t)v;
        if (num > 0x10FFFF) num = 0x110000;            // saturate: out of range either way
    }
    for (int i = 0; i < UT_CHARREF_INVALID_N; i++)
        if (UT_CHARREF_INVALID[i].from == num) { rep[0] = UT_CHARREF_INVALID[i].to; return 1; }
    if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF) { rep[0] = 0xFFFD; return 1; }
    if (in_ranges(UT_CHARREF_DROPPED, UT_CHARREF_DROPPED_N, (uint32_t)num)) return 0;
    if (num == ';') return -1;                         // the result would still hold a ';'
    rep[0] = (uint32_t)num;
    return 1;
}

// HTML_ENTITY_RE = &#?[0-9A-Za-z]{1,24};  substituted left to right.
static void unescape_html(const U32Buf* in, U32Buf* out) {
    out->n = 0;
    const uint32_t* t = in->v;
    size_t n = in->n, i = 0;
    while (i < n) {
        if (t[i] == '&') {
            size_t b = i + 1, j = b + (b < n && t[b] == '#'), k = j;
            while (k < n && k - j <= 24 && t[k] < 0x80 && (is_ascii_alpha(t[k]) || (t[k] >= '0' && t[k] <= '9')))
                k++;
            uint32_t rep[3];
            int r;
            if (k > j && k - j <= 24 && k < n && t[k] == ';' && (r = html_entity(t + b, k - b, rep)) >= 0) {
                ub_append(out, rep, (size_t)r);
                i = k + 1;
                continue;
            }
        }
        ub_push(out, t[i++]);
    }
}

// ---------------------------------------------------------------------------------------------
// ftfy: the mojibake heuristic (ftfy.badness.is_bad)
// ---------------------------------------------------------------------------------------------

enum {
    ACC = MJ_LOWER_ACC | MJ_UPPER_ACC,
    PUNCT = MJ_START_PUNCT | MJ_END_PUNCT,
    ARABIC_NEXT = MJ_COMMON | MJ_CURRENCY | MJ_BAD | MJ_NUMERIC | MJ_START_PUNCT,
    LATIN1_NEXT = MJ_C1 | MJ_BAD | PUNCT | MJ_CURRENCY,
};

// Does an alternative of ftfy's BADNESS_RE match at t[i]? (c: t[i..i+5], 0 past the end; m: masks.)
static int bad_at(const uint32_t* t, size_t i, size_t n) {
    uint32_t c[6] = {0}, m[6] = {0};
    for (size_t k = 0; k < 6 && i + k < n; k++) { c[k] = t[i + k]; m[k] = moji_mask(c[k]); }
    int has1 = i + 1 < n, has2 = i + 2 < n;
    if (m[0] & MJ_C1) return 1;
    if ((m[0] & (MJ_BAD | ACC | MJ_BOX | PUNCT | MJ_CURRENCY | MJ_NUMERIC)) && (m[1] & MJ_BAD)) return 1;
    if (is_ascii_alpha(c[0]) && (m[1] & (MJ_LOWER_COMMON | MJ_UPPER_COMMON)) && (m[2] & MJ_BAD)) return 1;
    if ((m[0] & MJ_BAD) && (m[1] & (ACC | MJ_BOX | PUNCT | MJ_CURRENCY | MJ_NUMERIC))) return 1;
    if ((m[0] & (MJ_LOWER_ACC | MJ_LOWER_COMMON | MJ_BOX | MJ_END_PUNCT | MJ_CURRENCY | MJ_NUMERIC)) &&
        (m[1] & MJ_UPPER_ACC)) return 1;
    if ((m[0] & (MJ_BOX | MJ_END_PUNCT | MJ_CURRENCY | MJ_NUMERIC)) && (m[1] & MJ_LOWER_ACC)) return 1;
    if ((m[0] & (MJ_LOWER_ACC | MJ_BOX | MJ_END_PUNCT)) && (m[1] & MJ_CURRENCY)) return 1;
    if (has1 && is_space(c[0]) && (m[1] & MJ_UPPER_ACC) && (m[2] & MJ_CURRENCY)) return 1;
    if ((m[0] & (MJ_UPPER_ACC | MJ_BOX)) && (m[1] & MJ_NUMERIC)) return 1;
    if ((m[0] & (ACC | MJ_BOX | MJ_CURRENCY | MJ_END_PUNCT)) && (m[1] & MJ_START_PUNCT) && (m[2] & MJ_NUMERIC)) return 1;
    if ((m[0] & (ACC | MJ_CURRENCY | MJ_NUMERIC | MJ_BOX)) && (m[1] & MJ_END_PUNCT) && (m[2] & MJ_START_PUNCT)) return 1;
    if ((m[0] & (MJ_CURRENCY | MJ_NUMERIC | MJ_BOX)) && (m[1] & MJ_START_PUNCT)) return 1;
    if (c[0] >= 'a' && c[0] <= 'z' && (m[1] & MJ_UPPER_ACC) && (m[2] & (MJ_START_PUNCT | MJ_CURRENCY))) return 1;
    if ((m[0] & MJ_BOX) && (m[1] & MJ_KAOMOJI)) return 1;
    if ((m[0] & (ACC | MJ_CURRENCY | MJ_NUMERIC | PUNCT)) && (m[1] & MJ_BOX)) return 1;
    if ((m[0] & MJ_BOX) && (m[1] & MJ_END_PUNCT)) return 1;
    if ((m[0] & ACC) && (m[1] & MJ_END_PUNCT) && has2 && is_word(c[2])) return 1;
    if ((c[0] == 0x152 || c[0] == 0x153) && has1 && !is_ascii_alpha(c[1])) return 1;          // Œœ
    if (has1 && in_set(c[0], "ÂÃÎÐ") &&
        ((m[1] & PUNCT) || in_set(c[1], "€Šš¢£Ÿž\u00a0\u00ad®©°·»–—´"))) return 1;
    if (c[0] == 0xD7 && (c[1] == 0xB2 || c[1] == 0xB3)) return 1;                               // ×²
    if ((c[0] == 0xD8 || c[0] == 0xD9) && (c[2] == 0xD8 || c[2] == 0xD9) && i + 3 < n &&       // Arabic
        ((m[1] & ARABIC_NEXT) || in_set(c[1], "ŸŠ®°µ»")) && ((m[3] & ARABIC_NEXT) || in_set(c[3], "ŸŠ®°µ»")))
        return 1;
    if (c[0] == 0xE0 && has1 && in_set(c[1], "²µ¹¼½¾")) return 1;                               // à
    if (c[0] == 0x221A && has1 && in_set(c[1], "±∂†≠®™´≤≥¥µø")) return 1;                       // √
    if (c[0] == 0x2248 && (c[1] == 0xB0 || c[1] == 0xA2)) return 1;                             // ≈
    if (c[0] == 0x201A && c[1] == 0xC4 && has2 && in_set(c[2], "ìîïòôúùû†°¢π")) return 1;      // ‚Ä
    if (c[0] == 0x201A && (c[1] == 0xE2 || c[1] == 0xF3) && has2 && in_set(c[2], "àä°ê")) return 1;
    if (c[0] == 0x432 && c[1] == 0x402) return 1;                                               // вЂ
    if (has2 && in_set(c[0], "ВГРС") && in_set(c[2], "ВГРС") &&
        ((m[1] & LATIN1_NEXT) || c[1] == 0xB0 || c[1] == 0xB5)) return 1;
    if (c[0] == 0x413 && c[1] == 0x45E && c[2] == 0x412 && c[3] == 0x402 && c[4] == 0x412 &&    // ГўВЂВ.[A-Za-z ]
        i + 6 < n && c[5] != '\n' && (is_ascii_alpha(t[i + 6]) || t[i + 6] == ' ')) return 1;
    if (c[0] == 0xC3 && (c[1] == 0xA0 || c[1] == 0xA1)) return 1;                               // Ã[\xa0¡]
    if (c[0] >= 'a' && c[0] <= 'z') {                                                          // [a-z]\s?[ÃÂ][ ]
        size_t k = 1 + (has1 && is_space(c[1]) && (c[2] == 0xC3 || c[2] == 0xC2));
        if ((c[k] == 0xC3 || c[k] == 0xC2) && i + k + 1 < n && c[k + 1] == ' ') return 1;
    }
    if (i == 0 && (c[0] == 0xC3 || c[0] == 0xC2) && c[1] == ' ' && has1) return 1;             // ^[ÃÂ][ ]
    if (((c[0] >= 'a' && c[0] <= 'z') || in_set(c[0], ".,?!") || (m[0] & MJ_END_PUNCT)) && c[1] == 0xC2 &&
        has2 && (c[2] == ' ' || (m[2] & PUNCT))) return 1;                                      // Â
    if (c[0] == 0x3B2 && c[1] == 0x20AC && has2 && in_set(c[2], "™\u00a0Ά\u00ad®°")) return 1; // β€
    if (has2 && in_set(c[0], "ΒΓΞΟ") && in_set(c[2], "ΒΓΞΟ") && ((m[1] & LATIN1_NEXT) || c[1] == 0xB0))
        return 1;
    return 0;
}

static int is_bad(const uint32_t* t, size_t n) {
    for (size_t i = 0; i < n; i++)      // every rule has a non-ASCII character in its first three
        if (t[i] >= 0x80 || (i + 1 < n && t[i + 1] >= 0x80) || (i + 2 < n && t[i + 2] >= 0x80))
            if (bad_at(t, i, n)) return 1;
    return 0;
}

// ---------------------------------------------------------------------------------------------
// ftfy: fix_encoding (re-decode mojibake)
// ---------------------------------------------------------------------------------------------

typedef struct { unsigned char* v; size_t n, cap; } Bytes;

static void bytes_push(Bytes* b, unsigned char c) {
    if (b->n == b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 256;
        unsigned char* v = realloc(b->v, cap);
        CHECK(v != NULL, "out of memory (%zu bytes)", cap);
        b->v = v;
        b->cap = cap;
    }
    b->v[b->n++] = c;
}

// The byte of c in a single-byte codec, or -1 (ftfy's possible_encoding fails).
static int codec_byte(const UCodec* cd, uint32_t c) {
    if (c < 0x80) return cd->sloppy && c == 0x1A ? -1 : (int)c;
    if (c == 0xFFFD && cd->sloppy) return 0x1A;
    int lo = 0, hi = 127;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cd->enc[mid].cp == c) return cd->enc[mid].byte;
        if (cd->enc[mid].cp < c) lo = mid + 1; else hi = mid - 1;
    }
    return -1;
}

static const UCodec* codec_named(const char* name) {
    for (int k = 0; k < UT_CODECS_N; k++)
        if (strcmp(UT_CODECS[k].name, name) == 0) return &UT_CODECS[k];
    CHECK(0, "unicode_tables.h has no codec %s", name);
}

// A byte regex as alternatives of byte classes; a class is a string of (lo, hi) byte pairs.
// '?' is written \x3f (no trigraphs). Each alternative ends at a NULL class.
typedef const char* BytePattern[7];
static const BytePattern ALTERED_UTF8_RE[] = {      // UTF-8 whose 0xA0 became a space
    {"\xc2\xc3\xc5\xc5\xce\xce\xd0\xd0\xd9\xd9", "  ", NULL},
    {"\xe2\xe3", "  ", "\x80\x84\x86\x9f\xa1\xbf", NULL},
    {"\xe0\xe3", "\x80\x84\x86\x9f\xa1\xbf", "  ", NULL},
    {"\xf0\xf0", "  ", "\x80\xbf", "\x80\xbf", NULL},
    {"\xf0\xf0", "\x80\xbf", "  ", "\x80\xbf", NULL},
    {"\xf0\xf0", "\x80\xbf", "\x80\xbf", "  ", NULL},
    {NULL},
};
static const BytePattern LOSSY_UTF8_RE[] = {        // UTF-8 with bytes lost to U+FFFD (0x1A) or '?'
    {"\xc2\xdf", "\x1a\x1a", NULL},
    {"\xc2\xc3", "\x3f\x3f", NULL},
    {"\xed\xed", "\xa0\xaf", "\x1a\x1a\x3f\x3f", "\xed\xed", "\xb0\xbf", "\x1a\x1a\x3f\x3f\x80\xbf", NULL},
    {"\xed\xed", "\xa0\xaf", "\x1a\x1a\x3f\x3f\x80\xbf", "\xed\xed", "\xb0\xbf", "\x1a\x1a\x3f\x3f", NULL},
    {"\xe0\xef", "\x1a\x1a\x3f\x3f", "\x1a\x1a\x80\xbf", NULL},
    {"\xe0\xef", "\x1a\x1a\x80\xbf", "\x1a\x1a\x3f\x3f", NULL},
    {"\xf0\xf4", "\x1a\x1a\x3f\x3f", "\x1a\x1a\x80\xbf", "\x1a\x1a\x80\xbf", NULL},
    {"\xf0\xf4", "\x1a\x1a\x80\xbf", "\x1a\x1a\x3f\x3f", "\x1a\x1a\x80\xbf", NULL},
    {"\xf0\xf4", "\x1a\x1a\x80\xbf", "\x1a\x1a\x80\xbf", "\x1a\x1a\x3f\x3f", NULL},
    {"\x1a\x1a", NULL},
    {NULL},
};

// Length of the first alternative of pat matching at s[i], 0 if none.
static size_t byte_match(const Bytes* s, size_t i, const BytePattern* pat) {
    for (; pat[0][0]; pat++) {
        size_t k = 0;
        for (; pat[0][k]; k++) {
            if (i + k >= s->n) break;
            unsigned char b = s->v[i + k];
            const char* cls = pat[0][k];
            while (cls[0] && !(b >= (unsigned char)cls[0] && b <= (unsigned char)cls[1])) cls += 2;
            if (!cls[0]) break;
        }
        if (!pat[0][k]) return k;
    }
    return 0;
}

// fixes.restore_byte_a0: "\xc3 " -> "\xc3\xa0 " unless a word follows that makes "à" unlikely,
// then the spaces inside ALTERED_UTF8_RE matches -> 0xA0.
static void restore_byte_a0(const Bytes* in, Bytes* out) {
    static const char* const keep[] = {" ", "quele", "quela", "quilo", "s ", NULL};
    Bytes mid = {0};
    for (size_t i = 0; i < in->n; i++) {
        bytes_push(&mid, in->v[i]);
        if (in->v[i] != 0xC3 || i + 1 >= in->n || in->v[i + 1] != ' ') continue;
        int kept = 0;
        for (int k = 0; keep[k] && !kept; k++) {
            size_t len = strlen(keep[k]);
            kept = i + 2 + len <= in->n && memcmp(in->v + i + 2, keep[k], len) == 0;
        }
        if (!kept) { bytes_push(&mid, 0xA0); bytes_push(&mid, ' '); i++; }
    }
    out->n = 0;
    for (size_t i = 0; i < mid.n;) {
        size_t len = byte_match(&mid, i, ALTERED_UTF8_RE);
        if (!len) { bytes_push(out, mid.v[i++]); continue; }
        for (size_t k = 0; k < len; k++) bytes_push(out, mid.v[i + k] == ' ' ? 0xA0 : mid.v[i + k]);
        i += len;
    }
    free(mid.v);
}

// fixes.replace_lossy_sequences: each LOSSY_UTF8_RE match -> the UTF-8 of U+FFFD.
static void replace_lossy(const Bytes* in, Bytes* out) {
    out->n = 0;
    for (size_t i = 0; i < in->n;) {
        size_t len = byte_match(in, i, LOSSY_UTF8_RE);
        if (!len) { bytes_push(out, in->v[i++]); continue; }
        bytes_push(out, 0xEF); bytes_push(out, 0xBF); bytes_push(out, 0xBD);
        i += len;
    }
}

static void fix_encoding(U32Buf* text, int depth);

// End of the UTF8_DETECTOR_RE match at t[i] ((first-of-2 cont | first-of-3 cont{2} |
// first-of-4 cont{3})+), or i when there is none.
static size_t utf8_clue_end(const uint32_t* t, size_t i, size_t n) {
    for (;;) {
        uint32_t m = i < n ? moji_mask(t[i]) : 0;
        size_t need = m & MJ_FIRST2 ? 1 : m & MJ_FIRST3 ? 2 : m & MJ_FIRST4 ? 3 : 0;
        if (!need || i + need >= n) return i;
        for (size_t k = 1; k <= need; k++)
            if (!(moji_mask(t[i + k]) & MJ_CONT)) return i;
        i += need + 1;
    }
}

// fixes.decode_inconsistent_utf8: fix each UTF-8-looking run (not just after a strict
// continuation character) that is shorter than the text and looks bad on its own.
static void decode_inconsistent_utf8(const U32Buf* in, U32Buf* out, int depth) {
    const uint32_t* t = in->v;
    size_t n = in->n, i = 0;
    out->n = 0;
    while (i < n) {
        size_t e = i == 0 || !(moji_mask(t[i - 1]) & MJ_CONT_STRICT) ? utf8_clue_end(t, i, n) : i;
        if (e == i) { ub_push(out, t[i++]); continue; }
        if (e - i < n && is_bad(t + i, e - i)) {
            U32Buf sub = {0};
            ub_append(&sub, t + i, e - i);
            fix_encoding(&sub, depth + 1);
            ub_append(out, sub.v, sub.n);
            free(sub.v);
        } else {
            ub_append(out, t + i, e - i);
        }
        i = e;
    }
}

// One step of ftfy's _fix_encoding_one_step_and_explain. Returns 1 with the new text in out,
// or 0 when the text stays as it is.
static int fix_encoding_step(const U32Buf* text, U32Buf* out, int depth) {
    const uint32_t* t = text->v;
    size_t n = text->n;
    int ascii = 1;
    for (size_t i = 0; i < n && ascii; i++) ascii = t[i] < 0x80;
    if (ascii || !is_bad(t, n)) return 0;
    Bytes b = {0}, b2 = {0};
    int latin1 = 0, done = 0;
    for (int k = 0; k < UT_CODECS_N && !done; k++) {     // UTF-8 decoded as a single-byte codec?
        const UCodec* cd = &UT_CODECS[k];
        b.n = 0;
        size_t i = 0;
        for (; i < n; i++) {
            int byte = codec_byte(cd, t[i]);
            if (byte < 0) break;
            bytes_push(&b, (unsigned char)byte);
        }
        if (i < n) continue;
        if (k == 0) latin1 = 1;
        int altered = 0;
        for (size_t j = 0; j < b.n && !altered; j++) altered = byte_match(&b, j, ALTERED_UTF8_RE) > 0;
        if (altered) { restore_byte_a0(&b, &b2); Bytes x = b; b = b2; b2 = x; }
        if (cd->sloppy) { replace_lossy(&b, &b2); Bytes x = b; b = b2; b2 = x; }
        out->n = 0;
        done = utf8_decode(b.v, b.n, 1, out, NULL) == 0;
    }
    free(b.v);
    free(b2.v);
    if (done) return !ub_equal(out, text);
    if (depth < FTFY_MAX_DEPTH) {
        decode_inconsistent_utf8(text, out, depth);
        if (!ub_equal(out, text)) return 1;
    }
    // Latin-1 meant as Windows-1252 (strict: bytes 81 8D 8F 90 9D fail). ftfy's shortcut for
    // "windows-1252 also possible" tests a name its list never holds, so it never applies.
    const UCodec* w1252 = codec_named("sloppy-windows-1252");
    if (latin1) {
        out->n = 0;
        int ok = 1, changed = 0;
        for (size_t i = 0; i < n && ok; i++) {
            uint32_t c = t[i];
            if (c >= 0x80 && c < 0xA0) {
                ok = !(c == 0x81 || c == 0x8D || c == 0x8F || c == 0x90 || c == 0x9D);
                c = w1252->hi[c - 0x80];
                changed = 1;
            }
            ub_push(out, c);
        }
        if (ok && changed) return 1;
    }
    out->n = 0;                                         // fix_c1_controls
    for (size_t i = 0; i < n; i++) ub_push(out, t[i] >= 0x80 && t[i] < 0xA0 ? w1252->hi[t[i] - 0x80] : t[i]);
    return !ub_equal(out, text);
}

static void fix_encoding(U32Buf* text, int depth) {
    U32Buf out = {0};
    for (int round = 0; round < FTFY_MAX_ROUNDS && fix_encoding_step(text, &out, depth); round++)
        ub_swap(text, &out);
    free(out.v);
}

// ---------------------------------------------------------------------------------------------
// ftfy: the other fixers and fix_text
// ---------------------------------------------------------------------------------------------

// fix_c1_controls, fix_latin_ligatures, fix_character_width, uncurl_quotes: each maps one
// character to a few, so they compose per character in ftfy's order.
static void translate_chars(const U32Buf* in, U32Buf* out) {
    const UCodec* w1252 = codec_named("sloppy-windows-1252");
    out->n = 0;
    for (size_t i = 0; i < in->n; i++) {
        uint32_t c = in->v[i], a[3] = {c, 0, 0};
        if (c >= 0x80 && c < 0xA0) a[0] = w1252->hi[c - 0x80];
        for (int k = 0; k < UT_LIGATURE_N; k++)
            if (UT_LIGATURE[k].cp == a[0]) { memcpy(a, UT_LIGATURE[k].to, sizeof a); break; }
        for (int j = 0; j < 3 && a[j]; j++) {
            uint32_t w[2] = {a[j], 0};
            if (a[j] == 0x3000 || (a[j] >= 0xFF01 && a[j] < 0xFFF0))
                for (int k = 0; k < UT_WIDTH_N; k++)
                    if (UT_WIDTH[k].from == a[j]) { w[0] = UT_WIDTH[k].to[0]; w[1] = UT_WIDTH[k].to[1]; break; }
            for (int q = 0; q < 2 && w[q]; q++) {
                uint32_t x = w[q];
                if (x == 0x2BC || (x >= 0x2018 && x <= 0x201B)) x = '\'';
                else if (x >= 0x201C && x <= 0x201F) x = '"';
                ub_push(out, x);
            }
        }
    }
}

// fix_line_breaks, remove_terminal_escapes (ESC [ digits/';' letter), remove_control_chars.
static void clean_controls(const U32Buf* in, U32Buf* out) {
    const uint32_t* t = in->v;
    size_t n = in->n;
    U32Buf mid = {0};
    for (size_t i = 0; i < n; i++) {
        uint32_t c = t[i];
        if (c == '\r' && i + 1 < n && t[i + 1] == '\n') continue;
        ub_push(&mid, c == '\r' || c == 0x2028 || c == 0x2029 || c == 0x85 ? '\n' : c);
    }
    out->n = 0;
    for (size_t i = 0; i < mid.n; i++) {
        uint32_t c = mid.v[i];
        if (c == 0x1B && i + 1 < mid.n && mid.v[i + 1] == '[') {
            size_t k = i + 2;
            while (k < mid.n && ((mid.v[k] >= '0' && mid.v[k] <= '9') || mid.v[k] == ';')) k++;
            if (k < mid.n && mid.v[k] < 0x80 && is_ascii_alpha(mid.v[k])) { i = k; continue; }
        }
        int control = c <= 8 || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F ||
                      (c >= 0x206A && c <= 0x206F) || c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFC);
        if (!control) ub_push(out, c);
    }
    free(mid.v);
}

// fix_and_explain on one segment: all fixers, repeated until the text stops changing.
static void ftfy_segment(U32Buf* text, int unescape) {
    U32Buf orig = {0}, tmp = {0};
    for (int round = 0; round < FTFY_MAX_ROUNDS; round++) {
        orig.n = 0;
        ub_append(&orig, text->v, text->n);
        if (unescape) { unescape_html(text, &tmp); ub_swap(text, &tmp); }
        fix_encoding(text, 0);
        translate_chars(text, &tmp); ub_swap(text, &tmp);
        clean_controls(text, &tmp); ub_swap(text, &tmp);
        nfc(text, &tmp);
        if (ub_equal(text, &orig)) break;
    }
    free(orig.v);
    free(tmp.v);
}

// ftfy.fix_text: one segment per line (at most FTFY_SEGMENT code points). Once a segment holds
// a literal '<', HTML entities stay as they are from there on.
static void ftfy_fix_text(U32Buf* text) {
    U32Buf out = {0}, seg = {0};
    int unescape = 1;
    for (size_t pos = 0; pos < text->n;) {
        size_t end = pos;
        while (end < text->n && text->v[end] != '\n' && end - pos < FTFY_SEGMENT) end++;
        if (end < text->n && text->v[end] == '\n' && end - pos < FTFY_SEGMENT) end++;
        seg.n = 0;
        ub_append(&seg, text->v + pos, end - pos);
        for (size_t i = 0; i < seg.n && unescape; i++) unescape = seg.v[i] != '<';
        ftfy_segment(&seg, unescape);
        ub_append(&out, seg.v, seg.n);
        pos = end;
    }
    ub_swap(text, &out);
    free(out.v);
    free(seg.v);
}

// ---------------------------------------------------------------------------------------------
// The tokenizer: symbols, merges, loading
// ---------------------------------------------------------------------------------------------

typedef struct { uint64_t key; int rank, merged; } PairSlot;   // key (a+1)<<32 | (b+1); 0 = empty

struct Tokenizer {
    int n_vocab;                  // vocab.json: ids 0..n_vocab-1
    char** sym;                   // symbol strings: the vocabulary, then strings only merges make
    int n_sym, cap_sym;
    int* sym_slot;                // hash table: symbol index + 1, 0 = empty
    size_t sym_cap;               // power of two
    PairSlot* pairs;              // (left, right) symbols -> merge rank and merged symbol
    size_t pair_cap;
    int byte_sym[2][256];         // symbol of byte b inside a word [0] / ending it with "</w>" [1]
    int bos, eos;                 // "<|startoftext|>", "<|endoftext|>" (also unk and pad)
    char** added;                 // exact-match tokens, split before everything else
    int* added_id;
    int n_added, cap_added, n_new;   // n_new: added ids past the vocabulary
};

static uint64_t hash_bytes(const char* s, size_t n) {
    uint64_t h = 1469598103934665603ull;                // FNV-1a
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

// Index of symbol s[0..n), interned when create; -1 when absent.
static int sym_find(Tokenizer* t, const char* s, size_t n, int create) {
    size_t mask = t->sym_cap - 1, i = (size_t)hash_bytes(s, n) & mask;
    for (; t->sym_slot[i]; i = (i + 1) & mask) {
        const char* x = t->sym[t->sym_slot[i] - 1];
        if (strncmp(x, s, n) == 0 && x[n] == 0) return t->sym_slot[i] - 1;
    }
    if (!create) return -1;
    if (t->n_sym == t->cap_sym) {
        t->cap_sym = t->cap_sym ? 2 * t->cap_sym : 1024;
        char** v = realloc(t->sym, (size_t)t->cap_sym * sizeof *v);
        CHECK(v != NULL, "out of memory");
        t->sym = v;
    }
    char* copy = xmalloc(n + 1);
    memcpy(copy, s, n);
    copy[n] = 0;
    t->sym[t->n_sym] = copy;
    t->sym_slot[i] = ++t->n_sym;
    return t->n_sym - 1;
}

static PairSlot* pair_slot(const Tokenizer* t, int a, int b) {
    uint64_t key = ((uint64_t)(a + 1) << 32) | (uint64_t)(b + 1);
    size_t mask = t->pair_cap - 1, i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 20) & mask;
    while (t->pairs[i].key && t->pairs[i].key != key) i = (i + 1) & mask;
    t->pairs[i].key = key;          // an empty slot is claimed only by pair_add (rank set there)
    return &t->pairs[i];
}

static const PairSlot* pair_find(const Tokenizer* t, int a, int b) {
    uint64_t key = ((uint64_t)(a + 1) << 32) | (uint64_t)(b + 1);
    size_t mask = t->pair_cap - 1, i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 20) & mask;
    for (; t->pairs[i].key; i = (i + 1) & mask)
        if (t->pairs[i].key == key) return &t->pairs[i];
    return NULL;
}

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the others for 256+k.
static uint32_t byte_char(int b) {
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return (uint32_t)b;
    int k = 0;
    for (int x = 0; x < b; x++)
        if (!((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF))) k++;
    return 256u + (uint32_t)k;
}

static int load_vocab(Tokenizer* t, const char* path) {
    size_t len = 0;
    char* text = file_read_all(path, &len, TOK_MAX_VOCAB_FILE);
    if (!text) return -1;
    Json* j = json_parse(text, len);
    free(text);
    if (!j) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", error_last());
        error_set("%s: %s (expected a JSON object of token -> id)", path, msg);
        return -1;
    }
    int rc = -1;
    if (j->type != JSON_OBJECT || j->count < 2) {
        error_set("%s: expected a JSON object of token -> id with entries, found %s", path,
                  j->type == JSON_OBJECT ? "an empty object" : "another JSON value");
        goto done;
    }
    int n = j->count;
    if (n > TOK_MAX_VOCAB) { error_set("%s: %d tokens, more than the limit of %d", path, n, TOK_MAX_VOCAB); goto done; }
    t->n_vocab = n;
    t->sym_cap = 1;
    while (t->sym_cap < 2 * ((size_t)n + 3 * TOK_MAX_MERGES + 1024)) t->sym_cap *= 2;   // merges add <= 3 each
    t->sym_slot = xcalloc(t->sym_cap, sizeof *t->sym_slot);
    t->sym = xcalloc((size_t)n, sizeof *t->sym);
    t->cap_sym = n;
    t->n_sym = n;
    for (int i = 0; i < n; i++) {
        const Json* v = &j->items[i];
        const char* key = j->keys[i];
        size_t klen = strlen(key);
        U32Buf tmp = {0};
        int bad_utf8 = utf8_decode((const unsigned char*)key, klen, 0, &tmp, NULL);
        free(tmp.v);
        if (v->type != JSON_NUMBER || !(v->number >= 0 && v->number < n) || v->number != floor(v->number)) {
            error_set("%s: token #%d must map to an integer id in [0, %d)", path, i, n);
            goto done;
        }
        int id = (int)v->number;
        if (bad_utf8 || !klen) { error_set("%s: token #%d (id %d) is empty or not UTF-8", path, i, id); goto done; }
        if (t->sym[id]) { error_set("%s: id %d appears twice (ids must be 0..%d, each once)", path, id, n - 1); goto done; }
        if (sym_find(t, key, klen, 0) >= 0) { error_set("%s: token #%d appears twice", path, i); goto done; }
        t->sym[id] = xstrdup(key);
        size_t mask = t->sym_cap - 1, s = (size_t)hash_bytes(key, klen) & mask;
        while (t->sym_slot[s]) s = (s + 1) & mask;
        t->sym_slot[s] = id + 1;
    }
    rc = 0;
done:
    json_free(j);
    return rc;
}

// One merges.txt line: two whitespace-separated symbols make the pair of this rank. Other lines
// take their rank too but can never match (Python keeps them as 1- or 3-tuples).
static void merge_line(Tokenizer* t, const uint32_t* s, size_t n, int rank) {
    enum { PART_MAX = 256 };                           // code points; CLIP's longest is ~20
    char part[2][4 * PART_MAX];
    size_t plen[2] = {0, 0};
    int np = 0;
    for (size_t i = 0; i < n;) {
        if (is_space(s[i])) { i++; continue; }
        size_t j = i;
        while (j < n && !is_space(s[j])) j++;
        if (np < 2 && j - i > PART_MAX) return;
        for (size_t k = i; k < j && np < 2; k++) plen[np] += (size_t)utf8_put(part[np] + plen[np], s[k]);
        np++;
        i = j;
    }
    if (np != 2) return;
    char joined[8 * PART_MAX];
    memcpy(joined, part[0], plen[0]);
    memcpy(joined + plen[0], part[1], plen[1]);
    int a = sym_find(t, part[0], plen[0], 1), b = sym_find(t, part[1], plen[1], 1);
    PairSlot* slot = pair_slot(t, a, b);
    slot->rank = rank;                                  // a repeated pair keeps its last rank
    slot->merged = sym_find(t, joined, plen[0] + plen[1], 1);
}

// CLIPTokenizer: merges = read().strip().split("\n")[1:48895]; rank = line index - 1.
static int load_merges(Tokenizer* t, const char* path) {
    size_t len = 0, at = 0;
    char* text = file_read_all(path, &len, TOK_MAX_MERGES_FILE);
    if (!text) return -1;
    U32Buf u = {0};
    int bad = utf8_decode((const unsigned char*)text, len, 0, &u, &at);
    free(text);
    if (bad) { free(u.v); error_set("%s: invalid UTF-8 at byte %zu", path, at); return -1; }
    size_t b = 0, e = u.n;
    while (b < e && is_space(u.v[b])) b++;
    while (e > b && is_space(u.v[e - 1])) e--;
    t->pair_cap = 1;
    while (t->pair_cap < 4 * (size_t)TOK_MAX_MERGES) t->pair_cap *= 2;
    t->pairs = xcalloc(t->pair_cap, sizeof *t->pairs);
    for (size_t i = b, line = 0; i <= e && line <= TOK_MAX_MERGES; line++) {
        size_t j = i;
        while (j < e && u.v[j] != '\n') j++;
        if (line > 0) merge_line(t, u.v + i, j - i, (int)line - 1);    // line 0: "#version: 0.2"
        i = j + 1;
    }
    free(u.v);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// BPE of one pre-split word
// ---------------------------------------------------------------------------------------------

typedef struct { int rank, pos, left, right, merged; } Cand;   // a mergeable adjacent pair

typedef struct {                  // scratch for the words of one encode call
    int *sym, *next, *prev, *merged_at;
    Cand* heap;
    size_t cap;
    char* utf8;
    size_t utf8_cap;
} BpeWork;

static int cand_less(const Cand* a, const Cand* b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(Cand* h, int* n, Cand c) {
    int i = (*n)++;
    while (i > 0 && cand_less(&c, &h[(i - 1) / 2])) { h[i] = h[(i - 1) / 2]; i = (i - 1) / 2; }
    h[i] = c;
}

static Cand heap_pop(Cand* h, int* n) {
    Cand top = h[0], last = h[--*n];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && cand_less(&h[c + 1], &h[c])) c++;
        if (!cand_less(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n > 0) h[i] = last;
    return top;
}

static void bpe_push_pair(const Tokenizer* t, BpeWork* w, int* nh, int pos) {
    int nx = w->next[pos];
    if (nx < 0) return;
    const PairSlot* p = pair_find(t, w->sym[pos], w->sym[nx]);
    if (p) heap_push(w->heap, nh, (Cand){p->rank, pos, w->sym[pos], w->sym[nx], p->merged});
}

// CLIPTokenizer.bpe on the symbols w->sym[0..n): take the lowest-ranked adjacent pair, merge all
// its occurrences left to right, repeat. The heap hands out one rank at a time; pairs that a
// pass creates are queued after it, so none joins the pass that made it (as in the reference).
static void bpe_word(const Tokenizer* t, BpeWork* w, int n) {
    int nh = 0;
    for (int i = 0; i < n; i++) { w->next[i] = i + 1 < n ? i + 1 : -1; w->prev[i] = i - 1; }
    for (int i = 0; i + 1 < n; i++) bpe_push_pair(t, w, &nh, i);
    while (nh > 0) {
        int rank = w->heap[0].rank, nm = 0;
        while (nh > 0 && w->heap[0].rank == rank) {
            Cand c = heap_pop(w->heap, &nh);
            int nx = w->next[c.pos];
            if (w->sym[c.pos] != c.left || nx < 0 || w->sym[nx] != c.right) continue;   // stale
            w->sym[c.pos] = c.merged;
            w->next[c.pos] = w->next[nx];
            if (w->next[nx] >= 0) w->prev[w->next[nx]] = c.pos;
            w->sym[nx] = -1;
            w->merged_at[nm++] = c.pos;
        }
        for (int k = 0; k < nm; k++) {
            int p = w->merged_at[k];
            if (w->prev[p] >= 0) bpe_push_pair(t, w, &nh, w->prev[p]);
            bpe_push_pair(t, w, &nh, p);
        }
    }
}

typedef struct { int* ids; int n, cap; } IdOut;

static void id_push(IdOut* o, int id) { if (o->n < o->cap) o->ids[o->n++] = id; }

// One match of the pre-split regex: bytes -> symbols -> BPE -> ids.
static void bpe_token(const Tokenizer* t, const uint32_t* cp, size_t n, IdOut* out, BpeWork* w) {
    if (w->utf8_cap < 4 * n + 1) {
        free(w->utf8);
        w->utf8_cap = 4 * n + 1;
        w->utf8 = xmalloc(w->utf8_cap);
    }
    size_t nb = 0;
    for (size_t i = 0; i < n; i++) nb += (size_t)utf8_put(w->utf8 + nb, cp[i]);
    w->utf8[nb] = 0;
    if (strcmp(w->utf8, "<|startoftext|>") == 0) { id_push(out, t->bos); return; }   // bpe's cache
    if (strcmp(w->utf8, "<|endoftext|>") == 0) { id_push(out, t->eos); return; }
    if (w->cap < nb) {
        free(w->sym); free(w->next); free(w->prev); free(w->merged_at); free(w->heap);
        w->cap = nb;
        w->sym = xmalloc(nb * sizeof *w->sym);
        w->next = xmalloc(nb * sizeof *w->next);
        w->prev = xmalloc(nb * sizeof *w->prev);
        w->merged_at = xmalloc(nb * sizeof *w->merged_at);
        w->heap = xmalloc(3 * nb * sizeof *w->heap);    // n-1 pairs + 2 per merge
    }
    for (size_t i = 0; i < nb; i++) w->sym[i] = t->byte_sym[i + 1 == nb][(unsigned char)w->utf8[i]];
    bpe_word(t, w, (int)nb);
    for (int p = 0; p >= 0 && out->n < out->cap; p = w->next[p])
        id_push(out, w->sym[p] < t->n_vocab ? w->sym[p] : t->eos);   // unknown -> unk = eos
}

// ---------------------------------------------------------------------------------------------
// Pre-split and encode
// ---------------------------------------------------------------------------------------------

// Does lit (ASCII, lower case) match at s[i] under re.IGNORECASE? Returns its length or 0.
static size_t match_ci(const uint32_t* s, size_t i, size_t n, const char* lit) {
    size_t k = 0;
    for (; lit[k]; k++) {
        if (i + k >= n) return 0;
        uint32_t c = s[i + k], l = (uint32_t)lit[k];
        int eq = c == l || (is_ascii_alpha(c) && (c | 0x20) == l) || (l == 's' && c == 0x17F);   // ſ
        if (!eq) return 0;
    }
    return k;
}

// Characters no alternative of CLIP's pattern matches: whitespace, and U+0345 (a combining mark
// whose case variants are letters: under re.IGNORECASE the regex module puts it neither in
// [\p{L}] nor in [^\s\p{L}\p{N}]; checked over all assigned code points of Unicode 14).
static int clip_skipped(uint32_t c) { return is_space(c) || c == 0x345; }

// CLIP's pattern at s[i] (s[i] not skipped): the length of the match.
static size_t clip_match(const uint32_t* s, size_t i, size_t n) {
    static const char* const contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d", NULL};
    size_t k;
    if ((k = match_ci(s, i, n, "<|startoftext|>")) || (k = match_ci(s, i, n, "<|endoftext|>"))) return k;
    for (int c = 0; contractions[c]; c++)
        if ((k = match_ci(s, i, n, contractions[c]))) return k;
    size_t j = i + 1;
    if (is_letter(s[i])) {
        while (j < n && is_letter(s[j])) j++;
    } else if (!is_number(s[i])) {
        while (j < n && !clip_skipped(s[j]) && !is_letter(s[j]) && !is_number(s[j])) j++;
    }
    return j - i;
}

// CLIPTokenizer._tokenize on one piece between added tokens.
static void encode_piece(const Tokenizer* t, const char* s, size_t len, IdOut* out, BpeWork* w) {
    if (!len || out->n >= out->cap) return;
    U32Buf text = {0}, tmp = {0};
    utf8_decode((const unsigned char*)s, len, 0, &text, NULL);   // validated by the caller
    ftfy_fix_text(&text);
    for (size_t i = 0; i < text.n; i++) {                          // whitespace_clean
        if (!is_space(text.v[i])) { ub_push(&tmp, text.v[i]); continue; }
        while (i + 1 < text.n && is_space(text.v[i + 1])) i++;
        if (tmp.n) ub_push(&tmp, ' ');
    }
    if (tmp.n && tmp.v[tmp.n - 1] == ' ') tmp.n--;
    unicode_lower(&tmp, &text);
    for (size_t i = 0; i < text.n && out->n < out->cap;) {
        if (clip_skipped(text.v[i])) { i++; continue; }
        size_t k = clip_match(text.v, i, text.n);
        bpe_token(t, text.v + i, k, out, w);
        i += k;
    }
    free(text.v);
    free(tmp.v);
}

// The longest added token at s (the Trie's leftmost-longest split): index or -1.
static int added_at(const Tokenizer* t, const char* s, size_t len) {
    int best = -1;
    size_t best_len = 0;
    for (int k = 0; k < t->n_added; k++) {
        size_t l = strlen(t->added[k]);
        if (l > best_len && l <= len && memcmp(s, t->added[k], l) == 0) { best = k; best_len = l; }
    }
    return best;
}

static int encode_ids(const Tokenizer* t, const char* text, int* ids, int cap) {
    if (!t || !text || (!ids && cap > 0) || cap < 0) { error_set("tokenizer: bad arguments"); return -1; }
    size_t len = strlen(text), at = 0;
    U32Buf chk = {0};
    int bad = utf8_decode((const unsigned char*)text, len, 0, &chk, &at);
    free(chk.v);
    if (bad) {
        error_set("prompt is not valid UTF-8: byte 0x%02X at offset %zu", (unsigned char)text[at], at);
        return -1;
    }
    IdOut out = {ids, 0, cap};
    BpeWork w = {0};
    size_t start = 0;
    for (size_t i = 0; i < len && out.n < cap;) {
        int k = added_at(t, text + i, len - i);
        if (k < 0) { i++; continue; }
        encode_piece(t, text + start, i - start, &out, &w);
        id_push(&out, t->added_id[k]);
        i += strlen(t->added[k]);
        start = i;
    }
    if (out.n < cap) encode_piece(t, text + start, len - start, &out, &w);
    free(w.sym); free(w.next); free(w.prev); free(w.merged_at); free(w.heap); free(w.utf8);
    return out.n;
}

// ---------------------------------------------------------------------------------------------
// API
// ---------------------------------------------------------------------------------------------

static int add_exact(Tokenizer* t, const char* text, int id) {
    if (t->n_added == t->cap_added) {
        t->cap_added = t->cap_added ? 2 * t->cap_added : 8;
        char** a = realloc(t->added, (size_t)t->cap_added * sizeof *a);
        CHECK(a != NULL, "out of memory");
        t->added = a;
        int* b = realloc(t->added_id, (size_t)t->cap_added * sizeof *b);
        CHECK(b != NULL, "out of memory");
        t->added_id = b;
    }
    t->added[t->n_added] = xstrdup(text);
    t->added_id[t->n_added++] = id;
    return id;
}

Tokenizer* tokenizer_load(const char* dir) {
    if (!dir) { error_set("tokenizer_load: no folder given"); return NULL; }
    size_t dlen = strlen(dir);
    char* path = xmalloc(dlen + 16);
    Tokenizer* t = xcalloc(1, sizeof *t);
    snprintf(path, dlen + 16, "%s/vocab.json", dir);
    if (load_vocab(t, path) != 0) goto fail;
    snprintf(path, dlen + 16, "%s/merges.txt", dir);
    if (load_merges(t, path) != 0) goto fail;
    snprintf(path, dlen + 16, "%s/vocab.json", dir);
    t->bos = sym_find(t, "<|startoftext|>", 15, 0);
    t->eos = sym_find(t, "<|endoftext|>", 13, 0);
    if (t->bos < 0 || t->bos >= t->n_vocab || t->eos < 0 || t->eos >= t->n_vocab) {
        error_set("%s: expected the tokens <|startoftext|> and <|endoftext|> (CLIP's BOS/EOS)", path);
        goto fail;
    }
    for (int b = 0; b < 256; b++) {
        char s[8];
        int n = utf8_put(s, byte_char(b));
        memcpy(s + n, "</w>", 4);
        t->byte_sym[0][b] = sym_find(t, s, (size_t)n, 1);
        t->byte_sym[1][b] = sym_find(t, s, (size_t)n + 4, 1);
    }
    add_exact(t, "<|startoftext|>", t->bos);
    add_exact(t, "<|endoftext|>", t->eos);
    free(path);
    return t;
fail:
    free(path);
    tokenizer_free(t);
    return NULL;
}

void tokenizer_free(Tokenizer* t) {
    if (!t) return;
    for (int i = 0; i < t->n_sym; i++) free(t->sym[i]);
    for (int i = 0; i < t->n_added; i++) free(t->added[i]);
    free(t->sym);
    free(t->sym_slot);
    free(t->pairs);
    free(t->added);
    free(t->added_id);
    free(t);
}

int tokenizer_vocab_size(const Tokenizer* t) { return t ? t->n_vocab : 0; }

int tokenizer_add_token(Tokenizer* t, const char* text) {
    if (!t || !text || !*text) { error_set("tokenizer_add_token: empty token"); return -1; }
    size_t len = strlen(text);
    U32Buf chk = {0};
    int bad = len > 1024 || utf8_decode((const unsigned char*)text, len, 0, &chk, NULL) != 0;
    free(chk.v);
    if (bad) { error_set("tokenizer_add_token: token is not valid UTF-8 or longer than 1024 bytes"); return -1; }
    for (int k = 0; k < t->n_added; k++)
        if (strcmp(t->added[k], text) == 0) return t->added_id[k];
    int id = sym_find(t, text, len, 0);                 // a vocabulary token keeps its id
    if (id < 0 || id >= t->n_vocab) id = t->n_vocab + t->n_new++;
    return add_exact(t, text, id);
}

void tokenizer_clear_added(Tokenizer* t) {
    while (t->n_added > 2) free(t->added[--t->n_added]);   // keeps BOS and EOS
    t->n_new = 0;
}

int tokenizer_encode(const Tokenizer* t, const char* text, int* ids, int max_len) {
    if (!ids) { error_set("tokenizer_encode: no output array"); return -1; }
    if (max_len < 2) { error_set("tokenizer_encode: max_len %d leaves no room for BOS and EOS", max_len); return -1; }
    int n = encode_ids(t, text, ids + 1, max_len - 2);
    if (n < 0) return -1;
    ids[0] = t->bos;
    for (int i = n + 1; i < max_len; i++) ids[i] = t->eos;
    return n + 2;
}

int tokenizer_encode_raw(const Tokenizer* t, const char* text, int* ids, int cap) {
    return encode_ids(t, text, ids, cap);
}

const char* tokenizer_token_text(const Tokenizer* t, int id) {
    if (!t || id < 0) return NULL;
    if (id < t->n_vocab) return t->sym[id];
    for (int k = 0; k < t->n_added; k++)
        if (t->added_id[k] == id) return t->added[k];
    return NULL;
}
