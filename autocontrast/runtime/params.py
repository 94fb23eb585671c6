"""Generation parameters: frozen, checked at construction, errors that quote the value and the range.

>>> GenerationParams(max_new_tokens=32, temperature=0.7, top_p=0.9, seed=1).do_sample
True
"""

from __future__ import annotations

import dataclasses

from autocontrast.errors import GenerationParameterError


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """How to search. `temperature=0` (the default) or `do_sample=False` is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()  # added to the bundle's end-of-sequence ids
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationParameterError(f"max_new_tokens ({self.max_new_tokens}) must be a positive integer")
        if self.temperature < 0:
            raise GenerationParameterError(f"temperature ({self.temperature}) must be >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationParameterError(f"top_p ({self.top_p}) must be within (0, 1]")
        if self.top_k < 0:
            raise GenerationParameterError(f"top_k ({self.top_k}) must be >= 0 (0 disables it)")
        if self.repetition_penalty <= 0:
            raise GenerationParameterError(f"repetition_penalty ({self.repetition_penalty}) must be > 0")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0
