"""The export bundle's manifest and graph facts: the contract between the exporter and the runtime.

A bundle is a directory holding ONNX graph(s), the tokenizer files and `manifest.json`. This is
the one module that writes and reads that manifest; a reader refuses a wrong format or version
by name, and a manifest that names files the bundle lacks. It is also the one home of the graphs'
input and output names and of graph selection (which graph returns which exits, exit aliases
resolved once when the manifest is read): the tracer, the session, validation, variants,
TensorRT and the tests import them from here. Torch-free.

Graph conventions (all graphs of a bundle share them):
- inputs `input_ids` (batch, seq) int64, `attention_mask` (batch, past+seq) int64,
  `position_ids` (batch, seq) int64, and for decode graphs the past KV cache named by `KVCacheSpec`
  (batch, kv_heads, past, head_dim).
- decode graphs output `GraphSpec.logits_output` (default `exit_logits`, (batch, n_exits, vocab))
  for the last position only, exits in `GraphSpec.exits` order, plus the present KV cache
  (batch, kv_heads, past+seq, head_dim), and optionally the fused contrast named by
  `ContrastSpec.output` (batch, vocab) and fused DoLa named by `DolaSpec.output` (batch, vocab),
  in that order after the logits. A prefill passes a past of length 0.
- score graphs take no past and output `logits_output` (batch, seq, n_exits, vocab) for every
  position (and the fused contrast, if any, as (batch, seq, vocab)).
- `GraphSpec.external_data`: files holding a graph's weights; acd-export writes one shared,
  deduplicated `weights.bin` that every graph reads by offset.
- `GraphSpec.layers`: an early-exit decode graph computes only the first `layers` decoder layers
  (its exits are at or below that layer) and its KV cache has that many layers (`Manifest.kv_for`);
  None: every layer.
- `GraphSpec.switches`: entries naming one switched decode graph (`UPPER_SWITCH`, `LOWER_SWITCH`:
  boolean scalar inputs) feed it these values at every run; such a graph's KV cache has every layer
  (`GraphSpec.cache_layers`), of which an early-exit entry writes only its `layers`.
- A decode graph fusing both the contrast and DoLa takes, for each, a boolean scalar input
  `output_switch(output)`: false skips that output (it comes back empty).

Encoder-decoder bundles (T5; `Manifest.encoder_decoder` is set) add an `encoder` graph: inputs
`input_ids` and `attention_mask` (batch, source) int64 of the prompt; outputs every decoder layer's
cross-attention keys and values, named by `EncoderDecoderSpec.cross_names()`, each
(batch, kv_heads, source, head_dim), computed once per prompt. Their decode and score graphs
are the decoder's: `input_ids`, `attention_mask` and `position_ids` are the decoder tokens' (the
first decoder token is `decoder_start_token_id` at position 0; positions feed the relative
position bias), and they also take `encoder_attention_mask` (batch, source) and the cross
keys/values under the same names (a graph whose exits all lie below the top layers does not
read those layers' cross keys/values and does not declare them: feed the inputs a graph declares).

Manifest dicts: `variant` = {dtype, optimize, quantize, quantization (int8 recipe), agreement
(int8: teacher-forced token agreement with fp32), tensorrt (provider options per graph, cache
paths relative to the bundle)};
`validation` = {tolerance, batch, prompt_length, decode_steps, graphs: {graph: {output: max abs
diff vs PyTorch}}, passed}; `special_tokens` = {bos_token_id, eos_token_ids, pad_token_id};
`files` = {path relative to the bundle: SHA-256 hex} of every file but the manifest, recorded by
`write_manifest` (format version 2; version 1 bundles have none). Reading a bundle never hashes;
`read_manifest(..., verify=True)` (and `acd-verify`) checks every recorded file.

>>> m = Manifest.from_dict(Manifest.example().to_dict())
>>> m.graph_for_exits([30, 15]).name
'decode_exits'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autocontrast.config import (
    DEFAULT_ALPHA,
    DEFAULT_MINIMUM_CANDIDATES,
    ORIGINAL,
    Exit,
    exit_aliases,
    parse_exit,
)
from autocontrast.errors import BundleError

FORMAT = "autocontrast-bundle"
# 2: `files` (SHA-256 of every file); 3: `GraphSpec.layers` (early-exit graphs); 4: `KVCacheSpec.layout`;
# 5: `GraphSpec.switches` (several entries naming one switched graph); 6: `output_switch` inputs of a
# decode graph fusing both the contrast and DoLa; 7: MIXED graphs (`GraphSpec.mixes`)
FORMAT_VERSION = 7
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7)  # each adds optional fields only: an older manifest reads as it was
MANIFEST_FILE = "manifest.json"

# graph kinds and the graphs acd-export writes
DECODE = "decode"
SCORE = "score"
DECODE_ORIGINAL = "decode_original"
DECODE_EXITS = "decode_exits"
SWITCHED_DECODE_FILE = "decode.onnx"  # one switched graph serving decode_original, decode_exits and decode_exit_K
SCORE_GRAPH = "score"


MIXED = "mixed"  # a decode graph's step and a joining prompt's chunk in one pass over the weights


def mixed_graph(decode_graph: str) -> str:
    """The name of the mixed-step graph serving decode graph `decode_graph` (bundle format 7)."""
    return f"{decode_graph}_mixed"


def early_exit_graph(k: int) -> str:
    """The name of the decode graph that runs layers 1..k only and returns exit k (an early exit)."""
    return f"decode_exit_{k}"


# input and output names every graph uses
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
TOKEN_INPUTS = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)
LOGITS_OUTPUT = "exit_logits"
CONTRAST_OUTPUT = "contrast_scores"
DOLA_OUTPUT = "dola_scores"
PAST_KEY, PAST_VALUE = "past_key_values.{layer}.key", "past_key_values.{layer}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{layer}.key", "present.{layer}.value"
ENCODER = "encoder"
KINDS = (DECODE, SCORE, ENCODER, MIXED)
# A mixed-step graph's second set of inputs and outputs: a joining prompt's chunk, in its own KV buffer
CHUNK_PREFIX = "chunk_"


def chunk_name(name: str) -> str:
    """The mixed-step graph's name for the chunk's counterpart of input or output `name`."""
    return CHUNK_PREFIX + name


CHUNK_TOKEN_INPUTS = tuple(chunk_name(n) for n in TOKEN_INPUTS)
# KV cache layouts of decode graphs. CONCAT: the graph concatenates past and new entries and returns
# the longer present; the batch's rows are right-aligned to a common width (left padding).
# BUFFER: past and present are one preallocated buffer (batch, kv_heads, capacity, head_dim) the graph
# writes in place (GroupQueryAttention); each row is left-aligned with its own length.
CONCAT_LAYOUT = "concat"
BUFFER_LAYOUT = "buffer"
KV_LAYOUTS = (CONCAT_LAYOUT, BUFFER_LAYOUT)
# Boolean scalar inputs of a switched decode graph (one file serving the original head, an early exit
# and ACD; autocontrast.export.switched_graph): which parts of the graph run.
UPPER_SWITCH = "compute_upper"  # the layers above the lower exit, and the upper exit's row
LOWER_SWITCH = "compute_lower"  # the lower exit's row


def output_switch(output: str) -> str:
    """The boolean scalar input of a decode graph fusing both the contrast and DoLa that says whether a run
    computes fused output `output` (autocontrast.export.output_gates; bundle format 6)."""
    return f"compute_{output}"

# ONNX metadata key under which each graph records the exits it returns (JSON list, graph order),
# so a reader can refuse a manifest that does not describe the graph it sits beside.
EXITS_METADATA_KEY = "autocontrast.exits"


def exits_metadata(exits: Sequence[Exit]) -> str:
    """The value stored under `EXITS_METADATA_KEY` for a graph returning `exits`."""
    return json.dumps([str(e) for e in exits])


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"  # numpy dtype name of the cache tensors
    layout: str = CONCAT_LAYOUT  # one of KV_LAYOUTS
    past_key: str = PAST_KEY
    past_value: str = PAST_VALUE
    present_key: str = PRESENT_KEY
    present_value: str = PRESENT_VALUE

    def past_names(self) -> list[str]:
        """Input names in graph order: key then value of layer 0, 1, ..."""
        return [n.format(layer=i) for i in range(self.num_layers) for n in (self.past_key, self.past_value)]

    def for_layers(self, layers: int | None) -> KVCacheSpec:
        """This layout for a graph computing only the first `layers` layers (None: all of them)."""
        return self if layers is None or layers == self.num_layers else dataclasses.replace(self, num_layers=layers)

    def present_names(self) -> list[str]:
        return [n.format(layer=i) for i in range(self.num_layers) for n in (self.present_key, self.present_value)]

    def chunk_past_names(self) -> list[str]:
        """A mixed-step graph's past inputs of the chunk's buffer, graph order."""
        return [chunk_name(n) for n in self.past_names()]

    def chunk_present_names(self) -> list[str]:
        return [chunk_name(n) for n in self.present_names()]


@dataclasses.dataclass(frozen=True)
class EncoderDecoderSpec:
    """What an encoder-decoder bundle adds: the encoder graph and the cross-attention KV it hands on.

    The cross keys/values of decoder layer i are (batch, kv_heads, source, head_dim), with the
    decoder's KV heads and head size (`Manifest.kv_cache`); they depend only on the prompt.
    """

    decoder_start_token_id: int
    num_layers: int  # decoder layers (each has a cross-attention)
    encoder_layers: int
    encoder_graph: str = "encoder"  # the name of the encoder's GraphSpec
    encoder_attention_mask: str = "encoder_attention_mask"  # decoder graphs' input: the prompt's mask
    cross_key: str = "cross_key_values.{layer}.key"
    cross_value: str = "cross_key_values.{layer}.value"

    def cross_names(self) -> list[str]:
        """Encoder outputs = decoder inputs, in order: key then value of decoder layer 0, 1, ..."""
        return [n.format(layer=i) for i in range(self.num_layers) for n in (self.cross_key, self.cross_value)]


@dataclasses.dataclass(frozen=True)
class ContrastSpec:
    """A contrast fused into a graph: its output name and exact parameters."""

    output: str
    upper: Exit
    lower: Exit
    alpha: float
    minimum_candidates: int


@dataclasses.dataclass(frozen=True)
class DolaSpec:
    """DoLa fused into a graph: its output name, the mature exit (the model's own head), the premature
    candidates (in the order the first-on-ties choice reads them) and relative_top."""

    output: str
    mature: Exit
    candidates: tuple[Exit, ...]
    relative_top: float


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str
    kind: str  # DECODE, SCORE or ENCODER (no exits)
    exits: tuple[Exit, ...]
    logits_output: str = LOGITS_OUTPUT
    contrast: ContrastSpec | None = None
    dola: DolaSpec | None = None
    external_data: tuple[str, ...] = ()  # files the graph's weights live in, relative to the bundle
    layers: int | None = None  # decoder layers the graph computes (an early exit); None: all of them
    # a switched graph's boolean inputs and the values this entry runs it with (several entries name one file)
    switches: tuple[tuple[str, bool], ...] = ()  # ((input name, value), ...)
    mixes: str | None = None  # a MIXED graph: the decode graph whose steps it runs beside a prompt chunk

    @property
    def cache_layers(self) -> int | None:
        """Layers of the graph's KV cache (None: all): a switched graph takes every layer's, whatever it computes."""
        return None if self.switches else self.layers

    def exit_position(self, exit_: Exit) -> int:
        return self.exits.index(exit_)

    def cost(self, num_layers: int) -> tuple[int, int, bool]:
        """Sort key of the work one step of this graph does: layers computed, exits projected, fused contrasts."""
        return (self.layers or num_layers, len(self.exits), (self.contrast is not None) + (self.dola is not None))


@dataclasses.dataclass(frozen=True)
class Manifest:
    source_model: str
    architecture: str  # registered family name: gpt2, gpt_neo, llama, ...
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    projection_mode: str  # a VocabularyProjectionMode name
    exits: tuple[Exit, ...]  # every exit the bundle's graphs provide
    kv_cache: KVCacheSpec
    graphs: tuple[GraphSpec, ...]
    special_tokens: dict[str, Any] = dataclasses.field(default_factory=dict)  # bos/eos/pad ids
    tokenizer_files: tuple[str, ...] = ("tokenizer.json",)
    chat_template: str | None = None
    variant: dict[str, Any] = dataclasses.field(default_factory=lambda: {"dtype": "float32"})
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    validation: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # relative path -> SHA-256 hex
    encoder_decoder: EncoderDecoderSpec | None = None  # set for encoder-decoder models (T5)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # -- lookups the runtime needs --------------------------------------------------------------

    def graph(self, name: str) -> GraphSpec:
        for g in self.graphs:
            if g.name == name:
                return g
        raise BundleError(f"bundle has no graph named {name!r}; it has: {[g.name for g in self.graphs]}")

    def __post_init__(self) -> None:
        # Exit aliases, resolved once (config.exit_aliases is the rule): in the shared projection
        # modes the top exit and 'original' are the same logits, so a graph returning either serves both.
        aliases = {e: exit_aliases(self.projection_mode, e, num_layers=self.num_layers)
                   for e in (ORIGINAL, self.num_layers)}
        object.__setattr__(self, "_aliases", aliases)

    def aliases(self, exit_: Exit) -> tuple[Exit, ...]:
        """Every name of `exit_`'s logits in this bundle's graphs, itself first."""
        return self._aliases.get(exit_, (exit_,))

    def graph_names(self, graph: GraphSpec, exits: Sequence[Exit]) -> tuple[Exit, ...] | None:
        """The names under which `graph` returns each of `exits` (aliases resolved); None if it lacks one."""
        found = []
        for exit_ in exits:
            name = next((n for n in self.aliases(exit_) if n in graph.exits), None)
            if name is None:
                return None
            found.append(name)
        return tuple(found)

    def find_graph(self, exits: Sequence[Exit], *, kind: str = DECODE) -> tuple[GraphSpec, tuple[Exit, ...]] | None:
        """The cheapest graph of `kind` (fewest layers, then fewest exits) returning all of `exits`,
        with the names it uses for them; None if no graph does."""
        fitting = [(g, names) for g in self.graphs if g.kind == kind
                   for names in (self.graph_names(g, exits),) if names is not None]
        return min(fitting, key=lambda c: c[0].cost(self.num_layers), default=None)

    def graph_for_exits(self, exits: Sequence[Exit], *, kind: str = DECODE) -> GraphSpec:
        """The cheapest graph of `kind` (fewest layers, then fewest exits) that returns all of `exits`."""
        found = self.find_graph(exits, kind=kind)
        if found is None:
            have = sorted({str(e) for g in self.graphs if g.kind == kind for e in g.exits})
            raise BundleError(f"no {kind} graph in this bundle returns exits {list(exits)}; "
                              f"its {kind} graphs return: {', '.join(have) or 'nothing'}")
        return found[0]

    def kv_for(self, graph: GraphSpec) -> KVCacheSpec:
        """The KV cache layout of one graph: the bundle's, with only the layers the graph computes."""
        return self.kv_cache.for_layers(graph.cache_layers)

    @property
    def fused_contrast(self) -> ContrastSpec | None:
        """The contrast the bundle's decode graphs fuse (the exporter's choice), if any."""
        return next((g.contrast for g in self.graphs if g.kind == DECODE and g.contrast), None)

    @property
    def fused_dola(self) -> DolaSpec | None:
        """The DoLa the bundle's decode graphs fuse (`acd-export --fuse-dola`), if any."""
        return next((g.dola for g in self.graphs if g.kind == DECODE and g.dola), None)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.encoder_decoder is not None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.special_tokens.get("eos_token_ids") or ())

    @property
    def padding_token_id(self) -> int:
        """The id that pads a batch's rows: pad, else end-of-sequence, else 0, the first inside the vocabulary.

        Padded positions are masked, so any token serves; one beyond the vocabulary (GPT-2's 50256 over a
        resized one) would fail the embedding's Gather.
        """
        candidates = (self.special_tokens.get("pad_token_id"), *self.eos_token_ids)
        return next((int(t) for t in candidates if t is not None and 0 <= int(t) < self.vocab_size), 0)

    # -- (de)serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BundleError(f"not an autocontrast bundle manifest (format is {data.get('format')!r}, "
                              f"expected {FORMAT!r})" if isinstance(data, dict) else "manifest is not a JSON object")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise BundleError(f"bundle format_version {version!r} is not supported by this runtime (it reads "
                              f"versions {', '.join(map(str, READABLE_VERSIONS))}); re-export the model with "
                              "this autocontrast")
        try:
            fields = dict(data)
            fields["exits"] = tuple(parse_exit(e) for e in fields["exits"])
            fields["kv_cache"] = KVCacheSpec(**fields["kv_cache"])
            fields["graphs"] = tuple(_graph_from_dict(g) for g in fields["graphs"])
            fields["tokenizer_files"] = tuple(fields.get("tokenizer_files", ("tokenizer.json",)))
            if fields.get("encoder_decoder") is not None:
                fields["encoder_decoder"] = EncoderDecoderSpec(**fields["encoder_decoder"])
            manifest = cls(**fields)
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"manifest is malformed: {type(err).__name__}: {err}") from None
        if manifest.kv_cache.layout not in KV_LAYOUTS:
            raise BundleError(f"manifest is malformed: kv_cache layout {manifest.kv_cache.layout!r} is not one of "
                              f"{', '.join(KV_LAYOUTS)}")
        if manifest.encoder_decoder is not None:
            manifest.graph(manifest.encoder_decoder.encoder_graph)  # raises BundleError when absent
        for g in manifest.graphs:
            if g.layers is not None and not (1 <= g.layers <= manifest.num_layers and g.kind == DECODE
                                             and all(isinstance(e, int) and e <= g.layers for e in g.exits)):
                raise BundleError(f"manifest is malformed: graph {g.name!r} computes {g.layers} layers but "
                                  f"returns exits {[str(e) for e in g.exits]} ({g.kind}, model of "
                                  f"{manifest.num_layers} layers); re-export the bundle")
        return manifest

    @staticmethod
    def example() -> Manifest:
        """A small manifest for documentation and tests of readers."""
        kv = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64)
        return Manifest(
            source_model="example", architecture="llama", num_layers=30, hidden_size=576, vocab_size=49152,
            max_positions=8192, projection_mode="SHARED_PROJECTION_DIRECT", exits=(15, 30, "original"),
            kv_cache=kv, graphs=(
                GraphSpec(DECODE_ORIGINAL, "decode_original.onnx", DECODE, ("original",)),
                GraphSpec(DECODE_EXITS, "decode_exits.onnx", DECODE, (30, 15),
                          contrast=ContrastSpec(CONTRAST_OUTPUT, 30, 15, DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES)),
                GraphSpec(SCORE_GRAPH, "score.onnx", SCORE, (15, 30, "original")),
            ))


