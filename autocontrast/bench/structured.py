"""`acd-bench-structured`: structured output on a bundle: do the answers validate, and what does the mask cost?

    acd-bench-structured BUNDLE [--requests 50] [--modes original,contrast] [--out results.json]

Each request is a chat prompt built from a line of WikiText-2 test ("Describe ... as a JSON record")
with a JSON schema of nested objects, enums and arrays (every field bounded, so a complete answer fits
`--max-tokens`), decoded greedily in each mode. Reported per mode: how many answers parse and validate
(checked by the `jsonschema` package, not by the code under test), tokens per answer, ms per token, and
the share of the decode time spent computing masks and advancing the grammar (timed inside the row's
constraint, so it is the mask's own cost, not a difference of two noisy runs).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from autocontrast.bench import machine
from autocontrast.cli_support import command_parser, run_cli
from autocontrast.config import MultiExitConfiguration
from autocontrast.data import wikitext_path
from autocontrast.errors import ConfigurationError

# nested objects, enums, arrays; strings and numbers bounded (an unbounded field can run to max_tokens)
SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["topic", "year", "kind", "places", "source"],
    "properties": {
        "topic": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 0, "maximum": 2100},
        "kind": {"enum": ["person", "place", "event", "thing", "other"]},
        "places": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 24}},
        "source": {"type": "object", "additionalProperties": False, "required": ["title", "reliable"],
                   "properties": {"title": {"type": "string", "maxLength": 40}, "reliable": {"type": "boolean"}}}}}
MODES = {"original": MultiExitConfiguration(), "contrast": None}  # None: the bundle's fused contrast


def prompts(count: int) -> list[str]:
    """`count` chat prompts, each naming the first words of a WikiText-2 test line."""
    lines = [line.strip() for line in wikitext_path("test").read_text(encoding="utf-8").splitlines()
             if len(line.split()) > 12 and not line.strip().startswith("=")]
    if len(lines) < count:
        raise ConfigurationError(f"--requests {count}: WikiText-2 test has only {len(lines)} usable lines")
    return [f"Describe this as a JSON record: {' '.join(line.split()[:16])}" for line in lines[:count]]


def run_mode(gen: Any, config: MultiExitConfiguration, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """Each prompt alone, greedy, constrained by SCHEMA: validity, tokens, time, the constraint's own time."""
    import jsonschema

    from autocontrast.runtime.constraint import OutputConstraint

    constraint = OutputConstraint.json_schema(SCHEMA)
    valid, tokens, wall, mask, failures = 0, [], 0.0, 0.0, []
    for text in texts:
        stepper = gen.stepper(config)
        row_id = stepper.add(text, chat=True, max_new_tokens=max_tokens, constraint=constraint)
        start = time.perf_counter()
        while not stepper.done:
            stepper.step()
        wall += time.perf_counter() - start
        row = stepper.row(row_id)
        mask += row.constraint.seconds
        tokens.append(len(row.token_ids))
        try:
            jsonschema.validate(json.loads(row.text), SCHEMA)
            valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError) as err:
            failures.append({"prompt": text, "text": row.text, "error": str(err).splitlines()[0]})
    return {"mode": config.description, "requests": len(texts), "valid": valid, "median_tokens": statistics.median(tokens),
            "ms_per_token": 1000 * wall / sum(tokens), "mask_share": mask / wall, "mask_us_per_token":
            1e6 * mask / sum(tokens), "failures": failures}


def main(argv: list[str] | None = None) -> int:
    from autocontrast.runtime import Generator

    p = command_parser(prog="acd-bench-structured", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--modes", default="original,contrast", help="original and/or contrast (the bundle's fused one)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="write the results (JSON) here")
    args = p.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 1:
        raise ConfigurationError("--requests and --max-tokens must be positive")
    gen = Generator(args.bundle, preload=())
    texts = prompts(args.requests)
    fused = gen.manifest.fused_contrast
    results = []
    for name in args.modes.split(","):
        if name not in MODES:
            raise ConfigurationError(f"--modes: {name!r} is not one of {', '.join(MODES)}")
        config = MODES[name]
        if config is None:
            if fused is None:
                raise ConfigurationError("--modes contrast: this bundle fuses no contrast")
            config = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(fused.upper, fused.lower),
                                            alpha=fused.alpha, minimum_candidates=fused.minimum_candidates)
        print(f"{name}: {len(texts)} requests ...", flush=True)
        results.append({"name": name, **run_mode(gen, config, texts, args.max_tokens)})
    print(f"\n{'mode':<10} {'valid':>8} {'tokens':>7} {'ms/token':>9} {'mask %':>7} {'mask us/token':>14}")
    for r in results:
        print(f"{r['name']:<10} {r['valid']:>4}/{r['requests']:<3} {r['median_tokens']:>7.0f} {r['ms_per_token']:>9.2f} "
              f"{100 * r['mask_share']:>7.2f} {r['mask_us_per_token']:>14.0f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bundle": str(args.bundle), "schema": SCHEMA, "max_tokens": args.max_tokens,
                                        "machine": machine.describe(), "results": results}, indent=2), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0 if all(r["valid"] == r["requests"] for r in results) else 1


def cli() -> None:
    sys.exit(run_cli(main))
