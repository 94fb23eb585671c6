"""Multi-exit configuration, torch-free and shared by the models, the exporter and the runtime.

Field names and defaults follow the original ACD library (`autocontrastive_gen`), so settings
carry over unchanged; string forms used on command lines and in lm-eval `--model_args` parse:

>>> from autocontrast.config import MultiExitConfiguration
>>> cfg = MultiExitConfiguration(use_original_head="False", contrast_layer_indices="original;12")
>>> cfg.contrast_layer_indices
('original', 12)
>>> cfg.description
'original_vs_12'
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

from autocontrast.errors import ConfigurationError, UnknownExitError

ORIGINAL = "original"
Exit = int | str  # a layer index (0 = embeddings, num_layers = top) or 'original'

DEFAULT_ALPHA = 0.1
DEFAULT_MINIMUM_CANDIDATES = 1
DEFAULT_RELATIVE_TOP = 0.1  # DoLa's (Chuang et al. 2023; HF's dola_decoding)


class VocabularyProjectionMode(Enum):
    """How an intermediate layer's hidden state is projected to the vocabulary."""

    LAYER_SPECIFIC_PROJECTION = 0  # each exit has its own trained linear head
    SHARED_PROJECTION_CAST_OUTPUTS = 1  # cast matrix (layer -> top) then the model's own head
    SHARED_PROJECTION_DIRECT = 2  # the model's own head applied directly

    @classmethod
    def parse(cls, value: VocabularyProjectionMode | str | int) -> VocabularyProjectionMode:
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        elif isinstance(value, str):
            key = value.strip().upper().replace("-", "_")
            if key in cls.__members__:
                return cls[key]
            aliases = {"LAYER_SPECIFIC": "LAYER_SPECIFIC_PROJECTION", "CAST": "SHARED_PROJECTION_CAST_OUTPUTS",
                       "CAST_OUTPUTS": "SHARED_PROJECTION_CAST_OUTPUTS", "SHARED_DIRECT": "SHARED_PROJECTION_DIRECT",
                       "DIRECT": "SHARED_PROJECTION_DIRECT"}
            if key in aliases:
                return cls[aliases[key]]
        names = ", ".join(cls.__members__)
        raise ConfigurationError(f"unknown vocab_projection_mode {value!r}; expected one of: {names}")


def parse_exit(value: Exit) -> Exit:
    """Parse one exit: an int layer index, a digit string, or 'original'."""
    if isinstance(value, bool):
        raise ConfigurationError(f"exit {value!r} is not a layer index or 'original'")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == ORIGINAL:
            return ORIGINAL
        try:
            return int(text)
        except ValueError:
            pass
    raise ConfigurationError(f"exit {value!r} is not a layer index or 'original'")


def parse_exits(value: Iterable[Exit] | str | int | None) -> tuple[Exit, ...] | None:
    """Parse a list of exits: a tuple/list, or a string separated by ';' or ',' ("original;12")."""
    if value is None:
        return None
    if isinstance(value, (int, str)) and not (isinstance(value, str) and any(s in value for s in ";,")):
        return (parse_exit(value),)
    if isinstance(value, str):
        parts = [p for p in value.replace(",", ";").split(";") if p.strip()]
        return tuple(parse_exit(p) for p in parts)
    return tuple(parse_exit(v) for v in value)


def contrast_problem(upper: Exit, lower: Exit) -> str | None:
    """What is wrong with contrasting `upper` against `lower` (None: nothing).

    The one home of the rule; the configuration and the exporter's fused contrast both apply it.
    """
    if lower == ORIGINAL:
        return "'original' can only be the upper exit of a contrast, not the lower one"
    if isinstance(upper, int) and isinstance(lower, int) and lower >= upper:
        return f"the lower exit of a contrast must be below the upper one, got upper={upper}, lower={lower}"
    return None


