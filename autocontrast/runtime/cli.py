"""`acd-generate BUNDLE --prompt TEXT`: generate from an export bundle, streaming to the terminal.

    acd-generate smollm2-acd --prompt "The history of Paris" --mode contrast --exits 30,15
    acd-generate smollm2-acd --prompt "Tell me a joke" --chat --temperature 0.7 --top-p 0.9 --seed 1
"""

from __future__ import annotations

import argparse
import sys

from autocontrast.bundle import Manifest
from autocontrast.cli_support import command_parser, run_cli
from autocontrast.config import (
    DEFAULT_ALPHA,
    DEFAULT_MINIMUM_CANDIDATES,
    DEFAULT_RELATIVE_TOP,
    MODE_NAMES,
    MultiExitConfiguration,
    configuration_for_mode,
)
from autocontrast.errors import ConfigurationError
from autocontrast.runtime.generator import Generator
from autocontrast.runtime.modes import dola_candidates
from autocontrast.runtime.params import GenerationParams


def bundle_mode(manifest: Manifest, mode: str, exits: str | tuple | None, alpha: float | None,
                minimum_candidates: int | None, relative_top: float | None = None) -> MultiExitConfiguration:
    """The MultiExitConfiguration a command line asks for; without --exits, a contrast takes the bundle's fused
    contrast (its alpha and minimum candidates too, unless given) and DoLa the bundle's fused DoLa (its
    relative_top too, unless given), else every exported exit below the model's own head (of the decode graph
    that returns it). `None`: the default (or the fused contrast's or DoLa's)."""
    if mode == "contrast" and exits is None:
        fused = manifest.fused_contrast
        if fused is None:
            raise ConfigurationError("this bundle has no fused contrast: name the exits, e.g. --exits "
                                     f"{manifest.num_layers},{manifest.num_layers // 2}")
        exits = (fused.upper, fused.lower)
        alpha = fused.alpha if alpha is None else alpha
        minimum_candidates = fused.minimum_candidates if minimum_candidates is None else minimum_candidates
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    minimum_candidates = DEFAULT_MINIMUM_CANDIDATES if minimum_candidates is None else minimum_candidates
    if mode == "dola" and exits is None:
        exits = dola_candidates(manifest)
        if manifest.fused_dola is not None and relative_top is None:
            relative_top = manifest.fused_dola.relative_top
    relative_top = DEFAULT_RELATIVE_TOP if relative_top is None else relative_top
    return configuration_for_mode(mode, exits, alpha=alpha, minimum_candidates=minimum_candidates,
                                  relative_top=relative_top)


def add_mode_arguments(p: argparse.ArgumentParser, *, default: str = "contrast") -> None:
    """--mode, --exits, --alpha, --minimum-candidates, --relative-top, as acd-generate and acd-serve take them."""
    p.add_argument("--mode", choices=MODE_NAMES, default=default,
                   help=f"decode with the model's own head, one exit, the ACD contrast or DoLa (default {default})")
    p.add_argument("--exits", help="exit for --mode exit (15), UPPER,LOWER for contrast (default: the bundle's fused "
                                   "contrast), premature candidates for dola (default: every exported exit)")
    p.add_argument("--alpha", type=float, help=f"contrast plausibility threshold (default: the bundle's fused "
                                                 f"contrast's, else {DEFAULT_ALPHA})")
    p.add_argument("--minimum-candidates", type=int, help="contrast minimum candidates (default: the fused "
                                                          f"contrast's, else {DEFAULT_MINIMUM_CANDIDATES})")
    p.add_argument("--relative-top", type=float,
                   help="DoLa: keep tokens of at least this x the top probability (default: the bundle's fused "
                        f"DoLa's, else {DEFAULT_RELATIVE_TOP})")


def _parser() -> argparse.ArgumentParser:
    p = command_parser(prog="acd-generate", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + "\n".join(__doc__.strip().splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="export bundle directory (made by acd-export)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the bundle's chat template")
    add_mode_arguments(p)
    p.add_argument("--numpy-contrast", action="store_true", help="compute the contrast in NumPy even if fused")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--min-new-tokens", type=int, default=0, help="suppress end-of-sequence before this many tokens")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--provider", default="cpu", help="cpu (default), cuda or tensorrt")
    p.add_argument("--no-stream", action="store_true", help="print the whole text at the end")
    p.add_argument("--timings", action="store_true", help="print time to first token and ms/token to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    generator = Generator(args.bundle, provider=args.provider)
    multi_exit = bundle_mode(generator.manifest, args.mode, args.exits, args.alpha, args.minimum_candidates,
                             args.relative_top)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
                              stop_strings=tuple(args.stop), min_new_tokens=args.min_new_tokens,
                              ignore_eos=args.ignore_eos)
    kwargs = dict(multi_exit=multi_exit, chat=args.chat, fused_contrast=not args.numpy_contrast)
    if args.no_stream or args.timings:
        result = generator.generate(args.prompt, params, **kwargs)
        print(result.text)
        if args.timings:
            t = result.timings
            print(f"[{multi_exit.description}] time to first token {t.ttft_s * 1000:.1f} ms, "
                  f"{t.per_token_ms:.1f} ms/token over {len(result.token_ids[0])} tokens", file=sys.stderr)
        return 0
    for delta in generator.stream(args.prompt, params, **kwargs):
        print(delta, end="", flush=True)
    print()
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
