"""What a decode graph fusing both the contrast and DoLa costs per step with each output switched on or off.

One process, one session, one batch state per setting, the settings interleaved step by step (so the
host's drift hits all alike): a prompt is prefilled, then each setting decodes `--steps` tokens (the
exit logits' argmax, the same for all: the switches leave the logits alone). Prints the median step
time per setting and batch size, and each against `--baseline`.

    python benchmarks/output_switch_cost.py BUNDLE --batches 1,4 --steps 32

Settings: `both` (what every step of the graph computed before the switches), `contrast` (an ACD
batch), `dola` (a DoLa batch), `neither` (the graph's exit logits alone: a NumPy contrast). All run on
the one session of that graph: steps of another session interleaved with them would each pay for the
other session's ONNX Runtime threads, which spin for a while after their work (on 2 cores, ~25 ms a
switch at the 1.7B shape), so greedy against ACD is `acd-bench`'s job (a process per system).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from interleaved_steps import median_step_ms, real_prompt

from autocontrast.runtime import Generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--batches", default="1,4", help="batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per setting")
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--baseline", default="both")
    parser.add_argument("--settings", default="both,contrast,dola,neither",
                        help="which settings, in the order their sessions open and their steps run")
    args = parser.parse_args()
    generator = Generator(args.bundle, threads=args.threads, preload=())
    graph = next((g for g in generator.manifest.graphs if g.contrast is not None and g.dola is not None), None)
    if graph is None:
        parser.error(f"{args.bundle} has no decode graph fusing both the contrast and DoLa (acd-export --fuse-dola)")
    known = {"both": None, "contrast": frozenset({graph.contrast.output}),
             "dola": frozenset({graph.dola.output}), "neither": frozenset()}
    chosen = [n.strip() for n in args.settings.split(",") if n.strip()]
    if unknown := [n for n in chosen if n not in known] or (args.baseline not in chosen and [args.baseline]):
        parser.error(f"unknown or missing setting(s) {unknown}: choose from {', '.join(known)}, the baseline among them")
    settings = {n: known[n] for n in chosen}
    prompt = real_prompt(generator, args.prompt_tokens)
    print(f"{args.bundle}: graph {graph.name}, prompt {len(prompt)} tokens, {args.steps} steps per setting")
    print(f"{'batch':>5} {'setting':<9} {'median ms/step':>15} {'x ' + args.baseline:>10}")
    for batch in (int(b) for b in args.batches.split(",")):
        states = []
        for fused in settings.values():
            states.append(generator.decode_state(graph))
            states[-1].fused_outputs = fused
        medians = dict(zip(settings, median_step_ms(states, prompt, batch=batch, steps=args.steps), strict=True))
        for name, median in medians.items():
            print(f"{batch:>5} {name:<9} {median:>15.1f} {median / medians[args.baseline]:>10.2f}")


if __name__ == "__main__":
    main()