def contrast_parameters_problem(alpha: float, minimum_candidates: int) -> str | None:
    """What is wrong with the contrast's parameters (None: nothing)."""
    if not 0.0 <= alpha <= 1.0:
        return f"alpha ({alpha}) must be within [0, 1]"
    if minimum_candidates < 1:
        return f"minimum_candidates ({minimum_candidates}) must be at least 1"
    return None


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value.strip().capitalize())
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, bool):
            return parsed
    raise ConfigurationError(f"{name} must be True or False, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MultiExitConfiguration:
    """Which exits a multi-exit model has and which it uses to generate.

    Exactly one generation mode is in force: the original head (`use_original_head=True`, the
    default, as in the original library), one exit (`output_layer_index`), or the contrast of two
    exits (`contrast_layer_indices=(upper, lower)`, upper may be 'original').
    `contrast_function`, if given, replaces the standard contrast; it takes
    `(upper_logits, lower_logits)` and returns scores of the same shape.

    DoLa (Chuang et al. 2023) is a fourth mode: `dola_layers` names the candidate premature exits
    contrasted with the model's own head ('original', the mature layer); with several, each step
    takes the one whose distribution is furthest (Jensen-Shannon) from the mature one; tokens below
    `relative_top` x the mature layer's top probability are cut (`autocontrast.models.contrast.dola_scores`).

    >>> MultiExitConfiguration(use_original_head=False, output_layer_index=12).description
    'layer_12'
    """

    vocab_projection_mode: VocabularyProjectionMode = VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION
    lm_head_layer_indices: tuple[Exit, ...] | None = None
    # training
    freeze_parameters: bool = False
    # inference
    use_original_head: bool = True
    output_layer_index: int | None = None
    contrast_layer_indices: tuple[Exit, int] | None = None
    contrast_function: Callable[[Any, Any], Any] | None = None
    alpha: float = DEFAULT_ALPHA
    minimum_candidates: int = DEFAULT_MINIMUM_CANDIDATES
    dola_layers: tuple[int, ...] | None = None  # DoLa: candidate premature exits (one: fixed)
    relative_top: float = DEFAULT_RELATIVE_TOP

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "vocab_projection_mode", VocabularyProjectionMode.parse(self.vocab_projection_mode))
        put(self, "lm_head_layer_indices", parse_exits(self.lm_head_layer_indices))
        put(self, "freeze_parameters", _parse_bool("freeze_parameters", self.freeze_parameters))
        put(self, "use_original_head", _parse_bool("use_original_head", self.use_original_head))
        if self.output_layer_index is not None:
            put(self, "output_layer_index", parse_exit(self.output_layer_index))
        contrast = parse_exits(self.contrast_layer_indices)
        put(self, "contrast_layer_indices", contrast)
        put(self, "dola_layers", parse_exits(self.dola_layers))
        try:
            put(self, "alpha", float(self.alpha))
            put(self, "minimum_candidates", int(self.minimum_candidates))
            put(self, "relative_top", float(self.relative_top))
        except (TypeError, ValueError) as err:
            raise ConfigurationError(f"alpha and relative_top must be numbers and minimum_candidates an integer: "
                                     f"{err}") from None
        self._check_consistency()

    def _check_consistency(self) -> None:
        contrast = self.contrast_layer_indices
        if self.dola_layers is not None:
            self._check_dola()
        elif contrast is not None:
            if len(contrast) != 2:
                raise ConfigurationError(
                    f"contrast_layer_indices needs exactly two exits (upper;lower), got {contrast!r}")
            if self.use_original_head:
                raise ConfigurationError(
                    f"contradiction: use_original_head=True but contrast_layer_indices={contrast!r} was also "
                    "given; set use_original_head=False to generate with the contrast")
            problem = contrast_problem(*contrast)
            if problem:
                raise ConfigurationError(problem)
            if self.output_layer_index is not None:
                raise ConfigurationError(
                    f"contradiction: both output_layer_index={self.output_layer_index} and "
                    f"contrast_layer_indices={contrast!r} were given; choose one")
        elif self.use_original_head and self.output_layer_index is not None:
            raise ConfigurationError(
                f"contradiction: use_original_head=True but output_layer_index={self.output_layer_index} was "
                "also given; set use_original_head=False to generate from that exit")
        elif not self.use_original_head and self.output_layer_index is None:
            raise ConfigurationError(
                "use_original_head=False needs output_layer_index (one exit) or contrast_layer_indices (a contrast)")
        problem = contrast_parameters_problem(self.alpha, self.minimum_candidates)
        if problem:
            raise ConfigurationError(problem)
        if not 0.0 < self.relative_top <= 1.0:
            raise ConfigurationError(f"relative_top ({self.relative_top}) must be within (0, 1]")
        for exit_ in self.lm_head_layer_indices or ():
            if isinstance(exit_, int) and exit_ < 0:
                raise ConfigurationError(f"exit index {exit_} is negative; exits are 0..num_layers")

    def _check_dola(self) -> None:
        layers = self.dola_layers
        if self.use_original_head:
            raise ConfigurationError(f"contradiction: use_original_head=True but dola_layers={layers!r} was also given; "
                                     "set use_original_head=False to generate with DoLa")
        if self.contrast_layer_indices is not None or self.output_layer_index is not None:
            raise ConfigurationError("contradiction: dola_layers is a mode of its own; give it without "
                                     "output_layer_index or contrast_layer_indices")
        if not layers or ORIGINAL in layers or len(set(layers)) != len(layers):
            raise ConfigurationError(f"dola_layers ({layers!r}) must be distinct layer indices (the premature "
                                     "candidates; the mature layer is always the model's own head)")

    # -- what the configuration asks for -------------------------------------------------------

    @property
    def mode(self) -> str:
        """'original', 'exit', 'contrast' or 'dola'."""
        if self.use_original_head:
            return "original"
        if self.dola_layers is not None:
            return "dola"
        return "contrast" if self.contrast_layer_indices is not None else "exit"

    @property
    def required_exits(self) -> tuple[Exit, ...]:
        """The exits whose logits generation needs, upper before lower (DoLa: the mature head, then its candidates)."""
        if self.use_original_head:
            return (ORIGINAL,)
        if self.dola_layers is not None:
            return (ORIGINAL, *self.dola_layers)
        if self.contrast_layer_indices is not None:
            return tuple(self.contrast_layer_indices)
        return (self.output_layer_index,)

    @property
    def description(self) -> str:
        """Short name of the generation mode, as the original library writes it."""
        if self.use_original_head:
            return "original_head"
        if self.dola_layers is not None:
            return "dola_" + "_".join(map(str, self.dola_layers))
        if self.contrast_layer_indices is not None:
            upper, lower = self.contrast_layer_indices
            return f"{upper}_vs_{lower}"
        return f"layer_{self.output_layer_index}"

    def validate_exits(self, *, num_layers: int, available: Iterable[Exit]) -> None:
        """Check that every exit this configuration uses is in range and exists.

        `available` is what the checkpoint (or bundle) provides; 'original' is always allowed.
        """
        have = set(available) | {ORIGINAL}
        for exit_ in self.required_exits:
            check_exit_in_range(exit_, num_layers)
            if exit_ not in have:
                listed = ", ".join(str(e) for e in sorted(have, key=_exit_sort_key))
                raise UnknownExitError(f"exit {exit_!r} is not available; this model has exits: {listed}")

    def replace(self, **changes: Any) -> MultiExitConfiguration:
        return dataclasses.replace(self, **changes)


