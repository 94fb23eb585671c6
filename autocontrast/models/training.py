"""Train layer-specific exit heads on a frozen base model (`acd-train-heads`).

One linear head per chosen layer, each initialised from the model's own vocabulary head (so
training starts from the shared projection and can only improve on it), trained through the
Hugging Face `Trainer` on the sum of the heads' cross-entropies (the multi-exit forward computes
it when given `labels`). The result is saved in the original library's checkpoint format
(`name_to_lm_exit_head.lm_head_<k>.weight`, `lm_head_layer_indices` in config.json), so
`AutoMultiExitModel` and `acd-export` load it.

>>> from autocontrast.models.training import HeadTrainingOptions, train_heads
>>> options = HeadTrainingOptions(block_size=128, batch_size=4, max_steps=300)
>>> train_heads("path/to/model", "trained/", layers=(15,), data_files=["valid.txt"],
...             options=options)  # doctest: +SKIP

Command line (options after `--` go to `transformers.TrainingArguments`):

    acd-train-heads MODEL --layers 8,15,22 --data valid.txt --output DIR [--resume] [-- --warmup_steps 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autocontrast.cli_support import command_parser, run_cli
from autocontrast.config import ORIGINAL, MultiExitConfiguration, VocabularyProjectionMode, parse_exits
from autocontrast.errors import ConfigurationError, DataError
from autocontrast.models.multi_exit import HEADS, LM_HEAD_PREFIX, MultiExitMixin
from autocontrast.models.training_data import PairCollator, task_pairs, text_blocks

TRAINER_DIR = "trainer"  # Trainer checkpoints (for --resume), inside the output directory


@dataclasses.dataclass(frozen=True)
class HeadTrainingOptions:
    """How to train. `max_steps` > 0 overrides `epochs`; `train_base` also trains the base (task
    fine-tuning as the original library does it); `trainer_args` go to `TrainingArguments` as given."""

    block_size: int = 512
    batch_size: int = 8
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-4  # the original library's rate for language-modelling heads
    warmup_steps: int = 0
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int = 2
    seed: int = 0
    train_base: bool = False
    trainer_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.logging_steps < 1 or self.save_steps < 1:
            raise ConfigurationError("batch size, logging steps and save steps must be at least 1")
        if self.learning_rate <= 0:
            raise ConfigurationError(f"learning rate ({self.learning_rate}) must be positive")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigurationError("give a positive number of epochs or of max steps")


@dataclasses.dataclass(frozen=True)
class TrainingResult:
    """Where the trained model went and the Trainer's log (one dict per logging step)."""

    output_dir: Path
    log_history: tuple[dict[str, Any], ...]

    @property
    def losses(self) -> list[float]:
        """The training losses logged, in order."""
        return [entry["loss"] for entry in self.log_history if "loss" in entry]


def parse_layers(value: str | Sequence[int]) -> tuple[int, ...]:
    """Layers to put heads on, from "8,15,22" or a sequence; 'original' is not a trainable head."""
    layers = parse_exits(value) or ()
    if not layers:
        raise ConfigurationError("no layers given; pass e.g. --layers 8,15,22")
    if ORIGINAL in layers:
        raise ConfigurationError("'original' is the model's own head and cannot be trained as an exit head")
    return tuple(dict.fromkeys(layers))


def load_for_training(model_path: str | Path, layers: Sequence[int], *, train_base: bool = False) -> MultiExitMixin:
    """Load a checkpoint with new layer-specific heads, each a copy of the model's own head.

    Heads the checkpoint already has (an existing multi-exit checkpoint) keep their weights.
    """
    from transformers import AutoConfig

    from autocontrast.models.auto import _model_class, prepare_config

    mec = MultiExitConfiguration(vocab_projection_mode=VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION,
                                 lm_head_layer_indices=tuple(layers), freeze_parameters=not train_base)
    config = prepare_config(AutoConfig.from_pretrained(str(model_path)), mec)  # checks layers are in range
    model, info = _model_class(config).from_pretrained(str(model_path), config=config, multi_exit_config=mec,
                                                       output_loading_info=True, torch_dtype=torch.float32)
    missing = set(info.get("missing_keys", ()))
    head = model.get_output_embeddings()
    head_keys = {name + ".weight" for name, module in model.named_modules() if module is head}
    if head is None or (head_keys & missing and not getattr(config, "tie_word_embeddings", False)):
        raise ConfigurationError(
            f"{model_path} has no trained vocabulary head ({', '.join(sorted(head_keys)) or 'lm_head'} is "
            "missing) to initialise exit heads from; use a causal-LM checkpoint that includes its head")
    with torch.no_grad():
        for layer in layers:
            name = LM_HEAD_PREFIX + str(layer)
            if f"{HEADS}.{name}.weight" in missing:  # new head: start from the shared projection
                model.name_to_lm_exit_head[name].weight.copy_(head.weight)
    model.train()
    return model


