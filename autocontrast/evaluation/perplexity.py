"""Per-exit perplexity, and the contrast's, on a text file (`acd-perplexity`).

The text is tokenized whole and cut into non-overlapping blocks of `block_size` tokens (the
remainder is dropped); inside a block every token after the first is predicted from the ones
before it, so a run scores `blocks * (block_size - 1)` tokens. Perplexity is
`exp(mean negative log-likelihood)` of those tokens, for each exit and for the contrast (whose
scores are a proper log-distribution: the plausible set's mass is redistributed, the rest keeps
the upper exit's probabilities).

Where the scores come from is a `Scorer`: anything that turns a batch of token blocks into the
log-probability of each next token under each named source. `TorchScorer` reads a PyTorch
multi-exit model; `BundleScorer` an export bundle, through the runtime's score graph (no torch
there; the contrast is then the runtime's NumPy one). A path holding a bundle manifest is a bundle.

>>> from autocontrast.evaluation.perplexity import perplexity_of_model
>>> report = perplexity_of_model("path/to/model", ["test.txt"], exits=(15, "original"),
...                              contrast=("original", 15))  # doctest: +SKIP
>>> report.perplexities["15"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from autocontrast.cli_support import command_parser, run_cli
from autocontrast.config import DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES, Exit, parse_exit, parse_exits
from autocontrast.errors import ConfigurationError, DataError


def exit_label(exit_: Exit) -> str:
    return str(exit_)


def contrast_label(upper: Exit, lower: Exit) -> str:
    return f"{upper}_vs_{lower}"


class Scorer(Protocol):
    """Next-token log-probabilities of a batch of blocks, under each named source (exit or contrast)."""

    labels: tuple[str, ...]

    def score(self, blocks: np.ndarray) -> dict[str, np.ndarray]:
        """blocks: (batch, block_size) int64 -> {label: (batch, block_size - 1) float64 log p(next token)}"""
        ...


@dataclasses.dataclass(frozen=True)
class PerplexityReport:
    """Perplexity per source over `tokens` predicted tokens (`blocks` blocks of `block_size`)."""

    tokens: int
    blocks: int
    block_size: int
    perplexities: dict[str, float]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def table(self) -> str:
        width = max(len(label) for label in self.perplexities)
        lines = [f"{'exit':<{width}}  perplexity   ({self.tokens:,} tokens, blocks of {self.block_size})"]
        lines += [f"{label:<{width}}  {value:10.3f}" for label, value in self.perplexities.items()]
        return "\n".join(lines)


def text_blocks(tokenizer: Any, paths: Sequence[str | Path], *, block_size: int,
                max_tokens: int | None = None) -> np.ndarray:
    """Token blocks of the text files, at most `max_tokens` tokens in all: -> (blocks, block_size) int64."""
    from autocontrast.models.training_data import chunk_tokens, read_text_files, tokenize_texts

    tokens = tokenize_texts(tokenizer, read_text_files(paths))
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    return chunk_tokens(tokens, block_size=block_size).numpy()


def perplexity(scorer: Scorer, blocks: np.ndarray, *, batch_size: int = 4) -> PerplexityReport:
    """Score the blocks batch by batch and turn the summed negative log-likelihoods into perplexities.

    blocks: (blocks, block_size) token ids
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise DataError("no blocks of text to score")
    nll = dict.fromkeys(scorer.labels, 0.0)
    count = 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start: start + batch_size]  # (batch, block_size)
        for label, log_probs in scorer.score(batch).items():
            nll[label] -= float(np.sum(log_probs, dtype=np.float64))
        count += batch.shape[0] * (batch.shape[1] - 1)
        print(f"\rscored {count:,} tokens", end="", file=sys.stderr)
    print(file=sys.stderr)
    return PerplexityReport(tokens=count, blocks=blocks.shape[0], block_size=blocks.shape[1],
                            perplexities={label: math.exp(total / count) for label, total in nll.items()})