def _graph_from_dict(data: dict[str, Any]) -> GraphSpec:
    fields = dict(data)
    fields["exits"] = tuple(parse_exit(e) for e in fields["exits"])
    fields["external_data"] = tuple(fields.get("external_data", ()))
    fields["switches"] = tuple((str(name), value) for name, value in fields.get("switches", ()))
    if not all(isinstance(value, bool) for _, value in fields["switches"]):
        raise ValueError(f"graph {fields.get('name')!r} has switches that are not true/false: {fields['switches']}")
    if fields.get("contrast"):
        c = dict(fields["contrast"])
        c["upper"], c["lower"] = parse_exit(c["upper"]), parse_exit(c["lower"])
        fields["contrast"] = ContrastSpec(**c)
    if fields.get("dola"):
        d = dict(fields["dola"])
        d["mature"], d["candidates"] = parse_exit(d["mature"]), tuple(parse_exit(e) for e in d["candidates"])
        fields["dola"] = DolaSpec(**d)
    if fields["kind"] not in KINDS:
        raise ValueError(f"graph {fields.get('name')!r} has unknown kind {fields['kind']!r}")
    return GraphSpec(**fields)


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is a bundle directory of this format (any version): its manifest names FORMAT.

    The test `acd-export --force` applies before replacing a directory: anything else is not ours.
    """
    manifest = Path(path) / MANIFEST_FILE
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return Path(path).is_dir() and isinstance(data, dict) and data.get("format") == FORMAT


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(bundle_dir: str | Path) -> dict[str, str]:
    """SHA-256 of every file under `bundle_dir` except the manifest, by relative POSIX path."""
    root = Path(bundle_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p != root / MANIFEST_FILE)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Manifest:
    """Write `manifest.json`, recording the SHA-256 of every file now in `bundle_dir`; returns what was written.

    Call it last, once every other file of the bundle is in place.
    """
    manifest = dataclasses.replace(manifest, files=file_digests(bundle_dir), format=FORMAT,
                                   format_version=FORMAT_VERSION)
    path = Path(bundle_dir) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return manifest


def weight_bytes(bundle_dir: str | Path) -> int:
    """Bytes of a bundle's external weight files, each counted once (the graphs share them)."""
    files = {name for g in read_manifest(bundle_dir).graphs for name in g.external_data}
    return sum((Path(bundle_dir) / name).stat().st_size for name in files)