def training_arguments(options: HeadTrainingOptions, checkpoint_dir: Path) -> Any:
    """`TrainingArguments` from the options; `options.trainer_args` (command-line style) override them."""
    from transformers import HfArgumentParser, TrainingArguments

    defaults = dict(
        output_dir=str(checkpoint_dir), per_device_train_batch_size=options.batch_size,
        num_train_epochs=options.epochs, max_steps=options.max_steps, learning_rate=options.learning_rate,
        warmup_steps=options.warmup_steps, lr_scheduler_type="linear", logging_steps=options.logging_steps,
        save_strategy="steps", save_steps=options.save_steps, save_total_limit=options.save_total_limit,
        seed=options.seed, data_seed=options.seed, report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=False)
    argv = [f"--{k}={v}" for k, v in defaults.items() if k != "report_to"] + ["--report_to", "none"]
    try:
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            args=argv + list(options.trainer_args))
    except (SystemExit, ValueError) as err:  # argparse exits; HfArgumentParser raises on unknown names
        detail = f" ({err})" if isinstance(err, ValueError) else ""
        raise ConfigurationError(f"invalid Trainer arguments: {' '.join(options.trainer_args)}{detail}") from None
    return args


def _latest_checkpoint(checkpoint_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None


def train_heads(model_path: str | Path, output_dir: str | Path, *, layers: Sequence[int] | str,
                data_files: Sequence[str | Path] = (), task_files: Sequence[str | Path] = (),
                options: HeadTrainingOptions | None = None, resume: bool = False,
                callbacks: Sequence[Any] = ()) -> TrainingResult:
    """Train exit heads at `layers` on text (`data_files`) or task pairs (`task_files`, JSON Lines).

    Trainer checkpoints go to `<output_dir>/trainer/` (`resume=True` continues from the latest);
    the final model and tokenizer are written to a temporary folder and moved into `output_dir`
    only when complete. `callbacks` are `transformers.TrainerCallback`s added to the Trainer's.
    """
    from transformers import AutoTokenizer, Trainer

    options = options or HeadTrainingOptions()
    layers = parse_layers(layers)
    output_dir = Path(output_dir)
    if bool(data_files) == bool(task_files):
        raise DataError("give either text files (--data) or task files (--task-data), not both or neither")
    checkpoint_dir = output_dir / TRAINER_DIR
    latest = _latest_checkpoint(checkpoint_dir)
    if resume and latest is None:
        raise ConfigurationError(f"--resume: no Trainer checkpoint under {checkpoint_dir} to resume from")
    if not resume and output_dir.exists() and any(output_dir.iterdir()):
        raise ConfigurationError(f"output directory {output_dir} is not empty; choose another one, or pass "
                                 "--resume to continue its training")

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if task_files:
        dataset = task_pairs(tokenizer, task_files, max_length=options.block_size)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collator = PairCollator(pad_token_id=pad or 0)
    else:
        dataset, collator = text_blocks(tokenizer, data_files, block_size=options.block_size), None
    model = load_for_training(model_path, layers, train_base=options.train_base)
    print(f"training heads at layers {', '.join(map(str, layers))} on {len(dataset)} examples "
          f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters)",
          file=sys.stderr)

    trainer = Trainer(model=model, args=training_arguments(options, checkpoint_dir), train_dataset=dataset,
                      data_collator=collator, callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=latest if resume else None)

    model.eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".heads-", dir=output_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            target = output_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"saved the multi-exit model to {output_dir}", file=sys.stderr)
    return TrainingResult(output_dir=output_dir, log_history=tuple(trainer.state.log_history))


# -- command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        prog="acd-train-heads",
        description="Train layer-specific exit heads on a frozen base model (original checkpoint format). "
                    "Arguments after `--` go to transformers.TrainingArguments.")
    parser.add_argument("model", help="Hugging Face model folder (or a multi-exit checkpoint)")
    parser.add_argument("--layers", required=True, help="layers to train heads for, e.g. 8,15,22")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", nargs="+", metavar="FILE", help="text files (chunked into blocks)")
    data.add_argument("--task-data", nargs="+", metavar="FILE",
                      help="JSON Lines files of {'source': ..., 'target': ...}; the source is not in the loss")
    parser.add_argument("--output", required=True, help="folder for the trained multi-exit model")
    defaults = HeadTrainingOptions()
    parser.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per training block")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="overrides --epochs when > 0")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--logging-steps", type=int, default=defaults.logging_steps)
    parser.add_argument("--save-steps", type=int, default=defaults.save_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train-base", action="store_true",
                        help="also train the base model (the original library does so for task fine-tuning)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest Trainer checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    options = HeadTrainingOptions(
        block_size=args.block_size, batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, logging_steps=args.logging_steps,
        save_steps=args.save_steps, seed=args.seed, train_base=args.train_base, trainer_args=tuple(trainer_args))
    result = train_heads(args.model, args.output, layers=args.layers, data_files=args.data or (),
                         task_files=args.task_data or (), options=options, resume=args.resume)
    losses = result.losses
    if losses:
        print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}", file=sys.stderr)
    return 0


def cli() -> int:
    return run_cli(main)
