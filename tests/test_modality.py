"""The code/text labeller for expert groups (moeflow.data.modality) on small Python snippets."""

import numpy as np
import pytest

from moeflow.data.modality import (CODE, TEXT, document_modality, encode_labelled,
                                   python_char_labels)
from moeflow.data.tokenizer import BPETokenizer

SOURCE = '''def area(r):  # circle, é
    """Return the area."""
    return 3.14 * r ** 2, f"r={r}", 'ok'
'''


def spans(text, labels):
    """Maximal runs of TEXT characters, as strings."""
    out, start = [], None
    for i, lab in enumerate(list(labels) + [CODE]):
        if lab == TEXT and start is None:
            start = i
        elif lab != TEXT and start is not None:
            out.append(text[start:i])
            start = None
    return out


def test_python_characters_comments_and_strings_are_text():
    got = spans(SOURCE, python_char_labels(SOURCE))
    # Python 3.12+ splits f-strings: only their literal part is text there
    assert got[:3] == ["# circle, é", '"""Return the area."""', got[2]]
    assert got[2] in ('f"r={r}"', "r=")
    assert got[-1] == "'ok'"
    assert "3.14" not in "".join(got) and "return" not in "".join(got)


def test_untokenizable_python_falls_back_to_comment_lines():
    src = "print 'py2'\n  # a comment\nx = (\n"
    assert spans(src, python_char_labels(src)) == ["  # a comment\n"]


def test_bpe_tokens_take_the_label_of_their_first_visible_character():
    tok = BPETokenizer.train([SOURCE * 4, "plain words here"], 300)
    names, texts = ["a.py", "notes.md"], [SOURCE, "plain words"]
    tokens, groups = encode_labelled(tok, names, texts)
    assert np.array_equal(tokens, tok.encode_documents(texts))
    enc = tok.tok.encode(SOURCE)
    pieces = [(SOURCE[a:b], int(g)) for (a, b), g in zip(enc.offsets, groups)]
    text = "".join(p for p, g in pieces if g == TEXT)
    code = "".join(p for p, g in pieces if g == CODE)
    assert "circle" in text and "Return the area" in text and "ok" in text
    assert "def area(r):" in code and "return" in code and "3" in code and "**" in code
    assert "return" not in text and "circle" not in code
    assert pieces[0] == ("def", CODE)
    n = len(enc.ids)
    assert groups[n] == CODE  # end-of-text
    assert (groups[n + 1:-1] == TEXT).all()  # a .md document is text throughout
    _, whole = encode_labelled(tok, names, texts, modalities=[TEXT, None])
    assert (whole[:n] == TEXT).all()


def test_jsonl_modality_field_is_checked():
    assert document_modality({"modality": "code"}, "modality", "f:1") == CODE
    with pytest.raises(ValueError, match="f:2: field 'modality' must be one of code, text"):
        document_modality({"modality": "image"}, "modality", "f:2")


def test_batched_encoding_gives_the_one_batch_result(monkeypatch):
    """BPETokenizer.encodings encodes ENCODE_BATCH_CHARS of text at a time (memory); batches
    of one document each must give what one batch gives, offsets and labels included."""
    import moeflow.data.tokenizer as tokenizer_module
    tok = BPETokenizer.train([SOURCE * 4, "plain words here"], 300)
    names = [f"d{i}.py" if i % 3 else f"d{i}.md" for i in range(7)]
    texts = [SOURCE[i:] + "x" * i for i in range(7)]
    one_batch = tok.encode_documents(texts), encode_labelled(tok, names, texts)
    monkeypatch.setattr(tokenizer_module, "ENCODE_BATCH_CHARS", 1)
    batched = tok.encode_documents(iter(texts)), encode_labelled(tok, names, texts)
    assert np.array_equal(batched[0], one_batch[0])
    for got, want in zip(batched[1], one_batch[1], strict=True):
        assert np.array_equal(got, want)
    assert len(list(tok.encodings(texts))) == len(texts)
    assert tok.encode_documents([]).shape == (0,)
