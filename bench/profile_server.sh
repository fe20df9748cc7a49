#!/usr/bin/env bash
# Profile our server under load with py-spy (pip install py-spy).
# Usage: bench/profile_server.sh OUT_PREFIX WORKLOAD [serve flags...]
#   e.g. bench/profile_server.sh /tmp/prof-fake short-c64 --engine fake
#        bench/profile_server.sh /tmp/prof-minilm short-c16 --demo --engine torch
# Writes OUT_PREFIX.svg (flame graph) and OUT_PREFIX.txt (top functions by own time).
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
"$PYSPY" record -p "$SERVER" -d $((DUR + 3)) -r 200 -o "$OUT.svg" --nonblocking --threads >/dev/null 2>&1 &
SPY=$!
"$PYSPY" record -p "$SERVER" -d $((DUR + 3)) -r 200 -f raw -o "$OUT.raw" --nonblocking --native >/dev/null 2>&1 &
SPY2=$!
"$PY" -m bench --url "http://127.0.0.1:$PORT/v1/embeddings" --model-name bench-model --workloads "$WORK" \
    --duration "$DUR" --out "$OUT.bench" | grep -E "texts/s" | head -3
wait $SPY $SPY2 || true
# Own time per function (the leaf frame of each sample), top 25.
"$PY" - "$OUT.raw" > "$OUT.txt" <<'PYEOF'
import collections, sys
own, total = collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, _, count = line.rstrip().rpartition(" ")
    if not stack:
        continue
    n = int(count); total += n
    own[stack.split(";")[-1]] += n
for frame, n in own.most_common(25):
    print(f"{100 * n / total:5.1f}%  {frame}")
PYEOF
cat "$OUT.txt" | head -25
