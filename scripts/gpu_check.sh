#!/usr/bin/env bash
# Run the CUDA (and, where its libraries exist, TensorRT) path for real, on a GPU machine with no
# network, from the parts scripts/gpu_prepare.sh made: reassemble and verify them, install the
# wheels, export SmolLM2 in fp32 and fp16, run the `gpu`-marked tests, and benchmark CPU vs CUDA,
# fp32 vs fp16, ACD vs greedy.
#
#   bash scripts/gpu_check.sh --status DIR    which parts are here and intact (exit 0 all, 3 some missing, 4 corrupt)
#   bash scripts/gpu_check.sh --dry-run DIR   verify, reassemble and unpack only (needs no GPU; the tests run this)
#   bash scripts/gpu_check.sh DIR             everything
#
# Every step has a time limit and the whole run a deadline; a failed step is recorded and the run
# goes on (steps that need it are skipped, saying so). Results are written as they come, into
# $ACD_GPU_OUT (default $OUT, else gpu-results), as at most 8 files (what a device call brings back):
#   log.txt              everything printed, step by step
#   steps.tsv            step, status, exit code, note (seconds, or why skipped)
#   env.txt              nvidia-smi, python and package versions, CUDA library folders, TensorRT
#   pytest.txt           pytest -m gpu
#   bench-cpu-cuda.json  acd-bench, fp32, providers cpu,cuda(,tensorrt), greedy vs ACD
#   bench-fp16.json      acd-bench on CUDA, fp32 vs fp16
#   probe.json           onnxruntime build and providers; SmolLM2 on CUDA: KV cache device, tokens vs CPU
#   summary.md           the tables for the README (rewritten after every step)
#
# Environment: ACD_GPU_OUT, ACD_GPU_DEADLINE_S (default 480: seconds for the whole run),
#   ACD_GPU_PYTHON (default python3: the image's, with CUDA torch), ACD_GPU_SCENARIOS (acd-bench,
#   default 16x64x1,512x64x1,16x64x8), ACD_GPU_REPEATS (default 3), ACD_GPU_SYSTEMS (default
#   ours-original,ours-acd-fused), ACD_GPU_TENSORRT (auto | 0 | 1; auto: where libnvinfer.so.10 loads).
# Kept between calls while the machine stays warm (all under DIR, git-ignored): the unpacked payload,
# the installed wheels (DIR/site), the converted model (DIR/cache), the exports (DIR/work).
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
REPO=$(dirname "$(dirname "$SELF")")

usage() { sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 2; }

MODE=check
case "${1:-}" in
    --status) MODE=status; shift ;;
    --dry-run) MODE=dry-run; shift ;;
    --_step) MODE=step; STEP_NAME=${2:?}; shift 2 ;;
    ""|-*) usage ;;
