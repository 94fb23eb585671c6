"""Text the project carries: WikiText-2's validation and test splits (CC BY-SA 3.0, see wikitext-2/README.md).

Tests, benchmarks (`acd-bench`'s prompts) and evaluation (`wikitext_local`, perplexity) read them
from here, so a clone or an installed wheel needs nothing beside it.

>>> from autocontrast.data import wikitext_path
>>> wikitext_path("test").name
'test.txt'
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from autocontrast.errors import DataError

WIKITEXT_SPLITS = ("valid", "test")


def wikitext_path(split: str = "test") -> Path:
    """The file of one WikiText-2 split ('valid' or 'test'), as installed with the package."""
    if split not in WIKITEXT_SPLITS:
        raise DataError(f"WikiText-2 split {split!r} is not carried; choose one of {', '.join(WIKITEXT_SPLITS)}")
    path = Path(str(files(__name__).joinpath("wikitext-2", f"{split}.txt")))
    if not path.is_file():
        raise DataError(f"{path} is missing: the package was installed without its data files "
                        "(reinstall autocontrast from a wheel or a clone)")
    return path
