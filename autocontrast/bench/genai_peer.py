"""onnxruntime-genai as a benchmarked peer: its `Generator` on a model folder its model builder wrote.

Optional: without the `onnxruntime_genai` package, or without a folder (`acd-bench --genai-model DIR`),
the system reports why it is skipped. docs/peers.md says how to build the folders (fp32, int4) from
the converted SmolLM2 in a separate virtual environment (the builder needs transformers >= 5).
Imported only inside worker processes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from autocontrast.bench.stats import RunTiming, token_rows
from autocontrast.errors import ConfigurationError

GENAI_CONFIG = "genai_config.json"  # what makes a folder a genai model folder


def check_genai_folder(folder: Path) -> None:
    """Refuse, before anything loads, a `--genai-model` folder the model builder did not write."""
    if not (folder / GENAI_CONFIG).is_file():
        raise ConfigurationError(f"--genai-model {folder}: no {GENAI_CONFIG} there; give a folder that "
                                 "onnxruntime-genai's model builder wrote (docs/peers.md says how to build one)")


class GenaiSystem:
    """Greedy search of onnxruntime-genai on CPU, end-of-sequence held off until `new_tokens` (min_length).

    >>> system = GenaiSystem("genai/smollm2-int4", threads=2)  # doctest: +SKIP
    >>> system.skip_reason() or system.load()  # doctest: +SKIP
    >>> system.generate([[504, 3458, 282]], 16).tokens  # doctest: +SKIP
    """

    def __init__(self, model_dir: str, *, threads: int | None = None) -> None:
        self.model_dir, self.threads = model_dir, threads
        self.model: Any = None

    def skip_reason(self) -> str | None:
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError as err:
            return f"onnxruntime-genai peer needs `pip install onnxruntime-genai` ({err.name} is not installed)"
        if not self.model_dir:
            return "no onnxruntime-genai model folder given (acd-bench --genai-model DIR; see docs/peers.md)"
        if not Path(self.model_dir, GENAI_CONFIG).is_file():
            return f"no {GENAI_CONFIG} in {self.model_dir}"
        return None

    def load(self) -> None:
        import onnxruntime_genai as og

        config = og.Config(self.model_dir)
        config.clear_providers()  # CPU, whatever the folder was built for
        if self.threads is not None:
            options = {"intra_op_num_threads": self.threads}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> RunTiming:
        import onnxruntime_genai as og

        width = len(prompts[0])
        if any(len(p) != width for p in prompts):
            raise ConfigurationError("the onnxruntime-genai peer runs batches of prompts of one length")
        ids = np.asarray(prompts, dtype=np.int32)  # (batch, width)
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, batch_size=len(prompts), max_length=width + new_tokens,
                                  min_length=width + new_tokens)
        ends: list[float] = []
        chosen: list[np.ndarray] = []  # each (batch,)
        # The generator (its KV buffers) is made inside the timed call: a request pays for it, as in ours.
        start = time.perf_counter()
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids)  # runs the prompt
        for _ in range(new_tokens):
            generator.generate_next_token()  # picks a token; from the second on, first runs the last one
            chosen.append(np.array(generator.get_next_tokens()))
            ends.append(time.perf_counter() - start)
        return RunTiming(step_ends=tuple(ends), batch=len(prompts), tokens=token_rows(np.stack(chosen, axis=1)))
