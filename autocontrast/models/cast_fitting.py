"""Fit layer-to-top cast matrices by least squares (`acd-fit-cast`; Din et al. 2023).

In `SHARED_PROJECTION_CAST_OUTPUTS` mode an intermediate exit k is read as
`lm_head(C_k · norm(h_k))` (see `MultiExitMixin.exit_hidden`): the final norm is applied to the
layer's output, then the cast matrix, then the model's own head. So the cast matrix is fitted to
map what the head would receive at layer k onto what it does receive at the top layer:

    minimise_C  || norm(h_k) C^T - top(h_L) ||_F        (no intercept; torch.linalg.lstsq, float64)

where `top(h_L)` is the top layer's recorded output as the head sees it (HF has already applied the
final norm to it), exactly the pair of vectors the original library's `train_conv_matrices.py`
regresses. Unlike the original, which samples the positions of a few greedily generated tokens per
prompt, the vectors here are every position of fixed-length blocks of the given text.

>>> from autocontrast.models.cast_fitting import fit_cast_matrices
>>> fit_cast_matrices("path/to/model", "cast/", layers=(15,), data_files=["valid.txt"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autocontrast.cli_support import command_parser, run_cli
from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.errors import ConfigurationError, DataError
from autocontrast.models.multi_exit import CASTS, MultiExitMixin, cast_matrix_name
from autocontrast.models.training import parse_layers
from autocontrast.models.training_data import chunk_tokens, read_text_files, tokenize_texts

REPORT_FILE = "cast_fit.json"


@dataclasses.dataclass(frozen=True)
class CastFit:
    """One fitted matrix and how well it reconstructs the top layer's head input (relative error
    ||X C^T - Y|| / ||Y||), against the direct projection (C = identity) on the same vectors."""

    layer: int
    weight: torch.Tensor  # (hidden, hidden): nn.Linear weight C, applied as x C^T
    cast_error: float
    direct_error: float


def collect_layer_outputs(model: MultiExitMixin, blocks: torch.Tensor, layers: Sequence[int], *,
                          batch_size: int = 4, max_vectors: int | None = None,
                          ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The head inputs of each layer's exit (final norm applied, no cast) and of the top layer.

    blocks: (blocks, block_size) token ids -> ({layer: (vectors, hidden)}, (vectors, hidden))
    """
    family, top = model.family, model.num_layers
    inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    targets: list[torch.Tensor] = []
    limit = max_vectors or blocks.numel()
    collected = 0
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            if collected >= limit:
                break
            batch = blocks[start: start + batch_size]  # (batch, block_size)
            kwargs = {"decoder_input_ids": batch} if family.is_encoder_decoder else {}
            # the body alone: its hidden states are the multi-exit model's, without the vocabulary products of
            # every position (for SmolLM2 those cost several times the layers)
            outputs = model.base_model(input_ids=batch, output_hidden_states=True, **kwargs)
            hidden = outputs.decoder_hidden_states if family.is_encoder_decoder else outputs.hidden_states
            take = min(batch.numel(), limit - collected)
            for layer in layers:
                x = family.normalize(model, hidden[layer], is_last_layer=False)  # (batch, block, hidden)
                inputs[layer].append(x.reshape(-1, x.shape[-1])[:take].float())
            y = family.normalize(model, hidden[top], is_last_layer=True)
            targets.append(y.reshape(-1, y.shape[-1])[:take].float())
            collected += take
            print(f"\rcollected {collected:,}/{limit:,} vectors", end="", file=sys.stderr)
    print(file=sys.stderr)
    return {layer: torch.cat(xs) for layer, xs in inputs.items()}, torch.cat(targets)