MODE_NAMES = ("original", "exit", "contrast", "dola")


def configuration_for_mode(mode: str, exits: Iterable[Exit] | str | None = None, *, alpha: float = DEFAULT_ALPHA,
                           minimum_candidates: int = DEFAULT_MINIMUM_CANDIDATES,
                           relative_top: float = DEFAULT_RELATIVE_TOP, **fields: Any) -> MultiExitConfiguration:
    """The configuration of a decoding mode named on a command line: 'original' (no exits), 'exit'
    (one exit), 'contrast' (UPPER,LOWER) or 'dola' (premature candidates, e.g. 10,15,20). Every CLI
    builds its configurations here.

    >>> configuration_for_mode("contrast", "30,15").description
    '30_vs_15'
    """
    parsed = parse_exits(exits) or ()
    if mode == "original":
        if parsed:
            raise ConfigurationError("exits are for mode exit or contrast; mode original uses the model's own head")
        return MultiExitConfiguration(**fields)
    if mode == "exit":
        if len(parsed) != 1:
            raise ConfigurationError(f"mode exit needs one exit, e.g. 15; got {list(parsed)}")
        return MultiExitConfiguration(use_original_head=False, output_layer_index=parsed[0], **fields)
    if mode == "contrast":
        if len(parsed) != 2:
            raise ConfigurationError(f"mode contrast needs two exits UPPER,LOWER, e.g. 30,15; got {list(parsed)}")
        return MultiExitConfiguration(use_original_head=False, contrast_layer_indices=parsed, alpha=alpha,
                                      minimum_candidates=minimum_candidates, **fields)
    if mode == "dola":
        if not parsed:
            raise ConfigurationError("mode dola needs its candidate premature exits, e.g. 10,15,20 (one: fixed)")
        return MultiExitConfiguration(use_original_head=False, dola_layers=parsed, relative_top=relative_top, **fields)
    raise ConfigurationError(f"unknown mode {mode!r}; choose one of: {', '.join(MODE_NAMES)}")


