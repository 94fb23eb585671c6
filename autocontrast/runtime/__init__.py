"""The torch-free runtime: NumPy + ONNX Runtime + tokenizers. Never imports torch."""
