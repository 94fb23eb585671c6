#!/usr/bin/env bash
# Set up the environment and run the main job: prepare SmolLM2, export it, generate with ACD next to greedy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m autocontrast.demo "$@"
