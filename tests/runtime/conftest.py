"""Runtime test constants; the tiny Llama bundle and its Generator (`llama_bundle`, `llama_generator`)
are fixtures of tests/conftest.py, shared with the server tests."""

from __future__ import annotations

CONTRAST = (3, 1)  # the tiny bundles' fused contrast (the export tests' choice, so caches are shared)
