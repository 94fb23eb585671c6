"""Training data for exit heads: plain text chunked into blocks, text the model samples itself, or
task (source, target) pairs.

Plain text (language-modelling heads): every file is tokenized whole, the files are joined with the
end-of-sequence token, and the token stream is cut into fixed-length blocks (the remainder is
dropped), as the original library's `group_texts` does. Every token is a label.

Self-sampled text (no corpus needed, `--self-sample N`): N blocks, each the start token (the
tokenizer's BOS, else its EOS) followed by `block_size - 1` tokens sampled from the model itself
with HF `generate()` (temperature 1, top-p `SAMPLING_TOP_P`, no top-k, seeded; EOS does not stop a block), then
used like plain-text blocks. Distilling heads on the model's own samples trains them where the
model's distribution puts its mass, as the tuned lens does.

Task pairs (downstream fine-tuning): JSON Lines with `source` and `target` strings; the model reads
`source + target` and only the target tokens carry a label, the source is masked out of the loss
with -100, as the original library's `gpt_preprocess_func(ignore_input_in_loss=True)` does.

>>> from autocontrast.models.training_data import chunk_tokens
>>> chunk_tokens(list(range(10)), block_size=4).tolist()
[[0, 1, 2, 3], [4, 5, 6, 7]]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autocontrast.errors import DataError

IGNORE_INDEX = -100  # the label cross-entropy skips (source tokens, padding)
SAMPLING_TOP_P = 0.95  # nucleus of self-sampled text (temperature 1, no top-k)
SAMPLING_BATCH_SIZE = 16  # blocks sampled per generate() call


def read_text_files(paths: Sequence[str | Path]) -> list[str]:
    """The texts of the given files; a missing, unreadable or empty file is a `DataError`."""
    if not paths:
        raise DataError("no data files given; pass one or more text files with --data")
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} does not exist (or is not a file)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"data file {str(path)!r} cannot be read as UTF-8 text: {err}") from None
        if not text.strip():
            raise DataError(f"data file {str(path)!r} is empty")
        texts.append(text)
    return texts


def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """One token stream of all texts, joined by the tokenizer's end-of-sequence token (if it has one)."""
    stream: list[int] = []
    for text in texts:
        if stream and tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return stream


def check_block_size(block_size: int) -> None:
    """A block must hold a token and the one it predicts."""
    if block_size < 2:
        raise DataError(f"block size ({block_size}) must be at least 2 (a token and the one it predicts)")


def chunk_tokens(tokens: Sequence[int], *, block_size: int) -> torch.Tensor:
    """Cut a token stream into full blocks, dropping the remainder: -> (blocks, block_size)."""
    check_block_size(block_size)
    blocks = len(tokens) // block_size
    if blocks == 0:
        raise DataError(f"the data has {len(tokens)} tokens, fewer than one block of {block_size}; "
                        "give more text or a smaller --block-size")
    return torch.tensor(tokens[: blocks * block_size], dtype=torch.long).view(blocks, block_size)


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length blocks for causal-LM training; every token is its own label."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks  # (blocks, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block.clone()}


def text_blocks(tokenizer: Any, paths: Sequence[str | Path], *, block_size: int) -> BlockDataset:
    """The blocks of the given text files (see the module docstring)."""
    return BlockDataset(chunk_tokens(tokenize_texts(tokenizer, read_text_files(paths)), block_size=block_size))


# -- self-sampled text -------------------------------------------------------------------------------


