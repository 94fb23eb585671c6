"""`export_bundle`: a multi-exit checkpoint -> a validated export bundle (ONNX graphs + manifest).

Stages: load the model, trace each graph (`torch.onnx.export`, TorchScript tracer, with the
patches of `autocontrast.export.patcher`), apply the variant (fp16 / ORT fusions / int8), write
the graphs with one shared deduplicated weights file, validate every graph against PyTorch,
copy the tokenizer, write the manifest, then rename the temporary directory into place.

Why not optimum's `main_export`: a bundle is several graphs (plain decoding, stacked exits with
a fused contrast, scoring) sharing one weights file, each a function of flat KV tensors with
outputs optimum's task configs do not have; its driver exports one task's graph(s) per call with
its own copy of the weights. We reuse optimum's tracing patches instead (see patcher.py).

>>> from autocontrast.export import ExportOptions, export_bundle
>>> export_bundle("path/to/SmolLM2", "bundle", options=ExportOptions(exits=(30, 15),
...               fuse_contrast=(30, 15)))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autocontrast.bundle import (
    BUFFER_LAYOUT,
    CONCAT_LAYOUT,
    CONTRAST_OUTPUT,
    DECODE,
    DECODE_EXITS,
    DECODE_ORIGINAL,
    DOLA_OUTPUT,
    EXITS_METADATA_KEY,
    KV_LAYOUTS,
    LOGITS_OUTPUT,
    MIXED,
    SCORE,
    SCORE_GRAPH,
    SWITCHED_DECODE_FILE,
    ContrastSpec,
    DolaSpec,
    GraphSpec,
    KVCacheSpec,
    Manifest,
    early_exit_graph,
    exits_metadata,
    mixed_graph,
    write_manifest,
)
from autocontrast.config import (
    DEFAULT_ALPHA,
    DEFAULT_MINIMUM_CANDIDATES,
    DEFAULT_RELATIVE_TOP,
    ORIGINAL,
    Exit,
    contrast_parameters_problem,
    contrast_problem,
    exit_aliases,
    sort_exits,
)
from autocontrast.errors import AutocontrastError, ExportError, UnknownExitError
from autocontrast.export.memory import Stage, StageMeter, release_freed_memory
from autocontrast.export.output import (
    TerminationGuard,
    check_output,
    discard_work_dir,
    make_work_dir,
    missing_parents,
    remove_stale_work,
    replace_output,
)
from autocontrast.export.output_gates import gate_bundle_graphs
from autocontrast.export.plan import FusedContrast, FusedDola, PlannedGraph
from autocontrast.export.variants import QUANTIZATIONS, QuantRecipe

OPSET = 17
DTYPES = ("float32", "float16")
# --decode-graphs: "one" switched graph for the original head, the early exit and ACD (one copy of
# the weights in a session; autocontrast.export.switched_graph) or a "separate" graph each
DECODE_GRAPHS = ("one", "separate")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What to export. `exits=None`: the checkpoint's exits (a plain checkpoint: top and middle layer)."""

    exits: tuple[Exit, ...] | None = None
    projection: str | None = None  # a VocabularyProjectionMode name; None: what the checkpoint has
    fuse_contrast: tuple[Exit, Exit] | None = None  # (upper, lower)
    alpha: float = DEFAULT_ALPHA
    minimum_candidates: int = DEFAULT_MINIMUM_CANDIDATES
    # DoLa of the model's own head against these premature candidates, computed inside decode_exits
    fuse_dola: tuple[Exit, ...] | None = None
    relative_top: float = DEFAULT_RELATIVE_TOP
    score_graph: bool = True
    dtype: str = "float32"
    optimize: bool | None = None  # graph fusions; None: the family's default (`Family.fuses_by_default`)
    quantize: str | None = None
    quant_block_size: int | None = None  # weights per quantization block along K; None: the recipe's (32)
    tensorrt: bool = False
    trt_max_batch: int = 8
    trt_max_length: int = 2048
    validation_steps: int = 4
    # exits that get an early-exit graph (only their layers computed); None: the chosen exits below
    # the top layer, unless they are a checkpoint's own list (which may name every layer)
    early_exits: tuple[int, ...] | None = None
    # the decode graphs' KV cache layout (autocontrast.bundle.KV_LAYOUTS); None: the family's default
    kv_layout: str | None = None
    # DECODE_GRAPHS; None: one switched graph where the bundle allows it, else separate graphs
    decode_graphs: str | None = None
    # refuse, before loading, an export whose estimated peak memory exceeds what is available
    memory_check: bool = True
    # a MIXED graph beside decode_exits: a batch's decode step and a joining prompt's chunk in one pass
    mixed_step: bool = False

    def __post_init__(self) -> None:
        if self.kv_layout is not None and self.kv_layout not in KV_LAYOUTS:
            raise ExportError(f"--kv-layout {self.kv_layout!r} is not supported; choose one of: {', '.join(KV_LAYOUTS)}")
        if self.decode_graphs is not None and self.decode_graphs not in DECODE_GRAPHS:
            raise ExportError(f"--decode-graphs {self.decode_graphs!r} is not supported; choose one of: "
                              f"{', '.join(DECODE_GRAPHS)}")
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype {self.dtype!r} is not supported; choose one of: {', '.join(DTYPES)}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ExportError(f"--quantize {self.quantize!r} is not supported; choose: {', '.join(QUANTIZATIONS)}")
        if self.quant_block_size is not None and (not self.quantize or self.quant_block_size < 16
                                                  or self.quant_block_size & (self.quant_block_size - 1)):
            raise ExportError(f"--quant-block-size {self.quant_block_size!r}: a power of two >= 16 (MatMulNBits), "
                              "with --quantize")
        if self.mixed_step and self.tensorrt:
            raise ExportError("--mixed-step and --tensorrt do not go together: the mixed-step graph attends through "
                              "ONNX Runtime's GroupQueryAttention, which TensorRT does not build")
        if self.quantize and self.dtype != "float32":
            raise ExportError(f"--quantize {self.quantize} quantizes float32 weights; do not combine it with "
                              "--dtype float16")
        if self.fuse_contrast is not None and len(self.fuse_contrast) != 2:
            raise ExportError(f"--fuse-contrast needs UPPER,LOWER, got {self.fuse_contrast!r}")
        if self.early_exits is not None and not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1
                                                    for e in self.early_exits):
            raise ExportError(f"--early-exits takes layer numbers (e.g. 15 or 10,15), got {self.early_exits!r}")
        problem = contrast_parameters_problem(self.alpha, self.minimum_candidates)
        if problem:
            raise ExportError(f"fused contrast: {problem}")
        if self.fuse_dola is not None:
            from autocontrast.config import MultiExitConfiguration
            from autocontrast.errors import ConfigurationError

            try:  # the runtime's own rules for candidates and relative_top
                MultiExitConfiguration(use_original_head=False, dola_layers=self.fuse_dola, relative_top=self.relative_top)
            except ConfigurationError as err:
                raise ExportError(f"--fuse-dola: {err}") from None

    @property
    def quant_recipe(self) -> QuantRecipe | None:
        """The quantization recipe this export applies: `--quantize`'s, with `--quant-block-size` if given."""
        if self.quantize is None:
            return None
        recipe = QUANTIZATIONS[self.quantize]
        return recipe if self.quant_block_size is None else dataclasses.replace(recipe, block_size=self.quant_block_size)

    @property
    def variant_name(self) -> str:
        return self.quantize or ("float16" if self.dtype == "float16" else "float32")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: Manifest
    seconds: float
    size_bytes: int
    stages: tuple[Stage, ...] = ()  # each stage's time and memory

    @property
    def peak_resident_bytes(self) -> int | None:
        """The highest stage's peak (None where /proc is absent)."""
        return max((s.peak_bytes for s in self.stages if s.peak_bytes is not None), default=None)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export_bundle(model: str | os.PathLike, output: str | os.PathLike, *, options: ExportOptions | None = None,
                  force: bool = False, log: Callable[[str], None] = _stderr) -> ExportResult:
    """Export `model` (local folder or hub id) to a validated bundle at `output`.

    The output path is checked before the model loads (see `autocontrast.export.output`): it must
    name a directory in a writable place and not exist, unless `force` and it is a bundle, which
    is then replaced once the new one is validated; anything else there is never touched.
    Temporary directories that killed exports to `output` left behind are removed first.

    Raises `ExportError` (a bad output path, a missing or corrupt checkpoint, bad options),
    `UnknownExitError`, `UnsupportedArchitectureError`, `ProviderUnavailableError` (TensorRT
    without a GPU) or `ExportValidationError`; on any error, Ctrl-C, SIGTERM or SIGHUP nothing is
    left at or beside `output`.
    """
    options = options or ExportOptions()
    started = time.perf_counter()
    meter = log = StageMeter(log)  # each stage's time and peak resident memory on the log
    try:
        source, output = str(model), check_output(output, force=force)
        if options.tensorrt:
            from autocontrast.export.tensorrt import check_tensorrt

            check_tensorrt()
        remove_stale_work(output, log=log)
        log(f"[1/6] loading {source}")
        loaded = _load(source, options)
        exits, graphs = _plan(loaded, options)
        manifest = _export_into_place(loaded, source, output, exits, graphs, options, force=force, log=log)
    finally:
        meter.stop()  # its sampling thread ends with the export, failed or not
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    result = ExportResult(output, manifest, time.perf_counter() - started, size, tuple(meter.stages))
    meter.log(summary(result))
    return result


