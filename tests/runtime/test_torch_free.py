"""The runtime imports and generates (every mode, structured output) with torch, transformers and optimum made
unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "optimum"):
                raise ImportError("blocked for the torch-free test: " + name)
    sys.meta_path.insert(0, Block())
""")


def test_runtime_generates_without_torch(llama_bundle):
    script = BLOCKER + textwrap.dedent(f"""
        from autocontrast.config import MultiExitConfiguration
        from autocontrast.runtime import Generator
        import autocontrast.runtime.cli, autocontrast.bench.cli, autocontrast.bench.ours
        gen = Generator({str(llama_bundle)!r})
        acd = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(3, 1))
        for fused in (True, False):
            print(len(gen.generate("Hello", multi_exit=acd, max_new_tokens=4, ignore_eos=True,
                                   fused_contrast=fused).token_ids[0]))
        from autocontrast.runtime.constraint import OutputConstraint
        print(gen.generate("Hello", max_new_tokens=8, constraint=OutputConstraint.choice(["yes", "no"])).text)
        dola = MultiExitConfiguration(use_original_head=False, dola_layers=(1, 2))
        print(len(gen.generate("Hello", multi_exit=dola, max_new_tokens=4, ignore_eos=True).token_ids[0]))
        assert not any(m.split(".")[0] in ("torch", "transformers", "optimum") for m in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split()
    assert out[:2] == ["4", "4"] and out[2] in ("yes", "no") and out[3] == "4"  # structured output and DoLa too


def test_blocker_really_blocks_torch():
    proc = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "blocked for the torch-free test" in proc.stderr
