"""`acd-quality`: open-ended generation from text prefixes, scored for repetition, diversity, coherence.

Prompts are the first `prompt_tokens` tokens of paragraphs of a text file (WikiText style: headings
`= Title =` and blank lines skipped, paragraphs shorter than `min_words` words too). For each setting
the model continues every prompt; the continuations are scored with `quality_metrics`.

Settings: `greedy` (original head), `exit` (greedy from the lower exit alone), `acd` (greedy on the
contrast upper vs lower) and `sampling` (original head, nucleus top-p). Generation runs either on a
PyTorch model folder (HF `generate`, batched) or on an export bundle through the torch-free runtime.

>>> from autocontrast.evaluation.quality import main
>>> main(["path/to/model", "--data", "test.txt", "--prompts", "8", "--json", "q.json"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autocontrast.cli_support import command_parser, run_cli
from autocontrast.config import (
    DEFAULT_ALPHA,
    DEFAULT_MINIMUM_CANDIDATES,
    ORIGINAL,
    MultiExitConfiguration,
    configuration_for_mode,
    parse_exit,
)
from autocontrast.errors import ConfigurationError, DataError
from autocontrast.evaluation.generation_backends import load_backend
from autocontrast.evaluation.quality_metrics import REP_ORDERS, SentenceEmbedder, coherence, diversity, rep_n

SETTINGS = ("greedy", "exit", "acd", "sampling")
HEADING = re.compile(r"^\s*=.*=\s*$")


def read_paragraphs(path: str | Path, *, min_words: int = 40) -> list[str]:
    """Paragraphs (one per line) of a WikiText-style file, headings and short lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not HEADING.match(line) and len(line.split()) >= min_words]


@dataclasses.dataclass(frozen=True)
class SettingResult:
    name: str
    description: str
    rep: dict[str, float]  # 'rep-2'..'rep-4', fractions
    diversity: float
    coherence: float | None
    mean_new_tokens: float
    seconds: float
    samples: list[dict[str, str]]  # a few prompt/continuation pairs


@dataclasses.dataclass(frozen=True)
class QualityReport:
    model: str
    backend: str
    prompts: int
    prompt_tokens: int
    max_new_tokens: int
    settings: list[SettingResult]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def table(self) -> str:
        head = f"{'setting':<26} {'rep-2':>7} {'rep-3':>7} {'rep-4':>7} {'divers.':>8} {'coher.':>7} {'tokens':>7}"
        lines = [f"{self.prompts} prompts of {self.prompt_tokens} tokens, up to {self.max_new_tokens} new tokens "
                 f"({self.backend})", head]
        for s in self.settings:
            coh = "n/a" if s.coherence is None else f"{s.coherence:.3f}"
            lines.append(f"{s.name + ' ' + s.description:<26} {s.rep['rep-2']:7.3f} {s.rep['rep-3']:7.3f} "
                         f"{s.rep['rep-4']:7.3f} {s.diversity:8.3f} {coh:>7} {s.mean_new_tokens:7.1f}")
        return "\n".join(lines)


def setting_config(name: str, *, upper: Any, lower: int | None, alpha: float, minimum_candidates: int,
                   ) -> MultiExitConfiguration:
    """The multi-exit configuration a setting generates with (`lower`: needed by exit and acd)."""
    if name in ("exit", "acd") and lower is None:
        raise ConfigurationError(f"the {name} setting needs a lower exit (--lower)")
    if name in ("greedy", "sampling"):
        return configuration_for_mode("original") if upper == ORIGINAL else configuration_for_mode("exit", (upper,))
    if name == "exit":
        return configuration_for_mode("exit", (lower,))
    if name == "acd":
        return configuration_for_mode("contrast", (upper, lower), alpha=alpha, minimum_candidates=minimum_candidates)
    raise ConfigurationError(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}")


