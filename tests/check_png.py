#!/usr/bin/env python3
"""check_png.py PATH: an independent check of a PNG file, Python 3 standard library only.

Verifies the signature, every chunk's length and CRC-32, that IHDR comes first and IEND last,
decompresses the concatenated IDAT data with zlib (which also checks the Adler-32), checks that
it holds exactly height * (1 + row bytes) bytes, and undoes the row filters (0..4, Paeth
included). Prints a one-line summary and exits 0 when the file is valid, 1 otherwise.
Used by tests/test_image.c on the PNGs that image.c writes.

check_png.py --make-fixtures prints the C arrays of the PNGs embedded in tests/test_image.c:
small images from pixel formulas, filtered and compressed here with zlib so that image.c's
inflate meets real stored, fixed and dynamic Huffman streams.
"""
import struct
import sys
import zlib

CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def fail(msg):
    print("check_png: " + msg)
    sys.exit(1)


def unfilter(raw, h, rowlen, bpp):
    prev = bytearray(rowlen)
    for y in range(h):
        f = raw[y * (rowlen + 1)]
        row = bytearray(raw[y * (rowlen + 1) + 1:(y + 1) * (rowlen + 1)])
        if f > 4:
            fail("row %d has filter type %d" % (y, f))
        for i in range(rowlen):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                row[i] = (row[i] + a) & 255
            elif f == 2:
                row[i] = (row[i] + b) & 255
            elif f == 3:
                row[i] = (row[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = row


def main():
    if len(sys.argv) != 2:
        fail("usage: check_png.py PATH")
    data = open(sys.argv[1], "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        fail("bad signature")
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        if len(data) - pos < 12:
            fail("truncated chunk header at byte %d" % pos)
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if pos + 12 + length > len(data):
            fail("chunk %r at byte %d runs past the end of the file" % (ctype, pos))
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
            fail("CRC mismatch in chunk %r at byte %d" % (ctype, pos))
        chunks.append((ctype, body))
        if ctype == b"IDAT":
            idat += body
        pos += 12 + length
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        fail("first chunk is not a 13-byte IHDR")
    if chunks[-1][0] != b"IEND":
        fail("last chunk is not IEND")
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if w == 0 or h == 0 or ctype not in CHANNELS or comp or filt or interlace:
        fail("unexpected IHDR %r" % ((w, h, depth, ctype, comp, filt, interlace),))
    raw = zlib.decompress(idat)
    rowlen = (w * CHANNELS[ctype] * depth + 7) // 8
    if len(raw) != h * (1 + rowlen):
        fail("IDAT holds %d bytes, expected %d" % (len(raw), h * (1 + rowlen)))
    unfilter(raw, h, rowlen, max(1, CHANNELS[ctype] * depth // 8))
    texts = [c[1].split(b"\0", 1)[0].decode("latin-1") for c in chunks if c[0] == b"tEXt"]
    print("check_png: OK %dx%d depth %d colour type %d, %d chunks, tEXt keys %s"
          % (w, h, depth, ctype, len(chunks), texts))


# ---------------------------------------------------------------------------------------------
# --make-fixtures: the PNGs embedded in tests/test_image.c (the C side repeats the formulas)

def fx_rgb(x, y):
    return [(x * 37 + y * 11) & 255, (x * y * 5 + 3) & 255, ((x ^ y) * 29) & 255]


def fx_alpha(x, y):
    return (x * 50 + y * 30) & 255


def fx_gray(x, y):
    return (x * 23 + y * 41) & 255


def lz_pixels(n):
    """256 LCG bytes, then copies of l bytes from d back (the C lz_pixels does the same)."""
    seed, buf = 1, bytearray()

    def rnd():
        nonlocal seed
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        return seed >> 16

    while len(buf) < 256:
        buf.append(rnd() & 255)
    while len(buf) < n:
        d = 1 + rnd() % len(buf)
        length = 3 + rnd() % 256
        if length > 250:
            length = 600
        for _ in range(length):
            buf.append(buf[len(buf) - d])
    return bytes(buf[:n])


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def filter_rows(rows, bpp, filter_of_row):
    out, prev = b"", bytes(len(rows[0]))
    for y, row in enumerate(rows):
        f, enc = filter_of_row(y), bytearray()
        for i, v in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            pred = [0, a, b, (a + b) // 2, paeth(a, b, c)][f]
            enc.append((v - pred) & 255)
        out += bytes([f]) + enc
        prev = row
    return out


def chunk(ctype, body):
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def make_png(w, h, depth, ctype, rows, bpp, filter_of_row, compress, extra=b"", plte=None, split=False):
    z = compress(filter_rows(rows, bpp, filter_of_row))
    s = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0)) + extra
    if plte:
        s += chunk(b"PLTE", plte)
    idats = [z[:len(z) // 2], z[len(z) // 2:]] if split else [z]
    return s + b"".join(chunk(b"IDAT", part) for part in idats) + chunk(b"IEND", b"")


def fixed_huffman(raw):
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_FIXED)
    return c.compress(raw) + c.flush()


def pack_bits(values, depth):
    out, acc, n = bytearray(), 0, 0
    for v in values:
        acc, n = acc << depth | v, n + depth
        if n == 8:
            out.append(acc)
            acc, n = 0, 0
    if n:
        out.append(acc << (8 - n))
    return bytes(out)


def make_fixtures():
    level = lambda k: (lambda raw: zlib.compress(raw, k))
    fx = []
    rows = [bytes(sum((fx_rgb(x, y) for x in range(16)), [])) for y in range(12)]
    extra = chunk(b"gAMA", struct.pack(">I", 45455)) + chunk(b"tEXt", b"Comment\0fixture")
    fx.append(("PNG_RGB_DYNAMIC", make_png(16, 12, 8, 2, rows, 3, lambda y: y % 5, level(9), extra, split=True)))
    rows = [bytes(sum((fx_rgb(x, y) + [fx_alpha(x, y)] for x in range(7)), [])) for y in range(5)]
    fx.append(("PNG_RGBA_FIXED", make_png(7, 5, 8, 6, rows, 4, lambda y: (y + 1) % 5, fixed_huffman)))
    rows = [bytes(sum(([fx_gray(x, y), fx_alpha(x, y)] for x in range(6)), [])) for y in range(5)]
    fx.append(("PNG_GRAY_ALPHA_STORED", make_png(6, 5, 8, 4, rows, 2, lambda y: y % 5, level(0))))
    pal = b"".join(bytes([i * 20, 255 - i * 20, i * 7]) for i in range(11))
    rows = [pack_bits([(x + 2 * y) % 11 for x in range(9)], 4) for y in range(3)]
    fx.append(("PNG_PALETTE4", make_png(9, 3, 4, 3, rows, 1, lambda y: 4 - y, level(6), plte=pal)))
    rows = [pack_bits([(x + y) % 4 for x in range(5)], 2) for y in range(3)]
    fx.append(("PNG_GRAY2", make_png(5, 3, 2, 0, rows, 1, lambda y: 1, level(6))))
    rows = [bytes([40 * x - 20 * y + 90 for x in range(5)]) for y in range(5)]
    fx.append(("PNG_GRAY_PAETH", make_png(5, 5, 8, 0, rows, 1, lambda y: 4, level(6))))
    px = lz_pixels(400 * 80)
    rows = [px[y * 400:(y + 1) * 400] for y in range(80)]
    fx.append(("PNG_GRAY_LZ", make_png(400, 80, 8, 0, rows, 1, lambda y: 0, level(9))))
    for name, data in fx:
        print("static const unsigned char %s[] = {" % name)
        for i in range(0, len(data), 20):
            print("    " + ",".join("0x%02x" % b for b in data[i:i + 20]) + ",")
        print("};")


if __name__ == "__main__":
    if sys.argv[1:] == ["--make-fixtures"]:
        make_fixtures()
    else:
        main()
