#!/usr/bin/env bash
# Lint, type-check and run the test suite in VENV (default .venv). Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/ruff" check src tests bench scripts config embedding_start.py || exit 1
"$VENV/bin/mypy" || exit 1
# Two pytest processes, the in-process tests then the slow ones (real servers, real models): one process that
# has loaded torch, openvino, Ray's and the tokenizers' native threads for half an hour died once of a SIGSEGV
# with no Python frame to show (session 34); each half holds half of that state.
"$VENV/bin/python" -m pytest -m "not slow" "$@"
fast=$?
"$VENV/bin/python" -m pytest -m slow "$@"
slow=$?
for rc in "$fast" "$slow"; do
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
    exit "$rc"
  fi
done
if [ "$fast" -eq 5 ] && [ "$slow" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit 0
