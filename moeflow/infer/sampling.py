"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

temperature == 0 means greedy (argmax, ties to the lower id). Otherwise logits are divided by the
temperature (any > 0: a tiny one samples among the tied maxima), filtered to the top_k best
(0 = all) and to the smallest set whose probability reaches top_p, and sampled with the given
torch.Generator (reproducible for a fixed seed).

Stopping is part of the request: `stop_token_ids` end it when one of them is produced,
`stop_sequences` (token-id tuples) when the generated tokens end with one of them; the stopping
tokens are still emitted. Lists are accepted and stored as tuples so params stay hashable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.ops.backend import triton_available
from moeflow.validate import check, integer, number, option


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = option("tokens to generate at most", default=64)
    temperature: float = option("sampling temperature; 0 = greedy", default=1.0)
    top_k: int = option("sample among the k most likely tokens (0 = all)", default=0)
    top_p: float = option("nucleus sampling: the smallest set of tokens with this much "
                          "probability", default=1.0)
    seed: int | None = option("seed for reproducible sampling", default=None)
    stop_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        def ids(x) -> bool:
            return all(type(t) is int and t >= 0 for t in x)

        sequence = (list, tuple)
        check(isinstance(self.stop_token_ids, sequence) and ids(self.stop_token_ids),
              "stop_token_ids", self.stop_token_ids, "must be a list of ids >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        check(isinstance(self.stop_sequences, sequence) and all(
            isinstance(s, sequence) and s and ids(s) for s in self.stop_sequences),
              "stop_sequences", self.stop_sequences, "must be non-empty lists of ids >= 0")
        object.__setattr__(self, "stop_sequences", tuple(tuple(s) for s in self.stop_sequences))
        integer("max_new_tokens", self.max_new_tokens, lo=1)
        number("temperature", self.temperature, lo=0)
        integer("top_k", self.top_k, lo=0)
        number("top_p", self.top_p, lo=0, hi=1, lo_open=True)
        integer("seed", self.seed, lo=0, hi=2**63 - 1, optional=True)  # a torch.Generator's

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def greedy_tokens(logits_BV: torch.Tensor, tickets: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's argmax, [B] int64 (ties to the lower id): one Triton launch on CUDA
    (moeflow.ops.argmax_triton, the same ids; `tickets` its counters), torch's argmax
    elsewhere. Exact in any float dtype: no upcast needed. `out`: a contiguous [B] int64
    tensor to write them into (returned)."""
    if logits_BV.is_cuda and triton_available() and not torch.is_grad_enabled():
        from moeflow.ops.argmax_triton import argmax_rows_triton
        return argmax_rows_triton(logits_BV, tickets, out)
    if out is None:
        return logits_BV.argmax(dim=-1)
    return torch.argmax(logits_BV, dim=-1, out=out)


def sample_next(logits_BV: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token id per row: [B] int64."""
    logits = logits_BV.float()
    if params.greedy:
        return logits.argmax(dim=-1)
    # Shifted to a maximum of 0 first (softmax does not change): at a tiny temperature the
    # others go to -inf rather than the maximum to inf, which would make every probability NaN;
    # and at least float32's smallest normal, which a smaller one would round to 0 (0 / 0).
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p  # keep the first past p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
