#!/usr/bin/env bash
# Build onnxruntime-genai model folders (fp32 and int4, CPU) of the converted SmolLM2 for acd-bench's
# genai peer (acd-bench --genai-model fp32=DIR --genai-model int4=DIR). See docs/peers.md.
#
# onnxruntime-genai's model builder (0.18.0) needs transformers >= 5, and autocontrast's environment pins
# transformers < 4.58 (optimum-onnx), so the builder runs in a throwaway virtual environment of its own.
# Running the built folders needs only `pip install onnxruntime-genai` beside autocontrast.
#
#   scripts/build_genai_models.sh            # folders land in $AUTOCONTRAST_CACHE/genai/smollm2-135m-instruct-{fp32,int4}
#   GENAI_VENV=/tmp/genai-venv PRECISIONS="int4" scripts/build_genai_models.sh
#   PRECISIONS=fp32 scripts/build_genai_models.sh /tmp/shapes/llama-3.2-1b   # any HF folder (acd-random-model's)
set -euo pipefail

CACHE=${AUTOCONTRAST_CACHE:-$HOME/.cache/autocontrast}
VENV=${GENAI_VENV:-$CACHE/genai-venv}
PRECISIONS=${PRECISIONS:-fp32 int4}
# torch only loads the HF weights; on a machine with no GPU, a CPU build of torch is enough
BUILDER_PACKAGES=${BUILDER_PACKAGES:-onnxruntime-genai==0.18.0 transformers>=5 onnx onnx-ir torch==2.13.0}
SOURCE=${1:-$CACHE/models/smollm2-135m-instruct}
NAME=$(basename "$SOURCE")

if [ ! -f "$SOURCE/config.json" ]; then
    if [ $# -gt 0 ]; then
        echo "$SOURCE is not a Hugging Face model folder (no config.json)" >&2
    else
        echo "no converted SmolLM2 at $SOURCE: run acd-prepare-smollm2 first (with the same AUTOCONTRAST_CACHE)" >&2
    fi
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    # shellcheck disable=SC2086  # the package list is split on purpose
    "$VENV/bin/python" -m pip install $BUILDER_PACKAGES
fi
for precision in $PRECISIONS; do
    out=$CACHE/genai/$NAME-$precision
    if [ -f "$out/genai_config.json" ]; then
        echo "$out exists"
        continue
    fi
    rm -rf "$out.partial"
    # offline: the builder reads the local folder and must not reach for a model hub
    HF_HUB_OFFLINE=1 "$VENV/bin/python" -m onnxruntime_genai.models.builder \
        -i "$SOURCE" -o "$out.partial" -p "$precision" -e cpu -c "$CACHE/genai/.builder-cache"
    mv "$out.partial" "$out"
    echo "built $out"
done
