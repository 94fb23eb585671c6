"""The torch-free runtime: NumPy + ONNX Runtime + tokenizers. Never imports torch.

>>> from autocontrast.runtime import Generator, GenerationParams
>>> gen = Generator("path/to/bundle")  # doctest: +SKIP
>>> gen.generate("Once upon a time", max_new_tokens=16).text  # doctest: +SKIP
"""

from autocontrast.runtime.generator import GenerationResult, Generator, TextStream, Timings
from autocontrast.runtime.model import Model
from autocontrast.runtime.params import GenerationParams
from autocontrast.runtime.request import Request, RequestStatus, TokenEvent
from autocontrast.runtime.stepper import Row, Stepper

__all__ = ["GenerationParams", "GenerationResult", "Generator", "Model", "Request", "RequestStatus", "Row", "Stepper",
           "TextStream", "Timings", "TokenEvent"]
