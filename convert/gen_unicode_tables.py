#!/usr/bin/env python3
"""gen_unicode_tables.py: writes unicode_tables.h, the data tokenizer.c needs, from the standard
library only (unicodedata, html and the codecs behind bytes.decode). Re-run it after changing
anything here:

  python3 convert/gen_unicode_tables.py > unicode_tables.h

The fixtures were made with Python 3.11 (Unicode 14.0.0); run this with the same Unicode version.
What it emits (each table sorted by its key, for binary search):
  - \\p{L}, \\p{N}, str.isspace() and Python's "cased" / "case-ignorable" (for the final sigma
    rule of str.lower()) as inclusive ranges;
  - str.lower() as runs "c -> c + delta for c in lo..hi step s" (the only multi-character
    lowercase, U+0130 -> "i\\u0307", is asserted and handled in tokenizer.c);
  - NFC data: canonical combining classes, one-step canonical decompositions with a flag telling
    whether the pair recomposes (primary composite), the same pairs sorted for composition;
    Hangul is algorithmic in tokenizer.c;
  - ftfy 6.1 data: HTML entities (built exactly as ftfy.chardata._build_html_entities), html's
    invalid numeric character references, the width map, the Latin ligatures, the nine single-byte
    codecs ftfy tries, both directions (sloppy-windows-125x decode unassigned bytes as Latin-1
    and byte 0x1A as U+FFFD), and one bit mask per character for the mojibake heuristic (ftfy.badness categories)
    and the UTF-8 clue classes of ftfy.chardata.
"""
import html, html.entities, sys, unicodedata

MAXCP = 0x110000


def ranges(pred):
    out, start = [], None
    for c in range(MAXCP):
        if 0xD800 <= c <= 0xDFFF:
            ok = False
        else:
            ok = pred(c)
        if ok and start is None:
            start = c
        if not ok and start is not None:
            out.append((start, c - 1))
            start = None
    if start is not None:
        out.append((start, MAXCP - 1))
    return out


def emit_rows(name, ctype, items, per_line, comment):
    print(f"// {comment}")
    print(f"static const {ctype} {name}[] = {{")
    for i in range(0, len(items), per_line):
        print("    " + " ".join(items[i:i + per_line]))
    print("};")
    print(f"#define {name}_N ((int)(sizeof {name} / sizeof {name}[0]))\n")


def emit_ranges(name, rs, comment):
    emit_rows(name, "URange", [f"{{0x{a:X},0x{b:X}}}," for a, b in rs], 8, comment)


def is_case_ignorable(c):
    # CPython's lower() gives final sigma after a cased letter unless a cased letter follows,
    # skipping case-ignorable characters in both directions. Probing with "A" (cased) and "1"
    # (neither) on the left separates case-ignorable characters from the rest.
    ch = chr(c)
    after_a = ("A" + ch + "\u03a3").lower()[-1] == "\u03c2"
    after_1 = ("1" + ch + "\u03a3").lower()[-1] == "\u03c2"
    return after_a and not after_1


def is_cased(c):
    ch = chr(c)
    return ch.islower() or ch.isupper() or ch.istitle()


def lower_runs():
    pairs = []
    for c in range(MAXCP):
        if 0xD800 <= c <= 0xDFFF:
            continue
        lo = chr(c).lower()
        if lo == chr(c):
            continue
        if len(lo) != 1:
            assert c == 0x130, hex(c)      # handled in tokenizer.c
            continue
        pairs.append((c, ord(lo) - c))
    runs = []
    for c, d in pairs:
        if runs:
            lo, hi, step, delta = runs[-1]
            if delta == d and ((step and c == hi + step) or (not step and c - hi in (1, 2))):
                runs[-1] = (lo, c, step or c - hi, delta)
                continue
        runs.append((c, c, 0, d))
    return [(lo, hi, step or 1, d) for lo, hi, step, d in runs]


def nfc_tables():
    ccc = []
    for c in range(MAXCP):
        v = unicodedata.combining(chr(c))
        if v:
            if ccc and ccc[-1][1] == c - 1 and ccc[-1][2] == v:
                ccc[-1] = (ccc[-1][0], c, v)
            else:
                ccc.append((c, c, v))
    dec = []
    for c in range(MAXCP):
        d = unicodedata.decomposition(chr(c))
        if not d or d.startswith("<"):
            continue
        parts = [int(x, 16) for x in d.split()]
        assert len(parts) in (1, 2)
        a, b = parts[0], parts[1] if len(parts) == 2 else 0
        comp = int(b != 0 and unicodedata.normalize("NFC", chr(a) + chr(b)) == chr(c))
        dec.append((c, a, b, comp))
    return ccc, dec