def _export_into_place(loaded: _Loaded, source: str, output: Path, exits: tuple[Exit, ...],
                       graphs: list[dict[str, Any]], options: ExportOptions, *, force: bool,
                       log: Callable[[str], None]) -> Manifest:
    """Build the bundle in a temporary directory beside `output`, then rename it into place.

    On any error or interruption the temporary directory, and parents made for it, are removed.
    """
    _import_build_modules()
    created = missing_parents(output)
    work: Path | None = None
    reported: list[str] = []

    def clean_up() -> None:
        if work is not None:
            discard_work_dir(work)
        for directory in created:
            try:
                directory.rmdir()
            except OSError:
                pass

    def interrupted(signum: int) -> None:
        if reported:
            return
        reported.append(name := signal.Signals(signum).name)
        if work is not None and work.exists():
            clean_up()
            log(f"interrupted ({name}): removed the unfinished export {work}")
        else:  # after the rename into place: the bundle is complete
            log(f"interrupted ({name}) after {output} was complete")

    with TerminationGuard(interrupted) as guard:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            work = make_work_dir(output)
        except OSError as err:
            clean_up()
            raise ExportError(f"cannot create {output.parent} ({err.strerror}); choose an OUTPUT in a "
                              "directory you can write to") from None
        try:
            manifest = _build(loaded, source, exits, graphs, options, work, log)
            if options.tensorrt:
                from autocontrast.export.tensorrt import build_engines

                log("[6/6] building TensorRT engines")
                manifest = build_engines(work, manifest, log=log, max_batch=options.trt_max_batch,
                                         max_length=options.trt_max_length)
            else:
                log("[6/6] writing the manifest")
            manifest = write_manifest(work, manifest)  # records every file's SHA-256
            work.chmod(0o755)  # mkdtemp made it private; a bundle is an ordinary directory
            with guard.hold():
                replace_output(work, output, force=force)
        except BaseException as err:
            if isinstance(err, KeyboardInterrupt):  # raised by the guard, or by an application's handler
                interrupted(signal.SIGINT)
            clean_up()
            if isinstance(err, OSError) and not isinstance(err, BrokenPipeError):  # a full disk, a lost mount
                raise ExportError(f"cannot write the bundle beside {output} ({err}); nothing was written") from err
            raise
    return manifest