def read_manifest(bundle_dir: str | Path, *, verify: bool = False) -> Manifest:
    """Read and check a bundle's manifest: format, version, and that every named file exists.

    `verify=True` also hashes every file the manifest records and raises `BundleError` naming the
    first that is missing or differs (reads the whole bundle: seconds for a large one).

    >>> read_manifest("smollm2-acd", verify=True).architecture  # doctest: +SKIP
    'llama'
    """
    root = Path(bundle_dir)
    path = root / MANIFEST_FILE
    if root.exists() and not root.is_dir():
        raise BundleError(f"{str(root)!r} is a file, not a bundle directory: pass the directory acd-export wrote")
    if not root.is_dir():
        raise BundleError(f"bundle directory {str(root)!r} does not exist")
    if not os.access(root, os.R_OK | os.X_OK):
        raise BundleError(f"bundle directory {str(root)!r} is not readable by this user; fix its permissions")
    if not path.is_file():
        raise BundleError(f"{str(root)!r} is not an export bundle: it has no {MANIFEST_FILE} (make one with acd-export)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise BundleError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); it is damaged: "
                          "re-export the bundle") from None
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"cannot read {path}: {err}") from None
    manifest = Manifest.from_dict(data)
    needed = [g.file for g in manifest.graphs] + [f for g in manifest.graphs for f in g.external_data]
    missing = [f for f in dict.fromkeys(needed + list(manifest.tokenizer_files)) if not (root / f).is_file()]
    if missing:
        raise BundleError(f"bundle {str(root)!r} is incomplete: missing {', '.join(missing)}")
    if verify:
        check_files(root, manifest)
    return manifest


def check_files(bundle_dir: str | Path, manifest: Manifest) -> None:
    """Raise `BundleError` naming the first recorded file that is missing or whose SHA-256 differs.

    Files the manifest does not record (a runtime's own cache, a user's notes) are not checked.
    """
    root = Path(bundle_dir)
    if not manifest.files:
        raise BundleError(f"bundle {str(root)!r} records no file digests (format version "
                          f"{manifest.format_version}); re-export it with this autocontrast to verify it")
    for name, expected in manifest.files.items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"bundle {str(root)!r} is damaged: {name} is missing; copy the bundle again "
                              "or re-export it")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"bundle {str(root)!r} is damaged: {name} differs from the manifest (SHA-256 "
                              f"{actual[:12]}..., recorded {expected[:12]}...); copy the bundle again or re-export it")
