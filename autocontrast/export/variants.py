"""Bundle variants: graph fusions, fp16 (GPUs), int8 and int4 weight quantization (CPUs, edge).

Each rewrites a lean graph file (`autocontrast.export.weights`) in place, its new tensors going into the
bundle's one weights file, and the variant is validated like fp32 (with its own tolerance). Graph
fusions (`autocontrast.export.fusions`) are the family's (`Family.fusions`); they run first, so a quantized graph quantizes merged
matrices. Quantization changes tokens, so it also measures teacher-forced agreement: the fp32
PyTorch model's greedy ACD tokens are fed to the quantized decode graph, and we count the steps
where it would have picked the same token.

Quantization recipes (`QUANTIZATIONS`): ORT's `quant_pre_process` (shape inference and graph
simplification so every MatMul, the tied head included, is quantizable), then `MatMulNBits` with
accuracy_level 4 (int8 activations on CPU: the only fast path for this op on CPUs; level 0, fp32
activations, ran ~20x slower). The head is quantized as its own MatMul (a tied head's transposed
copy), so a step never reads the fp32 embedding matrix; the embedding itself stays a Gather that
reads one row per token. Blocks of 32 along K, as onnxruntime-genai ships, round to nearest,
symmetric; `--quant-block-size 16` stores twice the scales and quantizes activations in blocks of 16:
int8 ACD then agrees with fp32 on 93.4 % of WikiText steps instead of 89.8 %, at 5-18 % more time per
step (README "Lean decode graphs"). int8: every MatMul
at 8 bits. int4 (edge devices): the layers' MLPs at 4 bits; the heads and the attention projections
at 8 bits, which lifted teacher-forced agreement on SmolLM2 from 55 % to 70-72 % for ~6 % more CPU time
per step (what was tried, measured: README "Quantization").

>>> fused = apply_variant({"decode_original": work / "decode_original.onnx"}, model=model,
...                       options=ExportOptions(quantize="int8"), log=print, store=store)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autocontrast.bundle import DECODE, GraphSpec, KVCacheSpec
from autocontrast.errors import ExportError
from autocontrast.export.weights import WeightStore, load_graph, save_lean

AGREEMENT_PROMPTS = ("The history of the city begins in", "In mathematics, a prime number is",
                     "The best way to learn a new language is")
AGREEMENT_STEPS = 32  # per prompt


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """Weight-only quantization of every MatMul with a constant weight into `MatMulNBits`.

    The heads (vocabulary-sized MatMuls) get `head_bits` and the attention projections (MatMuls
    traced inside a module whose path names `attn`, as HF's Llama, GPT-2 and Phi-3 modules do)
    `attention_bits` when set; everything else `bits`.
    """

    bits: int
    block_size: int
    accuracy_level: int = 4
    symmetric: bool = True
    head_bits: int | None = None
    attention_bits: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": "MatMulNBits", **dataclasses.asdict(self)}


QUANTIZATIONS = {
    "int8": QuantRecipe(bits=8, block_size=32),
    "int4": QuantRecipe(bits=4, block_size=32, head_bits=8, attention_bits=8),
}


def versions(*, opset: int) -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    import autocontrast

    found = {"autocontrast": autocontrast.__version__, "torch": torch.__version__,
             "transformers": transformers.__version__, "onnx": onnx.__version__,
             "onnxruntime": onnxruntime.__version__, "opset": str(opset)}
    try:
        from importlib.metadata import version

        found["optimum"] = version("optimum")
        found["optimum-onnx"] = version("optimum-onnx")
    except Exception:  # noqa: BLE001 - optional metadata
        pass
    return found


def fusions_for(family: Any, optimize: bool | None) -> tuple[str, ...]:
    """The graph fusions an export runs: `optimize` None: the family's, if it fuses by default;
    True: the family's (an `ExportError` where it has none); False: none."""
    if optimize is False:
        return ()
    if optimize is None:
        return family.fusions if family.fuses_by_default else ()
    if not family.fusions:  # the registry says which fusions fit; never guess a set
        raise ExportError(f"--optimize has no graph fusions for {family.name!r} models; export without it")
    return family.fusions


def apply_variant(paths: dict[str, Path], *, model: Any, options: Any, log: Callable[[str], None],
                  store: WeightStore, kv: KVCacheSpec | None = None) -> dict[str, dict[str, int]]:
    """Transform each lean graph file in place (fusions, then fp16 or quantization), its weights in `store`.

    Returns, per graph, how many nodes each fusion made ({} when none ran).
    `kv`: the bundle's cache layout; a float16 cache (`kv.dtype`) makes the past/present float16 too.
    """
    from autocontrast.export.fusions import apply_fusions, describe_counts

    float16_io = kv.past_names() + kv.present_names() if kv is not None and kv.dtype == "float16" else []
    fusions = fusions_for(model.family, options.optimize)
    fused: dict[str, dict[str, int]] = {}
    for name, path in paths.items():
        if fusions:
            fused[name] = apply_fusions(path, fusions, model=model, store=store)
        if options.dtype == "float16":
            to_float16(path, store=store, float16_io=float16_io)
        if options.quantize:
            quantize(path, options.quant_recipe, store=store, vocab_size=model.config.vocab_size)
        log(f"      {name}" + (f": {describe_counts(fused[name])}" if fusions else f": {options.variant_name}"))
    return fused


def to_float16(path: Path, *, store: WeightStore, float16_io: Sequence[str] = ()) -> Path:
    """Weights and compute in fp16, in place; inputs/outputs stay float32 for the runtime, except those named in
    `float16_io` (a KV buffer written in place must be in the dtype its attention computes in).

    ORT's converter rewrites every weight, so this graph's weights are in memory for the pass (float32 and
    float16); its float16 tensors go into the store.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_graph(path)
    half = set(float16_io)
    keep = [v.name for v in (*model.graph.input, *model.graph.output) if v.name not in half] if half else True
    converted = convert_float_to_float16(model, keep_io_types=keep, disable_shape_infer=True)
    del model
    return save_lean(converted, path, store)


def quantize(path: Path, recipe: QuantRecipe, *, store: WeightStore, vocab_size: int) -> Path:
    """Weight-only quantization in place: quant_pre_process, then MatMulNBits as `recipe` says.

    The heads are the MatMuls whose weight has `vocab_size` columns. ORT's quantizer reads every weight,
    so this graph's float32 weights are in memory for the pass; the packed ones go into the store.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = path.with_name(f".{path.stem}.preprocessed.onnx")
    quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True, save_as_external_data=True,
                      all_tensors_to_one_file=True, external_data_location=prepared.name + ".data")
    model = load_graph(prepared)
    prepared.unlink()
    prepared.with_name(prepared.name + ".data").unlink(missing_ok=True)
    inits = {t.name: t for t in model.graph.initializer}
    heads = {n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
             and inits[n.input[1]].dims[-1] == vocab_size}
    attention = {n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                 and "attn" in n.name}
    # the wider groups first, each on its own; a later pass skips what is already MatMulNBits
    for bits, group in ((recipe.head_bits, heads), (recipe.attention_bits, attention - heads)):
        if bits is not None and bits != recipe.bits and group:
            model = _matmul_nbits(model, dataclasses.replace(recipe, bits=bits), only=group)
    model = _matmul_nbits(model, recipe)
    return save_lean(model, path, store)