esac
[[ $# -ge 1 && -d "$1" ]] || { echo "gpu_check: give the folder holding the parts (e.g. gpu-wheels)" >&2; exit 2; }
DIR=$(cd "$1" && pwd)  # paths are taken from where the script was started, then it works from the repository
RES=${ACD_GPU_OUT:-${OUT:-$REPO/gpu-results}}
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
export ACD_GPU_OUT=$RES
cd "$REPO" || exit 2
DIR_REL=${DIR#"$REPO"/}
WORK=$DIR/work
PY=${ACD_GPU_PYTHON:-python3}
LOG=$RES/log.txt
STEPS=$RES/steps.tsv

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# -- parts ------------------------------------------------------------------------------------

whole_sha() { awk '$2 == "payload.tar" {print $1}' "$DIR/SHA256SUMS"; }

verify_parts() {  # 0: every part here and intact; 3: some missing; 4: one corrupt, or no SHA256SUMS
    local want name got missing=() bad=()
    if [[ ! -f "$DIR/SHA256SUMS" ]]; then
        echo "no $DIR_REL/SHA256SUMS: carry it with every part (scripts/gpu_prepare.sh writes it)"
        return 4
    fi
    while read -r want name; do
        [[ "$name" == payload.tar ]] && continue
        if [[ ! -f "$DIR/$name" ]]; then missing+=("$name"); continue; fi
        got=$(sha256sum "$DIR/$name" | cut -d' ' -f1)
        if [[ "$got" != "$want" ]]; then
            bad+=("$name")
            echo "CORRUPT $name: sha256 $got, expected $want; carry $DIR_REL/$name again"
        else
            echo "ok      $name"
        fi
    done < "$DIR/SHA256SUMS"
    for name in "${missing[@]}"; do echo "MISSING $name: carry $DIR_REL/$name"; done
    if (( ${#bad[@]} )); then return 4; fi
    if (( ${#missing[@]} )); then return 3; fi
    echo "all $(grep -c 'part-' "$DIR/SHA256SUMS") parts are here and intact"
}

assemble() {  # verify, reassemble, check the whole, unpack into DIR/payload (skipped when already done)
    local want got rc
    [[ -f "$DIR/SHA256SUMS" ]] || { verify_parts; return $?; }
    want=$(whole_sha)
    if [[ -f "$DIR/payload/.sha256" && "$(cat "$DIR/payload/.sha256")" == "$want" ]]; then
        echo "payload already unpacked (sha256 $want)"
        return 0
    fi
    verify_parts; rc=$?
    (( rc == 0 )) || return "$rc"
    awk '$2 ~ /^payload\.tar\.part-/ {print $2}' "$DIR/SHA256SUMS" | sort \
        | while read -r name; do cat "$DIR/$name"; done > "$DIR/payload.tar"
    got=$(sha256sum "$DIR/payload.tar" | cut -d' ' -f1)
    if [[ "$got" != "$want" ]]; then
        rm -f "$DIR/payload.tar"
        echo "REFUSED: the reassembled payload.tar has sha256 $got, expected $want;" \
             "the parts are not from one gpu_prepare.sh run: carry them all again"
        return 4
    fi
    rm -rf "$DIR/payload"
    tar -C "$DIR" -xf "$DIR/payload.tar" && rm -f "$DIR/payload.tar" || return 4
    echo "$want" > "$DIR/payload/.sha256"
    echo "payload unpacked:" "$DIR"/payload/wheels/*
}

# -- environment ------------------------------------------------------------------------------

cuda_lib_dirs() {  # the CUDA/cuDNN libraries the image's torch ships (pip nvidia-* packages), ':'-joined
    env -u PYTHONPATH "$PY" - <<'EOF' 2>/dev/null
import glob, importlib.util, os
dirs = []
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations if spec else []):
    dirs += sorted(glob.glob(os.path.join(root, "*", "lib")))  # nvidia/cu13/lib, nvidia/cudnn/lib, ...
spec = importlib.util.find_spec("torch")
if spec and spec.origin:
    dirs.append(os.path.join(os.path.dirname(spec.origin), "lib"))
print(":".join(d for d in dirs if os.path.isdir(d)))
EOF
}

tensorrt_lib() {  # where libnvinfer.so.10 is, or nothing
    local d
    for d in ${LD_LIBRARY_PATH//:/ }; do [[ -e "$d/libnvinfer.so.10" ]] && { echo "$d/libnvinfer.so.10"; return; }; done
    ldconfig -p 2>/dev/null | awk '/libnvinfer\.so\.10 / {print $NF; exit}'
}

setup_env() {
    local libs
    if [[ -z "${ACD_GPU_ENV_READY:-}" ]]; then  # steps inherit it from the run
        libs=$(cuda_lib_dirs)
        export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ACD_GPU_ENV_READY=1
    fi
    export PYTHONPATH="$DIR/site:$REPO"
    export AUTOCONTRAST_CACHE=$DIR/cache
    export PYTHONUNBUFFERED=1
    PROVIDERS=cpu,cuda
    TRT_LIB=$(tensorrt_lib)
    case "${ACD_GPU_TENSORRT:-auto}" in
        1) PROVIDERS=cpu,cuda,tensorrt ;;
        auto) [[ -n "$TRT_LIB" ]] && PROVIDERS=cpu,cuda,tensorrt ;;
    esac
    export PROVIDERS TRT_LIB
}

step_env() {
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -n)  kernel: $(uname -r)"
        echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
        echo; echo "## nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi failed"
        echo; echo "## nvidia-smi --query-gpu"
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
        echo; echo "## image packages (before ours)"
        env -u PYTHONPATH "$PY" -m pip list 2>/dev/null \
            | grep -iE '^(torch|numpy|onnx|onnxruntime|onnxruntime-gpu|onnxscript|onnx-ir|tokenizers|transformers|optimum|accelerate|huggingface.hub|nvidia-[a-z-]*|tensorrt[a-z0-9_-]*) '
        echo; echo "## CUDA library folders put on LD_LIBRARY_PATH"; echo "${LD_LIBRARY_PATH//:/$'\n'}"
        echo; echo "## TensorRT: ${TRT_LIB:-libnvinfer.so.10 not found (tensorrt is left out)}; providers benchmarked: $PROVIDERS"
    } > "$RES/env.txt" 2>&1
    cat "$RES/env.txt"
}

step_install() {
    local want
    want=$(cat "$DIR/payload/.sha256")
    if [[ -f "$DIR/site/.sha256" && "$(cat "$DIR/site/.sha256")" == "$want" ]]; then
        echo "wheels already installed in $DIR_REL/site"
        return 0
    fi
    rm -rf "$DIR/site"
    env -u PYTHONPATH "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$DIR/site" \
        "$DIR"/payload/wheels/*.whl || return 1
    echo "$want" > "$DIR/site/.sha256"
    ls "$DIR/site"
}

step_model() {
    "$PY" -m autocontrast.models.smollm2 > "$WORK/model-path" || return 1
    cat "$WORK/model-path"
}

step_export() {  # step_export float32|float16
    local dtype=$1 out=$WORK/smollm2-${1/float/fp} layout=()
    if [[ -f "$out/manifest.json" ]]; then echo "$out exists (exported earlier)"; return 0; fi
    # GroupQueryAttention (the default KV buffer) has CUDA kernels in float16 only: fp32 keeps the concat cache
    [[ $dtype == float32 ]] && layout=(--kv-layout concat)
    "$PY" -m autocontrast.export.cli "$(cat "$WORK/model-path")" "$out" --exits 30,15 --fuse-contrast 30,15 \
        --no-score-graph --dtype "$dtype" "${layout[@]}"
}

step_pytest() {
    local rc
    "$PY" -m pytest -m gpu tests/runtime tests/export tests/bench -rA -v -p no:cacheprovider \
        --continue-on-collection-errors 2>&1 | tee "$RES/pytest.txt"
    rc=${PIPESTATUS[0]}
    # On a GPU machine a skipped CUDA test means the CUDA path did not run: a failure for this check.
    if grep -q '^SKIPPED .*test_cuda\.py' "$RES/pytest.txt"; then
        echo "the CUDA tests were skipped (reasons above): the CUDA path did not run"
        return 1
    fi
    return "$rc"
}

step_bench() {  # step_bench cpu-cuda|fp16
    local name=$1 args out=$WORK/bench-$1
    if [[ "$name" == cpu-cuda ]]; then
        args=(--providers "$PROVIDERS" --baseline ours-original)
    else
        args=(--fp16-bundle "$WORK/smollm2-fp16" --providers cuda --baseline ours-original-fp32-cuda)
    fi
    "$PY" -m autocontrast.bench.cli --bundle "$WORK/smollm2-fp32" "${args[@]}" \
        --systems "${ACD_GPU_SYSTEMS:-ours-original,ours-acd-fused}" \
        --scenarios "${ACD_GPU_SCENARIOS:-16x64x1,512x64x1,16x64x8}" --repeats "${ACD_GPU_REPEATS:-3}" --warmup 1 \
        --text "$DIR/payload/text/test.txt" --out "$out" --timeout 240 || return 1
    cp "$out/results.json" "$RES/bench-$name.json"
    # A system that could not load is in the table as skipped; for this check that is a failure.
    "$PY" - "$RES/bench-$name.json" <<'EOF'
import json, sys
skipped = {name: entry["skipped"] for s in json.load(open(sys.argv[1]))["scenarios"]
           for name, entry in s["systems"].items() if "skipped" in entry}
for name, why in skipped.items():
    print(f"SKIPPED {name}: {why}")
sys.exit(1 if skipped else 0)
EOF
}

step_probe() {
    local fp16=()
    [[ -f "$WORK/smollm2-fp16/manifest.json" ]] && fp16=(--fp16 "$WORK/smollm2-fp16")
    "$PY" scripts/gpu_probe.py smollm2 --fp32 "$WORK/smollm2-fp32" "${fp16[@]}" \
        --text "$DIR/payload/text/test.txt" --json "$RES/probe.json"
}

# -- the run ----------------------------------------------------------------------------------

passed() { local s; for s in "$@"; do grep -q "^$s"$'\t'"ok"$'\t' "$STEPS" 2>/dev/null || return 1; done; }

summarise() { "$PY" scripts/gpu_summary.py "$RES" > /dev/null 2>> "$LOG" || true; }

step() {  # step NAME LIMIT_S "NEEDED STEPS" COMMAND...: run it under a time limit, log and record it
    local name=$1 limit=$2 needs=$3 left started rc status note=""
    shift 3
    left=$((DEADLINE - $(date +%s) - 20))  # 20 s kept for the summary
    # shellcheck disable=SC2086  # NEEDED STEPS is a list of words
    if ! passed $needs; then
        status=skipped; rc=0; note="needs: $needs"
    elif (( left < 15 )); then
        status=skipped; rc=0; note="out of time (ACD_GPU_DEADLINE_S=$DEADLINE_S)"
    else
        (( limit > left )) && limit=$left
        say "== $name (limit ${limit} s)"
        started=$(date +%s)
        timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
        note="$(( $(date +%s) - started )) s"
        if (( rc == 0 )); then status=ok; elif (( rc == 124 || rc == 137 )); then status=timeout; else status=failed; fi
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$note" >> "$STEPS"
    say "-- $name: $status ${note}"
    summarise
}

case "$MODE" in
    status)
        verify_parts; rc=$?
        command -v nvidia-smi > /dev/null && nvidia-smi -L
        exit "$rc" ;;
    dry-run)
        assemble; exit $? ;;
    step)
        setup_env
        case "$STEP_NAME" in
            env) step_env ;; parts) assemble ;; install) step_install ;; model) step_model ;;
            export-fp32) step_export float32 ;; export-fp16) step_export float16 ;;
            pytest-gpu) step_pytest ;; bench-cpu-cuda) step_bench cpu-cuda ;; bench-fp16) step_bench fp16 ;;
            probe) step_probe ;; *) echo "unknown step $STEP_NAME" >&2; exit 2 ;;
        esac
        exit $? ;;
esac

DEADLINE_S=${ACD_GPU_DEADLINE_S:-480}
DEADLINE=$(( $(date +%s) + DEADLINE_S ))
mkdir -p "$WORK"
: > "$LOG"
printf 'step\tstatus\texit\tnote\n' > "$STEPS"
setup_env
say "results in $RES; deadline ${DEADLINE_S} s; providers $PROVIDERS"
run() { step "$1" "$2" "$3" bash "$SELF" --_step "$1" "$DIR"; }
run env 60 ""
run parts 120 ""
run install 180 "parts"
run model 240 "install"
run export-fp32 300 "model"
run pytest-gpu 300 "install"
run bench-cpu-cuda 300 "export-fp32"
run export-fp16 300 "model"
run bench-fp16 240 "export-fp32 export-fp16"
run probe 120 "export-fp32"
say "done: $(awk -F'\t' 'NR > 1 {printf "%s=%s ", $1, $2}' "$STEPS")"
summarise
awk -F'\t' 'NR > 1 && $2 != "ok" {bad = 1} END {exit bad}' "$STEPS"
