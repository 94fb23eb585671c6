"""`python -m autocontrast.evaluation.lm_eval`: lm-eval-harness on multi-exit models and export bundles.

Registers the adapters (`multi_exit_hf`, `acd_onnx`), adds the offline tasks shipped here
(`wikitext_local`, ...) and runs `lm_eval.simple_evaluate`, like the original library's
run_lm_eval.py:

    python -m autocontrast.evaluation.lm_eval --model acd_onnx \
        --model_args pretrained=BUNDLE,use_original_head=False,contrast_layer_indices='original;15' \
        --tasks wikitext_local --metadata '{"max_documents": 10}'

>>> from autocontrast.evaluation.lm_eval import main
>>> main(["--model", "multi_exit_hf", "--model_args", "pretrained=PATH", "--tasks", "wikitext_local"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from autocontrast.cli_support import command_parser, run_cli
from autocontrast.errors import ConfigurationError


def evaluate(model: str, model_args: str, tasks: list[str], *, batch_size: int = 1, limit: float | None = None,
             metadata: dict[str, Any] | None = None, include_default_tasks: bool = False) -> dict[str, Any]:
    """lm_eval.simple_evaluate with our adapters registered and our offline tasks on the path."""
    import lm_eval
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models: local-completions scores through a server)
    from lm_eval.tasks import TaskManager

    import autocontrast.evaluation.harness  # noqa: F401  (registers multi_exit_hf and acd_onnx)
    from autocontrast.evaluation.tasks import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=include_default_tasks, metadata=metadata)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigurationError(f"unknown task(s) {', '.join(unknown)}; offline tasks here: "
                                 f"{', '.join(sorted(manager.all_tasks))}")
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=batch_size,
                                   limit=limit, task_manager=manager, metadata=metadata, bootstrap_iters=0,
                                   log_samples=False)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(prog="python -m autocontrast.evaluation.lm_eval",
                                description="lm-eval-harness on a multi-exit model (multi_exit_hf) or an export "
                                            "bundle (acd_onnx), with offline tasks.")
    p.add_argument("--model", default="multi_exit_hf", choices=("multi_exit_hf", "acd_onnx", "local-completions"),
                   help="local-completions: lm-eval's own client, scoring through an OpenAI-compatible server (acd-serve)")
    p.add_argument("--model_args", required=True,
                   help="pretrained=PATH[,use_original_head=False,output_layer_index=N | "
                        "contrast_layer_indices='original;N',alpha=..,minimum_candidates=..]")
    p.add_argument("--tasks", required=True, help="comma list, e.g. wikitext_local")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--limit", type=float, help="documents per task (or a fraction)")
    p.add_argument("--metadata", help='JSON for the tasks, e.g. \'{"path": "test.txt", "max_documents": 10}\'')
    p.add_argument("--include_default_tasks", action="store_true", help="also index lm-eval's own (hub) tasks")
    p.add_argument("--output_path", help="write the results JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    from lm_eval.utils import make_table

    args = build_parser().parse_args(argv)
    try:
        metadata = json.loads(args.metadata) if args.metadata else None
    except json.JSONDecodeError as err:
        raise ConfigurationError(f"--metadata is not valid JSON: {err}") from None
    results = evaluate(args.model, args.model_args, [t.strip() for t in args.tasks.split(",") if t.strip()],
                       batch_size=args.batch_size, limit=args.limit, metadata=metadata,
                       include_default_tasks=args.include_default_tasks)
    print(make_table(results))
    if args.output_path:
        Path(args.output_path).write_text(json.dumps({"results": results["results"], "config": {
            "model": args.model, "model_args": args.model_args, "tasks": args.tasks, "metadata": metadata}},
            indent=2, default=str), encoding="utf-8")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
