"""Decoding settings of the quality study: `METHOD[:key=value,...]`, parsed into what to generate with.

Methods: `greedy` (the upper exit, 'original' by default), `exit` (greedy from the lower exit alone),
`acd` (greedy on the contrast upper vs lower), `dola` (greedy on DoLa over premature `layers`) and
`sampling` (nucleus sampling from the upper exit). Keys, each optional (the command line's defaults
fill the rest): `upper`, `lower`, `alpha`, `k` (minimum candidates), `layers` (DoLa's candidates,
separated by '/'), `rt` (DoLa's relative_top), `rp` (repetition penalty, HF's), `top_p`.

>>> s = Setting.parse("acd:lower=15,alpha=0.3,rp=1.2", Setting())
>>> s.name, s.config().description, s.repetition_penalty
('acd:lower=15,alpha=0.3,rp=1.2', 'original_vs_15', 1.2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from autocontrast.config import (
    DEFAULT_ALPHA,
    DEFAULT_MINIMUM_CANDIDATES,
    DEFAULT_RELATIVE_TOP,
    ORIGINAL,
    Exit,
    MultiExitConfiguration,
    configuration_for_mode,
    parse_exit,
)
from autocontrast.errors import ConfigurationError

METHODS = ("greedy", "exit", "acd", "dola", "sampling")
KEYS = {"upper": "upper", "lower": "lower", "alpha": "alpha", "k": "minimum_candidates", "layers": "layers",
        "rt": "relative_top", "rp": "repetition_penalty", "top_p": "top_p"}
USES = {"greedy": {"upper", "rp"}, "exit": {"lower", "rp"}, "acd": {"upper", "lower", "alpha", "k", "rp"},
        "dola": {"layers", "rt", "rp"}, "sampling": {"upper", "top_p", "rp"}}
DEFAULT_TOP_P = 0.95


@dataclasses.dataclass(frozen=True)
class Setting:
    """One decoding setting. `name` is its spec as given (the study's label)."""

    method: str = "greedy"
    upper: Exit = ORIGINAL
    lower: int | None = None
    alpha: float = DEFAULT_ALPHA
    minimum_candidates: int = DEFAULT_MINIMUM_CANDIDATES
    layers: tuple[int, ...] | None = None
    relative_top: float = DEFAULT_RELATIVE_TOP
    repetition_penalty: float = 1.0
    top_p: float = DEFAULT_TOP_P
    name: str = "greedy"

    @classmethod
    def parse(cls, spec: str, defaults: Setting) -> Setting:
        """`METHOD[:key=value,...]` over `defaults` (the command line's --upper, --lower, ...)."""
        method, _, rest = spec.strip().partition(":")
        if method not in METHODS:
            raise ConfigurationError(f"unknown setting {method!r}; choose from {', '.join(METHODS)}")
        fields: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, equals, value = item.partition("=")
            if not equals or key not in KEYS:
                raise ConfigurationError(f"setting {spec!r}: {item!r} is not key=value with a key of "
                                         f"{', '.join(KEYS)}")
            if key not in USES[method]:
                raise ConfigurationError(f"setting {spec!r}: {method} does not use {key!r} (it uses "
                                         f"{', '.join(sorted(USES[method]))})")
            fields[KEYS[key]] = _value(key, value, spec)
        return dataclasses.replace(defaults, method=method, name=spec.strip(), **fields)

    @property
    def sampled(self) -> bool:
        return self.method == "sampling"

    def config(self) -> MultiExitConfiguration:
        """The multi-exit configuration this setting generates with."""
        if self.method in ("exit", "acd") and self.lower is None:
            raise ConfigurationError(f"setting {self.name!r} needs a lower exit (lower=N, or --lower)")
        if self.method in ("greedy", "sampling"):
            return configuration_for_mode("original") if self.upper == ORIGINAL else configuration_for_mode(
                "exit", (self.upper,))
        if self.method == "exit":
            return configuration_for_mode("exit", (self.lower,))
        if self.method == "acd":
            return configuration_for_mode("contrast", (self.upper, self.lower), alpha=self.alpha,
                                          minimum_candidates=self.minimum_candidates)
        if not self.layers:
            raise ConfigurationError(f"setting {self.name!r} needs its premature layers (layers=8/15/22, or a "
                                     "bundle whose exits give them)")
        return configuration_for_mode("dola", self.layers, relative_top=self.relative_top)


def _value(key: str, value: str, spec: str) -> object:
    try:
        if key in ("upper", "lower"):
            exit_ = parse_exit(value)
            if key == "lower" and exit_ == ORIGINAL:
                raise ConfigurationError("'original' is never a lower exit")
            return exit_
        if key == "layers":
            return tuple(int(part) for part in value.split("/"))
        if key == "k":
            return int(value)
        return float(value)
    except (ValueError, ConfigurationError) as err:
        raise ConfigurationError(f"setting {spec!r}: bad value for {key}: {value!r} ({err})") from None


def parse_settings(specs: Sequence[str], defaults: Setting, *, lower: Callable[[], int] | None = None,
                   layers: Callable[[], tuple[int, ...]] | None = None) -> list[Setting]:
    """Settings from command-line words; a word without ':' may list several methods ("greedy,exit,acd").
    `lower()` gives the lower exit of settings that need one and name none (a bundle's fused contrast's),
    `layers()` DoLa's candidates likewise (a bundle's exits); each is asked only when needed."""
    words = [w for spec in specs for w in (spec.split(",") if ":" not in spec else [spec]) if w.strip()]
    if not words:
        raise ConfigurationError("no settings given")
    settings = [Setting.parse(w, defaults) for w in words]
    for field, methods, find in (("lower", ("exit", "acd"), lower), ("layers", ("dola",), layers)):
        lacking = [i for i, s in enumerate(settings) if s.method in methods and getattr(s, field) is None]
        if find is not None and lacking:
            found = find()
            settings = [dataclasses.replace(s, **{field: found}) if i in lacking else s for i, s in enumerate(settings)]
    for setting in settings:
        setting.config()  # a setting that cannot generate fails before any generation starts
    return settings


def study_settings(exits: Sequence[int]) -> list[str]:
    """The standard sweep over a model's candidate exits (below its own head): greedy and nucleus sampling, ACD at
    every exit and two plausibility thresholds, DoLa over all candidates and each alone, each with and without
    a repetition penalty of 1.2 (the DoLa paper's recommendation)."""
    if not exits:
        raise ConfigurationError("the study needs candidate exits (--exits, or a bundle that exports some)")
    layers = "/".join(map(str, exits))
    specs = ["greedy", "greedy:rp=1.2", f"sampling:top_p={DEFAULT_TOP_P}"]
    specs += [f"acd:lower={e},alpha={a}{rp}" for e in exits for a in (0.1, 0.3) for rp in ("", ",rp=1.2")]
    specs += [f"dola:layers={layers},rt={rt}{rp}" for rt in (0.1, 0.3) for rp in ("", ",rp=1.2")]
    specs += [f"dola:layers={e},rp=1.2" for e in exits]
    return specs
