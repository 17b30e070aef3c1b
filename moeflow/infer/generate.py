"""Autoregressive generation for one batch of equal-length prompts, with or without a KV cache."""

from __future__ import annotations

from typing import Callable

import torch

from moeflow.infer.sampling import SamplingParams, sample_next
from moeflow.model.kv_cache import KVCache


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: torch.Tensor, params: SamplingParams,
             use_cache: bool = True,
             stop_when: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Continue `prompt_ids` [B, T]; returns the new tokens [B, <= max_new_tokens].

    Stops early once every row has produced a stop token or `stop_when(new_BT)` (the new tokens
    so far) is true for it, [B] bool (rows that stopped keep emitting their last token).
    Without the cache every step re-runs the whole sequence: slow, used to check the cache.
    Routing is dropless while generating, so each token's output is independent of the batch.
    """
    B, T = prompt_ids.shape
    max_len = model.config.max_seq_len
    steps = min(params.max_new_tokens, max_len - T)
    if steps < 1:
        raise ValueError(f"prompt of {T} tokens leaves no room under max_seq_len {max_len}")
    was_training = model.training
    model.eval()
    model.set_dropless(True)
    try:
        generator = params.make_generator(prompt_ids.device)
        stop = torch.tensor(params.stop_token_ids or [-1], device=prompt_ids.device)
        cache = KVCache.for_model(model, B, T + steps) if use_cache else None
        seq, new = prompt_ids, []
        done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
        step_input = prompt_ids
        for _ in range(steps):
            logits = model(step_input if use_cache else seq, cache=cache).logits[:, -1]
            nxt = sample_next(logits, params, generator)
            if new:
                nxt = torch.where(done, new[-1], nxt)
            new.append(nxt)
            done |= torch.isin(nxt, stop)
            if stop_when is not None:
                done |= stop_when(torch.stack(new, dim=1))
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if bool(done.all()):
                break
    finally:
        model.set_dropless(False)
        model.train(was_training)
    return torch.stack(new, dim=1)