def _import_build_modules() -> None:
    """Import what `_build` needs before the partial directory exists: an interrupt that lands inside a
    C extension's import (onnx, protobuf) can crash the interpreter outright."""
    import autocontrast.export.tied_head  # noqa: F401
    import autocontrast.export.trace  # noqa: F401
    import autocontrast.export.validation  # noqa: F401
    import autocontrast.export.variants  # noqa: F401
    import autocontrast.export.weights  # noqa: F401


@dataclasses.dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    generation_config: Any
    checkpoint_exits: tuple[Exit, ...] | None  # lm_head_layer_indices of the checkpoint's own config


def _load(source: str, options: ExportOptions) -> _Loaded:
    from transformers import AutoTokenizer, GenerationConfig

    from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
    from autocontrast.export.checkpoint import (
        corrupt_weights_error,
        detect_projection_mode,
        model_config,
        require_weights,
        unreadable_weight_errors,
    )
    from autocontrast.export.memory import (
        check_memory,
        checkpoint_float32_bytes,
        embedding_float32_bytes,
        estimate_export_bytes,
    )
    from autocontrast.models.auto import AutoMultiExitModel
    from autocontrast.models.families import family_for

    config = model_config(source)
    family = family_for(config)
    weight_bytes = checkpoint_float32_bytes(source, config)
    if options.memory_check and weight_bytes is not None:
        estimate = estimate_export_bytes(weight_bytes, embedding_float32_bytes(config, family.hidden_size(config)))
        check_memory(estimate, what=f"exporting {source} ({weight_bytes / 1e9:.1f} GB of float32 weights)")
    if family.is_encoder_decoder:
        from autocontrast.export.t5 import check_options

        check_options(options)
    require_weights(source)
    mode = (VocabularyProjectionMode.parse(options.projection) if options.projection
            else detect_projection_mode(source))
    try:
        model = AutoMultiExitModel.from_pretrained(source, MultiExitConfiguration(vocab_projection_mode=mode),
                                                   dtype="float32")
    except AutocontrastError:
        raise
    except unreadable_weight_errors() as err:
        raise corrupt_weights_error(source, err) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception:  # noqa: BLE001 - validation then uses fixed random ids
        tokenizer = None
    try:
        generation_config = GenerationConfig.from_pretrained(source)
    except OSError:
        generation_config = None
    own = getattr(config, "lm_head_layer_indices", None)
    return _Loaded(model, tokenizer, generation_config, tuple(own) if own is not None else None)


