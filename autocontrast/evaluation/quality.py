"""`acd-quality`: open-ended generation from text prefixes, scored for repetition, diversity, coherence, MAUVE.

Prompts are the first `prompt_tokens` tokens of paragraphs of a text file (WikiText style: headings
`= Title =` and blank lines skipped, paragraphs shorter than `min_words` words too); the paragraph's
next tokens are the human continuation MAUVE compares with. For each setting the model continues
every prompt; the continuations are scored with `quality_metrics`.

Settings are `METHOD[:key=value,...]` (`autocontrast.evaluation.quality_settings`): greedy, exit,
acd, dola and sampling, with their exits, thresholds and repetition penalty; `--study` runs the
standard sweep over the model's exits. Generation runs either on a PyTorch model folder (HF
`generate`, batched) or on an export bundle through the torch-free runtime.

>>> from autocontrast.evaluation.quality import main
>>> main(["path/to/model", "--data", "test.txt", "--prompts", "8", "--json", "q.json"])  # doctest: +SKIP
>>> main(["bundle", "--data", "test.txt", "--settings", "greedy", "acd:lower=15,rp=1.2", "dola:layers=10/15/20"])  # doctest: +SKIP
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
    DEFAULT_RELATIVE_TOP,
    parse_exit,
    parse_exits,
    projection_label,
)
from autocontrast.errors import ConfigurationError, DataError
from autocontrast.evaluation.generation_backends import load_backend
from autocontrast.evaluation.quality_metrics import (
    REP_ORDERS,
    SentenceEmbedder,
    coherence,
    diversity,
    mauve_score,
    rep_n,
)
from autocontrast.evaluation.quality_settings import (
    DEFAULT_TOP_P,
    METHODS,
    Setting,
    parse_settings,
    study_settings,
)

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
    mauve: float | None  # MAUVE against the human continuations (MiniLM features), None without embeddings
    mean_new_tokens: float
    seconds: float
    samples: list[dict[str, str]]  # a few prompt/continuation pairs


@dataclasses.dataclass(frozen=True)
class QualityReport:
    model: str
    backend: str
    exits: str  # what the exits are (`projection_label`): a direct projection is labelled untrained
    prompts: int
    prompt_tokens: int
    max_new_tokens: int
    settings: list[SettingResult]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def table(self) -> str:
        head = (f"{'setting':<34} {'mode':<16} {'rep-2':>6} {'rep-3':>6} {'rep-4':>6} {'divers.':>7} {'coher.':>6} "
                f"{'MAUVE':>6} {'tokens':>6}")
        lines = [f"{self.prompts} prompts of {self.prompt_tokens} tokens, up to {self.max_new_tokens} new tokens "
                 f"({self.backend}; exits: {self.exits})", head]
        for s in self.settings:
            coh = "n/a" if s.coherence is None else f"{s.coherence:.3f}"
            mauve = "n/a" if s.mauve is None else f"{s.mauve:.3f}"
            lines.append(f"{s.name:<34} {s.description:<16} {s.rep['rep-2']:6.3f} {s.rep['rep-3']:6.3f} "
                         f"{s.rep['rep-4']:6.3f} {s.diversity:7.3f} {coh:>6} {mauve:>6} {s.mean_new_tokens:6.1f}")
        return "\n".join(lines)


def write_chart(report: QualityReport, path: str | Path) -> None:
    """Diversity (x) against coherence (y), one labelled point per setting, the marker's area MAUVE (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colours = {"greedy": "black", "exit": "grey", "acd": "tab:blue", "dola": "tab:orange", "sampling": "tab:green"}
    for s in report.settings:
        method = s.name.partition(":")[0]
        size = 30 + 400 * (s.mauve or 0.0)
        ax.scatter(s.diversity, s.coherence or 0.0, s=size, color=colours.get(method, "tab:red"), alpha=0.6,
                   label=method)
        ax.annotate(s.name, (s.diversity, s.coherence or 0.0), fontsize=6, xytext=(3, 3), textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, title="marker area: MAUVE")
    ax.set_xlabel("diversity (higher: fewer repeated n-grams)")
    ax.set_ylabel("coherence (prompt-continuation cosine)")
    ax.set_title(f"{Path(report.model).name}: {report.prompts} prompts, {report.max_new_tokens} new tokens\n"
                 f"exits: {report.exits}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run_quality(model: str | Path, data: str | Path, *, settings: Sequence[Setting], prompts: int = 100,
                prompt_tokens: int = 32, max_new_tokens: int = 128, batch_size: int = 8, seed: int = 0,
                projection: str = "auto", with_coherence: bool = True, samples: int = 3) -> QualityReport:
    """Generate and score every setting; see the module docstring."""
    backend = load_backend(model, projection=projection)
    encoded = [ids for ids in (backend.encode(p) for p in read_paragraphs(data)) if len(ids) > prompt_tokens][:prompts]
    if not encoded:
        raise DataError(f"{data} has no paragraph longer than {prompt_tokens} tokens")
    prompt_ids = [ids[:prompt_tokens] for ids in encoded]
    prompt_texts = [backend.decode(ids) for ids in prompt_ids]
    human = [backend.decode(ids[prompt_tokens:prompt_tokens + max_new_tokens]) for ids in encoded]
    embedder = SentenceEmbedder() if with_coherence else None
    human_features = embedder.embed(human) if embedder else None
    results = []
    for number, setting in enumerate(settings, 1):
        config = setting.config()
        start = time.perf_counter()
        generated: list[list[int]] = []
        for b in range(0, len(prompt_ids), batch_size):
            generated += backend.generate(prompt_ids[b: b + batch_size], config, max_new_tokens=max_new_tokens,
                                          top_p=setting.top_p if setting.sampled else None, seed=seed + b,
                                          repetition_penalty=setting.repetition_penalty)
            print(f"\r[{number}/{len(settings)}] {setting.name}: {len(generated)}/{len(prompt_ids)} prompts", end="",
                  file=sys.stderr, flush=True)
        print(file=sys.stderr)
        texts = [backend.decode(ids) for ids in generated]
        coh = coherence(embedder, prompt_texts, texts) if embedder else None
        results.append(SettingResult(
            name=setting.name, description=config.description,
            rep={f"rep-{n}": rep_n(texts, n) for n in REP_ORDERS}, diversity=diversity(texts),
            coherence=None if coh is None else sum(coh) / len(coh),
            mauve=None if embedder is None else mauve_score(human_features, embedder.embed(texts), seed=seed),
            mean_new_tokens=sum(map(len, generated)) / len(generated), seconds=time.perf_counter() - start,
            samples=[{"prompt": p, "continuation": t} for p, t in zip(prompt_texts[:samples], texts[:samples], strict=True)]))
    return QualityReport(model=str(model), backend=backend.name, exits=projection_label(backend.projection_mode),
                         prompts=len(prompt_ids), prompt_tokens=prompt_tokens,
                         max_new_tokens=max_new_tokens, settings=results)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(prog="acd-quality", description="Repetition, diversity, coherence and MAUVE of "
                                "open-ended generation, per decoding setting.")
    p.add_argument("model", help="a PyTorch model folder or an export bundle (run by the runtime)")
    p.add_argument("--data", required=True, help="text file whose paragraph prefixes are the prompts")
    p.add_argument("--settings", nargs="+", default=["greedy,exit,acd"],
                   help=f"METHOD[:key=value,...] each ({', '.join(METHODS)}; keys upper, lower, alpha, k, layers "
                        "(a/b/c), rt, rp, top_p), e.g. greedy acd:lower=15,rp=1.2 dola:layers=10/15/20,rt=0.1")
    p.add_argument("--study", action="store_true",
                   help="the standard sweep over the exits (--exits, or the bundle's): greedy, sampling, ACD per "
                        "exit and alpha, DoLa, with and without repetition penalty (instead of --settings)")
    p.add_argument("--exits", help="candidate exits below the own head for --study and DoLa (default: the bundle's)")
    p.add_argument("--upper", default="original", help="upper exit (greedy/sampling/acd): 'original' or a layer")
    p.add_argument("--lower", type=int, help="lower exit (exit/acd); default: a bundle's fused contrast's lower exit")
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    p.add_argument("--minimum-candidates", type=int, default=DEFAULT_MINIMUM_CANDIDATES)
    p.add_argument("--relative-top", type=float, default=DEFAULT_RELATIVE_TOP, help="DoLa's default relative_top")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus for the sampling setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--projection", default="auto", help="model folders: projection mode (auto: from weights)")
    p.add_argument("--no-coherence", action="store_true", help="skip the embedding model (no coherence, no MAUVE)")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--chart", help="write a PNG chart (diversity against coherence) here")
    return p


