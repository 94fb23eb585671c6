"""Teacher-forced token agreement of a bundle with the fp32 PyTorch model, on real text.

An export records agreement on three short built-in prompts (96 steps: a gate, 1 % per step);
this measures it where it matters, on passages of WikiText-2, with the same code
(`autocontrast.export.variants.teacher_forced_agreement`): both sides read the same prefix, the
bundle's token (its fused ACD contrast when it has one) is compared with PyTorch's, then both
take PyTorch's.

    python scripts/agreement.py MODEL_DIR BUNDLE [BUNDLE ...] [--passages 8] [--steps 32] [--text FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autocontrast.bench.cli import DEFAULT_TEXT
from autocontrast.cli_support import run_cli
from autocontrast.errors import ConfigurationError

PROMPT_WORDS = 40


def passages(text: Path, count: int) -> list[str]:
    """The first `count` paragraphs of at least 60 words (headings skipped), cut to their first 40 words."""
    try:
        lines = text.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigurationError(f"cannot read --text {text}: {err.strerror}") from None
    chosen = [" ".join(line.split()[:PROMPT_WORDS]) for line in lines
              if len(line.split()) >= 60 and not line.strip().startswith("=")][:count]
    if len(chosen) < count:
        raise ConfigurationError(f"{text} has only {len(chosen)} paragraphs of 60+ words; asked for {count}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agreement.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="the Hugging Face checkpoint directory the bundles were exported from")
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--passages", type=int, default=8)
    p.add_argument("--steps", type=int, default=32, help="teacher-forced steps per passage")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from autocontrast.bundle import read_manifest
    from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
    from autocontrast.export.variants import teacher_forced_agreement
    from autocontrast.models.auto import AutoMultiExitModel

    prompts = passages(args.text, args.passages)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    models = {}
    for bundle in args.bundles:
        manifest = read_manifest(bundle)
        if manifest.projection_mode not in models:
            mode = VocabularyProjectionMode.parse(manifest.projection_mode)
            models[manifest.projection_mode] = AutoMultiExitModel.from_pretrained(
                args.model, MultiExitConfiguration(vocab_projection_mode=mode), dtype="float32")
        model = models[manifest.projection_mode]
        result = teacher_forced_agreement(model, bundle, manifest.graphs, manifest.kv_cache, tokenizer=tokenizer,
                                          prompts=prompts, steps_per_prompt=args.steps)
        print(f"{bundle}: {result['agreed']}/{result['steps']} = {100 * result['rate']:.1f} % on "
              f"{result['measured_on']} ({len(prompts)} WikiText passages x {args.steps} steps)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
