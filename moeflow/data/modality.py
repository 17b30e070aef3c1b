"""Per-token modality labels for expert groups: Python code vs natural-language text.

The rule, for the built-in corpora (Python sources plus .md/.rst/.txt files):
* in a `.py` document, Python's own `tokenize` decides: comments and string literals (docstrings
  included; on Python 3.12+ the literal parts of f-strings) are TEXT, everything else (names,
  keywords, operators, numbers, indentation, newlines) is CODE. A file `tokenize` rejects (a
  Python 2 file, a syntax error) falls back to lines: a line whose first non-blank character is
  `#` is TEXT, the rest CODE;
* any other document (.md, .rst, .txt, a JSONL record) is TEXT as a whole. User data names the
  modality per document instead (a JSONL field, see `document_modality`).

Characters are labelled first, then BPE tokens by their character offsets: a token takes the
label of its first non-whitespace character (a token " #" starts a comment, " x" is code), or
of its first character when it is all whitespace. End-of-text takes group CODE (0): it belongs
to no document. Group ids are positions in MODALITIES (moeflow.data.groups maps them to a
model's groups by name).

Prompts at inference have no file name, so `prompt_token_labels` decides from the text: a prompt
Python compiles, whole or as an unfinished block (`codeop`, as the interactive interpreter
decides whether to wait for more input), is labelled as a .py document; any other prompt (prose,
a chat transcript) is TEXT throughout. A one-word prompt such as "hello" compiles (a name), so
it counts as code: short prompts are ambiguous, and a client that knows better names the group.
"""

from __future__ import annotations

import codeop
import io
import tokenize
import warnings

import numpy as np

from moeflow.data.tokenizer import BPETokenizer

MODALITIES = ("code", "text")
CODE, TEXT = 0, 1
_TEXT_TOKENS = {tokenize.COMMENT, tokenize.STRING}
_TEXT_TOKENS |= {getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}  # Python >= 3.12


def python_char_labels(source: str) -> np.ndarray:
    """uint8 label per character of Python `source` (module docstring's rule)."""
    labels = np.full(len(source), CODE, dtype=np.uint8)
    line_starts = np.concatenate([[0], np.cumsum([len(x) for x in source.splitlines(True)])])
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in _TEXT_TOKENS:
                start = line_starts[tok.start[0] - 1] + tok.start[1]
                end = line_starts[tok.end[0] - 1] + tok.end[1]
                labels[start:end] = TEXT
    except (tokenize.TokenError, SyntaxError):
        labels[:] = CODE
        pos = 0
        for line in source.splitlines(True):
            if line.lstrip().startswith("#"):
                labels[pos:pos + len(line)] = TEXT
            pos += len(line)
    return labels


def document_char_labels(name: str, text: str) -> np.ndarray:
    """Labels of a built-in corpus document: by `tokenize` for .py files, TEXT otherwise."""
    if name.endswith(".py"):
        return python_char_labels(text)
    return np.full(len(text), TEXT, dtype=np.uint8)


def token_labels(char_labels: np.ndarray, text: str, offsets: list[tuple[int, int]]
                 ) -> np.ndarray:
    """uint8 label per token, from its (start, end) character offsets in `text`."""
    n = len(text)
    if not offsets:
        return np.zeros(0, dtype=np.uint8)
    space = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    space = np.isin(space, [ord(c) for c in " \t\n\r\f\v"])
    # next_solid[i]: the first non-whitespace position >= i (n where none)
    pos = np.where(space, n, np.arange(n))
    next_solid = np.minimum.accumulate(pos[::-1])[::-1] if n else pos
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    start = np.clip(spans[:, 0], 0, max(n - 1, 0))
    end = np.maximum(spans[:, 1], spans[:, 0] + 1)
    solid = next_solid[start]
    pick = np.where(solid < end, solid, start)
    return char_labels[np.clip(pick, 0, max(n - 1, 0))]


def encode_labelled(tokenizer: BPETokenizer, names: list[str], texts: list[str],
                    modalities: list[int | None] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, groups uint8) of the documents, each followed by end-of-text, as
    `BPETokenizer.encode_documents` packs them. `modalities[i]`, when given and not None, labels
    document i as a whole (user data); otherwise the built-in rule applies."""
    eot = np.asarray([tokenizer.eot_id], dtype=np.int32)
    tokens, groups = [], []
    encodings = tokenizer.encodings(texts, offsets=True)
    for i, (name, text, enc) in enumerate(zip(names, texts, encodings, strict=True)):
        ids = np.asarray(enc.ids, dtype=np.int32)
        whole = None if modalities is None else modalities[i]
        if whole is not None:
            labels = np.full(len(ids), whole, dtype=np.uint8)
        else:
            labels = token_labels(document_char_labels(name, text), text, enc.offsets)
        tokens += [ids, eot]
        groups += [labels, np.zeros(1, dtype=np.uint8)]
    if not tokens:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.uint8)
    return np.concatenate(tokens), np.concatenate(groups)


def document_modality(record: dict, field: str, where: str) -> int:
    """The group id named by a JSONL record's `field` (one of MODALITIES)."""
    value = record.get(field)
    if value not in MODALITIES:
        raise ValueError(f"{where}: field {field!r} must be one of {', '.join(MODALITIES)}, "
                         f"got {value!r}")
    return MODALITIES.index(value)


def is_python(text: str) -> bool:
    """Whether Python compiles `text`, complete or unfinished (module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in prose
        try:
            codeop.compile_command(text, symbol="exec")
        except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError):
            return False
    return True


def prompt_token_labels(tokenizer: BPETokenizer, text: str, add_special_tokens: bool | None
                        ) -> tuple[list[int], np.ndarray]:
    """(token ids as tokenizer.encode gives them, uint8 label per token) of a prompt."""
    special = tokenizer.add_special_tokens if add_special_tokens is None else add_special_tokens
    enc = tokenizer.tok.encode(text, add_special_tokens=special)
    if is_python(text):
        labels = token_labels(python_char_labels(text), text, enc.offsets)
    else:
        labels = np.full(len(enc.ids), TEXT, dtype=np.uint8)
    return list(enc.ids), labels