def html_entities():
    # ftfy.chardata._build_html_entities, verbatim in behaviour.
    ent = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            ent["&" + name] = char
            if name == name.lower():
                upper = "&" + name.upper()
                if html.unescape(upper) == upper:
                    ent[upper] = char.upper()
    out = []
    for k in sorted(ent, key=lambda s: s.encode()):
        v = ent[k]
        assert 1 <= len(v) <= 3 and k.startswith("&") and k.endswith(";")
        out.append((k[1:-1], [ord(x) for x in v] + [0] * (3 - len(v))))
    return out


def width_map():
    m = [(0x3000, [0x20, 0])]
    for c in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(c))
        if alt != chr(c):
            assert len(alt) <= 2
            m.append((c, [ord(x) for x in alt] + [0] * (2 - len(alt))))
    return m


LIGATURES = {  # ftfy.chardata.LIGATURES
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
    "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff",
    "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
}

# ftfy.chardata.CHARMAP_ENCODINGS (6.1), in the order ftfy tries them.
ENCODINGS = ["latin-1", "sloppy-windows-1252", "sloppy-windows-1251", "sloppy-windows-1250",
             "sloppy-windows-1253", "sloppy-windows-1254", "iso-8859-2", "macroman", "cp437"]


def decode_table(enc):
    sloppy = enc.startswith("sloppy-")
    base = enc[len("sloppy-"):] if sloppy else enc
    out = []
    for b in range(0x80, 0x100):
        ch = bytes([b]).decode(base, errors="replace")
        if sloppy and ch == "\ufffd":
            ch = chr(b)                # sloppy codecs: unassigned bytes decode as Latin-1
        out.append(ord(ch))
    return out, sloppy


