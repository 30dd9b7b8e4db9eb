#!/usr/bin/env bash
# make fuzz: builds every libFuzzer target with clang (+ ASan, UBSan), seeds the corpora from valid
# files, runs each target for SECONDS (two at a time, at low priority), and writes a report of
# executions, coverage and findings to build-fuzz/report.txt. Crashing inputs land in
# build-fuzz/crashes/<target>/; copy each into tests/fuzz/regressions/<target>/ once fixed (make
# test replays them). Also runs the Python fuzz loop of convert/convert.py.
# usage: tests/fuzz/run_fuzz.sh [SECONDS] [GOLDEN_DIR]
set -u
secs=${1:-600}
golden=${2:-../shared/golden}
cd "$(dirname "$0")/../.."
command -v clang >/dev/null || { echo "make fuzz needs clang (apt-get install clang)"; exit 1; }
make -s instastyle || exit 1
b=build-fuzz
mkdir -p $b/obj $b/corpus $b/crashes
CF="-O1 -g -std=c11 -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined"
for src in tensor gemm nn sd ddim lora tokenizer image; do
    clang $CF -I. -c $src.c -o $b/obj/$src.o || exit 1
done
targets=""
for f in tests/fuzz/fuzz_*.c; do
    t=$(basename "$f" .c); t=${t#fuzz_}
    clang -O1 -g -std=c11 -fsanitize=fuzzer,address,undefined -I. "$f" $b/obj/*.o -lm -lpthread -o $b/fuzz_$t || exit 1
    targets="$targets $t"
done
tests/fuzz/make_seeds.sh $b/seeds "$golden" || exit 1
export FUZZ_TOKENIZER=$golden/models/tiny-sd15/tokenizer FUZZ_MODEL=$golden/models/tiny-sd15
run_one() {
    local t=$1
    mkdir -p $b/corpus/$t $b/crashes/$t
    local dirs="$b/corpus/$t"
    [ -d "$b/seeds/$t" ] && dirs="$dirs $b/seeds/$t"
    [ -d "tests/fuzz/regressions/$t" ] && dirs="$dirs tests/fuzz/regressions/$t"
    nice -n 19 $b/fuzz_$t -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -max_len=262144 -print_final_stats=1 \
        -artifact_prefix=$b/crashes/$t/ $dirs >$b/$t.log 2>&1
    local execs cov crashes
    execs=$(grep -E "stat::number_of_executed_units" $b/$t.log | awk '{print $2}')
    cov=$(grep -E "#[0-9]+.*(DONE|pulse|NEW|REDUCE)" $b/$t.log | tail -n 1 | sed -nE 's/.*cov: ([0-9]+).*ft: ([0-9]+).*/cov \1 ft \2/p')
    crashes=$(ls $b/crashes/$t | wc -l)
    printf '%-14s %6ss  %12s execs  %-20s  findings %s\n' "$t" "$secs" "${execs:-?}" "${cov:-?}" "$crashes" | tee -a $b/report.txt
}
echo "fuzz run $(date -u +%FT%TZ), $secs s per target" > $b/report.txt
set -- $targets
while [ $# -gt 0 ]; do
    run_one "$1" & p1=$!
    if [ $# -gt 1 ]; then run_one "$2" & p2=$!; wait $p2; fi
    wait $p1
    shift; [ $# -gt 0 ] && shift
done
nice -n 19 python3 tests/fuzz/fuzz_convert.py "$secs" | tee -a $b/report.txt
echo "report: $b/report.txt"