def write_chart(report: QualityReport, path: str | Path) -> None:
    """Grouped bars: rep-2/3/4, diversity and coherence per setting (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [f"rep-{n}" for n in REP_ORDERS] + ["diversity", "coherence"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(report.settings))
    for i, s in enumerate(report.settings):
        values = [s.rep[m] for m in metrics[:3]] + [s.diversity, s.coherence or 0.0]
        ax.bar([j + i * width for j in range(len(metrics))], values, width, label=f"{s.name} ({s.description})")
    ax.set_xticks([j + width * (len(report.settings) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylim(0, 1)
    ax.set_title(f"{Path(report.model).name}: {report.prompts} prompts, {report.max_new_tokens} new tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_quality(model: str | Path, data: str | Path, *, settings: Sequence[str] = ("greedy", "exit", "acd"),
                upper: Any = "original", lower: int | None = None, prompts: int = 100, prompt_tokens: int = 32,
                max_new_tokens: int = 128, batch_size: int = 8, alpha: float = DEFAULT_ALPHA,
                minimum_candidates: int = DEFAULT_MINIMUM_CANDIDATES, top_p: float = 0.95, seed: int = 0,
                projection: str = "auto", with_coherence: bool = True, samples: int = 3) -> QualityReport:
    """Generate and score every setting; see the module docstring."""
    configs = {name: setting_config(name, upper=parse_exit(upper), lower=lower, alpha=alpha,
                                    minimum_candidates=minimum_candidates) for name in settings}
    backend = load_backend(model, projection=projection)
    paragraphs = read_paragraphs(data)
    prompt_ids = [ids[:prompt_tokens] for ids in (backend.encode(p) for p in paragraphs)
                  if len(ids) > prompt_tokens][:prompts]
    if not prompt_ids:
        raise DataError(f"{data} has no paragraph longer than {prompt_tokens} tokens")
    prompt_texts = [backend.decode(ids) for ids in prompt_ids]
    embedder = SentenceEmbedder() if with_coherence else None
    results = []
    for name, config in configs.items():
        start = time.perf_counter()
        generated: list[list[int]] = []
        for b in range(0, len(prompt_ids), batch_size):
            generated += backend.generate(prompt_ids[b: b + batch_size], config, max_new_tokens=max_new_tokens,
                                          top_p=top_p if name == "sampling" else None, seed=seed + b)
            print(f"\r{name}: {len(generated)}/{len(prompt_ids)} prompts", end="", file=sys.stderr)
        print(file=sys.stderr)
        texts = [backend.decode(ids) for ids in generated]
        coh = coherence(embedder, prompt_texts, texts) if embedder else None
        results.append(SettingResult(
            name=name, description=config.description, rep={f"rep-{n}": rep_n(texts, n) for n in REP_ORDERS},
            diversity=diversity(texts), coherence=None if coh is None else sum(coh) / len(coh),
            mean_new_tokens=sum(map(len, generated)) / len(generated), seconds=time.perf_counter() - start,
            samples=[{"prompt": p, "continuation": t} for p, t in zip(prompt_texts[:samples], texts[:samples], strict=True)]))
    return QualityReport(model=str(model), backend=backend.name, prompts=len(prompt_ids), prompt_tokens=prompt_tokens,
                         max_new_tokens=max_new_tokens, settings=results)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(prog="acd-quality", description="Repetition, diversity and coherence of "
                                "open-ended generation, per decoding setting.")
    p.add_argument("model", help="a PyTorch model folder or an export bundle (run by the runtime)")
    p.add_argument("--data", required=True, help="text file whose paragraph prefixes are the prompts")
    p.add_argument("--settings", default="greedy,exit,acd", help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--upper", default="original", help="upper exit (greedy/sampling/acd): 'original' or a layer")
    p.add_argument("--lower", type=int, help="lower exit (exit/acd); default: a bundle's fused contrast's lower exit")
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    p.add_argument("--minimum-candidates", type=int, default=DEFAULT_MINIMUM_CANDIDATES)
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus for the sampling setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--projection", default="auto", help="model folders: projection mode (auto: from weights)")
    p.add_argument("--no-coherence", action="store_true", help="skip the embedding model")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--chart", help="write a PNG bar chart here")
    return p


def _bundle_lower_exit(model: str) -> int:
    """The lower exit of the contrast a bundle fuses: a generic tool takes it from the bundle."""
    from autocontrast.bundle import MANIFEST_FILE, read_manifest

    fused = read_manifest(model).fused_contrast if (Path(model) / MANIFEST_FILE).is_file() else None
    if fused is None:
        raise ConfigurationError(f"pass --lower: {model} is not a bundle with a fused contrast to take it from")
    return int(fused.lower)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    needs_lower = args.lower is None and any(s in ("exit", "acd") for s in settings)
    lower = _bundle_lower_exit(args.model) if needs_lower else args.lower
    report = run_quality(args.model, args.data, settings=settings, upper=args.upper, lower=lower,
                         prompts=args.prompts, prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, alpha=args.alpha, minimum_candidates=args.minimum_candidates,
                         top_p=args.top_p, seed=args.seed, projection=args.projection,
                         with_coherence=not args.no_coherence)
    print(report.table())
    if args.json:
        Path(args.json).write_text(report.to_json(), encoding="utf-8")
    if args.chart:
        write_chart(report, args.chart)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
