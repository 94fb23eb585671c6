"""autocontrast: Auto-Contrastive Decoding and multi-exit language models, fast and deployable.

The package root imports nothing heavy: `autocontrast.runtime` runs with NumPy, onnxruntime and
tokenizers only; `autocontrast.models` and `autocontrast.export` need the `export` extra (torch).
"""

__version__ = "0.1.0"
