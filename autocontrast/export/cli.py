"""`acd-export MODEL OUTPUT_DIR`: export a multi-exit model to a validated ONNX bundle.

>>> main(["path/to/SmolLM2", "bundle", "--exits", "30,15", "--fuse-contrast", "30,15"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys

from autocontrast.bundle import KV_LAYOUTS
from autocontrast.cli_support import command_parser, run_cli
from autocontrast.config import DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES, DEFAULT_RELATIVE_TOP, parse_exits
from autocontrast.errors import ExportError
from autocontrast.export.exporter import DECODE_GRAPHS
from autocontrast.export.variants import QUANTIZATIONS
from autocontrast.models.families import labels

DESCRIPTION = """\
Export a multi-exit language model (a local folder or a hub id) to a bundle that the torch-free
runtime runs: ONNX graphs with a KV cache, the tokenizer, and manifest.json.

The bundle holds these graphs, sharing one weights file:
  decode_original  the checkpoint's own head, last position only (plain decoding pays nothing extra)
  decode_exits     the chosen exits stacked, last position only, plus the fused contrast and DoLa if asked
  decode_exit_K    an early exit: only layers 1..K run (decoding with exit K alone costs ~K/L);
                   by default one per chosen exit below the top layer (--early-exits)
  score            every position's logits of every exit (perplexity, lm-eval log-likelihoods)
With exits (top layer or 'original', K) the first three are one switched file, decode.onnx:
boolean inputs pick which layers and exits run, and one session (one copy of the weights) serves
all three modes (--decode-graphs separate for three files).
Every graph is checked against PyTorch (a prefill and cached decode steps); an export that does
not match within tolerance fails and leaves nothing behind. So does one stopped by Ctrl-C, SIGTERM
or SIGHUP; what a killed export (SIGKILL) left beside OUTPUT, the next export to OUTPUT removes.
manifest.json records the SHA-256 of every file: `acd-verify OUTPUT` checks them.
"""

EXAMPLES = """\
examples:
  acd-export ~/models/SmolLM2-135M-Instruct smollm2-acd --exits 30,15 --fuse-contrast 30,15
  acd-export IBM/gpt2-medium-multiexit gpt2-acd --exits 24,12 --fuse-contrast 24,12 --alpha 0.1
  acd-export CAST_CHECKPOINT smollm2-dola --exits original,10,15,20 --fuse-contrast original,15 --fuse-dola 10,15,20
  acd-export ~/models/SmolLM2-135M-Instruct smollm2-int8 --exits 30,15 --fuse-contrast 30,15 --quantize int8
  acd-export ~/models/SmolLM2-135M-Instruct smollm2-int4 --exits 30,15 --fuse-contrast 30,15 --quantize int4
