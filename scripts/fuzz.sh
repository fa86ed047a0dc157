#!/usr/bin/env bash
# Fuzzes every parser of untrusted input with cargo fuzz (libFuzzer, nightly): the filter's
# plugin configuration, its request extraction and its reading of the syncer's answers, the
# sale-event decoder and the admin API's bodies (fuzz/fuzz_targets/). Each target runs for a
# fixed number of executions, within a time limit, starting from its committed seed corpus
# (fuzz/corpus/<target>/, copied into fuzz/work/, where the corpus grows between runs). Exits
# non-zero if any target crashes (a panic, a broken invariant, an allocation over the limit, an
# input slower than the timeout) or does not build; the input is kept in fuzz/artifacts/.
#
#   bash scripts/fuzz.sh [RUNS] [--record] [TARGET...]
#
# RUNS: executions per target (default 200000). Per target at most SECKILL_FUZZ_MAX_TIME_S
# seconds (default 900). --record writes the summary into BENCHMARKS.md's fuzz section.
# Not part of CI (scripts/test.sh): it takes minutes per target on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RUNS=200000
RECORD=0
TARGETS=()
for arg in "$@"; do
    case "$arg" in
        --record) RECORD=1 ;;
        ''|*[!0-9]*) TARGETS+=("$arg") ;;
        *) RUNS="$arg" ;;
    esac
done
MAX_TIME_S="${SECKILL_FUZZ_MAX_TIME_S:-900}"
# What counts as a finding besides a panic: one input slower than this, one allocation larger
# than this (the inputs are at most a few KB; nothing the parsers do needs megabytes).
INPUT_TIMEOUT_S=10
MALLOC_LIMIT_MB=256
# The cargo fuzz this script was written against; installed once, reused after.
CARGO_FUZZ_VERSION=0.13.2

# libFuzzer itself is C++, built by the libfuzzer-sys crate (scripts/setup.sh installs one).
if ! command -v c++ >/dev/null; then
    echo "fuzz.sh needs a C++ compiler: run scripts/setup.sh (or apt-get install build-essential)" >&2
    exit 1
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

if [ ${#TARGETS[@]} -eq 0 ]; then
    mapfile -t TARGETS < <(cargo +nightly fuzz list --fuzz-dir fuzz)
fi

LOGS="fuzz/work/logs"
mkdir -p "$LOGS"
declare -A EXECUTIONS RESULT
failed=0
for target in "${TARGETS[@]}"; do
    echo "== $target: $RUNS executions, at most $MAX_TIME_S s"
    corpus="fuzz/work/corpus/$target"
    mkdir -p "$corpus"
    log="$LOGS/$target.log"
    # The work corpus first: libFuzzer adds the inputs it finds to the first directory only, so
    # the committed seeds stay as they are.
    status=0
    cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$corpus" "fuzz/corpus/$target" -- \
        -runs="$RUNS" -max_total_time="$MAX_TIME_S" -timeout="$INPUT_TIMEOUT_S" \
        -malloc_limit_mb="$MALLOC_LIMIT_MB" -dict="fuzz/dict/$target.dict" \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    # libFuzzer's final statistics name the executions it made, crash or not.
    executions="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    EXECUTIONS[$target]="${executions:-0}"
    if [ "$status" -eq 0 ]; then
        if [ "${executions:-0}" -ge "$RUNS" ]; then
            RESULT[$target]="ok"
        else
            RESULT[$target]="ok (time limit reached first)"
        fi
    else
        failed=1
        artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
        if [ -n "$artifact" ]; then
            RESULT[$target]="CRASH: $artifact"
        elif grep -q '^error' "$log"; then
            RESULT[$target]="BUILD FAILED"
        else
            RESULT[$target]="FAILED (exit $status)"
        fi
        tail -n 40 "$log"
    fi
    echo "   ${EXECUTIONS[$target]} executions: ${RESULT[$target]} (log: $log)"
done

table="| target | executions | result |
|---|---|---|"
for target in "${TARGETS[@]}"; do
    table+="
| \`$target\` | ${EXECUTIONS[$target]} | ${RESULT[$target]} |"
done
echo
echo "$table"

if [ "$RECORD" -eq 1 ]; then
    section="<!-- fuzz:begin -->
## Fuzzing: every parser of untrusted input

Command: \`bash scripts/fuzz.sh $RUNS --record\` (cargo fuzz $(cargo fuzz --version | awk '{print $2}'), libFuzzer with
AddressSanitizer, $(rustc +nightly --version | awk '{print $1, $2}'); at most $MAX_TIME_S s per target, an input slower than
$INPUT_TIMEOUT_S s or an allocation over $MALLOC_LIMIT_MB MB counts as a crash), $(date -u +%Y-%m-%d), this machine (2 cores).

$table
<!-- fuzz:end -->"
    SECTION="$section" perl -0pi -e 's/<!-- fuzz:begin -->.*?<!-- fuzz:end -->/$ENV{SECTION}/s' BENCHMARKS.md
    echo "BENCHMARKS.md: fuzz section rewritten"
fi
exit "$failed"