def start_token_id(tokenizer: Any) -> int:
    """The token self-sampled blocks start from: the tokenizer's BOS, else its EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise DataError("the tokenizer has neither a BOS nor an EOS token to start self-sampled text from")


def sample_blocks(model: Any, tokenizer: Any, *, blocks: int, block_size: int, seed: int = 0,
                  top_p: float = SAMPLING_TOP_P, batch_size: int = SAMPLING_BATCH_SIZE) -> torch.Tensor:
    """`blocks` blocks of text sampled from `model` itself (see the module docstring): -> (blocks, block_size).

    `model` is any HF causal LM (a multi-exit model generating with its own head samples the plain
    model; its exit heads are unused). Seeded: the same seed, sizes and model give the same blocks;
    the global torch RNG is left as it was. Progress goes to stderr after every batch.
    """
    if blocks < 1:
        raise DataError(f"the number of blocks to sample must be positive (got {blocks})")
    check_block_size(block_size)
    start = start_token_id(tokenizer)
    was_training = model.training
    model.eval()
    sampled = []
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for first in range(0, blocks, batch_size):
                rows = min(batch_size, blocks - first)
                prompt = torch.full((rows, 1), start, dtype=torch.long, device=model.device)  # (rows, 1)
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                     temperature=1.0, top_p=top_p, top_k=0, max_new_tokens=block_size - 1,
                                     eos_token_id=None, pad_token_id=None)  # (rows, block_size): EOS does not stop
                sampled.append(out.cpu())
                print(f"self-sampled {first + rows}/{blocks} blocks of {block_size} tokens", file=sys.stderr)
    finally:
        model.train(was_training)
    return torch.cat(sampled)


def self_sampled_blocks(model: Any, tokenizer: Any, *, blocks: int, block_size: int, seed: int = 0) -> BlockDataset:
    """`sample_blocks` as a training dataset, like `text_blocks`."""
    return BlockDataset(sample_blocks(model, tokenizer, blocks=blocks, block_size=block_size, seed=seed))


# -- task pairs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPair:
    """One (source, target) example: `input_ids` is source + target, `labels` masks the source."""

    input_ids: list[int]
    labels: list[int]


def read_pairs(paths: Sequence[str | Path]) -> list[tuple[str, str]]:
    """(source, target) pairs from JSON Lines files with `source` and `target` string fields."""
    if not paths:
        raise DataError("no task files given; pass JSON Lines files with 'source' and 'target' fields")
    pairs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"task file {str(path)!r} does not exist (or is not a file)")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                source, target = record["source"], record["target"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{number}: expected a JSON object with 'source' and 'target' strings") from None
            if not isinstance(source, str) or not isinstance(target, str) or not target:
                raise DataError(f"{path}:{number}: 'source' and 'target' must be strings, 'target' non-empty")
            pairs.append((source, target))
    if not pairs:
        raise DataError(f"the task files {', '.join(map(str, paths))} hold no examples")
    return pairs


def encode_pair(tokenizer: Any, source: str, target: str, *, max_length: int) -> EncodedPair:
    """Tokenize one pair; the source is cut from the left when the pair is longer than `max_length`."""
    source_ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]  # teach the heads where an answer ends
    if len(target_ids) >= max_length:
        raise DataError(f"a target of {len(target_ids)} tokens does not fit in --block-size {max_length} "
                        f"with any source: {target[:60]!r}")
    source_ids = source_ids[len(source_ids) + len(target_ids) - max_length:] if \
        len(source_ids) + len(target_ids) > max_length else source_ids
    return EncodedPair(input_ids=source_ids + target_ids,
                       labels=[IGNORE_INDEX] * len(source_ids) + target_ids)


class PairDataset(torch.utils.data.Dataset):
    """Encoded task pairs, padded per batch by `pad_pairs`."""

    def __init__(self, pairs: Sequence[EncodedPair]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> EncodedPair:
        return self.pairs[index]


def task_pairs(tokenizer: Any, paths: Sequence[str | Path], *, max_length: int) -> PairDataset:
    """The encoded pairs of the given JSON Lines files."""
    return PairDataset([encode_pair(tokenizer, s, t, max_length=max_length) for s, t in read_pairs(paths)])


@dataclass(frozen=True)
class PairCollator:
    """Right-pads a batch of pairs: padding gets attention 0 and label -100."""

    pad_token_id: int

    def __call__(self, batch: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        width = max(len(p.input_ids) for p in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)  # (batch, width)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (batch, width)
        attention = torch.zeros((len(batch), width), dtype=torch.long)  # (batch, width)
        for row, pair in enumerate(batch):
            n = len(pair.input_ids)
            input_ids[row, :n] = torch.tensor(pair.input_ids)
            labels[row, :n] = torch.tensor(pair.labels)
            attention[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
