#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on the device machine, whose image (Python 3.12, torch, transformers,
# sentence-transformers, aiohttp, numpy, ...) lacks the web stack: downloaded into .whl/ (git-ignored), at the
# versions this checkout's venv runs. Then, on the device (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
pkgs=()
for name in fastapi starlette uvicorn httptools pydantic pydantic-core pydantic-settings python-dotenv orjson \
            annotated-types typing-inspection fastapi-offline; do
  pkgs+=("$name==$("$PY" -c "from importlib.metadata import version; print(version('$name'))")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pkgs[@]}"
ls .whl
