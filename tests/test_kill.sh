#!/usr/bin/env bash
# Interrupted work loses nothing: SIGKILL 'refine' and 'generate' at random moments and check that
# every output file present is complete and valid (*.tmp files are a killed write's leftovers and
# never read), then that 'refine --resume' finishes with exactly the bytes of an uninterrupted run.
# usage: tests/test_kill.sh [GOLDEN_DIR]   (INSTASTYLE selects the binary)
set -u
golden=${1:-../shared/golden}
bin=${INSTASTYLE:-./instastyle}
model=$golden/models/tiny-sd15
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0
ok() { echo "PASS $1"; pass=$((pass + 1)); }
bad() { echo "FAIL $1: $2"; fail=$((fail + 1)); }
if [ ! -d "$model" ]; then echo "0 passed, 0 failed, 1 skipped"; exit 0; fi
if ! command -v python3 >/dev/null; then echo "SKIP kill tests: python3 needed to validate files"; echo "0 passed, 0 failed, 1 skipped"; exit 0; fi

# a safetensors file is complete: header inside the file, every tensor inside the data block
valid_st() {
    python3 - "$1" <<'PY'
import json, struct, sys
b = open(sys.argv[1], 'rb').read()
n = struct.unpack('<Q', b[:8])[0]
h = json.loads(b[8:8 + n])
end = max([v['data_offsets'][1] for k, v in h.items() if k != '__metadata__'] + [0])
sys.exit(0 if 8 + n + end == len(b) else 1)
PY
}

# the training set: two images the tiny model makes
"$bin" generate --model "$model" --prompt "a house" --size 64 --steps 2 --seed 1 --out "$tmp/a.png" >/dev/null 2>&1
"$bin" generate --model "$model" --prompt "a tree" --size 64 --steps 2 --seed 2 --out "$tmp/b.png" >/dev/null 2>&1
R="refine --model $model --images $tmp/a.png,$tmp/b.png --objects house,tree --style watercolor --size 64 --steps 48 --save-every 2 --seed 5"

# the uninterrupted run
$bin $R --out "$tmp/ref.safetensors" >/dev/null 2>"$tmp/ref.err" || bad "uninterrupted refine" "$(tail -n 2 "$tmp/ref.err")"

# killed runs: resume from the checkpoint each time until the run completes
kills=0 tries=0 done_=0 invalid=0
rm -f "$tmp/k.safetensors" "$tmp/k.safetensors.ckpt"
while [ $tries -lt 40 ] && [ $done_ -eq 0 ]; do
    tries=$((tries + 1))
    resume=""
    [ -f "$tmp/k.safetensors.ckpt" ] && resume="--resume $tmp/k.safetensors.ckpt"
    $bin $R $resume --out "$tmp/k.safetensors" >/dev/null 2>"$tmp/k.err" &
    pid=$!
    sleep "0.$(( RANDOM % 9 + 1 ))"
    if kill -9 $pid 2>/dev/null; then kills=$((kills + 1)); fi
    wait $pid 2>/dev/null && done_=1
    for f in "$tmp"/k.safetensors "$tmp"/k.safetensors.ckpt "$tmp"/k.lora.safetensors "$tmp"/k.style1.safetensors; do
        [ -f "$f" ] && ! valid_st "$f" && { invalid=$((invalid + 1)); echo "  incomplete file after kill: $f"; }
    done
done
[ $done_ -eq 0 ] && { resume="--resume $tmp/k.safetensors.ckpt"; [ -f "$tmp/k.safetensors.ckpt" ] || resume=""; $bin $R $resume --out "$tmp/k.safetensors" >/dev/null 2>&1 && done_=1; }
echo "  refine killed $kills times in $tries runs"
[ $invalid -eq 0 ] && ok "every file present after SIGKILL during refine is complete" || bad "files after kill" "$invalid incomplete"
if [ $done_ -eq 1 ] && cmp -s "$tmp/ref.safetensors" "$tmp/k.safetensors"; then
    ok "refine --resume after kills = uninterrupted run, byte for byte"
else
    bad "resume equals uninterrupted" "files differ or the run did not finish"
fi
cmp -s "$tmp/ref.lora.safetensors" "$tmp/k.lora.safetensors" && ok "exported LoRA identical too" || bad "exported LoRA" "differs"

# generate killed at random moments: the image is absent or a valid PNG
invalid=0
for i in 1 2 3 4 5 6; do
    rm -f "$tmp/g.png"
    $bin generate --model "$model" --prompt "a cat" --size 64 --steps 8 --seed $i --out "$tmp/g.png" >/dev/null 2>&1 &
    pid=$!
    sleep "0.$(( RANDOM % 6 ))"
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null
    if [ -f "$tmp/g.png" ] && ! python3 tests/check_png.py "$tmp/g.png" >/dev/null 2>&1; then invalid=$((invalid + 1)); fi
done
[ $invalid -eq 0 ] && ok "every image present after SIGKILL during generate is a valid PNG" || bad "generate kill" "$invalid invalid images"

# Ctrl-C during refine saves a checkpoint and says how to resume
$bin $R --steps 400 --save-every 0 --out "$tmp/c.safetensors" >/dev/null 2>"$tmp/c.err" &
pid=$!
sleep 1.5
kill -INT $pid
wait $pid
rc=$?
if [ $rc -eq 130 ] && [ -f "$tmp/c.safetensors.ckpt" ] && valid_st "$tmp/c.safetensors.ckpt" && grep -q -- "--resume" "$tmp/c.err"; then
    ok "Ctrl-C saves a checkpoint and names --resume"
else
    bad "Ctrl-C checkpoint" "exit $rc: $(tail -n 1 "$tmp/c.err")"
fi
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
