#!/usr/bin/env bash
# CLI tests on the tiny fixture model: usage texts, the whole flow (invert → candidates →
# generate → mix), reproducibility across thread counts, valid PNG output, and a list of bad
# invocations that must each end with a one-line error and a non-zero exit, never a crash.
# usage: tests/test_cli.sh [GOLDEN_DIR]   (INSTASTYLE=path selects the binary)
set -u
golden=${1:-../shared/golden}
bin=${INSTASTYLE:-./instastyle}
model=$golden/models/tiny-sd15
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0 skip=0
ok() { echo "PASS $1"; pass=$((pass + 1)); }
bad() { echo "FAIL $1: $2"; fail=$((fail + 1)); }

# expect_ok NAME CMD...: exit 0
expect_ok() {
    local name=$1; shift
    if "$@" >"$tmp/out" 2>"$tmp/err"; then ok "$name"; else bad "$name" "exit $? : $(tail -n 3 "$tmp/err")"; fi
}
# expect_error NAME CMD...: non-zero exit < 128 (no signal), an "error:" line, no sanitizer report
expect_error() {
    local name=$1; shift
    "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$?
    if [ $rc -eq 0 ]; then bad "$name" "exit status 0"; return; fi
    if [ $rc -ge 128 ]; then bad "$name" "killed by signal $((rc - 128))"; return; fi
    if grep -qE "Sanitizer|runtime error|Segmentation|Aborted|stack trace" "$tmp/err"; then bad "$name" "$(head -n 3 "$tmp/err")"; return; fi
    if [ "$(grep -c "^error: " "$tmp/err")" -ne 1 ]; then bad "$name" "expected one 'error:' line: $(head -n 2 "$tmp/err")"; return; fi
    ok "$name"
}

if [ ! -d "$model" ]; then echo "SKIP cli: $model not found"; echo "0 passed, 0 failed, 1 skipped"; exit 0; fi

# usage
expect_ok "usage" "$bin"
for c in info tokenize invert candidates refine generate mix snr bench; do
    if "$bin" "$c" --help >"$tmp/out" 2>&1 && grep -q "usage: instastyle $c" "$tmp/out"; then ok "help $c"; else bad "help $c" "$(head -n 2 "$tmp/out")"; fi
done

# info on the three model files (LDM files described by the folder's configs)
expect_ok "info diffusers" "$bin" info --model "$model"
expect_ok "info ldm fp32" "$bin" info --model "$golden/models/tiny-sd15.ldm.safetensors" --config "$model" --tokenizer "$model/tokenizer"
expect_ok "info ldm fp16" "$bin" info --model "$golden/models/tiny-sd15.ldm.fp16.safetensors" --config "$model"

# snr: the paper's terminal value
if "$bin" snr | grep -q "terminal SNR (timestep 999): 0.015144"; then ok "snr terminal 0.015144"; else bad "snr" "$("$bin" snr | tail -n 1)"; fi

# tokenize: BOS first, EOS last
ids=$("$bin" tokenize --model "$model" --prompt "A cat in the style of <style1>" --add-token "<style1>")
case "$ids" in 49406\ *\ 49408\ 49407) ok "tokenize added token";; *) bad "tokenize" "$ids";; esac

# the flow on a tiny image
python_png() { command -v python3 >/dev/null && python3 tests/check_png.py "$1" >/dev/null 2>&1; }
"$bin" generate --model "$model" --prompt "a red house" --size 64 --steps 3 --seed 7 --out "$tmp/ref.ppm" >/dev/null 2>&1
expect_ok "invert" "$bin" invert --model "$model" --image "$tmp/ref.ppm" --style watercolor --object house --size 64 --steps 4 --out "$tmp/noise.safetensors"
expect_ok "candidates" "$bin" candidates --model "$model" --noise "$tmp/noise.safetensors" --style watercolor --objects "cat,table lamp" --steps 3 --out "$tmp/cand"
[ -f "$tmp/cand/sheet.png" ] && [ -f "$tmp/cand/01_cat.png" ] && [ -f "$tmp/cand/02_table_lamp.png" ] && grep -q "table lamp" "$tmp/cand/manifest.tsv" \
    && ok "candidates files" || bad "candidates files" "$(ls "$tmp/cand" 2>&1)"
if command -v python3 >/dev/null; then
    python_png "$tmp/cand/sheet.png" && python_png "$tmp/cand/01_cat.png" && ok "png valid (independent decoder)" || bad "png valid" "check_png.py rejected the output"
else echo "SKIP png valid: no python3"; skip=$((skip + 1)); fi
expect_ok "generate from noise" "$bin" generate --model "$model" --noise "$tmp/noise.safetensors" --object cat --style watercolor --steps 3 --out "$tmp/g.png"
expect_ok "mix" "$bin" mix --model "$model" --noise1 "$tmp/noise.safetensors" --noise2 "$tmp/noise.safetensors" --object cat --style1 watercolor --style2 "oil painting" --steps 2 --out "$tmp/mix.png"
ls "$tmp" | grep -q '\.tmp$' && bad "no temporary files left" "$(ls "$tmp")" || ok "no temporary files left"

