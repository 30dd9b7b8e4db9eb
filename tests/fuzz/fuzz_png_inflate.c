// Fuzz target: inflate and the PNG filters, reached directly. The input is a zlib stream that
// this harness wraps into a valid PNG (IHDR from the first 3 bytes, correct CRCs), so mutations
// exercise the decompressor rather than die at a CRC check.
#include "../../instastyle.h"
#include <stdlib.h>
#include <string.h>
static uint32_t crc32_png(const unsigned char* p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) { c ^= p[i]; for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1))); }
    return ~c;
}
static void put32(unsigned char* p, uint32_t v) { p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16); p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v; }
int LLVMFuzzerTestOneInput(const unsigned char* d, size_t n) {
    if (n < 3) return 0;
    static const unsigned types[5] = {0, 2, 3, 4, 6}, depths[4] = {1, 2, 4, 8};
    unsigned w = 1 + d[0] % 40, h = 1 + d[1] % 40, ct = types[d[2] % 5];
    unsigned depth = (ct == 0 || ct == 3) ? depths[(d[2] / 5) % 4] : 8;
    size_t zl = n - 3, len = 8 + 25 + (ct == 3 ? 60 : 0) + 12 + zl + 12;
    unsigned char* b = malloc(len);
    unsigned char* p = b;
    memcpy(p, "\x89PNG\r\n\x1a\n", 8); p += 8;
    put32(p, 13); memcpy(p + 4, "IHDR", 4); put32(p + 8, w); put32(p + 12, h);
    p[16] = (unsigned char)depth; p[17] = (unsigned char)ct; p[18] = p[19] = p[20] = 0;
    put32(p + 21, crc32_png(p + 4, 17)); p += 25;
    if (ct == 3) {
        put32(p, 48); memcpy(p + 4, "PLTE", 4);
        for (int i = 0; i < 48; i++) p[8 + i] = (unsigned char)(i * 5);
        put32(p + 56, crc32_png(p + 4, 52)); p += 60;
    }
    put32(p, (uint32_t)zl); memcpy(p + 4, "IDAT", 4); memcpy(p + 8, d + 3, zl);
    put32(p + 8 + zl, crc32_png(p + 4, zl + 4)); p += 12 + zl;
    memcpy(p, "\0\0\0\0IEND\xae\x42\x60\x82", 12);
    Image img;
    if (image_read_mem(&img, b, len) == 0) image_free(&img);
    else if (img.rgb) abort();
    free(b);
    return 0;
}