def _matmul_nbits(model: Any, recipe: QuantRecipe, *, only: set[str] | None = None) -> Any:
    """Every MatMul with a constant weight (or only those named `only`) as `recipe.bits`-bit MatMulNBits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from autocontrast.export.fusions import quiet_loggers

    config = DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=recipe.symmetric,
                                          accuracy_level=recipe.accuracy_level, bits=recipe.bits)
    exclude = [] if only is None else [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in only]
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=exclude)
    with quiet_loggers("onnxruntime.quantization.matmul_nbits_quantizer"):  # an INFO line per node it skips
        quantizer.process()
    return quantizer.model.model


def teacher_forced_agreement(model: Any, bundle_dir: Path, graphs: Sequence[GraphSpec], kv: KVCacheSpec, *,
                             tokenizer: Any = None, prompts: Sequence[str] = AGREEMENT_PROMPTS,
                             steps_per_prompt: int = AGREEMENT_STEPS) -> dict[str, Any]:
    """Share of steps where the exported decode graph picks the fp32 PyTorch model's token.

    Uses the graph's fused contrast when it has one (ACD tokens), else its first exit. An export
    records it on `AGREEMENT_PROMPTS`; `scripts/agreement.py` measures it on real text.
    """
    from autocontrast.export.validation import expected_outputs, torch_step
    from autocontrast.runtime.decode_state import open_decode_state
    from autocontrast.runtime.session import ExitSession

    spec = next((g for g in graphs if g.kind == DECODE and g.contrast is not None), None) \
        or next(g for g in graphs if g.kind == DECODE)
    session = ExitSession(bundle_dir, spec, kv=kv.for_layers(spec.cache_layers), vocab_size=model.config.vocab_size)
    pick = spec.contrast.output if spec.contrast else spec.logits_output
    agreed = steps = 0
    for prompt in prompts:
        if tokenizer is not None:
            ids = np.array([tokenizer.encode(prompt, add_special_tokens=False)], np.int64)
        else:
            ids = np.random.default_rng(len(prompt)).integers(0, model.config.vocab_size, (1, 8))
        mask, pos = np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None]
        state, cache = open_decode_state(session), None
        for step in range(steps_per_prompt):
            by_exit, cache = torch_step(model, spec.exits, ids, mask, pos, cache)
            want = expected_outputs(spec, by_exit)[pick]
            want = want[:, 0] if want.ndim == 3 else want  # (1, vocab)
            out = state.extend([list(ids[0])]) if step == 0 else state.advance(ids[:, 0])
            have = out.contrast if spec.contrast else out.exit_logits[:, 0]  # (1, vocab)
            token = int(np.argmax(want[0]))
            agreed += int(np.argmax(have[0]) == token)
            steps += 1
            ids = np.array([[token]], np.int64)  # teacher forcing: the fp32 token, whatever int8 chose
            pos = pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
    return {"agreed": agreed, "steps": steps, "rate": agreed / steps, "measured_on": pick,
            "prompts": len(prompts), "reference": "fp32 PyTorch greedy tokens (teacher-forced)"}
