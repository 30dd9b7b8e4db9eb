#!/usr/bin/env bash
# make demo: the whole InstaStyle flow on the tiny fixture model, no download needed.
# The tiny model has random weights, so the pictures are noise-like: this shows the commands,
# files and timings, not the art. With real SD 1.5 weights the same commands make the paper's images.
set -eu
golden=${1:-../shared/golden}
model=$golden/models/tiny-sd15
bin=${INSTASTYLE:-./instastyle}
out=demo-out
mkdir -p "$out"
run() { echo "+ $*"; "$@"; }
t0=$(date +%s)
# 1. a "style reference" (here: an image the tiny model generates; normally your own PNG/PPM/BMP)
run "$bin" generate --model "$model" --prompt "a house, watercolor" --size 128 --steps 10 --seed 1 --out "$out/reference.png"
run "$bin" generate --model "$model" --prompt "a tree, ink drawing" --size 128 --steps 10 --seed 2 --out "$out/reference2.png"
# 2. style noise: DDIM inversion with the conditional noise only
run "$bin" invert --model "$model" --image "$out/reference.png" --style watercolor --object house --size 128 --steps 10 --out "$out/noise1.safetensors"
run "$bin" invert --model "$model" --image "$out/reference2.png" --style "ink drawing" --object tree --size 128 --steps 10 --out "$out/noise2.safetensors"
# 3. stage 1: candidates and a numbered contact sheet to pick from
run "$bin" candidates --model "$model" --noise "$out/noise1.safetensors" --style watercolor --steps 10 --out "$out/candidates"
# 3b. stage 2: learn <style1> + LoRA from the picks (here 30 steps; the paper uses 500)
run "$bin" refine --model "$model" --picks 1,3,5 --candidates "$out/candidates" --image "$out/reference.png" --object house \
    --style watercolor --steps 30 --size 128 --out "$out/style1.safetensors"
run "$bin" generate --model "$model" --trained "$out/style1.safetensors" --noise "$out/noise1.safetensors" --object tram \
    --style "<style1>" --steps 10 --out "$out/tram-style1.png"
# 4. inference from the style noise
run "$bin" generate --model "$model" --noise "$out/noise1.safetensors" --object lighthouse --style watercolor --steps 10 --out "$out/lighthouse.png"
# 5. two styles: mask-mixed noise and composed guidance
run "$bin" mix --model "$model" --noise1 "$out/noise1.safetensors" --noise2 "$out/noise2.safetensors" --object cat \
    --style1 watercolor --style2 "ink drawing" --alpha 0.5 --beta 0.5 --steps 10 --out "$out/mix.png"
echo
echo "demo finished in $(( $(date +%s) - t0 ))s; images in $out/:"
ls -1 "$out" "$out/candidates" | sed 's/^/  /'
