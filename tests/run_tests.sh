#!/usr/bin/env bash
# Runs every test program and sums their closing "N passed, M failed[, K skipped]" lines.
# usage: tests/run_tests.sh BUILD_DIR GOLDEN_DIR   (INSTASTYLE=path overrides ./instastyle)
set -u
build=${1:-build}
golden=${2:-../shared/golden}
export INSTASTYLE=${INSTASTYLE:-./instastyle}
total_pass=0 total_fail=0 total_skip=0
run() {   # name, command...
    local name=$1; shift
    echo "=== $name: $*"
    local out
    out=$("$@" 2>&1)
    local rc=$?
    echo "$out"
    local last
    last=$(printf '%s\n' "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -n 1)
    if [ -z "$last" ]; then
        echo "FAIL $name: no summary line (exit status $rc)"
        total_fail=$((total_fail + 1))
        return
    fi
    local p f s
    p=$(echo "$last" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$last" | sed -E 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/')
    s=$(echo "$last" | sed -nE 's/.*, ([0-9]+) skipped.*/\1/p')
    total_pass=$((total_pass + p)); total_fail=$((total_fail + f)); total_skip=$((total_skip + ${s:-0}))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "FAIL $name: exit status $rc"
        total_fail=$((total_fail + 1))
    fi
}
run golden "$build/run_golden" "$golden"
for t in "$build"/test_* "$build"/gradcheck; do
    [ -x "$t" ] || continue
    run "$(basename "$t")" "$t" "$golden"
done
export FUZZ_TOKENIZER=$golden/models/tiny-sd15/tokenizer FUZZ_MODEL=$golden/models/tiny-sd15
for r in "$build"/replay_*; do   # fuzz regression inputs (crashes once found, now fixed)
    [ -x "$r" ] || continue
    t=${r##*/replay_}
    [ -d "tests/fuzz/regressions/$t" ] && run "fuzz regressions $t" "$r" "tests/fuzz/regressions/$t"
done
if command -v python3 >/dev/null 2>&1 && [ -d tests/fuzz/regressions/convert ]; then
    run "fuzz regressions convert" python3 tests/fuzz/fuzz_convert.py --replay tests/fuzz/regressions/convert
fi
run cli tests/test_cli.sh "$golden"
run kill-resume tests/test_kill.sh "$golden"
if command -v python3 >/dev/null 2>&1; then
    run convert python3 tests/test_convert.py "$golden"
else
    echo "SKIP convert: python3 not installed"; total_skip=$((total_skip + 1))
fi
echo "$total_pass passed, $total_fail failed, $total_skip skipped"
[ "$total_fail" -eq 0 ]
