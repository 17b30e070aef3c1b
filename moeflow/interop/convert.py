"""`moeflow convert SRC DST --to hf|moeflow`: a checkpoint in the other layout, ready to use.

Examples:
  moeflow convert runs/tiny tiny-hf --to hf            # a training run -> transformers
  moeflow convert ./Qwen3-30B-A3B ./q3-moeflow --to moeflow
  moeflow convert ./q3-moeflow ./q3-hf --to hf --dtype bfloat16 --overwrite

SRC is anything `moeflow serve` and `moeflow generate` load (pretrained.find_model_dir): a
training run, its checkpoints/ directory, one step_* checkpoint, a moeflow export or a HF
checkpoint. DST gets the weights and config.json in the chosen layout, and what makes it usable
on its own, because a checkpoint without its tokenizer is not one a user can run:
  * the source's tokenizer files as they are: tokenizer*.json, tokenizer.model, vocabularies,
    special_tokens_map.json, added_tokens.json, chat templates, generation_config.json;
  * from a training checkpoint, whose tokenizer.json is moeflow's BPE with nothing declared
    beside it, a tokenizer_config.json (the `tokenizers` class, `<|endoftext|>` as bos, eos and
    pad, the context length) and a generation_config.json with those ids, so that
    `AutoTokenizer.from_pretrained(DST)` and transformers' generate stop where moeflow does;
  * a HF export's config.json carries the generation config's bos/eos/pad ids, as HF's do.
A source without tokenizer.json still converts (weights only) and the summary line says so.
Pre-gate heads (`moeflow train --pregate`) go along in either direction, named in the summary
line; in an HF-family export transformers skips them (moeflow.interop.hf_config says how).

Refusals come before anything is written: a DST that exists and is not empty (unless
`overwrite`: it is then replaced whole) and a DST that holds the source. The result is built in
a temporary directory beside DST and renamed into place last, so a failed conversion leaves no
half-written DST and a replaced one keeps no stale shard.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from moeflow.config import ModelConfig
from moeflow.data.tokenizer import EOT, BPETokenizer
from moeflow.interop.hf_config import GPT_MODEL_TYPE
from moeflow.interop.pretrained import (ModelDir, find_model_dir, from_pretrained, json_object,
                                        save_hf, save_pretrained)

TOKENIZER_FILES = ("tokenizer*", "vocab.*", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template*", "generation_config.json")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"destination {str(dst)!r} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"destination {str(dst)!r} exists and is not empty; pass --overwrite "
                         f"to replace it")


def _token_ids(source: ModelDir) -> dict:
    """bos/eos/pad ids: the source's generation config, else its config.json (HF), else
    moeflow's `<|endoftext|>` for a training checkpoint."""
    for name in ("generation_config.json", "config.json"):
        ids = {k: v for k, v in json_object(source.path / name).items()
               if k in TOKEN_ID_KEYS and v is not None}
        if ids:
            return ids
    if source.is_training:
        eot = BPETokenizer.load(source.path / "tokenizer.json").eot_id
        return dict.fromkeys(TOKEN_ID_KEYS, eot)
    return {}


def _write_tokenizer(source: ModelDir, config: ModelConfig, token_ids: dict, out: Path
                     ) -> list[str]:
    """Copy the tokenizer files, adding what a training checkpoint lacks; the names written."""
    written = []
    for f in sorted(source.path.iterdir()):
        if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in TOKENIZER_FILES):
            shutil.copyfile(f, out / f.name)
            written.append(f.name)
    if "tokenizer.json" in written and source.is_training:
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
            "pad_token": EOT, "model_max_length": config.max_seq_len,
            "clean_up_tokenization_spaces": False}, indent=2) + "\n")
        written.append("tokenizer_config.json")
    if "generation_config.json" not in written and token_ids:
        (out / "generation_config.json").write_text(json.dumps(token_ids, indent=2) + "\n")
        written.append("generation_config.json")
    return sorted(written)


def convert(src: str | Path, dst: str | Path, to: str, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 5 << 30, overwrite: bool = False) -> str:
    """Convert the checkpoint `src` names to `to` = "hf" or "moeflow" in the directory `dst`;
    returns a one-line summary. ValueError (nothing written) for what is refused."""
    if to not in ("hf", "moeflow"):
        raise ValueError(f"to={to!r}: must be 'hf' or 'moeflow'")
    if max_shard_bytes < 1 << 20:  # 0 or less wrote one file per tensor
        raise ValueError(f"max_shard_gb={max_shard_bytes / (1 << 30):g}: must be at least 1 MiB "
                         f"(0.001 GB)")
    dst = Path(dst)
    _check_destination(dst, overwrite)
    source = find_model_dir(src)
    if source.path.resolve().is_relative_to(dst.resolve()):
        raise ValueError(f"destination {str(dst)!r} holds the source checkpoint "
                         f"{str(source.path)!r}; choose another")
    model = from_pretrained(source.path, dtype=dtype)
    token_ids = _token_ids(source)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.convert-", dir=dst.parent))
    try:
        files = _write_tokenizer(source, model.config, token_ids, tmp)
        if to == "hf":
            kind = save_hf(model, tmp, max_shard_bytes, token_ids=token_ids)
        else:
            save_pretrained(model, tmp, max_shard_bytes)
            kind = "moeflow"
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params = sum(p.numel() for p in model.parameters())
    has_tok = "tokenizer.json" in files
    extra = (f"with {', '.join(files)}" if has_tok else
             f"weights only: {source.path} has no tokenizer.json, which serving needs")
    if model.pregate is not None:
        extra += "; pre-gate heads kept (moeflow reads them back, transformers skips them)"
    if kind == GPT_MODEL_TYPE:
        extra += "; transformers loads it with trust_remote_code=True"
    return f"{src} -> {dst} ({kind}, {params:,} parameters; {extra})"