# ftfy.badness.MOJIBAKE_CATEGORIES (ftfy 6.1), by Unicode name; "A-B" is an inclusive range.
N = unicodedata.lookup
MOJIBAKE = {
    "COMMON": ["NO-BREAK SPACE", "SOFT HYPHEN", "MIDDLE DOT", "ACUTE ACCENT", "EN DASH", "EM DASH",
               "HORIZONTAL BAR", "HORIZONTAL ELLIPSIS", "RIGHT SINGLE QUOTATION MARK"],
    "C1": [(0x80, 0x9F)],
    "BAD": ["BROKEN BAR", "CURRENCY SIGN", "DIAERESIS", "NOT SIGN", "MACRON", "PILCROW SIGN",
            "SECTION SIGN", "CEDILLA", "LATIN SMALL LETTER F WITH HOOK",
            "MODIFIER LETTER CIRCUMFLEX ACCENT", "CARON", "BREVE", "OGONEK", "SMALL TILDE",
            "DAGGER", "DOUBLE DAGGER", "PER MILLE SIGN", "REVERSED NOT SIGN", "LOZENGE",
            (0xFFFD, 0xFFFD), "FEMININE ORDINAL INDICATOR", "MASCULINE ORDINAL INDICATOR"],
    "CURRENCY": ["CENT SIGN", "POUND SIGN", "YEN SIGN", "PESETA SIGN", "EURO SIGN"],
    "START_PUNCT": ["INVERTED EXCLAMATION MARK", "LEFT-POINTING DOUBLE ANGLE QUOTATION MARK",
                    "INVERTED QUESTION MARK", "COPYRIGHT SIGN", "GREEK TONOS",
                    "GREEK DIALYTIKA TONOS", "LEFT SINGLE QUOTATION MARK",
                    "SINGLE LOW-9 QUOTATION MARK", "LEFT DOUBLE QUOTATION MARK",
                    "DOUBLE LOW-9 QUOTATION MARK", "BULLET",
                    "SINGLE LEFT-POINTING ANGLE QUOTATION MARK", (0xF8FF, 0xF8FF)],
    "END_PUNCT": ["REGISTERED SIGN", "RIGHT-POINTING DOUBLE ANGLE QUOTATION MARK",
                  "DOUBLE ACUTE ACCENT", "RIGHT DOUBLE QUOTATION MARK",
                  "SINGLE RIGHT-POINTING ANGLE QUOTATION MARK", "TRADE MARK SIGN"],
    "NUMERIC": ["SUPERSCRIPT TWO", "SUPERSCRIPT THREE", "SUPERSCRIPT ONE", "PLUS-MINUS SIGN",
                "VULGAR FRACTION ONE QUARTER", "VULGAR FRACTION ONE HALF",
                "VULGAR FRACTION THREE QUARTERS", "MULTIPLICATION SIGN", "MICRO SIGN",
                "DIVISION SIGN", "FRACTION SLASH", "PARTIAL DIFFERENTIAL", "INCREMENT",
                "N-ARY PRODUCT", "N-ARY SUMMATION", "SQUARE ROOT", "INFINITY", "INTERSECTION",
                "INTEGRAL", "ALMOST EQUAL TO", "NOT EQUAL TO", "IDENTICAL TO",
                "LESS-THAN OR EQUAL TO", "GREATER-THAN OR EQUAL TO", "NUMERO SIGN"],
    "KAOMOJI": [(0xD2, 0xD6), (0xD9, 0xDC), (0xF2, 0xF6), (0xF8, 0xFC),
                "LATIN CAPITAL LETTER O WITH DOUBLE ACUTE", "DEGREE SIGN"],
    "UPPER_ACC": [(0xC0, 0xD1)] + ["LATIN CAPITAL LETTER " + n for n in [
        "O WITH STROKE", "U WITH DIAERESIS", "Y WITH ACUTE", "A WITH BREVE", "A WITH OGONEK",
        "C WITH ACUTE", "C WITH CARON", "D WITH CARON", "D WITH STROKE", "E WITH OGONEK",
        "E WITH CARON", "G WITH BREVE", "I WITH DOT ABOVE", "L WITH ACUTE", "L WITH CARON",
        "L WITH STROKE", "N WITH ACUTE", "N WITH CARON", "R WITH CARON", "S WITH ACUTE",
        "S WITH CEDILLA", "S WITH CARON", "T WITH CEDILLA", "T WITH CARON", "U WITH RING ABOVE",
        "U WITH DOUBLE ACUTE", "Y WITH DIAERESIS", "Z WITH ACUTE", "Z WITH DOT ABOVE",
        "Z WITH CARON"]] + ["LATIN CAPITAL LIGATURE OE", "CYRILLIC CAPITAL LETTER GHE WITH UPTURN"],
    "LOWER_ACC": ["LATIN SMALL LETTER SHARP S", (0xE0, 0xF1)] + ["LATIN SMALL LETTER " + n for n in [
        "A WITH BREVE", "A WITH OGONEK", "C WITH ACUTE", "C WITH CARON", "D WITH CARON",
        "D WITH STROKE", "E WITH OGONEK", "E WITH CARON", "G WITH BREVE", "L WITH ACUTE",
        "L WITH CARON", "L WITH STROKE", "R WITH ACUTE", "S WITH ACUTE", "S WITH CEDILLA",
        "S WITH CARON", "T WITH CARON", "U WITH DIAERESIS", "Z WITH ACUTE", "Z WITH DOT ABOVE",
        "Z WITH CARON"]] + ["LATIN SMALL LIGATURE OE", "CYRILLIC SMALL LETTER GHE WITH UPTURN",
                            "LATIN SMALL LIGATURE FI", "LATIN SMALL LIGATURE FL"],
    "UPPER_COMMON": ["LATIN CAPITAL LETTER THORN", (0x391, 0x3A9)] + ["GREEK CAPITAL LETTER " + n for n in [
        "ALPHA WITH TONOS", "EPSILON WITH TONOS", "ETA WITH TONOS", "IOTA WITH TONOS",
        "OMICRON WITH TONOS", "UPSILON WITH TONOS", "OMEGA WITH TONOS", "IOTA WITH DIALYTIKA",
        "UPSILON WITH DIALYTIKA"]] + [(0x401, 0x42F)],
    "LOWER_COMMON": [(0x3B1, 0x3C9)] + ["GREEK SMALL LETTER " + n for n in [
        "ALPHA WITH TONOS", "EPSILON WITH TONOS", "ETA WITH TONOS", "IOTA WITH TONOS",
        "UPSILON WITH DIALYTIKA AND TONOS"]] + [(0x430, 0x45F)],
    "BOX": [ord(c) for c in "│┌┐┘├┤┬┼"] + [(0x2550, 0x256C)] + [ord(c) for c in "▀▄█▌▐░▒▓"],
}


