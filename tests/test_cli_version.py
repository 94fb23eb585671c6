"""Every console script the package installs answers `--version` with its name and the package version."""

from __future__ import annotations

import importlib
import sys

import pytest
import tomllib

from autocontrast import __version__
from tests.read_guard import REPOSITORY

SCRIPTS = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_prints_its_version(name, monkeypatch, capsys):
    module, function = SCRIPTS[name].split(":")
    entry = getattr(importlib.import_module(module), function)
    monkeypatch.setattr(sys, "argv", [name, "--version"])
    with pytest.raises(SystemExit) as exit_:
        entry()
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip().endswith(f" {__version__}")
