#!/usr/bin/env bash
# Profile our server under load with py-spy (pip install py-spy).
# Usage: bench/studies/profile_server.sh OUT_PREFIX WORKLOAD [serve flags...]
#   e.g. bench/studies/profile_server.sh /tmp/prof-fake short-c64 --engine fake
#        bench/studies/profile_server.sh /tmp/prof-minilm short-c16 --demo --engine torch
# Writes OUT_PREFIX.raw (py-spy collapsed stacks, per thread; feed to flamegraph.pl or speedscope) and
# OUT_PREFIX.txt: samples per thread, then the top functions by own and by inclusive time.
set -euo pipefail
OUT=$1; WORK=$2; shift 2
PY=${PYTHON:-python}
PYSPY=${PYSPY:-$(dirname "$(command -v "$PY")")/py-spy}
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$PY" -m embedding_service serve --host 127.0.0.1 --port "$PORT" --served-model-name bench-model "$@" \
    > "$OUT.server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1
done
DUR=${DURATION:-10}
"$PYSPY" record -p "$SERVER" -d $((DUR + 3)) -r 100 -f raw -o "$OUT.raw" --nonblocking --threads \
    >"$OUT.pyspy.log" 2>&1 &
SPY=$!
"$PY" -m bench --url "http://127.0.0.1:$PORT/v1/embeddings" --model-name bench-model --workloads "$WORK" \
    --duration "$DUR" --out "$OUT.bench" ${BENCH_ARGS:-} | grep -E "texts/s" | head -3
wait $SPY || true
# Samples per thread, own time (leaf frame) and inclusive time per function.
"$PY" - "$OUT.raw" > "$OUT.txt" <<'PYEOF'
import collections, sys
own, incl, threads, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, _, count = line.rstrip().rpartition(" ")
    if not stack:
        continue
    n = int(count); total += n
    frames = stack.split(";")
    threads[frames[0]] += n
    own[frames[-1]] += n
    for frame in set(frames[1:]):
        incl[frame] += n
print(f"{total} samples (idle excluded)")
for name, n in threads.most_common():
    print(f"{100 * n / total:5.1f}%  thread {name}")
print("-- own time")
for frame, n in own.most_common(20):
    print(f"{100 * n / total:5.1f}%  {frame}")
print("-- inclusive time")
for frame, n in incl.most_common(40):
    print(f"{100 * n / total:5.1f}%  {frame}")
PYEOF
cat "$OUT.txt"
