#!/usr/bin/env bash
# Seed corpora for the fuzz targets, made from valid files that the program and the tests produce.
# usage: tests/fuzz/make_seeds.sh OUT_DIR [GOLDEN_DIR]   (needs ./instastyle built)
set -eu
out=$1
golden=${2:-../shared/golden}
model=$golden/models/tiny-sd15
bin=${INSTASTYLE:-./instastyle}
mkdir -p "$out"/{safetensors,json,image,png_inflate,tokenizer,vocab,manifest,noise,trained}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# safetensors: small golden cases
for f in "$golden"/cases/ddim_step_t1_s50_b1.safetensors "$golden"/cases/tokenizer_ftfy.safetensors \
         "$golden"/cases/adamw_step_one_param_fresh.safetensors "$golden"/cases/snr_train1000.safetensors; do
    [ -f "$f" ] && cp "$f" "$out/safetensors/"
done
# json: configs
i=0; for f in "$model"/*/config.json "$model"/scheduler/scheduler_config.json "$model"/model_index.json; do cp "$f" "$out/json/$i.json"; i=$((i + 1)); done
# images, noise, manifest, trained files from the program itself
"$bin" generate --model "$model" --prompt "a red house" --size 16 --steps 2 --seed 1 --out "$tmp/a.png" >/dev/null 2>&1
"$bin" generate --model "$model" --prompt "a red house" --size 16 --steps 2 --seed 2 --out "$tmp/b.bmp" >/dev/null 2>&1
"$bin" generate --model "$model" --prompt "a red house" --size 16 --steps 2 --seed 3 --out "$tmp/c.ppm" >/dev/null 2>&1
cp "$tmp"/a.png "$tmp"/b.bmp "$tmp"/c.ppm "$out/image/"
printf 'P3\n2 2\n255\n255 0 0  0 255 0\n0 0 255  255 255 255\n' > "$out/image/d.ppm"
"$bin" invert --model "$model" --image "$tmp/a.png" --style ink --object house --size 16 --steps 2 --out "$tmp/noise.safetensors" >/dev/null 2>&1
cp "$tmp/noise.safetensors" "$out/noise/"
cp "$tmp/noise.safetensors" "$out/safetensors/"
"$bin" candidates --model "$model" --noise "$tmp/noise.safetensors" --style ink --objects "cat,table lamp" --steps 2 --out "$tmp/cand" >/dev/null 2>&1
cp "$tmp/cand/manifest.tsv" "$out/manifest/"
"$bin" refine --model "$model" --picks 1,2 --candidates "$tmp/cand" --style ink --steps 2 --size 64 --out "$tmp/t.safetensors" >/dev/null 2>&1
cp "$tmp"/t*.safetensors "$out/trained/" 2>/dev/null || true
# tokenizer prompts and a small vocabulary, png payloads (python3)
python3 - "$golden" "$out" <<'PY'
import json, struct, sys, zlib, os
golden, out = sys.argv[1], sys.argv[2]
def meta(path):
    b = open(path, 'rb').read(); n = struct.unpack('<Q', b[:8])[0]
    return json.loads(b[8:8 + n])['__metadata__']
p = json.loads(meta(os.path.join(golden, 'cases', 'tokenizer_main.safetensors'))['params'])
for i, s in enumerate(p['prompts'][:40]):
    open(os.path.join(out, 'tokenizer', '%02d.txt' % i), 'wb').write(s.encode('utf-8'))
vocab = json.load(open(os.path.join(golden, 'models', 'tiny-sd15', 'tokenizer', 'vocab.json'), encoding='utf-8'))
small = [k for k, v in sorted(vocab.items(), key=lambda kv: kv[1])[:600]] + ['<|startoftext|>', '<|endoftext|>']
sv = {k: i for i, k in enumerate(small)}
merges = open(os.path.join(golden, 'models', 'tiny-sd15', 'tokenizer', 'merges.txt'), encoding='utf-8').read().split('\n')[:60]
open(os.path.join(out, 'vocab', 'small'), 'wb').write(json.dumps(sv).encode() + b'\n###\n' + '\n'.join(merges).encode())
for i, (w, h, t) in enumerate([(4, 3, 1), (5, 5, 0), (3, 2, 2), (2, 2, 4)]):
    bpp = {0: 1, 1: 3, 2: 1, 3: 2, 4: 4}[t]
    raw = b''.join(bytes([i % 5]) + bytes((x * 7 + y) % 256 for x in range(w * bpp)) for y in range(h))
    open(os.path.join(out, 'png_inflate', '%d' % i), 'wb').write(bytes([w - 1, h - 1, t]) + zlib.compress(raw, 9))
PY
echo "seeds in $out: $(find "$out" -type f | wc -l) files"