"""


def _pair(text: str) -> tuple:
    exits = parse_exits(text)
    if exits is None or len(exits) != 2:
        raise argparse.ArgumentTypeError(f"expected UPPER,LOWER (e.g. 30,15 or original,12), got {text!r}")
    return exits


def _early_exits(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers (e.g. 15 or 10,15) or 'none', got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = command_parser(prog="acd-export", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=f"checkpoint folder or hub id ({labels()})")
    p.add_argument("output", help="bundle directory to create (refused if it exists, unless --force); checked "
                                   "before the model loads")
    p.add_argument("--exits", type=parse_exits, default=None,
                   help="exits to export, e.g. 30,15 or original,12 (default: the checkpoint's "
                        "lm_head_layer_indices; a plain checkpoint: its top and middle layer)")
    p.add_argument("--projection", default=None,
                   help="vocabulary projection mode: SHARED_PROJECTION_DIRECT (works on any checkpoint), "
                        "LAYER_SPECIFIC_PROJECTION or SHARED_PROJECTION_CAST_OUTPUTS (need trained "
                        "heads/cast matrices); default: what the checkpoint has")
    p.add_argument("--fuse-contrast", type=_pair, default=None, metavar="UPPER,LOWER",
                   help="compute the ACD contrast of these exits inside decode_exits (output contrast_scores)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="plausibility threshold of the fused contrast")
    p.add_argument("--minimum-candidates", type=int, default=DEFAULT_MINIMUM_CANDIDATES,
                   help="minimum plausible candidates of the fused contrast")
    p.add_argument("--fuse-dola", type=parse_exits, default=None, metavar="K[,K...]",
                   help="compute DoLa of the model's own head against these premature candidate exits inside "
                        "decode_exits (output dola_scores; one candidate: fixed)")
    p.add_argument("--relative-top", type=float, default=DEFAULT_RELATIVE_TOP,
                   help=f"relative_top of the fused DoLa (default {DEFAULT_RELATIVE_TOP})")
    p.add_argument("--early-exits", type=_early_exits, default=None, metavar="K[,K...]|none",
                   help="exits that get an early-exit graph computing only their layers (default: the chosen "
                        "exits below the top layer, none when the exits are a checkpoint's own list)")
    p.add_argument("--kv-layout", choices=KV_LAYOUTS, default=None,
                   help="decode graphs' KV cache: buffer (GroupQueryAttention writing a preallocated buffer in "
                        "place, rows of any length; the default of the Llama family, CPU in float32, CUDA in "
                        "float16) or concat (traced attention concatenating past and new; every family, every "
                        "provider and dtype)")
    p.add_argument("--decode-graphs", choices=DECODE_GRAPHS, default=None,
                   help="one: decode_original, decode_exits and decode_exit_K as one switched graph (one copy of "
                        "the weights in memory; the default where the exits are the top layer and one lower "
                        "exit, float32, buffer KV layout); separate: a file each")
    p.add_argument("--no-score-graph", action="store_true", help="leave out the every-position score graph")
    p.add_argument("--mixed-step", action="store_true",
                   help="also a graph running decode_exits' step for a batch and a joining prompt's chunk in one pass "
                        "over the weights (acd-serve's chunked prefill uses it; buffer KV layout only)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="float16 halves the weights, for GPUs (inputs, outputs and KV cache stay float32)")
    p.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=None,
                   help="graph fusions (the architecture's set: for Llama-family models merged q/k/v and gate/up "
                        "MatMuls and skip-RMSNorm, on by default; for GPT-2 ONNX Runtime's GPT-2 optimizer, off by "
                        "default); --no-optimize exports the traced graph as it is")
    p.add_argument("--quantize", choices=tuple(QUANTIZATIONS), default=None,
                   help="weight quantization (MatMulNBits): int8 for CPUs, int4 for edge devices; token "
                        "agreement with fp32 is measured and recorded")
    p.add_argument("--quant-block-size", type=int, default=None, metavar="N",
                   help="weights per quantization block (a power of two >= 16; default 32): 16 stores twice the "
                        "scales and quantizes activations in finer blocks, closer to fp32 and slower")
    p.add_argument("--tensorrt", action="store_true",
                   help="also build TensorRT engines (needs a CUDA GPU, onnxruntime-gpu and TensorRT)")
    p.add_argument("--trt-max-batch", type=int, default=8, help="largest batch of the TensorRT profile")
    p.add_argument("--trt-max-length", type=int, default=2048, help="longest sequence of the TensorRT profile")
    p.add_argument("--force", action="store_true",
                   help="replace OUTPUT if it is an autocontrast bundle, once the new one is validated; "
                        "anything else there is refused and left untouched")
    p.add_argument("--no-memory-check", action="store_true",
                   help="export even when the estimated peak memory exceeds what is available (risking the OOM killer)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from autocontrast.export.exporter import ExportOptions, export_bundle

    if args.trt_max_batch < 1 or args.trt_max_length < 2:
        raise ExportError("--trt-max-batch must be >= 1 and --trt-max-length >= 2")
    options = ExportOptions(exits=args.exits, projection=args.projection, fuse_contrast=args.fuse_contrast,
                            alpha=args.alpha, minimum_candidates=args.minimum_candidates,
                            fuse_dola=args.fuse_dola, relative_top=args.relative_top, score_graph=not args.no_score_graph, dtype=args.dtype, optimize=args.optimize,
                            quantize=args.quantize, quant_block_size=args.quant_block_size, tensorrt=args.tensorrt,
                            trt_max_batch=args.trt_max_batch, trt_max_length=args.trt_max_length, early_exits=args.early_exits,
                            kv_layout=args.kv_layout, decode_graphs=args.decode_graphs,
                            memory_check=not args.no_memory_check, mixed_step=args.mixed_step)

    def log(message: str) -> None:
        if not args.quiet or message.startswith("exported") or message.startswith("  "):
            print(message, file=sys.stderr, flush=True)

    export_bundle(args.model, args.output, options=options, force=args.force, log=log)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
