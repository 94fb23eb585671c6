"""Random-weight Hugging Face folders of real model configurations: the only way to measure export and
runtime at the sizes people deploy (0.36B-3B) where no hub is reachable. Timing and memory do not
depend on weight values; export validation still checks the graphs against PyTorch on these weights.

Each shape is the published `config.json` of the named model (architecture, widths, heads, vocabulary,
rotary settings); the tokenizer is borrowed from SmolLM2 (49,152 tokens), whose ids all lie inside
every shape's vocabulary, and the special ids are SmolLM2's. Weights are written shard by shard
(`safetensors`), so a 3B folder never holds more than one shard in memory.

>>> from autocontrast.models.real_shapes import write_random_model
>>> write_random_model("Llama-3.2-1B", "shapes/llama-3.2-1b")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from autocontrast.cli_support import command_parser, run_cli
from autocontrast.errors import ConfigurationError

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# name -> (model_type, config fields as published); tie_word_embeddings as the real checkpoints have it
REAL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "SmolLM2-135M": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
    "SmolLM2-360M": ("llama", dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                   num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
    "SmolLM2-1.7B": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=130000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
    "Llama-3.2-1B": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "Qwen2.5-1.5B": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                   use_sliding_window=False, tie_word_embeddings=True)),
    "Llama-3.2-3B": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True)),
}
# the class a real checkpoint's config.json names (tools such as onnxruntime-genai's model builder read it)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SHARD_BYTES = 2 * 1024**3
INIT_STD = 0.02  # as the configs' initializer_range


def shape_config(name: str, *, dtype: str = "float32") -> Any:
    """The transformers config of a named shape, with SmolLM2's special token ids."""
    from transformers import AutoConfig

    if name not in REAL_SHAPES:
        raise ConfigurationError(f"unknown shape {name!r}; known: {', '.join(REAL_SHAPES)}")
    model_type, fields = REAL_SHAPES[name]
    return AutoConfig.for_model(model_type, **fields, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                initializer_range=INIT_STD, torch_dtype=dtype,
                                architectures=[ARCHITECTURES[model_type]])


def parameter_count(name: str) -> int:
    """Parameters of a named shape as its checkpoint stores them (a tied head counted once)."""
    return sum(n for _, _, n in _tensors(shape_config(name)))


def _tensors(config: Any) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, elements) of every stored tensor, from a model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return [(k, tuple(v.shape), v.numel()) for k, v in model.state_dict().items() if k not in tied]


def write_random_model(name: str, output: str | Path, *, dtype: str = "float32", seed: int = 0,
                       tokenizer_from: str | Path | None = None, log: Any = print) -> Path:
    """Write a random-weight folder of shape `name` to `output` (config, shards, index, tokenizer)."""
    import torch
    from safetensors.torch import save_file

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ConfigurationError(f"{output} exists and is not empty; choose a new folder")
    config = shape_config(name, dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    tensors = _tensors(config)
    total = sum(n for _, _, n in tensors) * torch.finfo(torch_dtype).bits // 8
    log(f"{name}: {sum(n for _, _, n in tensors) / 1e9:.2f}B parameters, {total / 1e9:.2f} GB as {dtype}")
    output.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    written: list[tuple[Path, list[str]]] = []  # shard file, its tensors
    current: dict[str, Any] = {}

    def flush() -> None:
        path = output / f"shard-{len(written) + 1:05d}.safetensors"
        save_file(current, str(path), metadata={"format": "pt"})
        log(f"  wrote shard {len(written) + 1} ({sum(v.nbytes for v in current.values()) / 1e9:.2f} GB)")
        written.append((path, list(current)))
        current.clear()

    for key, shape, _ in tensors:
        if key.endswith("norm.weight"):
            value = torch.ones(shape, dtype=torch_dtype)
        elif key.endswith(".bias"):
            value = torch.zeros(shape, dtype=torch_dtype)
        else:
            value = torch.empty(shape, dtype=torch.float32).normal_(0.0, INIT_STD, generator=generator).to(torch_dtype)
        if current and sum(v.nbytes for v in current.values()) + value.nbytes > SHARD_BYTES:
            flush()
        current[key] = value
    flush()
    weight_map = {}
    for i, (path, keys) in enumerate(written, 1):  # the index names shards -of-N, known only now
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(output / final)
        weight_map.update(dict.fromkeys(keys, final))
    (output / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    config.save_pretrained(output)
    _copy_tokenizer(tokenizer_from, output)
    return output


def _copy_tokenizer(source: str | Path | None, output: Path) -> None:
    from autocontrast.export.checkpoint import TOKENIZER_FILES
    from autocontrast.models.smollm2 import smollm2_path

    folder = Path(source) if source else smollm2_path()
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, output / name)


def main(argv: list[str] | None = None) -> int:
    p = command_parser(prog="acd-random-model", description="Write a random-weight Hugging Face folder of a real "
                       "model's configuration (tokenizer from SmolLM2), to measure export and runtime at its size.")
    p.add_argument("shape", choices=list(REAL_SHAPES), help="the real configuration")
    p.add_argument("output", help="folder to write (new or empty)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = write_random_model(args.shape, args.output, dtype=args.dtype, seed=args.seed)
    print(path)
    return 0


def cli() -> None:
    raise SystemExit(run_cli(main))
