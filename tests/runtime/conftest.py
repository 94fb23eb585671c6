"""Runtime test constants; the tiny Llama bundle and its Generator (`llama_bundle`, `llama_generator`)
are fixtures of tests/conftest.py, shared with the server tests."""

from __future__ import annotations

CONTRAST = (3, 1)  # the tiny bundles' fused contrast (the export tests' choice, so caches are shared)

# nested objects, enums, arrays; every field bounded, so a complete answer always fits max_tokens
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "population", "tags", "mayor"],
          "properties": {"city": {"type": "string", "maxLength": 24},
                         "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
                         "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["big", "old", "coastal"]}},
                         "mayor": {"type": "object", "additionalProperties": False, "required": ["name", "party"],
                                   "properties": {"name": {"type": "string", "maxLength": 24},
                                                  "party": {"enum": ["red", "blue", "none"]}}}}}