# same seed, 1 vs 2 threads: identical bytes
"$bin" generate --model "$model" --prompt "a cat" --size 64 --steps 3 --seed 11 --threads 1 --out "$tmp/t1.png" >/dev/null 2>&1
"$bin" generate --model "$model" --prompt "a cat" --size 64 --steps 3 --seed 11 --threads 2 --out "$tmp/t2.png" >/dev/null 2>&1
if [ -s "$tmp/t1.png" ] && cmp -s "$tmp/t1.png" "$tmp/t2.png"; then ok "seed reproducible across 1 and 2 threads"; else bad "threads reproducible" "outputs differ"; fi
"$bin" invert --model "$model" --image "$tmp/ref.ppm" --style ink --object house --size 64 --steps 3 --threads 1 --out "$tmp/n1.safetensors" >/dev/null 2>&1
"$bin" invert --model "$model" --image "$tmp/ref.ppm" --style ink --object house --size 64 --steps 3 --threads 2 --out "$tmp/n2.safetensors" >/dev/null 2>&1
if [ -s "$tmp/n1.safetensors" ] && cmp -s "$tmp/n1.safetensors" "$tmp/n2.safetensors"; then ok "invert reproducible across threads"; else bad "invert threads" "noise files differ"; fi

# bad invocations: one-line error, non-zero exit, no crash
printf 'P6\n4 4\n255\n' > "$tmp/trunc.ppm"
printf '\xff\xd8\xff\xe0JFIF' > "$tmp/photo.jpg"
printf 'hello' > "$tmp/short.safetensors"
printf '\x10\x00\x00\x00\x00\x00\x00\x00{"latent":{}}   ' > "$tmp/lying.safetensors"
printf '\xff\xff\xff\xff\xff\xff\xff\x7f{}' > "$tmp/huge.safetensors"
expect_error "unknown command" "$bin" frobnicate
expect_error "unknown option" "$bin" info --model "$model" --frob
expect_error "missing model" "$bin" info
expect_error "model not found" "$bin" info --model "$tmp/nowhere"
expect_error "int option not a number" "$bin" generate --model "$model" --steps many
expect_error "option without value" "$bin" generate --model "$model" --steps
expect_error "steps zero" "$bin" generate --model "$model" --prompt x --steps 0
expect_error "steps too many" "$bin" generate --model "$model" --prompt x --steps 5000
expect_error "size not multiple of 8" "$bin" generate --model "$model" --prompt x --size 65
expect_error "absurd size" "$bin" generate --model "$model" --prompt x --size 100000
expect_error "unknown device" "$bin" info --model "$model" --device tpu
expect_error "unknown device in the environment" env INSTASTYLE_DEVICE=tpu "$bin" info --model "$model"
if "$bin" --help 2>&1 | grep -q "^devices in this build: cpu ("; then    # a CPU build: --device cuda names the remedy
    expect_error "cuda device in a cpu build" "$bin" info --model "$model" --device cuda
