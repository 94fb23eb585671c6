"""A fresh clone (or an installed wheel) needs nothing beside it: no file names a path outside the
checkout, the text the project reads is package data with its licence, and the session's read guard
(tests/read_guard.py) refuses what would slip through."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from autocontrast.data import WIKITEXT_SPLITS, wikitext_path
from autocontrast.errors import DataError
from tests.read_guard import REPOSITORY, ReadGuard, forbidden_siblings, reads_outside

OUTSIDE = re.compile(r"\.\./shared|[\"']shared[\"']\s*/\s*[\"']data[\"']")
PARENTS = re.compile(r"Path\(__file__\)\.resolve\(\)\.parents\[(\d+)\](\.parent)?")
TEXT_SUFFIXES = {".py", ".sh", ".toml", ".md", ".yaml", ".cfg", ".txt", ""}


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout
    return [REPOSITORY / n for n in names.splitlines()
            if not n.startswith(("benchmarks/results/", "autocontrast/data/")) and Path(n).suffix in TEXT_SUFFIXES
            and (REPOSITORY / n).is_file()]


def test_no_tracked_file_names_the_folder_beside_the_checkout():
    hits = [f"{p.relative_to(REPOSITORY)}:{i}" for p in tracked_text_files()
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if OUTSIDE.search(line) and p.name != "test_self_contained.py"]
    assert hits == []


def test_paths_built_from_a_module_stay_inside_the_checkout():
    escaping = []
    for path in tracked_text_files():
        if path.suffix != ".py":
            continue
        depth = len(path.relative_to(REPOSITORY).parts) - 1  # parents[depth] is the checkout
        for match in PARENTS.finditer(path.read_text(encoding="utf-8")):
            up = int(match.group(1)) + (1 if match.group(2) else 0)
            if up > depth:
                escaping.append(f"{path.relative_to(REPOSITORY)}: {match.group(0)}")
    assert escaping == []


@pytest.mark.parametrize("split", WIKITEXT_SPLITS)
def test_the_package_carries_each_wikitext_split(split):
    path = wikitext_path(split)
    assert path.is_relative_to(REPOSITORY / "autocontrast")
    text = path.read_text(encoding="utf-8")
    assert len(text) > 1_000_000 and text.lstrip("\ufeff").startswith(" \n = ")


def test_the_wikitext_licence_and_attribution_travel_with_the_text():
    folder = wikitext_path("test").parent
    assert "Attribution-ShareAlike 3.0 Unported" in (folder / "LICENSE").read_text(encoding="utf-8")
    assert "Merity" in (folder / "README.md").read_text(encoding="utf-8")


def test_an_unknown_split_is_a_data_error():
    with pytest.raises(DataError, match="train"):
        wikitext_path("train")


def test_the_guard_forbids_siblings_of_the_checkout_but_not_the_checkout(tmp_path):
    repo, shared, hidden = tmp_path / "clone", tmp_path / "shared", tmp_path / ".cache"
    for folder in (repo, shared / "data", hidden):
        folder.mkdir(parents=True)
    forbidden = forbidden_siblings(repo)
    assert shared in forbidden and hidden not in forbidden and repo not in forbidden
    assert reads_outside(shared / "data" / "valid.txt", forbidden)
    assert reads_outside(repo / ".." / "shared" / "x", forbidden)
    assert not reads_outside(repo / "autocontrast" / "x.py", forbidden)


def test_the_guard_refuses_and_records_a_read_in_a_forbidden_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "text.txt").write_text("x")
    guard = ReadGuard(frozenset({outside.resolve()}))
    guard.install()
    with pytest.raises(PermissionError, match="outside the checkout"):
        (outside / "text.txt").read_text()
    assert guard.violations == [str(outside / "text.txt")]