def _bundle_manifest(model: str) -> Any:
    from autocontrast.bundle import MANIFEST_FILE, read_manifest

    return read_manifest(model) if (Path(model) / MANIFEST_FILE).is_file() else None


def _bundle_lower_exit(model: str) -> int:
    """The lower exit of the contrast a bundle fuses: a generic tool takes it from the bundle."""
    manifest = _bundle_manifest(model)
    fused = manifest.fused_contrast if manifest is not None else None
    if fused is None:
        raise ConfigurationError(f"pass --lower: {model} is not a bundle with a fused contrast to take it from")
    return int(fused.lower)


def _candidate_exits(model: str, exits: str | None) -> tuple[int, ...] | None:
    """DoLa's and the study's exits: --exits, else the bundle's exits beside its own head, else None."""
    if exits is not None:
        parsed = parse_exits(exits) or ()
        if not all(isinstance(e, int) for e in parsed):
            raise ConfigurationError(f"--exits {exits!r}: layer indices below the own head, e.g. 10,15,20")
        return tuple(parsed)
    manifest = _bundle_manifest(model)
    if manifest is None:
        return None
    from autocontrast.runtime.modes import dola_candidates

    return tuple(int(e) for e in dola_candidates(manifest))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    specs = study_settings(_candidate_exits(args.model, args.exits) or ()) if args.study else list(args.settings)
    defaults = Setting(upper=parse_exit(args.upper), lower=args.lower, alpha=args.alpha,
                       minimum_candidates=args.minimum_candidates, relative_top=args.relative_top, top_p=args.top_p)
    settings = parse_settings(specs, defaults, lower=lambda: _bundle_lower_exit(args.model),
                              layers=lambda: _candidate_exits(args.model, args.exits))
    report = run_quality(args.model, args.data, settings=settings, prompts=args.prompts,
                         prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, seed=args.seed, projection=args.projection,
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
