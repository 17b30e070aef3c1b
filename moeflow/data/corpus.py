"""Where training text comes from: the interpreter's own files, or the user's.

Two built-in corpora need no download:
- the default (`--data` not given, or `builtin:stdlib`): every `.py` file of the running Python's
  standard library (the directory holding `os.py`, without site-packages), about 30 MB of real,
  varied code on CPython 3.11;
- `builtin:interpreter`: every text or source file (.py, .md, .rst, .txt) reachable from the
  running interpreter — the standard library and every site-packages directory on sys.path —
  deduplicated by content hash (vendored copies of one file appear once), files over 1 MB
  skipped (generated tables, data dumps), files that are not UTF-8 skipped. Its size depends on
  what is installed: tens of MB in a bare venv, hundreds on a machine with a deep-learning stack.
`--data` takes text files, directories of them, and JSONL files with a text field. With a
`group_field` (expert groups, `--group-field`), every JSONL record must also name its document's
expert group in that field; the name is checked against the model's groups later
(moeflow.data.groups), and any other kind of file is refused, since it names no group.

Documents come back in a fixed order (sorted paths, file line order), and the train/validation
split is a function of each document's name only (a CRC32 bucket), so it is the same on every
run, every seed and every rank, and adding files does not move existing ones between splits.

Every problem with the input is a `ValueError` naming the path, so the CLI can print one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import site
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

# Suffixes a directory contributes; a file named explicitly is read whatever its suffix.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl")
SITE_DIRS = ("site-packages", "dist-packages")
_SKIP_DIRS = (*SITE_DIRS, "__pycache__")


@dataclass(frozen=True)
class Document:
    # Relative to the --data argument (a file's own name, a directory's files below it), or
    # that:line for JSONL records; decides the split, so the same data split the same way
    # wherever it sits on disk.
    name: str
    text: str
    group: str | None = None  # the JSONL record's expert group (load_corpus's group_field)


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


BUILTIN = ("builtin:stdlib", "builtin:interpreter")
INTERPRETER_SUFFIXES = (".py", ".md", ".rst", ".txt")
MAX_FILE_BYTES = 1 << 20


def site_roots() -> list[Path]:
    """The site-packages directories on the interpreter's path, each once, outside the stdlib."""
    candidates = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    roots: list[Path] = []
    for c in candidates:
        path = Path(c).resolve() if c else None
        if path is None or not path.is_dir() or path.name not in SITE_DIRS:
            continue
        if path not in roots:
            roots.append(path)
    return roots


def interpreter_documents(max_bytes: int | None = None) -> tuple[list[Document], dict]:
    """The `builtin:interpreter` corpus and what building it found (files, duplicates, bytes).

    With `max_bytes`, files are read in a fixed pseudo-random order (CRC32 of the name) until
    that many bytes are kept: a sample spread over every package rather than the first ones."""
    labelled = [("stdlib", stdlib_root())] + [(f"site{i}", r) for i, r in enumerate(site_roots())]
    paths = []
    for label, root in labelled:
        paths += [(f"{label}/{p.relative_to(root)}", p) for p in _walk(root, INTERPRETER_SUFFIXES)]
    if max_bytes is not None:  # salted: the order must not follow the split's CRC buckets
        paths.sort(key=lambda item: zlib.crc32(("sample:" + item[0]).encode("utf-8")))
    # A sample takes no file over 1/16 of its size, so no single file dominates a split.
    file_limit = MAX_FILE_BYTES if max_bytes is None else min(MAX_FILE_BYTES, max_bytes // 16)
    seen: set[bytes] = set()
    docs, stats = [], {"files": len(paths), "duplicates": 0, "skipped": 0, "bytes": 0}
    for name, path in paths:
        if max_bytes is not None and stats["bytes"] >= max_bytes:
            break
        try:
            if path.stat().st_size > file_limit:
                stats["skipped"] += 1
                continue
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            stats["skipped"] += 1
            continue
        digest = hashlib.sha1(raw).digest()
        if digest in seen:
            stats["duplicates"] += 1
            continue
        seen.add(digest)
        if text.strip():
            docs.append(Document(name, text))
            stats["bytes"] += len(raw)
    docs.sort(key=lambda d: d.name)
    stats["documents"] = len(docs)
    return docs, stats


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


def _jsonl_documents(path: Path, text_field: str, group_field: str | None, name: str
                     ) -> list[Document]:
    """One document per record, named `name:line`."""
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
        group = None
        if group_field is not None:
            if group_field not in record:
                raise ValueError(f"{path} line {lineno}: no field {group_field!r} naming the "
                                 f"record's expert group (--group-field)")
            group = record[group_field]
            if not isinstance(group, str):
                raise ValueError(f"{path} line {lineno}: field {group_field!r} must be a string "
                                 f"naming an expert group, got {json.dumps(group)[:40]}")
        if text.strip():
            docs.append(Document(f"{name}:{lineno}", text, group))
    return docs


def _not_jsonl(path: Path | str, group_field: str) -> ValueError:
    return ValueError(f"data {str(path)!r} is not a JSONL file: --group-field {group_field!r} "
                      f"needs every document to name its expert group in a JSONL record")


def _file_documents(path: Path, text_field: str, group_field: str | None) -> list[Document]:
    if path.suffix == ".jsonl":
        docs = _jsonl_documents(path, text_field, group_field, path.name)
    elif group_field is not None:
        raise _not_jsonl(path, group_field)
    else:
        text = _read_text(path)
        docs = [Document(path.name, text)] if text.strip() else []
    if not docs:
        raise ValueError(f"data file {str(path)!r} holds no text")
    return docs


def load_corpus(paths: tuple[str, ...] | list[str], text_field: str = "text",
                group_field: str | None = None) -> list[Document]:
    """Documents from `paths` (files, directories, JSONL, built-in corpus names); the standard
    library when empty. `group_field`: JSONL only, each record's expert group (Document.group)."""
    if group_field is not None and not paths:
        raise _not_jsonl("builtin:stdlib", group_field)
    if not paths:
        return stdlib_documents()
    docs: list[Document] = []
    for raw in paths:
        if raw.startswith("builtin:") and group_field is not None:
            raise _not_jsonl(raw, group_field)
        if raw.startswith("builtin:"):
            if raw not in BUILTIN:
                raise ValueError(f"unknown built-in corpus {raw!r}; choose {' or '.join(BUILTIN)}")
            docs += stdlib_documents() if raw == "builtin:stdlib" else interpreter_documents()[0]
            continue
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
                rel = str(f.relative_to(path))
                if f.suffix == ".jsonl":
                    found += _jsonl_documents(f, text_field, group_field, rel)
                elif group_field is not None:
                    raise _not_jsonl(f, group_field)
                else:
                    text = _read_text(f)
                    if text.strip():
                        found.append(Document(rel, text))
            if not found:
                raise ValueError(f"data directory {raw!r} holds no text")
            docs += found
        else:
            docs += _file_documents(path, text_field, group_field)
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
        return ([Document(doc.name, doc.text[:cut], doc.group)],
                [Document(doc.name + "#validation", doc.text[cut:], doc.group)])
    val = [d for d in docs if _bucket(d.name) < val_fraction]
    if not val:
        val = [min(docs, key=lambda d: _bucket(d.name))]
    if len(val) == len(docs):
        val = val[:-1]
    val_names = {id(d) for d in val}
    return [d for d in docs if id(d) not in val_names], val
