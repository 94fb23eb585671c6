"""Train layer-specific exit heads on a frozen base model (`acd-train-heads`).

One linear head per chosen layer, each initialised from the model's own vocabulary head (so
training starts from the shared projection and can only improve on it), trained through the
Hugging Face `Trainer` on one of two objectives (`HeadTrainingOptions.objective`, `--objective`):

- `ce` (default, the original library's): the sum of the heads' cross-entropies against the next
  token (the multi-exit forward computes it when given `labels`);
- `kl` (distillation, as the tuned lens trains its translators): the sum over heads of
  KL(p_top || p_head), averaged over positions, where p_top is the model's own output
  distribution from the same forward pass, held fixed (`distillation_loss`). It needs no labels,
  so it fits text the model samples itself (`--self-sample N`, `training_data.sample_blocks`).
  It trains heads only (not with `train_base`: the base would be pulled towards its own lower
  layers with nothing holding the top layer to the data) and reads text blocks only (not task
  pairs, whose masked sources it would ignore), on decoder-only models.

The result is saved in the original library's checkpoint format
(`name_to_lm_exit_head.lm_head_<k>.weight`, `lm_head_layer_indices` in config.json), so
`AutoMultiExitModel` and `acd-export` load it; the objective leaves no trace in it.

>>> from autocontrast.models.training import HeadTrainingOptions, train_heads
>>> options = HeadTrainingOptions(block_size=128, batch_size=4, max_steps=300)
>>> train_heads("path/to/model", "trained/", layers=(15,), data_files=["valid.txt"],
...             options=options)  # doctest: +SKIP

Command line (options after `--` go to `transformers.TrainingArguments`):

    acd-train-heads MODEL --layers 8,15,22 --data valid.txt --output DIR [--resume] [-- --warmup_steps 20]
    acd-train-heads MODEL --layers 8,15,22 --self-sample 256 --objective kl --output DIR
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
from autocontrast.models.training_data import (
    SAMPLING_TOP_P,
    PairCollator,
    self_sampled_blocks,
    task_pairs,
    text_blocks,
)

TRAINER_DIR = "trainer"  # Trainer checkpoints (for --resume), inside the output directory
CROSS_ENTROPY, DISTILLATION = "ce", "kl"
OBJECTIVES = (CROSS_ENTROPY, DISTILLATION)


@dataclasses.dataclass(frozen=True)
class HeadTrainingOptions:
    """How to train. `max_steps` > 0 overrides `epochs`; `train_base` also trains the base (task
    fine-tuning as the original library does it); `objective` is one of `OBJECTIVES` (see the module
    docstring); `trainer_args` go to `TrainingArguments` as given."""

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
    objective: str = CROSS_ENTROPY
    trainer_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.logging_steps < 1 or self.save_steps < 1:
            raise ConfigurationError("batch size, logging steps and save steps must be at least 1")
        if self.learning_rate <= 0:
            raise ConfigurationError(f"learning rate ({self.learning_rate}) must be positive")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigurationError("give a positive number of epochs or of max steps")
        if self.objective not in OBJECTIVES:
            raise ConfigurationError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.objective == DISTILLATION and self.train_base:
            raise ConfigurationError(
                "--objective kl distils exit heads from the model's own top layer, which must stay fixed; "
                "--train-base would train the base with nothing but its lower layers' agreement with the top. "
                "Use --objective ce to fine-tune the base")


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


# -- the distillation objective ---------------------------------------------------------------------


def distillation_loss(top_logits: torch.Tensor, head_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The `kl` objective: every exit head's KL divergence from the top layer, averaged over
    positions and summed over heads,

        loss = sum_heads mean_positions sum_v p_top(v) * (log p_top(v) - log p_head(v))

    with p_top = softmax(top_logits), held fixed (no gradient reaches the top layer), p_head =
    softmax of that head's logits, in float32; a token with p_top(v) = 0 adds 0.

    top_logits: (..., vocab); head_logits[i]: (..., vocab), the same positions -> scalar
    """
    if not head_logits:
        raise ConfigurationError("distillation needs at least one exit head")
    log_p_top = torch.log_softmax(top_logits.detach().float(), dim=-1)
    p_top = log_p_top.exp()
    per_head = []
    for logits in head_logits:
        log_p_head = torch.log_softmax(logits.float(), dim=-1)
        pointwise = torch.where(p_top > 0, p_top * (log_p_top - log_p_head), 0.0)
        per_head.append(pointwise.sum(dim=-1).mean())
    return torch.stack(per_head).sum()


def head_distillation_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """The `kl` loss of a batch of token blocks and the model's outputs, from one forward pass.

    The model generates with its own head (as `load_for_training` configures it), so the pass
    yields the top layer's logits, and the hidden states give every exit head's; labels are not read.
    """
    inner = getattr(model, "module", model)  # a DataParallel / DDP wrapper keeps the model in .module
    if inner.multi_exit_config.required_exits != (ORIGINAL,):
        raise ConfigurationError("distillation needs a model whose output is its own head's (use_original_head)")
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    output_hidden_states=True)
    heads = inner.exit_logits(inner.exit_indices, outputs.logits, outputs.hidden_states)
    return distillation_loss(outputs.logits, list(heads.values())), outputs