def utf8_clues():
    # ftfy.chardata.UTF8_CLUES: what the lead / continuation bytes of UTF-8 look like when decoded
    # with a Latin-1-like codec (latin-1 and windows-1250..1254).
    encs = ["latin-1", "cp1252", "cp1251", "cp1250", "cp1253", "cp1254"]

    def chars(lo, hi):
        s = set()
        for e in encs:
            for b in range(lo, hi + 1):
                try:
                    s.add(ord(bytes([b]).decode(e)))
                except UnicodeDecodeError:
                    pass
        return s
    cont = chars(0x80, 0xBF) | {0x20}           # a space may stand for byte 0xA0
    loose = {ord(c) for c in " –—―‘’‚“”„…"}    # not "strict": can stand for themselves
    return {"FIRST2": chars(0xC2, 0xDF), "FIRST3": chars(0xE0, 0xEF),
            "FIRST4": chars(0xF0, 0xF0) | chars(0xF3, 0xF3), "CONT": cont,
            "CONT_STRICT": cont - loose}


def moji_masks():
    names = list(MOJIBAKE) + ["FIRST2", "FIRST3", "FIRST4", "CONT", "CONT_STRICT"]
    masks = {}
    for bit, key in enumerate(MOJIBAKE):
        for item in MOJIBAKE[key]:
            if isinstance(item, str):
                cps = [ord(N(item))]
            elif isinstance(item, tuple):
                cps = range(item[0], item[1] + 1)
            else:
                cps = [item]
            for c in cps:
                masks[c] = masks.get(c, 0) | (1 << bit)
    clues = utf8_clues()
    for i, key in enumerate(["FIRST2", "FIRST3", "FIRST4", "CONT", "CONT_STRICT"]):
        for c in clues[key]:
            masks[c] = masks.get(c, 0) | (1 << (len(MOJIBAKE) + i))
    return names, masks


