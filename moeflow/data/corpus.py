"""Where training text comes from: the interpreter's own standard library, or the user's files.

The default corpus needs no download: every `.py` file of the running Python's standard library
(the directory holding `os.py`, without site-packages), about 30 MB of real, varied code on
CPython 3.11. `--data` takes text files, directories of them, and JSONL files with a text field.

Documents come back in a fixed order (sorted paths, file line order), and the train/validation
split is a function of each document's name only (a CRC32 bucket), so it is the same on every
run, every seed and every rank, and adding files does not move existing ones between splits.

Every problem with the input is a `ValueError` naming the path, so the CLI can print one line.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

# Suffixes a directory contributes; a file named explicitly is read whatever its suffix.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl")
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


@dataclass(frozen=True)
class Document:
    name: str  # path, or path:line for JSONL records; decides the split
    text: str


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory (where os.py lives)."""
    return Path(os.path.dirname(os.__file__))


def stdlib_documents() -> list[Document]:
    root = stdlib_root()
    docs = []
    for path in _walk(root, (".py",)):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(str(path.relative_to(root)), text))
    if not docs:
        raise ValueError(f"no .py files found in the standard library at {root}; pass --data")
    return docs


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        found += [Path(dirpath, f) for f in sorted(filenames)
                  if f.endswith(suffixes) and not f.startswith(".")]
    return found


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"cannot read data file {str(path)!r}: {e.strerror or e}") from None


def _jsonl_documents(path: Path, text_field: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path} line {lineno}: not valid JSON") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path} line {lineno}: no string field {text_field!r}")
        if text.strip():
            docs.append(Document(f"{path}:{lineno}", text))
    return docs


def _file_documents(path: Path, text_field: str) -> list[Document]:
    if path.suffix == ".jsonl":
        docs = _jsonl_documents(path, text_field)
    else:
        text = _read_text(path)
        docs = [Document(str(path), text)] if text.strip() else []
    if not docs:
        raise ValueError(f"data file {str(path)!r} holds no text")
    return docs


def load_corpus(paths: tuple[str, ...] | list[str], text_field: str = "text") -> list[Document]:
    """Documents from `paths` (files, directories, JSONL); the standard library when empty."""
    if not paths:
        return stdlib_documents()
    docs: list[Document] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"data path {raw!r} does not exist")
        if path.is_dir():
            files = _walk(path, TEXT_SUFFIXES)
            if not files:
                raise ValueError(f"data directory {raw!r} holds no text files "
                                 f"({', '.join(TEXT_SUFFIXES)})")
            found = []
            for f in files:
                if f.suffix == ".jsonl":
                    found += _jsonl_documents(f, text_field)
                else:
                    text = _read_text(f)
                    if text.strip():
                        found.append(Document(str(f), text))
            if not found:
                raise ValueError(f"data directory {raw!r} holds no text")
            docs += found
        else:
            docs += _file_documents(path, text_field)
    return docs


def _bucket(name: str) -> float:
    return zlib.crc32(name.encode("utf-8")) / 2**32


def split_documents(docs: list[Document], val_fraction: float
                    ) -> tuple[list[Document], list[Document]]:
    """(train, validation): a document goes to validation when its name's CRC32 bucket is below
    `val_fraction`. At least one document goes each way; a single document is cut in two at the
    last line boundary before (1 - val_fraction) of its length."""
    if len(docs) == 1:
        doc = docs[0]
        cut = int(len(doc.text) * (1 - val_fraction))
        newline = doc.text.rfind("\n", 0, cut)
        cut = newline + 1 if newline > 0 else cut
        return ([Document(doc.name, doc.text[:cut])],
                [Document(doc.name + "#validation", doc.text[cut:])])
    val = [d for d in docs if _bucket(d.name) < val_fraction]
    if not val:
        val = [min(docs, key=lambda d: _bucket(d.name))]
    if len(val) == len(docs):
        val = val[:-1]
    val_names = {id(d) for d in val}
    return [d for d in docs if id(d) not in val_names], val
