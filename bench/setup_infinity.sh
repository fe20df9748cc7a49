#!/usr/bin/env bash
# Build the Infinity peer in its OWN venv (its pins clash with ours: transformers<4.58, no torchvision).
# Usage: bench/setup_infinity.sh [VENV_DIR]   (default /tmp/v-infinity). Idempotent.
set -euo pipefail
VENV=${1:-/tmp/v-infinity}
PY=${PYTHON:-python3.11}
if [ -x "$VENV/bin/infinity_emb" ]; then echo "infinity already in $VENV"; exit 0; fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch==2.13.0: the same build as the main venv (CPU wheel where one is on the find-links path).
# The extras it needs to serve text embeddings; [all] also pulls colpali-engine, whose releases pin either
# torch<2.12 or transformers>=5.3, so with our torch and transformers<4.58 [all] cannot resolve.
"$VENV/bin/pip" install "infinity-emb[server,torch,einops,logging]==0.0.78" "transformers>=4.51,<4.58" \
    "torch==2.13.0" "sentence-transformers<5"
# torchvision (pulled by [all]) is built for another torch and breaks the import of transformers.
"$VENV/bin/pip" uninstall -y torchvision || true
"$VENV/bin/python" -c "import infinity_emb, torch, transformers; print('infinity', infinity_emb.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
