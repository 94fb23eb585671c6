"""Our runtime as a benchmarked system: one Generator, one decoding mode, one provider. Torch-free."""

from __future__ import annotations

from typing import Any

from autocontrast.bench.stats import RunTiming, token_rows


class RuntimeSystem:
    """`contrast=None`: the bundle's fused contrast; `exit_=None`: the contrast's lower exit;
    `threads=None`: onnxruntime's default."""

    def __init__(self, bundle: str, *, mode: str, provider: str, contrast: tuple[Any, Any] | None,
                 exit_: Any = None, share_weights: bool = False, threads: int | None = None) -> None:
        self.bundle, self.mode_name, self.provider, self.threads = bundle, mode, provider, threads
        self.share_weights = share_weights
        self.contrast, self.exit_ = contrast, exit_
        self.generator: Any = None
        self.multi_exit: Any = None

    def skip_reason(self) -> str | None:
        from autocontrast.errors import AutocontrastError
        from autocontrast.runtime.providers import resolve_providers

        try:
            resolve_providers(self.provider)
        except AutocontrastError as err:
            return str(err)
        return None

    def load(self) -> None:
        from autocontrast.config import configuration_for_mode
        from autocontrast.errors import ConfigurationError
        from autocontrast.runtime import Generator

        # Only this mode's graph is loaded: the memory figure is that of a service running this mode.
        self.generator = Generator(self.bundle, provider=self.provider, threads=self.threads, preload=(),
                                   share_weights=self.share_weights)
        # acd-fused, acd-numpy -> contrast; dola, dola-numpy -> dola
        mode = "contrast" if self.mode_name.startswith("acd") else self.mode_name.removesuffix("-numpy")
        needs_contrast = mode == "contrast" or (mode == "exit" and self.exit_ is None)
        contrast_parameters = {}
        if needs_contrast and self.contrast is None:
            fused = self.generator.manifest.fused_contrast  # a generic tool takes its exits from the bundle
            if fused is None:
                raise ConfigurationError(f"{self.bundle} fuses no contrast; pass --contrast UPPER,LOWER and --exit N")
            self.contrast = (fused.upper, fused.lower)  # ... and the parameters they are fused with
            contrast_parameters = {"alpha": fused.alpha, "minimum_candidates": fused.minimum_candidates}
        exit_ = self.exit_ if self.exit_ is not None else (self.contrast[1] if self.contrast else None)
        if mode == "dola":  # over every exit the bundle returns beside its own head
            from autocontrast.runtime.modes import dola_candidates

            manifest = self.generator.manifest  # the fused DoLa's candidates and relative_top where it has one
            rt = {"relative_top": manifest.fused_dola.relative_top} if manifest.fused_dola else {}
            self.multi_exit = configuration_for_mode(mode, dola_candidates(manifest), **rt)
        else:
            self.multi_exit = configuration_for_mode(mode, {"original": (), "exit": (exit_,)}.get(mode, self.contrast),
                                                     **(contrast_parameters if mode == "contrast" else {}))
        self.fused = not self.mode_name.endswith("-numpy")
        mode = self.generator.mode(self.multi_exit, fused=self.fused)
        self.generator.session(mode.graph)
        if self.mode_name == "acd-fused" and not mode.fused:
            raise RuntimeError(f"bundle {self.bundle} has no fused contrast {self.contrast}")

    def generate(self, prompts: list[list[int]], new_tokens: int) -> RunTiming:
        result = self.generator.generate(prompts, multi_exit=self.multi_exit, fused_contrast=self.fused,
                                         max_new_tokens=new_tokens, ignore_eos=True)
        t = result.timings
        ends = [t.ttft_s]
        for step in t.step_s:
            ends.append(ends[-1] + step)
        return RunTiming(step_ends=tuple(ends), batch=len(prompts), tokens=token_rows(result.token_ids))