def _plan(loaded: _Loaded, options: ExportOptions) -> tuple[tuple[Exit, ...], list[PlannedGraph]]:
    """Check the exits and decide the graphs."""
    from autocontrast.config import parse_exit
    from autocontrast.export.graph import graph_exit_order

    model = loaded.model
    L = model.num_layers
    available = model.available_exits
    if options.exits is not None:
        chosen = tuple(parse_exit(e) for e in options.exits)
    else:
        own = [e for e in model.exit_indices if e != ORIGINAL]
        if loaded.checkpoint_exits is None and L > 2:
            own = [L, L // 2]  # a plain checkpoint "has" every layer in direct mode: export two
        chosen = tuple(own)
    contrast = options.fuse_contrast
    if contrast is not None:
        contrast = (parse_exit(contrast[0]), parse_exit(contrast[1]))
        chosen = tuple(dict.fromkeys(chosen + contrast))
    listed = ", ".join(str(e) for e in available)
    for exit_ in chosen:
        if exit_ not in available:
            raise UnknownExitError(f"exit {exit_!r} is not available in this checkpoint "
                                   f"({model.vocab_projection_mode.name}); it has exits: {listed}")
    problem = contrast_problem(*contrast) if contrast is not None else None
    if problem:
        raise ExportError(f"--fuse-contrast: {problem}")
    premature = tuple(parse_exit(e) for e in options.fuse_dola) if options.fuse_dola is not None else ()
    if premature:
        own = exit_aliases(model.vocab_projection_mode, ORIGINAL, num_layers=L)
        inside = [e for e in premature if e in own]
        if inside:
            raise ExportError(f"--fuse-dola: candidate {inside[0]} is the model's own head in "
                              f"{model.vocab_projection_mode.name} (DoLa's mature layer): choose lower layers")
        if model.family.is_encoder_decoder:
            raise ExportError("--fuse-dola is for decoder-only models (leave it out for an encoder-decoder bundle)")
        mature = next((e for e in chosen if e in own), ORIGINAL)
        chosen = tuple(dict.fromkeys(chosen + (mature,) + premature))
    early = _early_exits(options, chosen, L, from_checkpoint=options.exits is None and loaded.checkpoint_exits is not None,
                         encoder_decoder=model.family.is_encoder_decoder)
    layered = tuple(e for e in chosen if e != ORIGINAL)
    explicit_original = ORIGINAL in chosen
    stacked = graph_exit_order(model, chosen if explicit_original else layered) if layered else ()
    fused = (contrast + (options.alpha, options.minimum_candidates)) if contrast else None
    dola = None
    if premature:  # the mature head under the name the stacked graph gives it
        names = exit_aliases(model.vocab_projection_mode, ORIGINAL, num_layers=L)
        dola = (next(e for e in stacked if e in names), premature, options.relative_top)
    lower = _switched_lower_exit(model, options, stacked, early)
    switched = lower is not None  # traced once, as decode_exits; the other two entries name the same file
    graphs = [PlannedGraph(DECODE_ORIGINAL, DECODE, (ORIGINAL,), traced=not switched)]
    if stacked:
        graphs.append(PlannedGraph(DECODE_EXITS, DECODE, stacked, fused, dola, switched_lower=lower))
    graphs += [PlannedGraph(early_exit_graph(k), DECODE, (k,), layers=k, traced=not (switched and k == lower))
               for k in early]
    all_exits = tuple(sort_exits(set(chosen) | {ORIGINAL}))
    if options.mixed_step:
        graphs.append(_mixed_plan(loaded, options, stacked, fused, dola))
    if options.score_graph:
        graphs.append(PlannedGraph(SCORE_GRAPH, SCORE, graph_exit_order(model, all_exits), fused, dola))
    return all_exits, graphs


def _mixed_plan(loaded: _Loaded, options: ExportOptions, stacked: tuple[Exit, ...], fused: FusedContrast | None,
                dola: FusedDola | None) -> PlannedGraph:
    """The MIXED graph serving decode_exits, or why the bundle cannot have one."""
    model = loaded.model
    if model.family.is_encoder_decoder or _kv_layout(model.family, model.config, options) != BUFFER_LAYOUT:
        raise ExportError(f"--mixed-step needs a decoder-only model whose decode graphs write a KV buffer in place "
                          f"(--kv-layout {BUFFER_LAYOUT}; the Llama family); {loaded.model.family.name} here")
    if not stacked:
        raise ExportError(f"--mixed-step serves {DECODE_EXITS}: export at least one layer exit")
    return PlannedGraph(mixed_graph(DECODE_EXITS), MIXED, stacked, fused, dola, mixes=DECODE_EXITS)


def _switched_lower_exit(model: Any, options: ExportOptions, stacked: tuple[Exit, ...],
                         early: tuple[int, ...]) -> int | None:
    """The lower exit K when decode_original, decode_exits and decode_exit_K can be one switched graph
    (`--decode-graphs one`, the default where it applies); None for separate graphs. Raises
    `ExportError` naming what is missing when `--decode-graphs one` was asked for and cannot be."""
    from autocontrast.export.graph import projection_groups

    if options.decode_graphs == "separate":
        return None
    L, family = model.num_layers, model.family
    upper, lower = (stacked + (None, None))[:2]
    reasons = [
        ("a decoder-only model", not family.is_encoder_decoder),
        ("the buffer KV layout (GroupQueryAttention)", _kv_layout(family, model.config, options) == BUFFER_LAYOUT),
        ("float32 weights for the CPU (no --dtype float16, no --tensorrt)",
         options.dtype == "float32" and not options.tensorrt),
        ("exactly two stacked exits: the top layer (or 'original', where it is the top layer's logits) and a "
         "lower one with its early exit",
         len(stacked) == 2 and upper in exit_aliases(model.vocab_projection_mode, L, num_layers=L)
         and isinstance(lower, int) and lower in early),
        ("a top exit that is the model's own head (a SHARED_PROJECTION_* mode)",
         ORIGINAL in exit_aliases(model.vocab_projection_mode, L, num_layers=L)),
        ("one head for both exits", len(projection_groups(model, stacked)) == 1 if len(stacked) == 2 else False),
        ("no --fuse-dola (the switched graph fuses ACD only)", options.fuse_dola is None),
    ]
    missing = [what for what, ok in reasons if not ok]
    if missing:
        if options.decode_graphs == "one":
            raise ExportError("--decode-graphs one needs " + "; ".join(missing) + "; leave it out for separate graphs")
        return None
    return lower


def _early_exits(options: ExportOptions, chosen: tuple[Exit, ...], num_layers: int, *,
                 from_checkpoint: bool, encoder_decoder: bool = False) -> tuple[int, ...]:
    """The exits that get an early-exit graph, each checked against the chosen exits."""
    if options.early_exits is None:
        if from_checkpoint or encoder_decoder:
            return ()
        return tuple(sorted(e for e in chosen if isinstance(e, int) and e < num_layers))
    if encoder_decoder and options.early_exits:
        raise ExportError("--early-exits is for decoder-only models; an encoder-decoder bundle has none "
                          "(pass --early-exits none or leave it out)")
    for k in options.early_exits:
        if k not in chosen:
            raise ExportError(f"--early-exits {k}: exit {k} is not among the exported exits "
                              f"({', '.join(map(str, chosen))}); add it to --exits")
        if k >= num_layers:
            raise ExportError(f"--early-exits {k}: an early exit must be below the top layer ({num_layers}); "
                              "the top exit already computes every layer")
    return tuple(sorted(set(options.early_exits)))


def _build(loaded: _Loaded, source: str, exits: tuple[Exit, ...], plan: list[PlannedGraph],
           options: ExportOptions, work: Path, log: Callable[[str], None]) -> Manifest:
    from autocontrast.export.checkpoint import copy_tokenizer, special_tokens
    from autocontrast.export.tied_head import untie_transposed_copies
    from autocontrast.export.trace import trace_graph
    from autocontrast.export.validation import TOLERANCES, validate_graphs
    from autocontrast.export.variants import apply_variant, fusions_for, versions
    from autocontrast.export.weights import (
        WEIGHTS_FILE,
        WeightStore,
        finish_weights,
        load_lean,
        save_lean,
    )

    model = loaded.model
    family, config = model.family, model.config
    kv = KVCacheSpec(num_layers=model.num_layers, num_kv_heads=family.num_kv_heads(config),
                     head_dim=family.head_dim(config), layout=_kv_layout(family, config, options))
    trace, validate, encoder_decoder = trace_graph, validate_graphs, None
    if family.is_encoder_decoder:  # T5: an encoder graph first; decoder graphs take its cross-attention KV
        from autocontrast.export.t5 import encoder_decoder_spec, trace_t5_graph, with_encoder
        from autocontrast.export.t5_validation import validate_t5_graphs

        trace, validate, encoder_decoder = trace_t5_graph, validate_t5_graphs, encoder_decoder_spec(model)
        plan = with_encoder(plan)
    store = WeightStore(work)  # the bundle's one weights file, written as each graph is traced
    specs, paths = [], {}
    traced = [g for g in plan if g.traced]
    for i, g in enumerate(traced):
        log(f"[2/6] tracing graph {i + 1}/{len(traced)} {g.describe()}")
        # only decoder-only graphs have early exits and fused DoLa (T5's tracer takes neither)
        extra = ({"layers": g.layers} if g.layers else {}) | ({"dola": g.dola} if g.dola else {})
        paths[g.name] = trace(model, g.exits, kind=g.kind, contrast=g.contrast, kv=kv.for_layers(g.layers),
                              target=work / g.file, store=store, opset=OPSET, **extra)
        release_freed_memory()  # the trace's folded constants
    for g in plan:
        spec_contrast = ContrastSpec(CONTRAST_OUTPUT, *g.contrast) if g.contrast else None
        spec_dola = DolaSpec(DOLA_OUTPUT, *g.dola) if g.dola else None
        specs.append(GraphSpec(g.name, g.file, g.kind, tuple(g.exits), logits_output=LOGITS_OUTPUT,
                               contrast=spec_contrast, dola=spec_dola, external_data=(WEIGHTS_FILE,), layers=g.layers,
                               mixes=g.mixes))
    if options.dtype == "float16" and kv.layout == BUFFER_LAYOUT:  # attention writes the buffer in its own dtype
        kv = dataclasses.replace(kv, dtype="float16")
    fusions = fusions_for(family, options.optimize)
    variant: dict[str, Any] = {"dtype": options.dtype, "optimize": bool(fusions), "quantize": options.quantize}
    if options.quantize:
        variant["quantization"] = options.quant_recipe.to_dict()
    if options.variant_name != "float32" or fusions:
        log(f"[3/6] applying variant {options.variant_name}{' + graph fusions' if fusions else ''}")
        variant["fusions"] = apply_variant(paths, model=model, options=options, log=log, kv=kv, store=store)
    release_freed_memory()
    log("[4/6] compacting the shared weights file")
    for path in paths.values():  # after the fusions, which read the head's shape as traced
        lean = load_lean(path)
        if untie_transposed_copies(lean, base_dir=work):  # a tied head reads the embedding, not a transposed copy
            save_lean(lean, path, store)
    finish_weights(list(paths.values()), store,
                   metadata={work / s.file: {EXITS_METADATA_KEY: exits_metadata(s.exits)} for s in specs if s.name in paths})
    switched = next((g.switched_lower for g in plan if g.switched_lower is not None), None)
    if switched is not None:
        from autocontrast.export.switched_graph import switch_decode_graphs

        log(f"[4/6] merging {DECODE_ORIGINAL}, {DECODE_EXITS} and {early_exit_graph(switched)} into one "
            f"switched graph ({SWITCHED_DECODE_FILE})")
        specs = switch_decode_graphs(work, specs, lower=switched, kv=kv,
                                     hidden_size=family.hidden_size(config))
    gated = gate_bundle_graphs(work, specs)
    if gated:
        log(f"[4/6] switches for the fused contrast and DoLa in {', '.join(gated)}: a step computes the one it reads")
    log(f"[5/6] validating against PyTorch (prefill + {options.validation_steps} cached decode steps)")
    # the model is needed no more unless quantization agreement runs it: its memory goes before the sessions open
    release = {} if family.is_encoder_decoder else {"release_model": not options.quantize}
    report = validate(model, work, specs, kv, tolerance=TOLERANCES[options.variant_name],
                      tokenizer=loaded.tokenizer, steps=options.validation_steps, **release)
    if options.quantize:
        from autocontrast.export.variants import teacher_forced_agreement

        log("[5/6] measuring teacher-forced token agreement with fp32 PyTorch")
        variant["agreement"] = teacher_forced_agreement(model, work, specs, kv, tokenizer=loaded.tokenizer)
    tokenizer_files, template = copy_tokenizer(source, work)
    special = special_tokens(config, loaded.generation_config, vocab_size=int(config.vocab_size))
    if special.get("outside_vocabulary"):
        log(f"warning: special token id(s) {', '.join(map(str, special['outside_vocabulary']))} lie outside the "
            f"vocabulary (0..{int(config.vocab_size) - 1}): the model can never generate them, so generation "
            "stops only at max_new_tokens or a stop string (recorded as special_tokens.outside_vocabulary)")
    return Manifest(
        source_model=source, architecture=family.name, num_layers=model.num_layers,
        hidden_size=family.hidden_size(config), vocab_size=int(config.vocab_size),
        max_positions=family.max_positions(config), projection_mode=model.vocab_projection_mode.name,
        exits=exits, kv_cache=kv, graphs=tuple(specs),
        special_tokens=special, tokenizer_files=tokenizer_files,
        chat_template=template, variant=variant, versions=versions(opset=OPSET), validation=report,
        encoder_decoder=encoder_decoder)


def _kv_layout(family: Any, config: Any, options: ExportOptions) -> str:
    """The decode graphs' KV layout: the option, or the family's default; a buffer only where it can be."""
    default = family.kv_layout(config)
    if options.kv_layout == BUFFER_LAYOUT and default != BUFFER_LAYOUT:
        raise ExportError(f"--kv-layout {BUFFER_LAYOUT}: this {family.name} model's attention cannot run as "
                          f"GroupQueryAttention (GPT-2, GPT-Neo, T5 and sliding-window models keep the "
                          f"{CONCAT_LAYOUT} layout); leave --kv-layout out")
    return options.kv_layout or default


def summary(result: ExportResult) -> str:
    """A few lines for the end of an export: where, what, how big, how close to PyTorch."""
    from autocontrast.export.fusions import describe_counts

    m = result.manifest
    peak = f", peak resident {result.peak_resident_bytes / 1e9:.2f} GB" if result.peak_resident_bytes else ""
    lines = [f"exported {m.source_model} -> {result.path} in {result.seconds:.1f} s{peak}, "
             f"{result.size_bytes / 1e6:.1f} MB ({m.variant.get('quantize') or m.variant.get('dtype')})"]
    for g in m.graphs:
        diffs = m.validation.get("graphs", {}).get(g.name, {})
        worst = ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())
        fused = f", contrast {g.contrast.upper} vs {g.contrast.lower}" if g.contrast else ""
        fused += f", DoLa vs {','.join(map(str, g.dola.candidates))}" if g.dola else ""
        early = f", layers 1..{g.layers} only" if g.layers else ""
        lines.append(f"  {g.file}: {g.kind}, exits {', '.join(map(str, g.exits))}{fused}{early}; max |diff| {worst}")
    fused: dict[str, int] = {}
    for counts in m.variant.get("fusions", {}).values():
        for name, made in counts.items():
            fused[name] = fused.get(name, 0) + made
    if fused:
        lines.append("  graph fusions (nodes made, all graphs): " + describe_counts(fused))
    if "agreement" in m.variant:
        a = m.variant["agreement"]
        lines.append(f"  teacher-forced agreement with fp32: {a['agreed']}/{a['steps']} = {a['rate']:.1%}")
    return "\n".join(lines)
