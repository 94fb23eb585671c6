"""The torch-free runtime: NumPy + ONNX Runtime + tokenizers. Never imports torch.

>>> from autocontrast.runtime import Generator, GenerationParams
>>> gen = Generator("path/to/bundle")  # doctest: +SKIP
>>> gen.generate("Once upon a time", max_new_tokens=16).text  # doctest: +SKIP
"""

from autocontrast.runtime.generator import GenerationResult, Generator, Timings
from autocontrast.runtime.model import Model
from autocontrast.runtime.params import GenerationParams
from autocontrast.runtime.stepper import Row, Stepper, TokenEvent

__all__ = ["GenerationParams", "GenerationResult", "Generator", "Model", "Row", "Stepper", "Timings", "TokenEvent"]
