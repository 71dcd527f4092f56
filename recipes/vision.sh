#!/usr/bin/env bash
# Vision results on the embedded digits: ViT mixing variants and CNN Patch Mixing vs CutMix over seeds.
# Writes docs/results/vision.md, docs/results/vision.json and docs/results/vision_occlusion.png.
#   bash recipes/vision.sh                       # SEEDS="0 1 2", recipe default epochs
#   EPOCHS=15 SEEDS="0 1 2" bash recipes/vision.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" recipes/vision_results.py "$@"
