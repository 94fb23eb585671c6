"""What the exporter reads from a checkpoint besides the model: projection mode, tokenizer, special tokens.

Works for a local folder or a hub id (files are resolved with transformers' `cached_file`).

>>> detect_projection_mode("path/to/gpt2-medium-multiexit")  # doctest: +SKIP
<VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION: 0>
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

from autocontrast.config import VocabularyProjectionMode
from autocontrast.errors import ExportError
from autocontrast.models.multi_exit import CASTS, HEADS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CHECKPOINT_HELP = "a Hugging Face checkpoint folder (config.json and model.safetensors or pytorch_model.bin)"


def unreadable_weight_errors() -> tuple[type[BaseException], ...]:
    """What reading truncated or corrupt weight files raises (safetensors, torch's zip and pickle readers)."""
    from safetensors import SafetensorError

    return OSError, EOFError, RuntimeError, json.JSONDecodeError, pickle.UnpicklingError, SafetensorError


def model_config(model: str) -> Any:
    """The checkpoint's HF config; its model type from config.json only, never guessed from the folder's name.

    Raises `ExportError` for a missing, unreadable or type-less config.json.
    """
    local = os.path.isdir(model)
    if not local and os.path.lexists(model):
        raise ExportError(f"MODEL {model!r} is a file; give {CHECKPOINT_HELP}")
    try:
        path = Path(model, "config.json") if local else _file(model, "config.json")
    except ValueError:  # not a valid hub id either
        path = None
    if path is None or not path.is_file():
        where = "it has no config.json" if local else "no such folder, and no hub checkpoint of that name here"
        raise ExportError(f"cannot read a model config from {model!r}: {where}; give {CHECKPOINT_HELP}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"cannot read a model config from {model!r}: {path.name} is not valid JSON "
                          f"({err}); restore it from the original checkpoint") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ExportError(f"cannot read a model config from {model!r}: its config.json has no model_type; "
                          "restore it from the original checkpoint (save_pretrained writes one)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError, KeyError) as err:
        raise ExportError(f"cannot read a model config from {model!r}: {err}") from None


def require_weights(model: str) -> None:
    """`ExportError` for a local checkpoint folder without weight files (a hub id is checked when loaded)."""
    if os.path.isdir(model) and not any(Path(model, name).is_file() for name in WEIGHT_FILES):
        raise ExportError(f"{model!r} has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])}); "
                          "copy the checkpoint's weight files into it or save the model again with save_pretrained")


def corrupt_weights_error(model: str, err: BaseException) -> ExportError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ExportError(f"cannot read the weights of {model!r} ({type(err).__name__}: {first_line}); they look "
                       "truncated or corrupt (an interrupted download or copy?): copy or save the checkpoint again")


def _file(model: str, name: str) -> Path | None:
    from transformers.utils import cached_file

    try:
        found = cached_file(model, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return Path(found) if found else None


def weight_names(model: str) -> set[str]:
    """Names of the checkpoint's tensors, read without loading them (`ExportError` if unreadable)."""
    try:
        return _weight_names(model)
    except unreadable_weight_errors() as err:
        raise corrupt_weights_error(model, err) from None


def _weight_names(model: str) -> set[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = _file(model, index)
        if path:
            return set(json.loads(path.read_text(encoding="utf-8"))["weight_map"])
    path = _file(model, "model.safetensors")
    if path:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    path = _file(model, "pytorch_model.bin")
    if path:
        import torch

        return set(torch.load(str(path), map_location="meta", weights_only=True))
    return set()


def detect_projection_mode(model: str) -> VocabularyProjectionMode:
    """The mode a checkpoint was trained for: its own exit heads, cast matrices, or neither (direct)."""
    names = weight_names(model)
    if any(n.startswith(f"{HEADS}.") and not n.startswith(f"{HEADS}.lm_head_original") for n in names):
        return VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION
    if any(n.startswith(f"{CASTS}.") for n in names):
        return VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS
    return VocabularyProjectionMode.SHARED_PROJECTION_DIRECT


def copy_tokenizer(model: str, target: Path) -> tuple[tuple[str, ...], str | None]:
    """Copy the tokenizer files into `target`; returns (files copied, chat template or None).

    A checkpoint with only a slow tokenizer (vocab.json + merges.txt) gets a `tokenizer.json`
    written by its fast counterpart: the runtime reads tokenizer.json with `tokenizers`.
    """
    copied = []
    for name in TOKENIZER_FILES:
        path = _file(model, name)
        if path:
            shutil.copy(path, target / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(model, use_fast=True).save_pretrained(str(target))
        except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
            raise ExportError(f"{model} has no tokenizer.json and no tokenizer that can write one "
                              f"({type(err).__name__}: {err}); the runtime needs tokenizer.json") from None
        copied = [n for n in TOKENIZER_FILES if (target / n).is_file()]
    template = None
    if (target / "chat_template.jinja").is_file():
        template = (target / "chat_template.jinja").read_text(encoding="utf-8")
    elif (target / "tokenizer_config.json").is_file():
        template = json.loads((target / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    return tuple(copied), template if isinstance(template, str) else None


def special_tokens(config: Any, generation_config: Any, *, vocab_size: int) -> dict[str, Any]:
    """bos/eos/pad ids from the model config and its generation config (eos may be several).

    Ids at or beyond `vocab_size` (a GPT-2 config keeping 50256 over a resized vocabulary) are kept, as the
    original library keeps them (no such token is ever generated), and listed under `outside_vocabulary`.
    """
    eos: list[int] = []
    for source in (generation_config, config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for token in (value if isinstance(value, (list, tuple)) else [value]):
            if token is not None and int(token) not in eos:
                eos.append(int(token))

    def first(name: str) -> int | None:
        for source in (generation_config, config):
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                return int(value[0] if isinstance(value, (list, tuple)) else value)
        return None

    out: dict[str, Any] = {"bos_token_id": first("bos_token_id"), "eos_token_ids": eos,
                           "pad_token_id": first("pad_token_id")}
    ids = [out["bos_token_id"], *eos, out["pad_token_id"]]
    outside = sorted({i for i in ids if i is not None and not 0 <= i < vocab_size})
    if outside:
        out["outside_vocabulary"] = outside
    return out