fi
expect_error "no prompt" "$bin" generate --model "$model" --steps 2
expect_error "invalid utf-8 prompt" "$bin" generate --model "$model" --prompt $'a \xff\xfe cat' --size 64 --steps 2 --out "$tmp/x.png"
expect_error "tokenize invalid utf-8" "$bin" tokenize --model "$model" --prompt $'\xc3\x28'
expect_error "truncated ppm" "$bin" invert --model "$model" --image "$tmp/trunc.ppm" --style a --object b --size 64 --steps 2 --out "$tmp/x.safetensors"
expect_error "jpeg input" "$bin" invert --model "$model" --image "$tmp/photo.jpg" --style a --object b --size 64 --steps 2 --out "$tmp/x.safetensors"
grep -qi "convert" "$tmp/err" && ok "jpeg error gives a hint" || bad "jpeg hint" "$(cat "$tmp/err")"
expect_error "missing image" "$bin" invert --model "$model" --image "$tmp/none.png" --style a --object b
expect_error "short noise file" "$bin" generate --model "$model" --noise "$tmp/short.safetensors" --prompt x --steps 2
expect_error "lying noise file" "$bin" generate --model "$model" --noise "$tmp/lying.safetensors" --prompt x --steps 2
expect_error "huge header noise file" "$bin" generate --model "$model" --noise "$tmp/huge.safetensors" --prompt x --steps 2
expect_error "noise file is a model" "$bin" generate --model "$model" --noise "$golden/models/tiny-sd15.ldm.fp16.safetensors" --prompt x --steps 2
expect_error "ldm without tokenizer" "$bin" generate --model "$golden/models/tiny-sd15.ldm.safetensors" --config "$model" --prompt x --steps 2
grep -q "tokenizer" "$tmp/err" && ok "ldm hint names --tokenizer" || bad "ldm hint" "$(cat "$tmp/err")"
expect_error "ldm with wrong config" "$bin" info --model "$golden/models/tiny-sd15.ldm.safetensors"
expect_error "mix alpha out of range" "$bin" mix --model "$model" --noise1 "$tmp/noise.safetensors" --noise2 "$tmp/noise.safetensors" --object a --style1 b --style2 c --alpha 2
# refine: wrong style word, missing or bad picks, bad files
expect_error "refine multi-token style" "$bin" refine --model "$model" --images "$tmp/ref.ppm" --objects house --style "oil painting" --size 64 --steps 1
grep -q "CLIP tokens" "$tmp/err" && ok "refine style hint" || bad "refine style hint" "$(cat "$tmp/err")"
expect_error "refine picks without candidates" "$bin" refine --model "$model" --picks 1,2 --style ink --size 64 --steps 1
expect_error "refine pick not in manifest" "$bin" refine --model "$model" --picks 7 --candidates "$tmp/cand" --style ink --size 64 --steps 1
mkdir -p "$tmp/evil"; printf 'number\tobject\tprompt\tfile\n1\tcat\tA cat\t../../etc/passwd\n' > "$tmp/evil/manifest.tsv"
expect_error "refine manifest path traversal" "$bin" refine --model "$model" --picks 1 --candidates "$tmp/evil" --style ink --size 64 --steps 1
expect_error "refine resume from a noise file" "$bin" refine --model "$model" --images "$tmp/ref.ppm" --objects house --style ink --size 64 --steps 2 --resume "$tmp/noise.safetensors" --out "$tmp/r.safetensors"
expect_error "refine no images" "$bin" refine --model "$model" --style ink --size 64 --steps 1
expect_error "generate with a noise file as --trained" "$bin" generate --model "$model" --prompt x --size 64 --steps 2 --trained "$tmp/noise.safetensors"
expect_error "generate with a lying --trained file" "$bin" generate --model "$model" --prompt x --size 64 --steps 2 --trained "$tmp/lying.safetensors"
"$bin" generate --model "$model" --prompt "a red house" --size 128 --steps 2 --seed 7 --out "$tmp/big.ppm" >/dev/null 2>&1
"$bin" invert --model "$model" --image "$tmp/big.ppm" --style ink --object house --size 128 --steps 2 --out "$tmp/noise128.safetensors" >/dev/null 2>&1
expect_error "mix noises of different sizes" "$bin" mix --model "$model" --noise1 "$tmp/noise.safetensors" --noise2 "$tmp/noise128.safetensors" --object a --style1 b --style2 c --steps 2
# other configs than SD 1.5's topology (hidden golden cases have them): random weights through
# --model random:sd15 --config DIR; 3 levels, per-level transformer_layers_per_block, heads from
# num_attention_heads, linear projections, gelu text encoder, a 2-level VAE; then a bad list.
if command -v python3 >/dev/null; then
    python3 - "$model" "$tmp/cfg3" "$tmp/cfgbad" <<'PY'
import json, os, shutil, sys
src, good, bad = sys.argv[1:]
def put(d, comp, cfg):
    os.makedirs(f"{d}/{comp}", exist_ok=True)
    json.dump(cfg, open(f"{d}/{comp}/config.json", "w"))
for d in (good, bad):
    u = json.load(open(f"{src}/unet/config.json")); v = json.load(open(f"{src}/vae/config.json"))
    t = json.load(open(f"{src}/text_encoder/config.json"))
    u.update(block_out_channels=[32, 32, 64], down_block_types=["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
             up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2, layers_per_block=1, num_attention_heads=[2, 4, 4],
             transformer_layers_per_block=[1, 2, 1] if d == good else [1, 2], use_linear_projection=True, cross_attention_dim=48)
    t.update(hidden_size=48, num_attention_heads=6, intermediate_size=50, num_hidden_layers=2, hidden_act="gelu")
    v.update(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
             layers_per_block=1, norm_num_groups=8)
    put(d, "unet", u); put(d, "vae", v); put(d, "text_encoder", t)
    shutil.copytree(f"{src}/scheduler", f"{d}/scheduler")
PY
    rnd=(--model random:sd15 --config "$tmp/cfg3" --tokenizer "$model/tokenizer")
    expect_ok "other config: generate" "$bin" generate "${rnd[@]}" --prompt "a cat" --size 64 --steps 2 --out "$tmp/cfg3.png"
    expect_ok "other config: invert" "$bin" invert "${rnd[@]}" --image "$tmp/cfg3.png" --style ink --object cat --size 64 --steps 2 --out "$tmp/cfg3.noise.safetensors"
    expect_ok "other config: refine" "$bin" refine "${rnd[@]}" --images "$tmp/cfg3.png" --objects cat --style ink --size 64 --steps 2 --out "$tmp/cfg3.trained.safetensors"
    expect_error "transformer_layers_per_block of the wrong length" "$bin" info --model random:sd15 --config "$tmp/cfgbad" --tokenizer "$model/tokenizer"
else echo "SKIP other configs: no python3"; skip=$((skip + 1)); fi
echo "$pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]
