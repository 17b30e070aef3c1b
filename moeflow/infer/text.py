"""Text in, text out: tokenize a prompt, generate with `generate`, decode up to a stop token.

Separate from generate.py (token ids only) so that the token-level loop stays free of any
tokenizer; the tokenizer is anything with encode(str) -> list[int], decode(ids) -> str and an
`eot_id` (moeflow.data.tokenizer.BPETokenizer, as saved in every training checkpoint).
"""

from __future__ import annotations

import torch

from moeflow.infer.generate import generate
from moeflow.infer.sampling import SamplingParams


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, params: SamplingParams,
                  use_cache: bool = True, stop: tuple[str, ...] = ()) -> str:
    """The continuation of `prompt` as text, cut at the first stop token or stop string.

    `stop` strings work on the text, not on token ids: BPE may spell a string with different
    tokens depending on what precedes it, so token-id stop sequences would miss it. Generation
    ends at the step whose text first contains one, and the text ends just before it (as the
    server's `stop`). An empty prompt starts a new document (the end-of-text token). A prompt
    longer than the model's context is refused rather than silently truncated.
    """
    if any(not s for s in stop):
        raise ValueError(f"stop={stop!r}: stop strings must not be empty")
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    max_len = model.config.max_seq_len
    if len(ids) >= max_len:
        raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {max_len}")
    device = next(model.parameters()).device

    def contains_stop(new_BT: torch.Tensor) -> torch.Tensor:
        text = tokenizer.decode(new_BT[0].tolist())
        return torch.tensor([any(s in text for s in stop)], device=new_BT.device)

    new = generate(model, torch.tensor([ids], device=device), params, use_cache=use_cache,
                   stop_when=contains_stop if stop else None)[0]
    out = new.tolist()
    stops = set(params.stop_token_ids)
    for i, t in enumerate(out):
        if t in stops:
            out = out[:i]
            break
    text = tokenizer.decode(out)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