def fit_cast_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The least-squares C of `x C^T ≈ y`, without intercept, solved in float64.

    x, y: (vectors, hidden) -> (hidden, hidden), the weight of an `nn.Linear(hidden, hidden, bias=False)`
    """
    if x.shape[0] < x.shape[1]:
        raise DataError(f"{x.shape[0]} vectors cannot determine a {x.shape[1]}x{x.shape[1]} cast matrix; "
                        f"give at least {x.shape[1]} tokens of text (more is better)")
    solution = torch.linalg.lstsq(x.double(), y.double(), driver="gelsd").solution  # (hidden, hidden) = C^T
    return solution.T.contiguous().float()


def relative_error(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """||prediction - target||_F / ||target||_F."""
    return float(torch.linalg.norm((prediction - target).double()) / torch.linalg.norm(target.double()))


def fit_all(model: MultiExitMixin, blocks: torch.Tensor, layers: Sequence[int], *, batch_size: int = 4,
            max_vectors: int | None = None) -> list[CastFit]:
    """Collect the vectors and fit one cast matrix per layer (errors measured on the same vectors)."""
    xs, y = collect_layer_outputs(model, blocks, layers, batch_size=batch_size, max_vectors=max_vectors)
    fits = []
    for layer in layers:
        weight = fit_cast_matrix(xs[layer], y)
        fits.append(CastFit(layer=layer, weight=weight, cast_error=relative_error(xs[layer] @ weight.T, y),
                            direct_error=relative_error(xs[layer], y)))
    return fits


def check_layers(layers: Sequence[int], num_layers: int) -> None:
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise ConfigurationError(f"cast layer {layer} is outside 0..{num_layers - 1}: layer {num_layers} is "
                                     "the top, which the model's head reads directly")


def load_for_fitting(model_path: str | Path, config: Any, layers: Sequence[int]) -> MultiExitMixin:
    """The model in cast mode with matrices for `layers` (to be fitted) and for any other layer whose
    matrix the checkpoint already has (kept); exits of the checkpoint without a matrix are dropped."""
    from autocontrast.models.auto import _model_class, prepare_config

    existing = [e for e in getattr(config, "lm_head_layer_indices", None) or () if isinstance(e, int)]
    mec = MultiExitConfiguration(vocab_projection_mode=VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS,
                                 lm_head_layer_indices=tuple(sorted(set(existing) | set(layers))))
    config = prepare_config(config, mec)
    model, info = _model_class(config).from_pretrained(str(model_path), config=config, multi_exit_config=mec,
                                                       output_loading_info=True, dtype=torch.float32)
    missing = set(info.get("missing_keys", ()))
    unfitted = [e for e in existing if e not in layers and e != model.num_layers
                and f"{CASTS}.{cast_matrix_name(e, model.num_layers)}.weight" in missing]
    for exit_ in unfitted:  # e.g. a direct-mode checkpoint's exits: no matrix to keep, none to fit
        del model.name_to_conv_matrix[cast_matrix_name(exit_, model.num_layers)]
    model.config.lm_head_layer_indices = [e for e in model.config.lm_head_layer_indices if e not in unfitted]
    model.exit_indices = tuple(model.config.lm_head_layer_indices)
    return model.eval()


def fit_cast_matrices(model_path: str | Path, output_dir: str | Path, *, layers: Sequence[int] | str,
                      data_files: Sequence[str | Path], block_size: int = 256, batch_size: int = 4,
                      max_vectors: int | None = 20000) -> list[CastFit]:
    """Fit cast matrices for `layers` on the text files and save the model in the original format
    (`name_to_conv_matrix.<k>_to_<L>.weight`), loadable as `SHARED_PROJECTION_CAST_OUTPUTS`."""
    from transformers import AutoConfig, AutoTokenizer

    from autocontrast.models.families import family_for

    layers = parse_layers(layers)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ConfigurationError(f"output directory {output_dir} is not empty; choose another one")
    config = AutoConfig.from_pretrained(str(model_path))
    check_layers(layers, family_for(config).num_layers(config))
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    blocks = chunk_tokens(tokenize_texts(tokenizer, read_text_files(data_files)), block_size=block_size)
    model = load_for_fitting(model_path, config, layers)
    fits = fit_all(model, blocks, layers, batch_size=batch_size, max_vectors=max_vectors)
    with torch.no_grad():
        for fit in fits:
            model.name_to_conv_matrix[cast_matrix_name(fit.layer, model.num_layers)].weight.copy_(fit.weight)
            print(f"layer {fit.layer}: relative error {fit.cast_error:.4f} with the cast matrix, "
                  f"{fit.direct_error:.4f} direct", file=sys.stderr)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        report = [{"layer": f.layer, "cast_error": f.cast_error, "direct_error": f.direct_error} for f in fits]
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if output_dir.exists():
            output_dir.rmdir()  # empty (checked above)
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"saved the multi-exit model with cast matrices to {output_dir}", file=sys.stderr)
    return fits


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        prog="acd-fit-cast",
        description="Fit layer-to-top cast matrices by least squares, for SHARED_PROJECTION_CAST_OUTPUTS.")
    parser.add_argument("model", help="Hugging Face model folder (or a multi-exit checkpoint)")
    parser.add_argument("--layers", required=True, help="layers to fit cast matrices for, e.g. 8,15,22")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE", help="text files")
    parser.add_argument("--output", required=True, help="folder for the model with its cast matrices")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per forward pass")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-vectors", type=int, default=20000,
                        help="hidden-state vectors to fit on (tokens of text used); 0 for all")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fit_cast_matrices(args.model, args.output, layers=args.layers, data_files=args.data,
                      block_size=args.block_size, batch_size=args.batch_size, max_vectors=args.max_vectors or None)
    return 0


def cli() -> int:
    return run_cli(main)
