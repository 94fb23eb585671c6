"""WikiText (the tokenized release, as `autocontrast.data` carries it) as lm-eval documents, from a local file.

A document is one article: it starts at a top-level heading line ` = Title = ` (sub-headings
` = = Section = = ` stay inside it), as in `EleutherAI/wikitext_document_level`, which lm-eval's own
`wikitext` task reads from the hub. The file comes from the task's metadata `path` (TaskManager
metadata or `--metadata '{"path": ...}'`), else $AUTOCONTRAST_WIKITEXT, else the test split the package carries;
`max_documents` keeps only the first N articles.

>>> docs = load_documents(path="test.txt", max_documents=2)  # doctest: +SKIP
>>> docs["test"][0]["page"][:20]  # doctest: +SKIP
' = Robert <unk> = \\n'
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401

from autocontrast.data import wikitext_path
from autocontrast.errors import DataError

TITLE = re.compile(r"^ = [^=].* = $")  # ' = Title = ', not ' = = Section = = '


def split_documents(text: str) -> list[str]:
    """Articles of a WikiText file, each from its title line to the line before the next title."""
    documents: list[list[str]] = []
    for line in text.lstrip("\ufeff").splitlines(keepends=True):
        if TITLE.match(line.rstrip("\n")) or not documents:
            documents.append([])
        documents[-1].append(line)
    return [doc for doc in ("".join(lines) for lines in documents) if doc.strip()]


def load_documents(path: str | None = None, max_documents: int | None = None, **unused: Any) -> Any:
    """A DatasetDict with a 'test' split of {'page': article} rows (the `custom_dataset` of the task)."""
    import datasets

    source = Path(path or os.environ.get("AUTOCONTRAST_WIKITEXT") or wikitext_path("test"))
    if not source.is_file():
        raise DataError(f"WikiText file {source} does not exist; give the task metadata "
                        '{"path": "..."} or set AUTOCONTRAST_WIKITEXT')
    pages = split_documents(source.read_text(encoding="utf-8"))
    if max_documents is not None:
        pages = pages[: int(max_documents)]
    if not pages:
        raise DataError(f"{source} holds no text")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"page": p} for p in pages])})
