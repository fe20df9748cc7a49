#!/usr/bin/env bash
# Lint, type-check and run the test suite in VENV (default .venv). Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/ruff" check src tests bench scripts config embedding_start.py || exit 1
"$VENV/bin/mypy" || exit 1
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  rc=0
fi
exit "$rc"
