// image.c: the images at the two ends of the pipeline (style references in, samples and the
// contact sheet out).
//   - read, detected by content: PNG (8-bit gray, RGB, RGBA, gray+alpha; palette and gray at
//     1/2/4/8 bits; non-interlaced; every CRC and the zlib Adler-32 checked; a complete inflate
//     after RFC 1951 and Mark Adler's puff.c: stored, fixed and dynamic Huffman blocks), BMP
//     (BITMAPINFOHEADER and the V2-V5 headers, 24/32-bit, BI_RGB or BI_BITFIELDS with the
//     standard masks, bottom-up or top-down) and PPM (P6 and P3, any maxval up to 65535, scaled
//     to 8 bits like Pillow: round(v / maxval * 255));
//   - alpha is dropped, not composited, as Pillow's Image.convert("RGB") does (diffusers'
//     load_image), so a reference image decodes to the same pixels as in the Python pipeline;
//   - write, chosen by extension: PNG (RGB 8-bit, zlib with stored deflate blocks, tEXt chunks),
//     BMP (24-bit bottom-up) and PPM (P6), atomically through file_write_atomic;
//   - centre crop + Pillow's bicubic resize (ImagingResample in libImaging/Resample.c: Keys
//     kernel a = -0.5, support widened by the scale when downscaling, 22-bit fixed-point
//     coefficients, horizontal pass then vertical), [-1, 1] NCHW conversion both ways (diffusers'
//     VaeImageProcessor / numpy_to_pil), a 5x7 bitmap font and the labelled contact sheet.
// Every reader treats its input as hostile: bounds are checked before each read, sizes are
// checked before allocating, and failures return -1 with a message in error_last().
// Left out: JPEG, GIF, WebP, TIFF, PBM/PGM, 16-bit and interlaced PNG, palette/16-bit/RLE BMP,
// OS/2 BMP headers (all get a clear error, with a conversion command where one helps); PNG
// colour management (gAMA, iCCP) and tRNS are ignored; the PNG writer does not compress.
#include "instastyle.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define IMAGE_MAX_FILE ((size_t)2 << 30)   // 2 GiB: a 16384 x 16384 PPM is 805 MB

// ----------------------------------------------------------------------------------------------
// byte helpers, CRC-32 (PNG chunks) and Adler-32 (zlib)