SHARED_MODES = (VocabularyProjectionMode.SHARED_PROJECTION_DIRECT, VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS)
# how reports name the exits of each projection mode: the direct projection is no trained exit, and says so
PROJECTION_LABELS = {
    VocabularyProjectionMode.SHARED_PROJECTION_DIRECT: "direct projection (untrained: the own head on a lower layer)",
    VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS: "cast matrices (fitted) before the own head",
    VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION: "layer-specific exit heads (trained)",
}


def projection_label(mode: VocabularyProjectionMode | str) -> str:
    """What a report says the exits are, e.g. 'direct projection (untrained: ...)'."""
    return PROJECTION_LABELS[VocabularyProjectionMode.parse(mode)]


def is_original_logits(mode: VocabularyProjectionMode | str, exit_: Exit, *, num_layers: int) -> bool:
    """Whether an exit's logits are the model's own head's: 'original', and the top exit in the
    shared projection modes (there the top layer is projected by the model's own head).

    The one home of this rule: the models, the exporter and the runtime's graph lookup use it.

    >>> is_original_logits("SHARED_PROJECTION_DIRECT", 30, num_layers=30)
    True
    """
    if exit_ == ORIGINAL:
        return True
    return exit_ == num_layers and VocabularyProjectionMode.parse(mode) in SHARED_MODES


def exit_aliases(mode: VocabularyProjectionMode | str, exit_: Exit, *, num_layers: int) -> tuple[Exit, ...]:
    """Names of the same logits: (exit_,) or, for the original head's logits, (exit_, its other name)."""
    if is_original_logits(mode, exit_, num_layers=num_layers) and is_original_logits(mode, num_layers,
                                                                                        num_layers=num_layers):
        return (exit_, num_layers if exit_ == ORIGINAL else ORIGINAL)
    return (exit_,)


def check_exit_in_range(exit_: Exit, num_layers: int) -> None:
    if exit_ == ORIGINAL:
        return
    if not isinstance(exit_, int) or not 0 <= exit_ <= num_layers:
        raise UnknownExitError(
            f"exit {exit_!r} is outside 0..{num_layers} (0 is the embeddings, {num_layers} the top layer)")


def _exit_sort_key(exit_: Exit) -> tuple[int, int]:
    return (1, 0) if exit_ == ORIGINAL else (0, int(exit_))


def sort_exits(exits: Iterable[Exit]) -> list[Exit]:
    """Exits in a stable order: layer indices ascending, then 'original'."""
    return sorted(set(exits), key=_exit_sort_key)
