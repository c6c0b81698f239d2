"""The embedded default corpus: the running Python's own standard library, its sources (code, docstrings,
comments) and pydoc's topic documentation. Real text nobody here wrote, present on every machine."""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterator

EMBEDDED_MAX_CHARS = 6_000_000  # the embedded corpus's default cap (data.max_chars null)


def embedded_corpus_files() -> list[Path]:
    """Standard-library sources, sorted, without tests, site-packages or generated tables."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "ensurepip",
                 "turtledemo", "tkinter", "encodings"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                out.append(Path(dirpath) / name)
    docs = root / "pydoc_data" / "topics.py"
    # pydoc's topics (the language reference, as text) lead, so a small max_chars still gets prose.
    out = [p for p in out if p != docs]
    return ([docs] if docs.is_file() else []) + out


def embedded_documents(max_chars: int = 0) -> Iterator[str]:
    """The corpus's documents in order, stopping after the one that reaches ``max_chars`` (0: all)."""
    total = 0
    for p in embedded_corpus_files():
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if p.name == "topics.py":  # the module is one dict of documentation strings: yield the prose
            ns: dict = {}
            exec(compile(text, str(p), "exec"), ns)  # stdlib file, data only
            texts = [ns["topics"][key] for key in sorted(ns["topics"])]
        else:
            texts = [text]
        for t in texts:
            yield t
            total += len(t)
            if max_chars and total >= max_chars:
                return