static uint32_t rd16le(const unsigned char* p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }
static uint32_t rd32le(const unsigned char* p) { return rd16le(p) | rd16le(p + 2) << 16; }
static uint32_t rd32be(const unsigned char* p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static void wr16le(unsigned char* p, uint32_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static void wr32le(unsigned char* p, uint32_t v) { wr16le(p, v); wr16le(p + 2, v >> 16); }
static void wr32be(unsigned char* p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}

static uint32_t crc32(const unsigned char* p, size_t n) {
    static uint32_t table[256];     // reflected polynomial 0xedb88320, built on first use
    if (!table[1]) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    }
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) c = table[(c ^ p[i]) & 255] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

static uint32_t adler32(const unsigned char* p, size_t n) {
    uint32_t a = 1, b = 0;
    while (n) {
        size_t chunk = n < 5552 ? n : 5552;   // largest run before b can overflow 32 bits
        n -= chunk;
        while (chunk--) { a += *p++; b += a; }
        a %= 65521; b %= 65521;
    }
    return b << 16 | a;
}

// ----------------------------------------------------------------------------------------------
// inflate (RFC 1951), structured like puff.c: canonical Huffman codes decoded bit by bit from
// count/symbol tables. Output goes into a buffer of exactly the expected size; a stream that
// would write past it is an error, so a decompression bomb costs nothing.

#define HUFF_MAXBITS 15
typedef struct { short count[HUFF_MAXBITS + 1]; short symbol[288]; } Huffman;

typedef struct {
    const unsigned char* in; size_t in_len, in_pos;
    uint32_t bitbuf; int bitcnt;
    unsigned char* out; size_t out_len, out_pos;
    int eof;                         // a read ran past the end of the input
    const char* where;               // path for messages
} Inflate;

static int inflate_fail(Inflate* s, const char* what) {
    if (s->eof) error_set("%s: zlib stream in IDAT is truncated (ended after %zu bytes)", s->where, s->in_len);
    else error_set("%s: corrupt zlib stream in IDAT: %s (compressed byte %zu)", s->where, what, s->in_pos);
    return -1;
}

static int inflate_too_long(Inflate* s) {
    error_set("%s: zlib stream in IDAT expands beyond the %zu bytes the IHDR size implies",
              s->where, s->out_len);
    return -1;
}

static uint32_t inflate_bits(Inflate* s, int need) {
    uint32_t val = s->bitbuf;
    while (s->bitcnt < need) {
        if (s->in_pos == s->in_len) { s->eof = 1; return 0; }
        val |= (uint32_t)s->in[s->in_pos++] << s->bitcnt;
        s->bitcnt += 8;
    }
    s->bitbuf = val >> need;
    s->bitcnt -= need;
    return val & ((1u << need) - 1);
}

// Builds the canonical code for n code lengths (RFC 1951 3.2.2). Returns 0 for a complete code,
// > 0 for an incomplete one, < 0 for an over-subscribed one.
static int huff_build(Huffman* h, const short* length, int n) {
    short offs[HUFF_MAXBITS + 1];
    memset(h->count, 0, sizeof h->count);
    for (int s = 0; s < n; s++) h->count[length[s]]++;
    if (h->count[0] == n) return 0;
    int left = 1;
    for (int len = 1; len <= HUFF_MAXBITS; len++) {
        left = 2 * left - h->count[len];
        if (left < 0) return left;
    }
    offs[1] = 0;
    for (int len = 1; len < HUFF_MAXBITS; len++) offs[len + 1] = (short)(offs[len] + h->count[len]);
    for (int s = 0; s < n; s++) if (length[s]) h->symbol[offs[length[s]]++] = (short)s;
    return left;
}

static int huff_decode(Inflate* s, const Huffman* h) {
    int code = 0, first = 0, index = 0;
    for (int len = 1; len <= HUFF_MAXBITS; len++) {
        code |= (int)inflate_bits(s, 1);
        if (s->eof) return -1;
        int count = h->count[len];
        if (code - count < first) return h->symbol[index + (code - first)];
        index += count;
        first = (first + count) << 1;
        code <<= 1;
    }
    return -1;                       // a code of an incomplete table that has no symbol
}

static int inflate_codes(Inflate* s, const Huffman* lencode, const Huffman* distcode) {
    static const short lbase[29] = {3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31,
                                    35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
    static const short lext[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2,
                                   3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
    static const short dbase[30] = {1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257,
                                    385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193,
                                    12289, 16385, 24577};
    static const short dext[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6,
                                   7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};
    for (;;) {
        int sym = huff_decode(s, lencode);
        if (sym < 0) return inflate_fail(s, "invalid literal/length code");
        if (sym == 256) return 0;
        if (sym < 256) {
            if (s->out_pos == s->out_len) return inflate_too_long(s);
            s->out[s->out_pos++] = (unsigned char)sym;
            continue;
        }
        sym -= 257;
        if (sym >= 29) return inflate_fail(s, "invalid length symbol (286 or 287)");
        size_t len = (size_t)lbase[sym] + inflate_bits(s, lext[sym]);
        int dsym = huff_decode(s, distcode);
        if (dsym < 0 || dsym >= 30) return inflate_fail(s, "invalid distance code");
        size_t dist = (size_t)dbase[dsym] + inflate_bits(s, dext[dsym]);
        if (s->eof) return inflate_fail(s, "");
        if (dist > s->out_pos) return inflate_fail(s, "distance reaches before the start of the data");
        if (len > s->out_len - s->out_pos) return inflate_too_long(s);
        for (; len; len--, s->out_pos++) s->out[s->out_pos] = s->out[s->out_pos - dist];
    }
}

static int inflate_stored(Inflate* s) {
    s->bitbuf = 0;                   // a stored block starts at the next byte boundary
    s->bitcnt = 0;
    if (s->in_len - s->in_pos < 4) { s->eof = 1; return inflate_fail(s, ""); }
    const unsigned char* p = s->in + s->in_pos;
    uint32_t len = rd16le(p), nlen = rd16le(p + 2);
    s->in_pos += 4;
    if (len != (~nlen & 0xffff)) return inflate_fail(s, "stored block length does not match its complement");
    if (s->in_len - s->in_pos < len) { s->eof = 1; return inflate_fail(s, ""); }
    if (len > s->out_len - s->out_pos) return inflate_too_long(s);
    memcpy(s->out + s->out_pos, s->in + s->in_pos, len);
    s->in_pos += len;
    s->out_pos += len;
    return 0;
}

static int inflate_fixed(Inflate* s) {
    short lengths[288 + 30];
    Huffman lencode, distcode;
    for (int i = 0; i < 288; i++) lengths[i] = i < 144 ? 8 : i < 256 ? 9 : i < 280 ? 7 : 8;
    for (int i = 288; i < 288 + 30; i++) lengths[i] = 5;
    huff_build(&lencode, lengths, 288);
    huff_build(&distcode, lengths + 288, 30);
    return inflate_codes(s, &lencode, &distcode);
}

static int inflate_dynamic(Inflate* s) {
    static const short order[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
    short lengths[286 + 30];
    Huffman lencode, distcode;
    int nlen = (int)inflate_bits(s, 5) + 257, ndist = (int)inflate_bits(s, 5) + 1;
    int ncode = (int)inflate_bits(s, 4) + 4;
    if (s->eof) return inflate_fail(s, "");
    if (nlen > 286 || ndist > 30) return inflate_fail(s, "more than 286 length or 30 distance codes");
    for (int i = 0; i < 19; i++) lengths[order[i]] = i < ncode ? (short)inflate_bits(s, 3) : 0;
    if (s->eof) return inflate_fail(s, "");
    if (huff_build(&lencode, lengths, 19) != 0) return inflate_fail(s, "bad code-length code");
    int index = 0;
    while (index < nlen + ndist) {
        int sym = huff_decode(s, &lencode), rep;
        if (sym < 0) return inflate_fail(s, "invalid code-length code");
        if (sym < 16) { lengths[index++] = (short)sym; continue; }
        short len = 0;
        if (sym == 16) {
            if (index == 0) return inflate_fail(s, "length repeat with no previous length");
            len = lengths[index - 1];
            rep = 3 + (int)inflate_bits(s, 2);
        } else {
            rep = sym == 17 ? 3 + (int)inflate_bits(s, 3) : 11 + (int)inflate_bits(s, 7);
        }
        if (s->eof) return inflate_fail(s, "");
        if (index + rep > nlen + ndist) return inflate_fail(s, "code lengths overrun the table");
        while (rep--) lengths[index++] = len;
    }
    if (lengths[256] == 0) return inflate_fail(s, "no end-of-block code");
    // Incomplete codes are only allowed for a single code (RFC 1951 3.2.7; zlib agrees).
    int err = huff_build(&lencode, lengths, nlen);
    if (err < 0 || (err > 0 && nlen - lencode.count[0] != 1))
        return inflate_fail(s, "over-subscribed or incomplete literal/length code");
    err = huff_build(&distcode, lengths + nlen, ndist);
    if (err < 0 || (err > 0 && ndist - distcode.count[0] != 1))
        return inflate_fail(s, "over-subscribed or incomplete distance code");
    return inflate_codes(s, &lencode, &distcode);
}

// zlib stream (RFC 1950) -> exactly out_len bytes. 0 or -1 + error_last().
static int zlib_inflate(unsigned char* out, size_t out_len, const unsigned char* in, size_t in_len,
                        const char* where) {
    if (in_len < 6) {
        error_set("%s: zlib stream in IDAT is %zu bytes, shorter than a header and checksum", where, in_len);
        return -1;
    }
    if ((in[0] & 15) != 8 || (in[0] >> 4) > 7 || (in[0] * 256 + in[1]) % 31 || (in[1] & 32)) {
        error_set("%s: bad zlib header %02x %02x (expected deflate, window <= 32K, no preset dictionary)",
                  where, in[0], in[1]);
        return -1;
    }
    Inflate s = {in, in_len, 2, 0, 0, out, out_len, 0, 0, where};
    int last;
    do {
        last = (int)inflate_bits(&s, 1);
        int type = (int)inflate_bits(&s, 2);
        if (s.eof) return inflate_fail(&s, "");
        int rc = type == 0 ? inflate_stored(&s) : type == 1 ? inflate_fixed(&s)
               : type == 2 ? inflate_dynamic(&s) : inflate_fail(&s, "block type 3 (reserved)");
        if (rc) return -1;
    } while (!last);
    if (s.out_pos != out_len) {
        error_set("%s: zlib stream in IDAT holds %zu bytes of image data, expected %zu", where, s.out_pos, out_len);
        return -1;
    }
    if (in_len - s.in_pos < 4) {
        error_set("%s: zlib stream in IDAT ends without its Adler-32 checksum", where);
        return -1;
    }
    uint32_t want = rd32be(in + s.in_pos), got = adler32(out, out_len);
    if (want != got) {
        error_set("%s: zlib Adler-32 mismatch: stored %08x, computed %08x", where, want, got);
        return -1;
    }
    return 0;
}

// ----------------------------------------------------------------------------------------------
// PNG reader

typedef struct {
    uint32_t w, h;
    int depth, ctype, channels;     // colour type 0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA
    int npal;
    unsigned char pal[256 * 3];
} PngInfo;

static int png_ihdr(PngInfo* p, const unsigned char* b, uint32_t len, const char* where) {
    if (len != 13) { error_set("%s: PNG IHDR has %u bytes, expected 13", where, len); return -1; }
    p->w = rd32be(b);
    p->h = rd32be(b + 4);
    p->depth = b[8];
    p->ctype = b[9];
    if (p->w == 0 || p->h == 0 || p->w > IMAGE_MAX_SIDE || p->h > IMAGE_MAX_SIDE) {
        error_set("%s: PNG is %u x %u; each side must be 1..%d (IMAGE_MAX_SIDE)", where, p->w, p->h, IMAGE_MAX_SIDE);
        return -1;
    }
    if (p->depth == 16) {
        error_set("%s: 16-bit PNG is not supported; convert to 8 bits, e.g. `convert in.png -depth 8 out.png`", where);
        return -1;
    }
    static const int channels[7] = {1, 0, 3, 1, 2, 0, 4};
    int low_ok = p->ctype == 0 || p->ctype == 3;     // 1/2/4-bit exists for gray and palette only
    int ok = p->ctype <= 6 && channels[p->ctype] &&
             (p->depth == 8 || (low_ok && (p->depth == 1 || p->depth == 2 || p->depth == 4)));
    if (!ok) {
        error_set("%s: PNG bit depth %d with colour type %d is not valid or not supported "
                  "(expected 8-bit gray/RGB/palette/gray+alpha/RGBA, or 1/2/4-bit gray/palette)",
                  where, p->depth, p->ctype);
        return -1;
    }
    p->channels = channels[p->ctype];
    if (b[10] != 0 || b[11] != 0) {
        error_set("%s: PNG compression method %d / filter method %d, expected 0 / 0", where, b[10], b[11]);
        return -1;
    }
    if (b[12] != 0) {
        error_set("%s: interlaced (Adam7) PNG is not supported; re-save it without interlacing, "
                  "e.g. `convert in.png -interlace none out.png`", where);
        return -1;
    }
    return 0;
}

// Walks the chunks once: checks each length and CRC, reads IHDR and PLTE, sums the IDAT bytes.
static int png_chunks(PngInfo* p, const unsigned char* d, size_t n, size_t* idat_len, const char* where) {
    size_t pos = 8;
    int seen_ihdr = 0;
    *idat_len = 0;
    for (;;) {
        if (n - pos < 12) {
            error_set("%s: PNG truncated: a chunk header at byte %zu needs 12 bytes, %zu left (no IEND)",
                      where, pos, n - pos);
            return -1;
        }
        uint32_t len = rd32be(d + pos);
        const unsigned char* type = d + pos + 4;
        const unsigned char* body = d + pos + 8;
        for (int i = 0; i < 4; i++) {
            if (!((type[i] | 32) >= 'a' && (type[i] | 32) <= 'z')) {
                error_set("%s: PNG chunk at byte %zu has an invalid type %02x %02x %02x %02x",
                          where, pos, type[0], type[1], type[2], type[3]);
                return -1;
            }
        }
        if (len > 0x7fffffffu || len > n - pos - 12) {
            error_set("%s: PNG chunk '%.4s' at byte %zu claims %u bytes, but only %zu remain",
                      where, (const char*)type, pos, len, n - pos - 12);
            return -1;
        }
        uint32_t want = rd32be(body + len), got = crc32(type, (size_t)len + 4);
        if (want != got) {
            error_set("%s: PNG chunk '%.4s' at byte %zu: CRC mismatch (stored %08x, computed %08x)",
                      where, (const char*)type, pos, want, got);
            return -1;
        }
        if (!seen_ihdr && memcmp(type, "IHDR", 4) != 0) {
            error_set("%s: PNG first chunk is '%.4s', expected IHDR", where, (const char*)type);
            return -1;
        }
        if (!memcmp(type, "IHDR", 4)) {
            if (seen_ihdr) { error_set("%s: PNG has two IHDR chunks", where); return -1; }
            if (png_ihdr(p, body, len, where)) return -1;
            seen_ihdr = 1;
        } else if (!memcmp(type, "PLTE", 4)) {
            if (len % 3 || len == 0 || len > 768) {
                error_set("%s: PNG PLTE has %u bytes, expected a multiple of 3 in 3..768", where, len);
                return -1;
            }
            p->npal = (int)(len / 3);
            memcpy(p->pal, body, len);
        } else if (!memcmp(type, "IDAT", 4)) {
            *idat_len += len;        // <= n: every chunk lies inside the file
        } else if (!memcmp(type, "IEND", 4)) {
            return 0;
        } else if (!(type[0] & 32)) {
            error_set("%s: PNG has an unknown critical chunk '%.4s'", where, (const char*)type);
            return -1;
        }
        pos += 12 + (size_t)len;
    }
}

// Undoes the per-row filters (PNG spec 9.2) in place. raw holds h rows of [filter byte, row].
static int png_unfilter(unsigned char* raw, uint32_t h, size_t rowlen, size_t bpp, const char* where) {
    for (uint32_t y = 0; y < h; y++) {
        unsigned char* row = raw + (size_t)y * (rowlen + 1) + 1;
        const unsigned char* prev = y ? row - (rowlen + 1) : NULL;
        int f = row[-1];
        if (f > 4) { error_set("%s: PNG row %u has filter type %d, expected 0..4", where, y, f); return -1; }
        if (f == 0 || (f == 2 && !prev)) continue;
        for (size_t i = 0; i < rowlen; i++) {
            int a = i >= bpp ? row[i - bpp] : 0;
            int b = prev ? prev[i] : 0;
            int c = prev && i >= bpp ? prev[i - bpp] : 0;
            int add;
            if (f == 1) add = a;
            else if (f == 2) add = b;
            else if (f == 3) add = (a + b) >> 1;
            else {                   // Paeth: the neighbour closest to a + b - c
                int pa = abs(b - c), pb = abs(a - c), pc = abs(a + b - 2 * c);
                add = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
            }
            row[i] = (unsigned char)(row[i] + add);
        }
    }
    return 0;
}

// Unfiltered rows -> RGB. Gray at 1/2/4 bits is scaled to 0..255; alpha is dropped.
static int png_to_rgb(Image* img, const PngInfo* p, const unsigned char* raw, size_t rowlen, const char* where) {
    int maxv = (1 << p->depth) - 1;
    for (uint32_t y = 0; y < p->h; y++) {
        const unsigned char* row = raw + (size_t)y * (rowlen + 1) + 1;
        unsigned char* out = img->rgb + (size_t)y * p->w * 3;
        for (uint32_t x = 0; x < p->w; x++, out += 3) {
            if (p->ctype == 2 || p->ctype == 6) {
                memcpy(out, row + (size_t)x * p->channels, 3);
                continue;
            }
            int v = p->ctype == 4 ? row[2 * x]
                  : (row[x * p->depth / 8] >> (8 - p->depth - x * p->depth % 8)) & maxv;
            if (p->ctype == 3) {
                if (v >= p->npal) {
                    error_set("%s: PNG pixel (%u, %u) uses palette index %d, but the palette has %d entries",
                              where, x, y, v, p->npal);
                    return -1;
                }
                memcpy(out, p->pal + 3 * v, 3);
            } else {
                out[0] = out[1] = out[2] = (unsigned char)(v * 255 / maxv);
            }
        }
    }
    return 0;
}

static int png_read(Image* img, const unsigned char* d, size_t n, const char* where) {
    PngInfo p;
    memset(&p, 0, sizeof p);
    size_t idat_len;
    if (png_chunks(&p, d, n, &idat_len, where)) return -1;
    if (p.ctype == 3 && p.npal == 0) { error_set("%s: PNG palette image has no PLTE chunk", where); return -1; }
    size_t rowlen = ((size_t)p.w * p.channels * p.depth + 7) / 8, raw_len;
    if (size_mul(rowlen + 1, p.h, &raw_len)) { error_set("%s: PNG size overflows", where); return -1; }
    // Deflate expands at most 1032:1, so fewer IDAT bytes than that cannot fill the image.
    if (idat_len == 0 || raw_len / 1032 > idat_len) {
        error_set("%s: PNG has %zu bytes of IDAT, too few to hold the %zu bytes of a %u x %u image",
                  where, idat_len, raw_len, p.w, p.h);
        return -1;
    }
    unsigned char* z = xmalloc(idat_len);
    size_t zpos = 0;
    for (size_t pos = 8; zpos < idat_len;) {        // the chunks were validated by png_chunks
        uint32_t len = rd32be(d + pos);
        if (!memcmp(d + pos + 4, "IDAT", 4)) { memcpy(z + zpos, d + pos + 8, len); zpos += len; }
        pos += 12 + (size_t)len;
    }
    unsigned char* raw = xmalloc(raw_len);
    size_t bpp = (size_t)(p.channels * p.depth + 7) / 8;
    int rc = zlib_inflate(raw, raw_len, z, idat_len, where);
    free(z);
    if (!rc) rc = png_unfilter(raw, p.h, rowlen, bpp, where);
    if (!rc) {
        *img = image_alloc((int)p.w, (int)p.h);
        rc = png_to_rgb(img, &p, raw, rowlen, where);
        if (rc) image_free(img);
    }
    free(raw);
    return rc;
}

// ----------------------------------------------------------------------------------------------
// BMP reader

static int bmp_read(Image* img, const unsigned char* d, size_t n, const char* where) {
    if (n < 14 + 40) { error_set("%s: BMP truncated: %zu bytes, the headers need at least 54", where, n); return -1; }
    uint32_t off = rd32le(d + 10), hsize = rd32le(d + 14);
    if (hsize != 40 && hsize != 52 && hsize != 56 && hsize != 108 && hsize != 124) {
        error_set("%s: BMP info header of %u bytes is not supported (expected 40, 52, 56, 108 or 124: "
                  "BITMAPINFOHEADER or V2..V5)", where, hsize);
        return -1;
    }
    if (n < 14 + hsize) { error_set("%s: BMP truncated inside its %u-byte info header", where, hsize); return -1; }
    int32_t w = (int32_t)rd32le(d + 18), h = (int32_t)rd32le(d + 22);
    uint32_t bits = rd16le(d + 28), comp = rd32le(d + 30);
    if (w < 1 || w > IMAGE_MAX_SIDE || h == 0 || h > IMAGE_MAX_SIDE || h < -IMAGE_MAX_SIDE) {
        error_set("%s: BMP is %d x %d; width must be 1..%d and |height| 1..%d (IMAGE_MAX_SIDE; "
                  "negative height = top-down)", where, w, h, IMAGE_MAX_SIDE, IMAGE_MAX_SIDE);
        return -1;
    }
    if (bits != 24 && bits != 32) {
        error_set("%s: BMP with %u bits per pixel is not supported (expected 24 or 32)", where, bits);
        return -1;
    }
    if (comp == 3 || comp == 6) {    // BI_BITFIELDS / BI_ALPHABITFIELDS: masks after the 40 bytes
        if (n < 14 + 40 + 12) { error_set("%s: BMP truncated inside its colour masks", where); return -1; }
        uint32_t r = rd32le(d + 54), g = rd32le(d + 58), b = rd32le(d + 62);
        if (bits != 32 || r != 0xff0000 || g != 0xff00 || b != 0xff) {
            error_set("%s: BMP %u-bit BI_BITFIELDS masks R=%08x G=%08x B=%08x are not supported "
                      "(expected 32-bit with 00ff0000 0000ff00 000000ff)", where, bits, r, g, b);
            return -1;
        }
    } else if (comp != 0) {
        error_set("%s: BMP compression %u is not supported (expected 0 = BI_RGB or 3 = BI_BITFIELDS)", where, comp);
        return -1;
    }
    int top_down = h < 0, hh = top_down ? -h : h, bpp = (int)bits / 8;
    size_t rowlen = (size_t)w * bpp, stride = (rowlen + 3) & ~(size_t)3, need;
    // The last row's padding may be missing; everything else must be in the file.
    if (size_mul(stride, (size_t)hh - 1, &need) || size_add(need, rowlen, &need) ||
        size_add(need, off, &need) || off < 14 + hsize || need > n) {
        error_set("%s: BMP pixel data at offset %u needs %zu bytes for %d x %d, but the file has %zu",
                  where, off, need, w, hh, n);
        return -1;
    }
    *img = image_alloc(w, hh);
    for (int y = 0; y < hh; y++) {
        const unsigned char* src = d + off + stride * (size_t)(top_down ? y : hh - 1 - y);
        unsigned char* dst = img->rgb + (size_t)y * w * 3;
        for (int x = 0; x < w; x++, src += bpp, dst += 3) {
            dst[0] = src[2]; dst[1] = src[1]; dst[2] = src[0];   // stored B, G, R (, unused/alpha)
        }
    }
    return 0;
}

// ----------------------------------------------------------------------------------------------
// PPM reader (netpbm P6 binary, P3 ASCII)

static int is_space(int c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

// The next decimal number, skipping whitespace and # comments. -1 when absent or above 10^7.
static long ppm_number(const unsigned char* d, size_t n, size_t* pos) {
    size_t i = *pos;
    for (;;) {
        while (i < n && is_space(d[i])) i++;
        if (i < n && d[i] == '#') { while (i < n && d[i] != '\n' && d[i] != '\r') i++; }
        else break;
    }
    if (i == n || d[i] < '0' || d[i] > '9') return -1;
    long v = 0;
    for (; i < n && d[i] >= '0' && d[i] <= '9'; i++) {
        v = v * 10 + (d[i] - '0');
        if (v > 10000000) return -1;
    }
    *pos = i;
    return v;
}

static int ppm_read(Image* img, const unsigned char* d, size_t n, const char* where) {
    int ascii = d[1] == '3';
    size_t pos = 2;
    long w = ppm_number(d, n, &pos), h = w < 0 ? -1 : ppm_number(d, n, &pos);
    long maxval = h < 0 ? -1 : ppm_number(d, n, &pos);
    if (maxval < 0) {
        error_set("%s: PPM header malformed near byte %zu: expected width, height and maxval as decimal "
                  "numbers", where, pos);
        return -1;
    }
    if (w < 1 || h < 1 || w > IMAGE_MAX_SIDE || h > IMAGE_MAX_SIDE) {
        error_set("%s: PPM is %ld x %ld; each side must be 1..%d (IMAGE_MAX_SIDE)", where, w, h, IMAGE_MAX_SIDE);
        return -1;
    }
    if (maxval < 1 || maxval > 65535) { error_set("%s: PPM maxval %ld, expected 1..65535", where, maxval); return -1; }
    size_t count = (size_t)w * (size_t)h * 3, bps = maxval > 255 ? 2 : 1, need;
    if (!ascii) {
        if (pos == n || !is_space(d[pos])) {
            error_set("%s: PPM expected one whitespace byte after maxval at byte %zu", where, pos);
            return -1;
        }
        pos++;
        if (size_mul(count, bps, &need) || n - pos < need) {
            error_set("%s: PPM truncated: %ld x %ld pixels need %zu bytes after the header, %zu present",
                      where, w, h, need, n - pos);
            return -1;
        }
    } else if ((n - pos) / 2 < count) {  // every ASCII sample takes a separator and a digit
        error_set("%s: PPM (P3) truncated: %zu bytes cannot hold %zu samples", where, n - pos, count);
        return -1;
    }
    *img = image_alloc((int)w, (int)h);
    for (size_t i = 0; i < count; i++) {
        long v = ascii ? ppm_number(d, n, &pos)
               : bps == 1 ? d[pos + i] : (long)d[pos + 2 * i] << 8 | d[pos + 2 * i + 1];   // big-endian
        if (v < 0 || v > maxval) {
            error_set("%s: PPM sample %zu of %zu is %s (maxval %ld)", where, i, count,
                      v < 0 ? "missing or not a number" : "above maxval", maxval);
            image_free(img);
            return -1;
        }
        img->rgb[i] = (unsigned char)(maxval == 255 ? v : lrint((double)v / maxval * 255.0));
    }
    return 0;
}

// ----------------------------------------------------------------------------------------------
// format detection and the public readers

static int image_decode(Image* img, const unsigned char* d, size_t n, const char* where) {
    memset(img, 0, sizeof *img);
    if (n >= 8 && !memcmp(d, "\x89PNG\r\n\x1a\n", 8)) return png_read(img, d, n, where);
    if (n >= 2 && d[0] == 'B' && d[1] == 'M') return bmp_read(img, d, n, where);
    if (n >= 2 && d[0] == 'P' && (d[1] == '6' || d[1] == '3')) return ppm_read(img, d, n, where);
    const char* hint = " (expected PNG, BMP or PPM P6/P3)";
    if (n >= 3 && d[0] == 0xff && d[1] == 0xd8 && d[2] == 0xff)
        hint = ": JPEG is not supported; convert it to PNG first, e.g. `convert in.jpg out.png` "
               "or `ffmpeg -i in.jpg out.png`";
    else if (n >= 6 && (!memcmp(d, "GIF87a", 6) || !memcmp(d, "GIF89a", 6)))
        hint = ": GIF is not supported; convert it to PNG first, e.g. `convert 'in.gif[0]' out.png`";
    else if (n >= 12 && !memcmp(d, "RIFF", 4) && !memcmp(d + 8, "WEBP", 4))
        hint = ": WebP is not supported; convert it to PNG first, e.g. `dwebp in.webp -o out.png`";
    else if (n >= 4 && (!memcmp(d, "II*\0", 4) || !memcmp(d, "MM\0*", 4)))
        hint = ": TIFF is not supported; convert it to PNG first, e.g. `convert in.tif out.png`";
    else if (n >= 2 && d[0] == 'P' && d[1] >= '1' && d[1] <= '5')
        hint = ": PBM/PGM is not supported (only PPM P6/P3); e.g. `convert in.pgm out.ppm`";
    if (n == 0) error_set("%s: empty file, expected PNG, BMP or PPM", where);
    else error_set("%s: unrecognised image format (first bytes %02x %02x %02x %02x)%s", where,
                   d[0], n > 1 ? d[1] : 0, n > 2 ? d[2] : 0, n > 3 ? d[3] : 0, hint);
    return -1;
}

int image_read_mem(Image* img, const unsigned char* data, size_t len) {
    return image_decode(img, data, len, "(memory)");
}

int image_read(Image* img, const char* path) {
    memset(img, 0, sizeof *img);
    size_t n;
    char* data = file_read_all(path, &n, IMAGE_MAX_FILE);
    if (!data) return -1;
    int rc = image_decode(img, (const unsigned char*)data, n, path);
    free(data);
    return rc;
}

Image image_alloc(int w, int h) {
    CHECK(w >= 1 && h >= 1 && w <= IMAGE_MAX_SIDE && h <= IMAGE_MAX_SIDE,
          "image size %d x %d, each side must be 1..%d", w, h, IMAGE_MAX_SIDE);
    Image img = {w, h, xcalloc((size_t)w * h, 3)};
    return img;
}

void image_free(Image* img) {
    free(img->rgb);
    img->rgb = NULL;
    img->w = img->h = 0;
}

// ----------------------------------------------------------------------------------------------
// writers

static unsigned char* ppm_encode(const Image* img, size_t* len) {
    char head[48];
    int hl = snprintf(head, sizeof head, "P6\n%d %d\n255\n", img->w, img->h);
    size_t px = (size_t)img->w * img->h * 3;
    unsigned char* buf = xmalloc(hl + px);
    memcpy(buf, head, hl);
    memcpy(buf + hl, img->rgb, px);
    *len = hl + px;
    return buf;
}

static unsigned char* bmp_encode(const Image* img, size_t* len) {
    size_t stride = ((size_t)img->w * 3 + 3) & ~(size_t)3, data = stride * img->h;
    unsigned char* buf = xcalloc(54 + data, 1);
    buf[0] = 'B'; buf[1] = 'M';
    wr32le(buf + 2, (uint32_t)(54 + data));
    wr32le(buf + 10, 54);            // pixel data offset
    wr32le(buf + 14, 40);            // BITMAPINFOHEADER
    wr32le(buf + 18, (uint32_t)img->w);
    wr32le(buf + 22, (uint32_t)img->h);   // positive: bottom-up
    wr16le(buf + 26, 1);             // planes
    wr16le(buf + 28, 24);
    wr32le(buf + 34, (uint32_t)data);
    wr32le(buf + 38, 2835);          // 72 dpi in pixels per metre
    wr32le(buf + 42, 2835);
    for (int y = 0; y < img->h; y++) {
        const unsigned char* src = img->rgb + (size_t)(img->h - 1 - y) * img->w * 3;
        unsigned char* dst = buf + 54 + stride * y;
        for (int x = 0; x < img->w; x++, src += 3, dst += 3) { dst[0] = src[2]; dst[1] = src[1]; dst[2] = src[0]; }
    }
    *len = 54 + data;
    return buf;
}

// Fills in the length, type and CRC of a chunk whose len data bytes are already at p + 8.
static unsigned char* png_chunk_close(unsigned char* p, const char* type, size_t len) {
    wr32be(p, (uint32_t)len);
    memcpy(p + 4, type, 4);
    wr32be(p + 8 + len, crc32(p + 4, len + 4));
    return p + 12 + len;
}

// PNG: signature, IHDR, tEXt per key/value pair, one IDAT (zlib of stored deflate blocks with
// filter 0 on every row), IEND.
static unsigned char* png_encode(const Image* img, const char* const* text, size_t* len, const char* path) {
    size_t rowlen = (size_t)img->w * 3 + 1, raw = rowlen * img->h;
    size_t nblocks = (raw + 65534) / 65535, zlen = 2 + raw + 5 * nblocks + 4;
    size_t total = 8 + 25 + 12 + zlen + 12;
    for (int i = 0; text && text[i]; i += 2) {
        size_t klen = strlen(text[i]);
        if (!text[i + 1] || klen < 1 || klen > 79) {
            error_set("%s: PNG tEXt key '%s' must be 1..79 bytes and have a value", path, text[i]);
            return NULL;
        }
        size_t vlen = strlen(text[i + 1]);
        if (vlen > 0x7fff0000u) { error_set("%s: PNG tEXt value for '%s' is too long", path, text[i]); return NULL; }
        if (size_add(total, 12 + klen + 1 + vlen, &total)) { error_set("%s: PNG text too long", path); return NULL; }
    }
    unsigned char* buf = xmalloc(total);
    unsigned char* p = buf;
    memcpy(p, "\x89PNG\r\n\x1a\n", 8);
    p += 8;
    wr32be(p + 8, (uint32_t)img->w);
    wr32be(p + 12, (uint32_t)img->h);
    memcpy(p + 16, "\x08\x02\x00\x00\x00", 5);   // 8-bit RGB, deflate, filter 0, no interlace
    p = png_chunk_close(p, "IHDR", 13);
    for (int i = 0; text && text[i]; i += 2) {
        size_t klen = strlen(text[i]), vlen = strlen(text[i + 1]);
        memcpy(p + 8, text[i], klen + 1);          // keyword, NUL separator
        memcpy(p + 9 + klen, text[i + 1], vlen);
        p = png_chunk_close(p, "tEXt", klen + 1 + vlen);
    }
    unsigned char* z = p + 8;
    z[0] = 0x78; z[1] = 0x01;                    // deflate, 32K window, no dictionary
    z += 2;
    uint32_t a = 1, b = 0;                       // Adler-32, updated as the rows go out
    size_t left = raw, y = 0, x = 0;            // raw byte (y, x): x = 0 is the filter byte
    for (size_t k = 0; k < nblocks; k++) {
        size_t n = left < 65535 ? left : 65535;
        left -= n;
        z[0] = left == 0;                        // BFINAL, BTYPE = 00 (stored)
        wr16le(z + 1, (uint32_t)n);
        wr16le(z + 3, (uint32_t)~n & 0xffff);
        z += 5;
        for (size_t i = 0; i < n; i++) {
            unsigned char v = x == 0 ? 0 : img->rgb[y * (rowlen - 1) + x - 1];
            *z++ = v;
            a = (a + v) % 65521;
            b = (b + a) % 65521;
            if (++x == rowlen) { x = 0; y++; }
        }
    }
    wr32be(z, b << 16 | a);
    p = png_chunk_close(p, "IDAT", zlen);
    p = png_chunk_close(p, "IEND", 0);
    *len = (size_t)(p - buf);
    return buf;
}

int image_write(const Image* img, const char* path, const char* const* text) {
    if (!img->rgb || img->w < 1 || img->h < 1 || img->w > IMAGE_MAX_SIDE || img->h > IMAGE_MAX_SIDE) {
        error_set("%s: cannot write an image of %d x %d (each side must be 1..%d)",
                  path, img->w, img->h, IMAGE_MAX_SIDE);
        return -1;
    }
    const char* dot = strrchr(path, '.');
    const char* slash = strrchr(path, '/');
    char ext[8] = "";
    if (dot && (!slash || dot > slash) && strlen(dot) < sizeof ext)
        for (int i = 0; dot[i]; i++) ext[i] = (char)(dot[i] >= 'A' && dot[i] <= 'Z' ? dot[i] + 32 : dot[i]);
    size_t len = 0;
    unsigned char* buf;
    if (!strcmp(ext, ".ppm")) buf = ppm_encode(img, &len);
    else if (!strcmp(ext, ".bmp")) buf = bmp_encode(img, &len);
    else if (!strcmp(ext, ".png")) buf = png_encode(img, text, &len, path);
    else {
        error_set("%s: unknown image extension, expected .png, .bmp or .ppm", path);
        return -1;
    }
    if (!buf) return -1;
    int rc = file_write_atomic(path, buf, len);
    free(buf);
    return rc;
}

// ----------------------------------------------------------------------------------------------
// centre crop and Pillow's bicubic resize

#define RESAMPLE_BITS 22                 // Pillow's PRECISION_BITS = 32 - 8 - 2

static double bicubic(double x) {        // Keys cubic with a = -0.5, support 2
    const double a = -0.5;
    if (x < 0) x = -x;
    if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
    if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
    return 0;
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for in_size -> out_size. For output i:
// inputs bounds[2i] .. bounds[2i] + bounds[2i+1] - 1 with fixed-point weights kk[i * ksize + j].
static int resample_coeffs(int in_size, int out_size, int** bounds, int** kk) {
    double scale = (double)in_size / out_size, filterscale = scale < 1 ? 1 : scale;
    double support = 2.0 * filterscale, ss = 1.0 / filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double* k = xmalloc(sizeof(double) * ksize);
    *bounds = xmalloc(sizeof(int) * 2 * out_size);
    *kk = xcalloc((size_t)out_size * ksize, sizeof(int));
    for (int i = 0; i < out_size; i++) {
        double center = (i + 0.5) * scale, ww = 0;
        int xmin = (int)(center - support + 0.5), xmax = (int)(center + support + 0.5);
        if (xmin < 0) xmin = 0;
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) { k[x] = bicubic((x + xmin - center + 0.5) * ss); ww += k[x]; }
        for (int x = 0; x < xmax; x++) {
            double v = (ww != 0 ? k[x] / ww : k[x]) * (1 << RESAMPLE_BITS);
            (*kk)[(size_t)i * ksize + x] = (int)(v < 0 ? v - 0.5 : v + 0.5);
        }
        (*bounds)[2 * i] = xmin;
        (*bounds)[2 * i + 1] = xmax;
    }
    free(k);
    return ksize;
}

static unsigned char clip8(int v) {
    v >>= RESAMPLE_BITS;
    return (unsigned char)(v < 0 ? 0 : v > 255 ? 255 : v);
}

// One pass: n_out outputs along an axis, for each of n_lines lines. Element (line, i) of the
// input is at in[line * in_line + i * in_step], likewise the output; 3 interleaved channels.
static void resample_pass(unsigned char* out, const unsigned char* in, int in_size, int n_out, int n_lines,
                          size_t in_line, size_t in_step, size_t out_line, size_t out_step) {
    int *bounds, *kk;
    int ksize = resample_coeffs(in_size, n_out, &bounds, &kk);
    for (int line = 0; line < n_lines; line++) {
        for (int i = 0; i < n_out; i++) {
            const int* k = kk + (size_t)i * ksize;
            const unsigned char* src = in + line * in_line + bounds[2 * i] * in_step;
            for (int c = 0; c < 3; c++) {
                int ss = 1 << (RESAMPLE_BITS - 1);
                for (int j = 0; j < bounds[2 * i + 1]; j++) ss += src[j * in_step + c] * k[j];
                out[line * out_line + i * out_step + c] = clip8(ss);
            }
        }
    }
    free(bounds);
    free(kk);
}

// The crop keeps the largest centred window with the target's aspect ratio (its size rounded to
// the nearest pixel, offset floored), exactly what PIL's img.crop(box).resize((w, h), BICUBIC)
// gets for that box.
Image image_center_crop_resize(const Image* src, int w, int h) {
    CHECK(src->rgb && src->w >= 1 && src->h >= 1, "image_center_crop_resize: empty source image");
    CHECK(w >= 1 && h >= 1 && w <= IMAGE_MAX_SIDE && h <= IMAGE_MAX_SIDE,
          "image_center_crop_resize: target %d x %d, each side must be 1..%d", w, h, IMAGE_MAX_SIDE);
    int cw = src->w, ch = src->h;
    if ((int64_t)src->w * h > (int64_t)src->h * w) cw = (int)(((int64_t)src->h * w * 2 + h) / (2 * h));
    else ch = (int)(((int64_t)src->w * h * 2 + w) / (2 * w));
    if (cw < 1) cw = 1;
    if (ch < 1) ch = 1;
    int x0 = (src->w - cw) / 2, y0 = (src->h - ch) / 2;
    const unsigned char* base = src->rgb + ((size_t)y0 * src->w + x0) * 3;
    unsigned char* tmp = xmalloc((size_t)ch * w * 3);     // horizontal pass: ch x w
    resample_pass(tmp, base, cw, w, ch, (size_t)src->w * 3, 3, (size_t)w * 3, 3);
    Image out = image_alloc(w, h);                         // vertical pass: h x w
    resample_pass(out.rgb, tmp, ch, h, w, 3, (size_t)w * 3, 3, (size_t)w * 3);
    free(tmp);
    return out;
}

// ----------------------------------------------------------------------------------------------
// [-1, 1] NCHW conversion

// out [3, h, w] = 2·(pixel / 255) − 1, in float32 as diffusers' VaeImageProcessor computes it.
void image_to_nchw(const Image* img, float* out) {
    size_t hw = (size_t)img->w * img->h;
    for (size_t i = 0; i < hw; i++)
        for (int c = 0; c < 3; c++) out[c * hw + i] = 2.0f * (img->rgb[i * 3 + c] / 255.0f) - 1.0f;
}

// x [3, h, w] -> pixels: round(clamp(x / 2 + 0.5, 0, 1) * 255), as diffusers' postprocess and
// numpy_to_pil compute it in float32 (rintf rounds half to even like numpy's round). NaN -> 0.
Image image_from_nchw(const float* x, int h, int w) {
    Image img = image_alloc(w, h);
    size_t hw = (size_t)w * h;
    for (size_t i = 0; i < hw; i++) {
        for (int c = 0; c < 3; c++) {
            float v = x[c * hw + i] / 2 + 0.5f;
            v = v > 0 ? (v < 1 ? v : 1) : 0;
            img.rgb[i * 3 + c] = (unsigned char)rintf(v * 255.0f);
        }
    }
    return img;
}

// ----------------------------------------------------------------------------------------------
// text and the contact sheet

// 5x7 font for ASCII 32..126: five column bytes per glyph, bit 0 = top row.
static const unsigned char FONT5X7[95][5] = {
    {0x00,0x00,0x00,0x00,0x00}, {0x00,0x00,0x5f,0x00,0x00}, {0x00,0x07,0x00,0x07,0x00}, {0x14,0x7f,0x14,0x7f,0x14},
    {0x24,0x2a,0x7f,0x2a,0x12}, {0x23,0x13,0x08,0x64,0x62}, {0x36,0x49,0x55,0x22,0x50}, {0x00,0x05,0x03,0x00,0x00},
    {0x00,0x1c,0x22,0x41,0x00}, {0x00,0x41,0x22,0x1c,0x00}, {0x08,0x2a,0x1c,0x2a,0x08}, {0x08,0x08,0x3e,0x08,0x08},
    {0x00,0x50,0x30,0x00,0x00}, {0x08,0x08,0x08,0x08,0x08}, {0x00,0x60,0x60,0x00,0x00}, {0x20,0x10,0x08,0x04,0x02},
    {0x3e,0x51,0x49,0x45,0x3e}, {0x00,0x42,0x7f,0x40,0x00}, {0x42,0x61,0x51,0x49,0x46}, {0x21,0x41,0x45,0x4b,0x31},
    {0x18,0x14,0x12,0x7f,0x10}, {0x27,0x45,0x45,0x45,0x39}, {0x3c,0x4a,0x49,0x49,0x30}, {0x01,0x71,0x09,0x05,0x03},
    {0x36,0x49,0x49,0x49,0x36}, {0x06,0x49,0x49,0x29,0x1e}, {0x00,0x36,0x36,0x00,0x00}, {0x00,0x56,0x36,0x00,0x00},
    {0x08,0x14,0x22,0x41,0x00}, {0x14,0x14,0x14,0x14,0x14}, {0x00,0x41,0x22,0x14,0x08}, {0x02,0x01,0x51,0x09,0x06},
    {0x32,0x49,0x79,0x41,0x3e}, {0x7e,0x11,0x11,0x11,0x7e}, {0x7f,0x49,0x49,0x49,0x36}, {0x3e,0x41,0x41,0x41,0x22},
    {0x7f,0x41,0x41,0x22,0x1c}, {0x7f,0x49,0x49,0x49,0x41}, {0x7f,0x09,0x09,0x09,0x01}, {0x3e,0x41,0x49,0x49,0x7a},
    {0x7f,0x08,0x08,0x08,0x7f}, {0x00,0x41,0x7f,0x41,0x00}, {0x20,0x40,0x41,0x3f,0x01}, {0x7f,0x08,0x14,0x22,0x41},
    {0x7f,0x40,0x40,0x40,0x40}, {0x7f,0x02,0x0c,0x02,0x7f}, {0x7f,0x04,0x08,0x10,0x7f}, {0x3e,0x41,0x41,0x41,0x3e},
    {0x7f,0x09,0x09,0x09,0x06}, {0x3e,0x41,0x51,0x21,0x5e}, {0x7f,0x09,0x19,0x29,0x46}, {0x46,0x49,0x49,0x49,0x31},
    {0x01,0x01,0x7f,0x01,0x01}, {0x3f,0x40,0x40,0x40,0x3f}, {0x1f,0x20,0x40,0x20,0x1f}, {0x3f,0x40,0x38,0x40,0x3f},
    {0x63,0x14,0x08,0x14,0x63}, {0x07,0x08,0x70,0x08,0x07}, {0x61,0x51,0x49,0x45,0x43}, {0x00,0x7f,0x41,0x41,0x00},
    {0x02,0x04,0x08,0x10,0x20}, {0x00,0x41,0x41,0x7f,0x00}, {0x04,0x02,0x01,0x02,0x04}, {0x40,0x40,0x40,0x40,0x40},
    {0x00,0x01,0x02,0x04,0x00}, {0x20,0x54,0x54,0x54,0x78}, {0x7f,0x48,0x44,0x44,0x38}, {0x38,0x44,0x44,0x44,0x20},
    {0x38,0x44,0x44,0x48,0x7f}, {0x38,0x54,0x54,0x54,0x18}, {0x08,0x7e,0x09,0x01,0x02}, {0x08,0x14,0x54,0x54,0x3c},
    {0x7f,0x08,0x04,0x04,0x78}, {0x00,0x44,0x7d,0x40,0x00}, {0x20,0x40,0x44,0x3d,0x00}, {0x7f,0x10,0x28,0x44,0x00},
    {0x00,0x41,0x7f,0x40,0x00}, {0x7c,0x04,0x18,0x04,0x78}, {0x7c,0x08,0x04,0x04,0x78}, {0x38,0x44,0x44,0x44,0x38},
    {0x7c,0x14,0x14,0x14,0x08}, {0x08,0x14,0x14,0x18,0x7c}, {0x7c,0x08,0x04,0x04,0x08}, {0x48,0x54,0x54,0x54,0x20},
    {0x04,0x3f,0x44,0x40,0x20}, {0x3c,0x40,0x40,0x20,0x7c}, {0x1c,0x20,0x40,0x20,0x1c}, {0x3c,0x40,0x30,0x40,0x3c},
    {0x44,0x28,0x10,0x28,0x44}, {0x0c,0x50,0x50,0x50,0x3c}, {0x44,0x64,0x54,0x4c,0x44}, {0x00,0x08,0x36,0x41,0x00},
    {0x00,0x00,0x7f,0x00,0x00}, {0x00,0x41,0x36,0x08,0x00}, {0x08,0x04,0x08,0x10,0x08},
};
#define GLYPH_W 6                        // 5 columns + 1 spacing
#define GLYPH_H 8                        // 7 rows + 1 spacing

// Fills (or, with shade, darkens to a quarter) the rectangle clipped to the image.
static void fill_rect(Image* img, long x0, long y0, long w, long h, const unsigned char* rgb, int shade) {
    long x1 = x0 + w > img->w ? img->w : x0 + w, y1 = y0 + h > img->h ? img->h : y0 + h;
    for (long y = y0 < 0 ? 0 : y0; y < y1; y++) {
        for (long x = x0 < 0 ? 0 : x0; x < x1; x++) {
            unsigned char* p = img->rgb + ((size_t)y * img->w + x) * 3;
            for (int c = 0; c < 3; c++) p[c] = shade ? p[c] / 4 : rgb[c];
        }
    }
}

// Printable ASCII as is; '\n' starts a new line; any other byte, and each UTF-8 code point
// beyond ASCII, is drawn as '?'. Clipped to the image; scale is clamped to 1..64.
void image_draw_text(Image* img, int x, int y, const char* text, int scale,
                     unsigned char r, unsigned char g, unsigned char b) {
    if (!img->rgb || !text) return;
    const unsigned char rgb[3] = {r, g, b};
    long s = scale < 1 ? 1 : scale > 64 ? 64 : scale, cx = x, cy = y;
    for (const unsigned char* p = (const unsigned char*)text; *p; p++) {
        if (*p == '\n') { cx = x; cy += GLYPH_H * s; continue; }
        if ((*p & 0xc0) == 0x80) continue;        // UTF-8 continuation byte
        int c = *p >= 32 && *p < 127 ? *p : '?';
        if (cx < img->w && cy < img->h && cx > -GLYPH_W * s && cy > -GLYPH_H * s) {
            for (int col = 0; col < 5; col++)
                for (int row = 0; row < 7; row++)
                    if (FONT5X7[c - 32][col] >> row & 1) fill_rect(img, cx + col * s, cy + row * s, s, s, rgb, 0);
        }
        cx += GLYPH_W * s;
    }
}

// Tiles of w x h in rows of `cols`, GAP pixels apart on a dark background; each label is drawn
// in white on a darkened box in the tile's top-left corner, cut to the tile's width.
Image image_contact_sheet(const Image* imgs, const char* const* labels, int n, int cols) {
    enum { GAP = 4 };
    CHECK(n >= 1 && imgs[0].rgb, "image_contact_sheet: need at least one image");
    int w = imgs[0].w, h = imgs[0].h;
    for (int i = 1; i < n; i++)
        CHECK(imgs[i].rgb && imgs[i].w == w && imgs[i].h == h,
              "image_contact_sheet: image %d is %d x %d, expected %d x %d like image 0", i, imgs[i].w, imgs[i].h, w, h);
    if (cols < 1) cols = 1;
    if (cols > n) cols = n;
    int rows = (n + cols - 1) / cols;
    int64_t sw = (int64_t)cols * (w + GAP) + GAP, sh = (int64_t)rows * (h + GAP) + GAP;
    CHECK(sw <= IMAGE_MAX_SIDE && sh <= IMAGE_MAX_SIDE,
          "contact sheet of %d x %d tiles would be %lld x %lld, over IMAGE_MAX_SIDE %d",
          cols, rows, (long long)sw, (long long)sh, IMAGE_MAX_SIDE);
    Image sheet = image_alloc((int)sw, (int)sh);
    memset(sheet.rgb, 24, (size_t)sheet.w * sheet.h * 3);
    int scale = w >= 384 ? 2 : 1, pad = 2 * scale;
    for (int i = 0; i < n; i++) {
        int ox = GAP + (i % cols) * (w + GAP), oy = GAP + (i / cols) * (h + GAP);
        for (int y = 0; y < h; y++)
            memcpy(sheet.rgb + ((size_t)(oy + y) * sheet.w + ox) * 3, imgs[i].rgb + (size_t)y * w * 3, (size_t)w * 3);
        if (!labels || !labels[i] || !labels[i][0]) continue;
        char line[256];                           // the label's first characters that fit
        int fit = (w - 2 * pad + scale) / (GLYPH_W * scale), chars = 0;
        size_t k = 0;
        for (const char* p = labels[i]; *p && k + 1 < sizeof line; p++) {
            int starts_char = (*p & 0xc0) != 0x80;
            if (starts_char && chars == fit) break;
            chars += starts_char;
            line[k++] = *p == '\n' ? ' ' : *p;
        }
        line[k] = 0;
        if (chars == 0) continue;
        fill_rect(&sheet, ox, oy, (long)chars * GLYPH_W * scale - scale + 2 * pad, 7 * scale + 2 * pad, NULL, 1);
        image_draw_text(&sheet, ox + pad, oy + pad, line, scale, 255, 255, 255);
    }
    return sheet;
}

// ----------------------------------------------------------------------------------------------
// the candidates manifest beside the contact sheet

int manifest_lookup(const char* text, size_t len, long number, char* object, size_t ocap, char* file, size_t fcap) {
    size_t pos = 0;
    while (pos < len) {
        size_t end = pos;
        while (end < len && text[end] != '\n') end++;
        const char* f[4];
        size_t fl[4];
        int nf = 0;
        for (size_t a = pos; nf < 4 && a <= end; ) {   // up to 4 tab-separated fields
            size_t b = a;
            while (b < end && text[b] != '\t') b++;
            f[nf] = text + a;
            fl[nf++] = b - a;
            a = b + 1;
        }
        long num = -1;
        if (nf == 4 && fl[0] > 0 && fl[0] < 12) {
            num = 0;
            for (size_t i = 0; i < fl[0] && num >= 0; i++)
                num = f[0][i] >= '0' && f[0][i] <= '9' ? num * 10 + (f[0][i] - '0') : -1;
        }
        if (num == number) {
            if (fl[1] == 0 || fl[1] >= ocap || fl[3] == 0 || fl[3] >= fcap) {
                error_set("manifest line of candidate %ld: object or file name empty or too long", number);
                return -1;
            }
            memcpy(object, f[1], fl[1]); object[fl[1]] = 0;
            memcpy(file, f[3], fl[3]); file[fl[3]] = 0;
            if (strchr(file, '/') || strchr(file, '\\') || strcmp(file, ".") == 0 || strcmp(file, "..") == 0 ||
                memchr(f[1], 0, fl[1]) || memchr(f[3], 0, fl[3])) {
                error_set("manifest line of candidate %ld names the file '%s'; expected a plain file name in the same folder",
                          number, file);
                return -1;
            }
            return 0;
        }
        pos = end + 1;
    }
    error_set("no candidate number %ld in the manifest (see the contact sheet for the numbers)", number);
    return -1;
}