def main():
    if unicodedata.unidata_version != "14.0.0":
        print(f"warning: Unicode {unicodedata.unidata_version}; the fixtures used 14.0.0 (Python 3.11)",
              file=sys.stderr)
    print("// unicode_tables.h: generated by convert/gen_unicode_tables.py from Python "
          f"{sys.version.split()[0]}'s standard library")
    print(f"// (unicodedata {unicodedata.unidata_version}). Do not edit; re-run the script. "
          "Included by tokenizer.c only.")
    print("#ifndef UNICODE_TABLES_H\n#define UNICODE_TABLES_H\n#include <stdint.h>\n")
    print("typedef struct { uint32_t lo, hi; } URange;                          // inclusive")
    print("typedef struct { uint32_t lo, hi; int32_t delta; uint32_t step; } ULowerRun;")
    print("typedef struct { uint32_t lo, hi, ccc; } UCcc;")
    print("typedef struct { uint32_t cp, a, b, composes; } UDecomp;   // cp -> a (+ b); b = 0: singleton")
    print("typedef struct { const char* name; uint32_t cp[3]; } UEntity;     // &name; -> 1 to 3 chars")
    print("typedef struct { uint32_t from, to; } UMap;")
    print("typedef struct { uint32_t cp, mask; } UMask;")
    print("typedef struct { uint16_t cp; uint8_t byte; } UByte;")
    print("// a single-byte codec: hi = characters of bytes 0x80..0xFF; enc = the same pairs sorted by")
    print("// character, for encoding. sloppy: byte 0x1A stands for U+FFFD (ftfy's sloppy-* codecs).")
    print("typedef struct { const char* name; int sloppy; uint16_t hi[128]; UByte enc[128]; } UCodec;\n")
    cat = unicodedata.category
    emit_ranges("UT_LETTER", ranges(lambda c: cat(chr(c))[0] == "L"), "\\p{L}: categories Lu Ll Lt Lm Lo")
    emit_ranges("UT_NUMBER", ranges(lambda c: cat(chr(c))[0] == "N"), "\\p{N}: categories Nd Nl No")
    emit_ranges("UT_SPACE", ranges(lambda c: chr(c).isspace()), "str.isspace(), also Python re's \\s")
    emit_ranges("UT_CASED", ranges(is_cased), "cased: islower() or isupper() or istitle()")
    emit_ranges("UT_CASE_IGNORABLE", ranges(is_case_ignorable), "case-ignorable, as CPython's lower() sees it")
    emit_rows("UT_LOWER", "ULowerRun",
              [f"{{0x{a:X},0x{b:X},{d},{s}}}," for a, b, s, d in lower_runs()], 5,
              "str.lower(): c + delta for c = lo, lo+step, ..., hi (U+0130 is handled in code)")
    ccc, dec = nfc_tables()
    emit_rows("UT_CCC", "UCcc", [f"{{0x{a:X},0x{b:X},{v}}}," for a, b, v in ccc], 6,
              "canonical combining class (nonzero only)")
    comp = sorted((a, b, c) for c, a, b, f in dec if f)
    print("typedef struct { uint32_t a, b, c; } UCompose;")
    emit_rows("UT_COMPOSE", "UCompose", [f"{{0x{a:X},0x{b:X},0x{c:X}}}," for a, b, c in comp], 6,
              "canonical composition of primary composites: a + b -> c, sorted by (a, b)")
    emit_rows("UT_DECOMP", "UDecomp", [f"{{0x{c:X},0x{a:X},0x{b:X},{f}}}," for c, a, b, f in dec], 4,
              "canonical decompositions, one step; composes = 1 for primary composites")
    ents = html_entities()
    emit_rows("UT_ENTITY", "UEntity",
              [f'{{"{n}",{{0x{v[0]:X},0x{v[1]:X},0x{v[2]:X}}}}},' for n, v in ents], 3,
              "ftfy's HTML entities (name between '&' and ';'), sorted by strcmp")
    emit_rows("UT_CHARREF_INVALID", "UMap",
              [f"{{0x{k:X},0x{ord(v):X}}}," for k, v in sorted(html._invalid_charrefs.items())], 8,
              "html.unescape: numeric references replaced by another character")
    emit_ranges("UT_CHARREF_DROPPED", [(a, b) for a, b in ranges(lambda c: c in html._invalid_codepoints)],
                "html.unescape: numeric references that decode to nothing")
    print("typedef struct { uint32_t from, to[2]; } UWidth;")
    emit_rows("UT_WIDTH", "UWidth", [f"{{0x{a:X},{{0x{b[0]:X},0x{b[1]:X}}}}}," for a, b in width_map()], 6,
              "ftfy fix_character_width: U+3000 and the NFKC forms of U+FF01..U+FFEF")
    lig = [f"{{0x{ord(k):X},{{{', '.join('0x%X' % ord(x) for x in v)}{', 0' * (3 - len(v))}}}}},"
           for k, v in sorted(LIGATURES.items())]
    print("typedef struct { uint32_t cp, to[3]; } ULigature;")
    emit_rows("UT_LIGATURE", "ULigature", lig, 4, "ftfy fix_latin_ligatures")
    print("// ftfy's single-byte codecs, in the order fix_encoding tries them")
    print("static const UCodec UT_CODECS[] = {")
    for enc in ENCODINGS:
        tab, sloppy = decode_table(enc)
        print(f'    {{"{enc}", {int(sloppy)}, {{')
        for i in range(0, 128, 16):
            print("        " + ",".join(f"0x{x:X}" for x in tab[i:i + 16]) + ",")
        print("    }, {")
        enc = sorted((cp, 0x80 + i) for i, cp in enumerate(tab))
        assert len({cp for cp, _ in enc}) == 128 and all(cp <= 0xFFFF for cp, _ in enc)
        for i in range(0, 128, 8):
            print("        " + " ".join(f"{{0x{cp:X},0x{b:X}}}," for cp, b in enc[i:i + 8]))
        print("    }},")
    print("};")
    print("#define UT_CODECS_N ((int)(sizeof UT_CODECS / sizeof UT_CODECS[0]))\n")
    names, masks = moji_masks()
    print("// bits of UT_MOJI: ftfy.badness categories, then ftfy.chardata UTF-8 clue classes")
    print("enum {")
    for i, n in enumerate(names):
        print(f"    MJ_{n} = 1u << {i},")
    print("};")
    emit_rows("UT_MOJI", "UMask", [f"{{0x{c:X},0x{m:X}}}," for c, m in sorted(masks.items())], 8,
              "mojibake character classes")
    print("#endif // UNICODE_TABLES_H")


if __name__ == "__main__":
    main()
