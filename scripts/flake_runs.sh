#!/usr/bin/env bash
# Run each named test RUNS times, the tests' loops side by side (each loads the others), with BURN busy shell
# loops beside them, and report passes, seconds and the load average per test. Issue 37's flake reports
# (bench/RESULTS.md, "Flaky spots: 50 runs each") were these loops, run as:
#   BURN=2 scripts/flake_runs.sh 50 tests/test_resilience_server.py::test_overload_refuses_cleanly_and_keeps_accepted_latency \
#       tests/test_resilience_server.py::test_sigterm_drains_accepted_requests_and_exits_zero \
#       tests/test_bulk_resume.py::test_killed_at_random_moments_then_rerun_gives_the_same_bytes
# Logs: $OUT (default /tmp/flake-runs)/<n>-<run>.log; a failed run's log keeps its assertion.
set -uo pipefail
RUNS=$1; shift
OUT=${OUT:-/tmp/flake-runs}; BURN=${BURN:-0}; PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"; rm -f "$OUT"/*.rc "$OUT"/*.log "$OUT"/done
cd "$(dirname "$0")/.."
for _ in $(seq 1 "$BURN"); do ( while [ ! -e "$OUT/done" ]; do :; done ) & done
loop() {  # index test-id
  for run in $(seq 1 "$RUNS"); do
    started=$(date +%s)
    timeout 900 "$PY" -m pytest -q -p no:cacheprovider -s "$2" >"$OUT/$1-$run.log" 2>&1
    echo "$? $(( $(date +%s) - started )) $(cut -d' ' -f1 /proc/loadavg)" >>"$OUT/$1.rc"
  done
}
index=0; pids=()
for test in "$@"; do index=$((index + 1)); loop "$index" "$test" & pids+=($!); done
wait "${pids[@]}"
touch "$OUT/done"; wait
index=0
for test in "$@"; do
  index=$((index + 1))
  awk -v t="$test" '{n++; if ($1 == 0) ok++; s += $2; l += $3; if ($3 > m) m = $3}
    END {printf "%d of %d passed, %.0f s a run, load %.1f mean, %.1f max: %s\n", ok, n, s / n, l / n, m, t}' \
    "$OUT/$index.rc"
done