def trainer_class(objective: str) -> type:
    """The `transformers.Trainer` for an objective: the Trainer itself for `ce` (the model's
    forward computes the loss from `labels`), a subclass computing `head_distillation_loss` for `kl`."""
    from transformers import Trainer

    if objective == CROSS_ENTROPY:
        return Trainer

    class DistillationTrainer(Trainer):
        def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss, outputs = head_distillation_loss(model, inputs)
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer


def _latest_checkpoint(checkpoint_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None


def check_data_sources(data_files: Sequence[str | Path], task_files: Sequence[str | Path], self_sample: int | None,
                       objective: str) -> None:
    """Exactly one source of training data, and one the objective can use."""
    if self_sample is not None and self_sample < 1:
        raise DataError(f"--self-sample needs a positive number of blocks (got {self_sample})")
    given = [flag for flag, value in (("--data", data_files), ("--task-data", task_files),
                                      ("--self-sample", self_sample is not None)) if value]
    if len(given) != 1:
        raise DataError("give one source of training data: text files (--data), task files (--task-data) or "
                        f"--self-sample N; got {' and '.join(given) if given else 'none'}")
    if task_files and objective == DISTILLATION:
        raise ConfigurationError("--objective kl distils every position of text blocks and ignores labels, so it "
                                 "would train on the task sources that --task-data masks out; give the text with "
                                 "--data, or use --objective ce for task pairs")


def check_model_fits(model: MultiExitMixin, objective: str, self_sample: int | None) -> None:
    """Distillation and self-sampled text are for decoder-only models."""
    if model.family.is_encoder_decoder and (objective == DISTILLATION or self_sample is not None):
        raise ConfigurationError(f"--objective {DISTILLATION} and --self-sample are for decoder-only models; "
                                 f"{model.config.model_type} is an encoder-decoder: use --objective "
                                 f"{CROSS_ENTROPY} with --data or --task-data")


def _file_data(tokenizer: Any, data_files: Sequence[str | Path], task_files: Sequence[str | Path],
               block_size: int) -> tuple[Any, Any]:
    """(dataset, collator) of text files or task files; (None, None) when neither is given."""
    if task_files:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return task_pairs(tokenizer, task_files, max_length=block_size), PairCollator(pad_token_id=pad or 0)
    if data_files:
        return text_blocks(tokenizer, data_files, block_size=block_size), None
    return None, None


def train_heads(model_path: str | Path, output_dir: str | Path, *, layers: Sequence[int] | str,
                data_files: Sequence[str | Path] = (), task_files: Sequence[str | Path] = (), self_sample: int | None = None,
                options: HeadTrainingOptions | None = None, resume: bool = False,
                callbacks: Sequence[Any] = ()) -> TrainingResult:
    """Train exit heads at `layers` on text (`data_files`), task pairs (`task_files`, JSON Lines)
    or `self_sample` blocks of text the model samples itself (`training_data.sample_blocks`).

    Trainer checkpoints go to `<output_dir>/trainer/` (`resume=True` continues from the latest;
    self-sampled text is sampled again, the same under the same seed); the final model and
    tokenizer are written to a temporary folder and moved into `output_dir` only when complete.
    `callbacks` are `transformers.TrainerCallback`s added to the Trainer's.
    """
    from transformers import AutoTokenizer

    options = options or HeadTrainingOptions()
    layers = parse_layers(layers)
    output_dir = Path(output_dir)
    check_data_sources(data_files, task_files, self_sample, options.objective)
    checkpoint_dir = output_dir / TRAINER_DIR
    latest = _latest_checkpoint(checkpoint_dir)
    if resume and latest is None:
        raise ConfigurationError(f"--resume: no Trainer checkpoint under {checkpoint_dir} to resume from")
    if not resume and output_dir.exists() and any(output_dir.iterdir()):
        raise ConfigurationError(f"output directory {output_dir} is not empty; choose another one, or pass "
                                 "--resume to continue its training")

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    dataset, collator = _file_data(tokenizer, data_files, task_files, options.block_size)  # errors before loading
    model = load_for_training(model_path, layers, train_base=options.train_base)
    check_model_fits(model, options.objective, self_sample)
    if self_sample is not None:
        dataset = self_sampled_blocks(model, tokenizer, blocks=self_sample, block_size=options.block_size,
                                      seed=options.seed)
    print(f"training heads at layers {', '.join(map(str, layers))} on {len(dataset)} examples, objective "
          f"{options.objective} ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable "
          "parameters)", file=sys.stderr)

    trainer = trainer_class(options.objective)(
        model=model, args=training_arguments(options, checkpoint_dir), train_dataset=dataset,
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
    data.add_argument("--self-sample", type=int, metavar="N",
                      help="train on N blocks of --block-size tokens sampled from the model itself "
                           f"(temperature 1, top-p {SAMPLING_TOP_P}, seeded by --seed); no corpus needed")
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
    parser.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective,
                        help="ce: next-token cross-entropy (the original library's); kl: distil each head from "
                             "the model's own top layer, KL(p_top || p_head) (heads only, text blocks only)")
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
        save_steps=args.save_steps, seed=args.seed, train_base=args.train_base, objective=args.objective,
        trainer_args=tuple(trainer_args))
    result = train_heads(args.model, args.output, layers=args.layers, data_files=args.data or (),
                         task_files=args.task_data or (), self_sample=args.self_sample, options=options,
                         resume=args.resume)
    losses = result.losses
    if losses:
        print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}", file=sys.stderr)
    return 0


def cli() -> int:
    return run_cli(main)
