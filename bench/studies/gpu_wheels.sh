#!/usr/bin/env bash
# The wheels bench/studies/gpu_check.py needs on the device machine, whose image (Python 3.12, torch, transformers,
# sentence-transformers, aiohttp, numpy, ...) lacks the web stack: downloaded into .whl/ (git-ignored), at the
# versions this checkout's venv runs; and the full-size Qwen3 shape's folder without its weights into .gpukit/
# (git-ignored; from bench/make_model.py's output). Then, on the device (carry .whl and .gpukit):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 -m bench.studies.gpu_check --out $OUT \
#     --kit .gpukit/qwen3-0.6b
set -euo pipefail
cd "$(dirname "$0")/../.."
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
model=${MODELS_DIR:-/tmp/bench-models}/qwen3-0.6b-random
grep -qx '/.gpukit/' "$exclude" || echo /.gpukit/ >> "$exclude"
[ -f "$model/config.json" ] || "$PY" bench/make_model.py --out "$(dirname "$model")"
mkdir -p .gpukit/qwen3-0.6b
for item in "$model"/*; do
  case "$(basename "$item")" in model.safetensors|BENCH_MODEL.json) ;; *) cp -r "$item" .gpukit/qwen3-0.6b/ ;; esac
done
du -sh .gpukit