class TorchScorer:
    """Scores with a PyTorch multi-exit model: each exit's logits (the model's own code path), and
    the contrast through `autocontrast.models.contrast`, the implementation generation uses."""

    def __init__(self, model: Any, exits: Sequence[Exit], *, contrast: tuple[Exit, Exit] | None = None,
                 alpha: float = DEFAULT_ALPHA, minimum_candidates: int = DEFAULT_MINIMUM_CANDIDATES) -> None:
        from autocontrast.config import check_exit_in_range
        from autocontrast.errors import UnknownExitError

        if model.family.is_encoder_decoder:
            raise ConfigurationError("perplexity of encoder-decoder (T5) models is not supported")
        if not model.multi_exit_config.use_original_head:  # then the forward's logits are not the head's
            raise ConfigurationError("score a model loaded with use_original_head=True (the default)")
        needed = tuple(dict.fromkeys(tuple(exits) + tuple(contrast or ())))
        available = set(model.available_exits)
        for exit_ in needed:
            check_exit_in_range(exit_, model.num_layers)
            if exit_ not in available:
                have = ", ".join(map(str, model.available_exits))
                raise UnknownExitError(f"exit {exit_!r} is not available; this model has exits: {have}")
        self.model, self.exits, self.needed, self.contrast = model, tuple(exits), needed, contrast
        self.alpha, self.minimum_candidates = alpha, minimum_candidates
        self.labels = tuple(exit_label(e) for e in self.exits) + (
            (contrast_label(*contrast),) if contrast else ())

    def score(self, blocks: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        from autocontrast.models.contrast import calculate_contrasted_logits

        model = self.model
        input_ids = torch.from_numpy(np.asarray(blocks, dtype=np.int64))  # (batch, block_size)
        targets = input_ids[:, 1:, None]  # (batch, block_size - 1, 1)
        with torch.no_grad():
            outputs = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
            # with use_original_head, outputs.logits are the model's own head's: (batch, block_size, vocab)
            def logits(exit_: Exit) -> torch.Tensor:  # one exit at a time: vocab-sized tensors are large
                return model.exit_logits((exit_,), outputs.logits, outputs.hidden_states)[exit_][:, :-1]

            scores = {}
            for exit_ in self.exits:
                log_probs = torch.log_softmax(logits(exit_).float(), dim=-1)  # (batch, block_size - 1, vocab)
                scores[exit_label(exit_)] = log_probs.gather(-1, targets)[..., 0].double().numpy()
                del log_probs
            if self.contrast:
                upper, lower = (logits(e) for e in self.contrast)
                contrasted = calculate_contrasted_logits(upper, lower, minimum_candidates=self.minimum_candidates,
                                                         alpha=self.alpha)  # (batch, block_size - 1, vocab)
                scores[contrast_label(*self.contrast)] = contrasted.gather(-1, targets)[..., 0].double().numpy()
        return scores  # label -> (batch, block_size - 1)


def load_torch_model(path: str | Path, *, projection: str = "auto") -> Any:
    """A multi-exit model for scoring: its projection mode detected from its weights unless given."""
    from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
    from autocontrast.export.checkpoint import detect_projection_mode
    from autocontrast.models.auto import AutoMultiExitModel

    if not Path(path, "config.json").is_file():
        raise DataError(f"{path} is not a model folder (it has no config.json)")
    mode = detect_projection_mode(str(path)) if projection == "auto" else VocabularyProjectionMode.parse(projection)
    return AutoMultiExitModel.from_pretrained(str(path), MultiExitConfiguration(vocab_projection_mode=mode))


class BundleScorer:
    """Scores with an export bundle's score graph through the runtime (no torch); the contrast with
    the runtime's NumPy implementation."""

    def __init__(self, bundle: str | Path, exits: Sequence[Exit] | None = None, *,
                 contrast: tuple[Exit, Exit] | None = None, alpha: float = DEFAULT_ALPHA,
                 minimum_candidates: int = DEFAULT_MINIMUM_CANDIDATES, provider: str = "cpu") -> None:
        from autocontrast.runtime import Generator

        self.generator = Generator(bundle, provider=provider)
        self.exits = tuple(exits or self.generator.manifest.exits)
        self.needed = tuple(dict.fromkeys(self.exits + tuple(contrast or ())))
        self.contrast, self.alpha, self.minimum_candidates = contrast, alpha, minimum_candidates
        self.labels = tuple(exit_label(e) for e in self.exits) + (
            (contrast_label(*contrast),) if contrast else ())
        self.generator.exit_logits_all_positions([[0, 0]], self.needed)  # a missing exit fails now, by name

    @property
    def tokenizer(self) -> Any:
        """The bundle's tokenizer behind the small interface `text_blocks` uses."""
        return _BundleTokenizer(self.generator.tokenizer, (self.generator.manifest.eos_token_ids or (None,))[0])

    def score(self, blocks: np.ndarray) -> dict[str, np.ndarray]:
        from autocontrast.config import MultiExitConfiguration
        from autocontrast.runtime.contrast import log_softmax
        from autocontrast.runtime.modes import mode_over_exits
        from autocontrast.runtime.session import StepOutput

        logits = np.stack(self.generator.exit_logits_all_positions(blocks.tolist(), self.needed))
        logits = logits[:, :-1]  # (batch, block_size - 1, n_exits, vocab)
        targets = np.asarray(blocks)[:, 1:, None]  # (batch, block_size - 1, 1)
        column = {e: i for i, e in enumerate(self.needed)}
        scores = {}
        for exit_ in self.exits:
            log_probs = log_softmax(logits[:, :, column[exit_]].astype(np.float64))
            scores[exit_label(exit_)] = np.take_along_axis(log_probs, targets, -1)[..., 0]
        if self.contrast:
            config = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=self.contrast,
                                            alpha=self.alpha, minimum_candidates=self.minimum_candidates)
            contrasted = mode_over_exits(config, self.needed).scores(StepOutput(logits, None))
            scores[contrast_label(*self.contrast)] = np.take_along_axis(contrasted, targets, -1)[..., 0].astype(
                np.float64)
        return scores  # label -> (batch, block_size - 1)


