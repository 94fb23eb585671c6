"""The package as users install it: the README's install lines that name the wheel are run as written,
in fresh virtual environments (no torch, nothing of this checkout on the path), after the README's
build line made the sdist and the wheel from a copy of the checkout.

Needs the package index (the runtime's dependencies are installed as a user's pip would install them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib

from autocontrast import __version__
from tests.read_guard import REPOSITORY
from tests.serve.conftest import ServerProcess

README = REPOSITORY / "README.md"
WHEEL = f"autocontrast-{__version__}-py3-none-any.whl"


def install_section() -> list[list[str]]:
    """The README's '## Install' section: its bash blocks, each a list of commands (comments cut)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Install\n"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [[line.split("  #")[0].strip() for line in block.splitlines() if line.strip()] for block in blocks]


def wheel_lines() -> list[str]:
    return [line for block in install_section() for line in block if "dist/" in line]


def run(command: str | list[str], *, cwd: Path, bin_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `command` as a user's shell would with `bin_dir` (a virtual environment's) first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(command, shell=isinstance(command, str), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin"


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """A copy of the checkout's files (tracked and new, not ignored) where the README's build line ran."""
    copy = tmp_path_factory.mktemp("clone") / "autocontrast"
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPOSITORY,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in names:
        if (REPOSITORY / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPOSITORY / name, copy / name)
    (build_line,) = [line for block in install_section() for line in block if "python -m build" in line]
    run(build_line, cwd=copy, bin_dir=Path(sys.executable).parent)
    return copy


def test_the_readme_names_the_wheel_of_this_version_and_extras_that_exist():
    extras = set(tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {m for block in install_section() for line in block for m in re.findall(r"\[(\w+)\]", line)}
    assert named and named <= extras, named - extras
    assert wheel_lines() and all(f"dist/{WHEEL}" in line for line in wheel_lines())


def test_the_build_writes_the_wheel_and_sdist_and_their_metadata_passes_twine(dist):
    built = sorted(p.name for p in (dist / "dist").iterdir())
    assert built == sorted([f"autocontrast-{__version__}.tar.gz", WHEEL])
    run([sys.executable, "-m", "twine", "check", "--strict", *map(str, (dist / "dist").iterdir())], cwd=dist,
        bin_dir=Path(sys.executable).parent)


def test_the_wheel_holds_the_package_and_its_data_and_nothing_else(dist):
    wheel = dist / "dist" / WHEEL
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"autocontrast", f"autocontrast-{__version__}.dist-info"}
    for needed in ("autocontrast/runtime/generator.py", "autocontrast/data/wikitext-2/valid.txt",
                   "autocontrast/data/wikitext-2/test.txt", "autocontrast/data/wikitext-2/LICENSE",
                   "autocontrast/evaluation/tasks/wikitext_local.yaml"):
        assert needed in names
    assert not [n for n in names if "benchmarks" in n or "/results/" in n or n.endswith((".onnx", ".json"))]
    print(f"\n{WHEEL}: {wheel.stat().st_size / 1e6:.2f} MB, {len(names)} files")


@pytest.fixture(scope="module")
def runtime_env(dist, tmp_path_factory) -> Path:
    """A fresh virtual environment where the README's plain wheel line ran."""
    bin_dir = fresh_venv(tmp_path_factory.mktemp("venv-runtime") / "venv")
    (plain,) = [line for line in wheel_lines() if "whl[" not in line]
    run(plain, cwd=dist, bin_dir=bin_dir)
    return bin_dir


def test_the_runtime_imports_where_torch_is_not_installed(runtime_env, tmp_path):
    out = run(["python", "-c", "import importlib.util, autocontrast.runtime as r; "
               "print(importlib.util.find_spec('torch') is None, r.__file__)"], cwd=tmp_path, bin_dir=runtime_env)
    absent, location = out.stdout.split()
    assert absent == "True" and location.startswith(str(runtime_env.parent))


def test_the_installed_package_reads_the_text_it_carries(runtime_env, tmp_path):
    out = run(["python", "-c", "from autocontrast.data import wikitext_path as w; "
               "print(w('valid').stat().st_size, w('test').stat().st_size, w('test'))"], cwd=tmp_path, bin_dir=runtime_env)
    valid, test, path = out.stdout.split()
    assert int(valid) > 1_000_000 and int(test) > 1_000_000 and path.startswith(str(runtime_env.parent))


def test_acd_generate_from_the_wheel_generates_with_acd(runtime_env, llama_bundle, tmp_path):
    assert run(["acd-generate", "--version"], cwd=tmp_path, bin_dir=runtime_env).stdout.strip() == \
        f"acd-generate {__version__}"
    out = run(["acd-generate", str(llama_bundle), "--prompt", "The history of", "--exits", "3,1",
               "--max-new-tokens", "8", "--no-stream", "--timings"], cwd=tmp_path, bin_dir=runtime_env)
    assert out.stdout.strip() and "ms/token over 8 tokens" in out.stderr


def test_acd_serve_from_the_wheel_with_serve_answers_the_openai_client(dist, llama_bundle, tmp_path_factory):
    import openai

    bin_dir = fresh_venv(tmp_path_factory.mktemp("venv-serve") / "venv")
    (serve,) = [line for line in wheel_lines() if "whl[serve]" in line]
    run(serve, cwd=dist, bin_dir=bin_dir)
    server = ServerProcess(llama_bundle, command=[str(bin_dir / "acd-serve")], env={"PYTHONPATH": ""})
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.completions.create(model=llama_bundle.name, prompt="The history of", max_tokens=6,
                                           temperature=0)
        assert reply.choices[0].text and reply.usage.completion_tokens <= 6
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.output()
