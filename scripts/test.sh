#!/usr/bin/env bash
# Lint, type-check and run the test suite in VENV (default .venv). Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/ruff" check src tests bench scripts config embedding_start.py || exit 1
"$VENV/bin/mypy" || exit 1
# Three pytest processes: the in-process tests, then the slow ones (real servers, real models) in two halves by
# file. One process that had loaded torch, openvino, Ray's and the tokenizers' native threads for half an hour
# died once of a SIGSEGV with no Python frame to show (session 34); each part holds a part of that state.
# Arguments (files, -k, ...) go to every part; a part that collects nothing is not a failure.
first_half=() second_half=()
if [ "$#" -eq 0 ]; then
  for file in tests/test_*.py; do
    if [[ "$(basename "$file")" < "test_n" ]]; then first_half+=("$file"); else second_half+=("$file"); fi
  done
fi
failed=0 ran=0
run() {
  "$VENV/bin/python" -m pytest "$@"
  local rc=$?
  if [ "$rc" -eq 5 ]; then return; fi
  ran=1
  if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=$rc; fi
}
run -m "not slow" "$@"
if [ "$#" -eq 0 ]; then
  run -m slow "${first_half[@]}"
  run -m slow "${second_half[@]}"
else
  run -m slow "$@"
fi
if [ "$ran" -eq 0 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$failed"