@dataclasses.dataclass(frozen=True)
class _BundleTokenizer:
    tokenizer: Any  # tokenizers.Tokenizer
    eos_token_id: int | None

    def __call__(self, text: str, *, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}


def is_bundle(path: str | Path) -> bool:
    from autocontrast.bundle import MANIFEST_FILE

    return Path(path, MANIFEST_FILE).is_file()


def perplexity_of_model(path: str | Path, data_files: Sequence[str | Path], *,
                        exits: Sequence[Exit] | None = None, contrast: tuple[Exit, Exit] | None = None,
                        projection: str = "auto", block_size: int = 256, batch_size: int = 2,
                        max_tokens: int | None = None, alpha: float = DEFAULT_ALPHA,
                        minimum_candidates: int = DEFAULT_MINIMUM_CANDIDATES, provider: str = "cpu",
                        ) -> PerplexityReport:
    """Perplexity of a PyTorch model folder's or an export bundle's exits (default: all it has) and
    of `contrast`, if given. `projection` applies to model folders, `provider` to bundles."""
    if is_bundle(path):
        scorer: Any = BundleScorer(path, exits, contrast=contrast, alpha=alpha,
                                   minimum_candidates=minimum_candidates, provider=provider)
        tokenizer = scorer.tokenizer
    else:
        from transformers import AutoTokenizer

        model = load_torch_model(path, projection=projection)
        scorer = TorchScorer(model, exits or model.available_exits, contrast=contrast, alpha=alpha,
                             minimum_candidates=minimum_candidates)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    blocks = text_blocks(tokenizer, data_files, block_size=block_size, max_tokens=max_tokens)
    return perplexity(scorer, blocks, batch_size=batch_size)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(prog="acd-perplexity",
                                     description="Per-exit perplexity (and of the contrast) of a multi-exit model.")
    parser.add_argument("model", help="a PyTorch model folder or an export bundle (scored by its score graph)")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE", help="text files to score")
    parser.add_argument("--exits", help="exits to score, e.g. 15,30,original (default: all the model has)")
    parser.add_argument("--contrast", help="upper,lower exits of a contrast to score too, e.g. original,15")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    parser.add_argument("--minimum-candidates", type=int, default=DEFAULT_MINIMUM_CANDIDATES)
    parser.add_argument("--projection", default="auto",
                        help="auto (from the weights), LAYER_SPECIFIC_PROJECTION, SHARED_PROJECTION_CAST_OUTPUTS "
                             "or SHARED_PROJECTION_DIRECT")
    parser.add_argument("--provider", default="cpu", help="bundles only: cpu, cuda or tensorrt")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    return parser


def parse_contrast(value: str | None) -> tuple[Exit, Exit] | None:
    if value is None:
        return None
    exits = parse_exits(value) or ()
    if len(exits) != 2:
        raise ConfigurationError(f"--contrast needs two exits, upper,lower (e.g. original,15), got {value!r}")
    return parse_exit(exits[0]), parse_exit(exits[1])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < args.block_size:
        raise ConfigurationError(f"--max-tokens ({args.max_tokens}) is less than one block ({args.block_size})")
    report = perplexity_of_model(args.model, args.data, exits=parse_exits(args.exits), contrast=parse_contrast(args.contrast),
                                 projection=args.projection, block_size=args.block_size, batch_size=args.batch_size,
                                 max_tokens=args.max_tokens, alpha=args.alpha,
                                 minimum_candidates=args.minimum_candidates, provider=args.provider)
    print(report.table())
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n", encoding="utf-8")
    return 0


def cli() -> int:
    return run_cli(main)
