"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

temperature == 0 means greedy (argmax, ties to the lower id). Otherwise logits are divided by the
temperature (any > 0: a tiny one samples among the tied maxima), filtered to the top_k best
(0 = all; exactly k tokens: among tokens of equal logits the lower ids rank first,
`ranked_candidates`) and to the smallest set, in that order, whose probability reaches top_p,
and sampled.

One draw for a whole batch: the sampled rows of a step are drawn together, whatever their
parameters (`sample_tokens`: the rows' candidates ranked by a top-k or a sort, then the
plain-torch `draw_reference`; on CUDA with Triton, rows with a top-k from one top-k launch and
the others from their whole rows, a nucleus bounded without a sort, moeflow.ops.nucleus_triton,
each group drawn in one launch, moeflow.ops.sample_triton), instead of a chain of ops per row.
Each kept token gets Gumbel noise g = -log(-log u) and the row takes the argmax of x + g, where
x = (logit - max) / temperature: the Gumbel-max trick, whose winner is distributed as softmax(x)
over the kept tokens. The noise is counter-based, with no generator state: u of token v is a
hash of v and the draw's key, and the key a hash of the request's seed and the position in the
sequence of the token being drawn (`draw_key`). So a row's token is a function of its logits,
its parameters, its seed and its position only: the same alone or in any batch, pipelined or
not, replayed or resumed. (Batch-mates decide whether the candidates come
from a top-k of some size or a full sort; the candidates' total order, value then id, makes the
kept set the same either way, ties included, and a row without a top-k measures its nucleus
against its whole row's mass, `row_mass`, not its candidates'. On the CPU that lets a batch of
top-k and nucleus rows try each row's best few thousand candidates before sorting every logit.)

Stopping is part of the request: `stop_token_ids` end it when one of them is produced,
`stop_sequences` (token-id tuples) when the generated tokens end with one of them; the stopping
tokens are still emitted. Lists are accepted and stored as tuples so params stay hashable.

Legend: B rows of logits, V vocabulary, S sampled rows, N candidates per row.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moeflow.infer.token_ring import TokenRing
from moeflow.ops.backend import triton_available
from moeflow.validate import check, integer, number, option

if TYPE_CHECKING:
    from moeflow.infer.sampler_graphs import SamplerGraphs


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = option("tokens to generate at most", default=64)
    temperature: float = option("sampling temperature; 0 = greedy", default=1.0)
    top_k: int = option("sample among the k most likely tokens (0 = all)", default=0)
    top_p: float = option("nucleus sampling: the smallest set of tokens with this much "
                          "probability", default=1.0)
    seed: int | None = option("seed for reproducible sampling (none: a random one per request)",
                              default=None)
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
        integer("seed", self.seed, lo=0, hi=2**63 - 1, optional=True)  # OpenAI's and vLLM's range

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def greedy_tokens(logits_BV: torch.Tensor, tickets: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, ring: TokenRing | None = None
                  ) -> torch.Tensor:
    """Each row's argmax, [B] int64 (ties to the lower id): one Triton launch on CUDA
    (moeflow.ops.argmax_triton, the same ids; `tickets` its counters), torch's argmax
    elsewhere. Exact in any float dtype: no upcast needed. `out`: a contiguous [B] int64
    tensor to write them into (returned). `ring`: the kernel also publishes them there
    (moeflow.infer.token_ring; the Triton launch only)."""
    if _use_kernel(logits_BV) and not torch.is_grad_enabled():
        from moeflow.ops.argmax_triton import argmax_rows_triton
        return argmax_rows_triton(logits_BV, tickets, out, ring)
    if ring is not None:
        raise ValueError("greedy_tokens: a token ring is written by the Triton argmax only "
                         "(CUDA with Triton, no autograd)")
    if out is None:
        return logits_BV.argmax(dim=-1)
    return torch.argmax(logits_BV, dim=-1, out=out)




# -- counter-based noise ----------------------------------------------------------------------

_M32, _M64 = (1 << 32) - 1, (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / the golden ratio: splitmix64's step
# A 32-bit multiply-xorshift hash (a bijection); both multipliers are below 2^31, so a product
# with a 32-bit value fits int64 exactly and torch needs no unsigned type.
HASH_MUL_1, HASH_MUL_2 = 0x21F0AAAD, 0x735A2D97
# The sampler's per-row table, float64 [S, 6] (every column exact: ids and keys < 2^53).
TABLE_COLUMNS = ("temperature", "top_k", "top_p", "key_lo", "key_hi", "row")


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit ints in which every input bit moves every
    output bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def draw_key(seed: int, position: int) -> tuple[int, int]:
    """The key of the draw of the token at `position` (its index in the whole sequence, prompt
    included) of a request sampled with `seed`: 64 bits as two 32-bit halves. Host side, exact."""
    key = _mix64((_mix64(seed) + (position + 1) * _GOLDEN) & _M64)
    return key & _M32, key >> 32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash of int64 values in [0, 2^32), in place (x must be a temporary)."""
    x.bitwise_xor_(x >> 16).mul_(HASH_MUL_1).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15).mul_(HASH_MUL_2).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 15)


def gumbel_noise(ids: torch.Tensor, key_lo: torch.Tensor, key_hi: torch.Tensor) -> torch.Tensor:
    """Gumbel noise (fp32) of token ids (int64, < 2^32) under a draw's key (int64 halves,
    broadcast against ids): u = (h + 1/2) / 2^32 from the hash h of id and key, g = -log(-log u)
    (`gumbel_of_hash`)."""
    return gumbel_of_hash(_hash32(_hash32(ids ^ key_lo).bitwise_xor_(key_hi)))


def gumbel_of_hash(h: torch.Tensor) -> torch.Tensor:
    """g = -log(-log u) of u = (h + 1/2) / 2^32 for 32-bit hashes h (int64). Where u >= 1/2,
    -log u is -log1p(-w) with w = 1 - u held exactly, so that u near 1 (which fp32 rounds to 1:
    an infinite g) keeps its precision; every g is finite, between -3.2 and 22.9. (The Triton
    kernel, which has no log1p, takes it by Kahan's identity, log(1 - w) * w / (1 - (1 - w)):
    the same to the last bits.)"""
    scale = 2.0 ** -32
    low = h < 2 ** 31
    u = h.float().add_(0.5).mul_(scale)
    w = (_M32 - h).float().add_(0.5).mul_(scale)
    e = torch.where(low, u.log_(), w.neg_().log1p_())
    return e.neg_().log_().neg_()


# -- the batched draw -------------------------------------------------------------------------

# On the CPU, a batch whose every sampled row keeps a top-k or a nucleus takes the best this
# many of each row first (4 times more while a nucleus runs past them), not a sort of every
# logit: 16 x 151,936 bf16 logits, one thread, the best 4,096 in 48 ms, the sort 154 (session 42).
CPU_FIRST_CANDIDATES = 4096

# On the CPU the noise is made and added in blocks of about this many elements, whose hash
# temporaries stay in cache: over a whole [16, 151,936] block its ~35 passes were bound by memory
# (one thread: 52.7 ms for the noise alone, 35 ms in blocks; session 42).
CPU_NOISE_BLOCK = 1 << 17


def _add_noise(x_SN: torch.Tensor, ids_SN: torch.Tensor, key_lo_S1: torch.Tensor,
               key_hi_S1: torch.Tensor) -> torch.Tensor:
    """x_SN += gumbel_noise(ids_SN, key_lo_S1, key_hi_S1), in place (returned); the same bits in
    blocks on the CPU."""
    if x_SN.device.type != "cpu":
        return x_SN.add_(gumbel_noise(ids_SN, key_lo_S1, key_hi_S1))
    S, N = x_SN.shape
    rows, cols = max(1, CPU_NOISE_BLOCK // N), min(N, CPU_NOISE_BLOCK)
    for r in range(0, S, rows):
        for c in range(0, N, cols):
            x_SN[r:r + rows, c:c + cols].add_(gumbel_noise(
                ids_SN[r:r + rows, c:c + cols], key_lo_S1[r:r + rows], key_hi_S1[r:r + rows]))
    return x_SN


def draw_reference(values_BN: torch.Tensor, ids_BN: torch.Tensor | None, table_S6: torch.Tensor,
                   out_B: torch.Tensor, *, ranked: bool, top_p: bool,
                   row_mass_S1: torch.Tensor | None = None, whole: bool = True
                   ) -> torch.Tensor | None:
    """Plain-torch draw: for each row of the table, the token of logits row `row` drawn from its
    candidates (values_BN[row], token ids ids_BN[row], or 0..N-1 when None; `ranked`: sorted
    best first, as top-k and top-p need), written into out_B[row] (returned). `top_p`: apply the
    rows' top_p (else ignored). x = (value - best) / temperature, and 0 where that is NaN (tied
    infinite maxima, a row of -inf, NaN logits), so that every row draws a token of its own.
    The reference of moeflow.ops.sample_triton: the same operations, whose exp, log and division
    may differ in their last bits (a token differs only where two scores are that close).
    `row_mass_S1` (`row_mass`): the mass of each table row's whole logits row, which a row
    without a top-k measures its nucleus against (else: its candidates' sum), so that its kept
    set does not depend on how many candidates the batch took. `whole` False: the candidates
    are each row's best N only, and None is returned where a nucleus runs past them."""
    rows = table_S6[:, 5].long()
    x = values_BN.index_select(0, rows).float()
    N = x.shape[1]
    x = _scaled(x, x[:, :1] if ranked else x.amax(dim=-1, keepdim=True), table_S6)
    j = torch.arange(N, device=x.device)
    k = table_S6[:, 1:2].long()
    keep = j < torch.where(k > 0, k, N) if ranked else torch.ones_like(x, dtype=torch.bool)
    # (a whole row keeps everything: no mask then)
    if top_p:
        e = torch.where(keep, x.exp(), 0.0)
        p = table_S6[:, 2:3].float()
        total = e.sum(dim=-1, keepdim=True)
        if row_mass_S1 is not None:
            total = torch.where(k > 0, total, row_mass_S1)
        mass = torch.where(p < 1.0, total * p, float("inf"))
        reached = e.cumsum(dim=-1)
        if not whole and bool(((reached[:, -1:] < mass) & (k == 0)).any()):
            return None  # a nucleus (or a row without either filter) runs past the candidates
        keep &= (reached - e) < mass  # up to and including the first to reach p
    ids = j.expand(len(rows), N) if ids_BN is None else ids_BN.index_select(0, rows)
    if ranked and x.device.type == "cpu":  # each row keeps a prefix: noise for the longest
        n = max(int(keep.sum(dim=-1).max()), 1)
        x, keep, ids = x[:, :n], keep[:, :n], ids[:, :n]
    score = _add_noise(x, ids, table_S6[:, 3:4].long(), table_S6[:, 4:5].long())
    if ranked or top_p:
        score.masked_fill_(~keep, float("-inf"))
    best = score.argmax(dim=-1, keepdim=True)
    return out_B.index_copy_(0, rows, ids.gather(1, best)[:, 0])


def row_mass(logits_BV: torch.Tensor, table_S6: torch.Tensor) -> torch.Tensor:
    """[S, 1]: the sum over each table row's whole logits row of exp(x), x as draw_reference
    makes it (NaN as 0), in id order: a nucleus's mass, the same whatever candidates a batch
    takes (the best of the row, whose x is 0, is its largest value in the total order)."""
    x = logits_BV.index_select(0, table_S6[:, 5].long()).float()
    return _scaled(x, x.amax(dim=-1, keepdim=True), table_S6).exp_().sum(dim=-1, keepdim=True)


def _scaled(x_SN: torch.Tensor, shift_S1: torch.Tensor, table_S6: torch.Tensor) -> torch.Tensor:
    """x = (x - shift) / the table rows' temperature, 0 where NaN (inf - inf: tied infinite
    maxima, an all -inf row; NaN logits): what the draw and a nucleus's mass are made of."""
    x = (x_SN - shift_S1) / table_S6[:, 0:1].float()
    return x.masked_fill_(x.isnan(), 0.0)


def ranked_candidates(logits_BV: torch.Tensor, k: int | None,
                      tickets: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of each row's k best logits (None: all), best first in a total order:
    value (NaN first, -0 as +0), then the lower id. A total order, so that the kept set and its
    order do not depend on how many candidates the batch-mates need (with bf16 logits, tokens
    tie at a row's k-th value in most rows) nor on how torch orders ties. All: a stable sort.
    k: on CUDA with Triton (k <= top_k_triton.MAX_K) one launch (moeflow.ops.top_k_triton,
    `tickets`: int32 zeros, at least B, or None); else a top-k of the order keys (cheap), then
    its tie group at the k-th key refilled with the row's lowest tied ids (topk keeps every
    larger key, but any of the tied ones), then the k sorted by id and stably by key. No host
    sync."""
    if k is None:
        ids = order_keys(logits_BV).sort(dim=-1, descending=True, stable=True).indices
        return logits_BV.gather(1, ids), ids
    if _use_kernel(logits_BV):
        from moeflow.ops.top_k_triton import MAX_K, top_k_triton
        if k <= MAX_K:
            return top_k_triton(logits_BV, k, tickets)
    return _ranked_top_k(logits_BV, k)


def _ranked_top_k(logits_BV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ranked_candidates' top-k in plain torch, over order_keys (integers: torch's float top-k
    and sort on CUDA do not rank NaN and -0 as the order does). The tie group at the k-th key
    is refilled with its lowest ids by a second top-k, of V - id over the tied tokens: two
    passes over the row where a rank by cumsum and a scatter of every id took eight (the CPU,
    one thread, 16 x 151,936 fp32 logits, k 40: 56 -> 13 ms with order_keys' two passes fewer,
    session 42)."""
    B, V = logits_BV.shape
    keys = order_keys(logits_BV)
    top, ids = keys.topk(k, dim=-1)  # every key above the k-th, and any of the tied ones
    kth = top[:, -1:]
    above = (top > kth).sum(dim=-1, keepdim=True)
    from_end = torch.arange(V, 0, -1, dtype=torch.int32, device=logits_BV.device)  # V - id
    lowest_tied = V - torch.where(keys == kth, from_end, 0).topk(k, dim=-1).values.long()
    j = torch.arange(k, device=logits_BV.device)
    ids = torch.where(j < above, ids, lowest_tied.gather(1, (j - above).clamp_(min=0)))
    ids = ids.sort(dim=-1).values
    order = keys.gather(1, ids).sort(dim=-1, descending=True, stable=True).indices
    ids = ids.gather(1, order)
    return logits_BV.gather(1, ids), ids


_KEY_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@functools.cache
def _inf_bits(dtype: torch.dtype) -> int:
    return torch.tensor(float("inf"), dtype=dtype).view(_KEY_DTYPES[dtype.itemsize]).item()


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """Signed integer keys of floating-point values in ranked_candidates' order (a larger value,
    a larger key; NaN above +inf whatever its sign bit; -0 as +0), of the values' width: what
    the candidates are sorted by. torch's own sort of floats on CUDA put a NaN with its sign bit
    set last, and in a short bf16 row every NaN (H100, session 41). The key is the magnitude's
    bits, negated for a negative value (so -0 is 0), every NaN the largest key."""
    bits = values.view(_KEY_DTYPES[values.element_size()])
    magnitude = torch.iinfo(bits.dtype).max
    keys = bits & magnitude
    nan = keys > _inf_bits(values.dtype)
    sign = bits >> (8 * values.element_size() - 1)  # -1 for a negative value, else 0
    keys ^= sign
    keys -= sign  # two's complement: -magnitude where negative
    return keys.masked_fill_(nan, magnitude)


def kernels_on(device: torch.device) -> bool:
    """Whether the sampler's Triton kernels run on `device` (CUDA with Triton), else plain
    torch: also whether a decode step's argmax can publish into a token ring."""
    return torch.device(device).type == "cuda" and triton_available()


def _use_kernel(logits: torch.Tensor) -> bool:
    return kernels_on(logits.device)


def sample_tokens(logits_BV: torch.Tensor, params: Sequence[SamplingParams],
                  seeds: Sequence[int], positions: Sequence[int],
                  greedy_B: torch.Tensor | None = None,
                  tickets: torch.Tensor | None = None,
                  graphs: SamplerGraphs | None = None) -> torch.Tensor:
    """Each row's next token, [B] int64 on the logits' device, with no host sync: row i drawn
    with params[i] for the token at positions[i] of the sequence sampled with seeds[i]
    (`draw_key`); greedy rows take their argmax (`greedy_B`: every row's, when the caller has
    them). `tickets`: int32 zeros, at least B, for the Triton kernels (moeflow.ops.tickets;
    None: made per call). `graphs` (with greedy_B, on CUDA with Triton): the draw's kernels
    replayed from CUDA graphs once its shape repeats (moeflow.infer.sampler_graphs; the result
    is then a graph's output buffer, valid until that graph's next replay)."""
    B, V = logits_BV.shape
    if not len(params) == len(seeds) == len(positions) == B:
        raise ValueError(f"sample_tokens: {B} rows of logits need as many params, seeds and "
                         f"positions, got {len(params)}, {len(seeds)}, {len(positions)}")
    kernel = _use_kernel(logits_BV)
    table = sampling_table(params, seeds, positions, V, kernel)
    if not table:
        return greedy_B if greedy_B is not None else greedy_tokens(logits_BV, tickets)
    cuda = logits_BV.is_cuda
    host_S6 = torch.tensor(table, dtype=torch.float64)
    if cuda:
        host_S6 = host_S6.pin_memory()
    if greedy_B is None and len(table) < B:
        greedy_B = greedy_tokens(logits_BV, tickets)
    if kernel:
        draws = KernelDraws.of(table)
        if graphs is not None and greedy_B is not None:
            return graphs.draw(logits_BV, draws, host_S6, greedy_B, tickets)
        return draw_on_kernels(logits_BV, draws, host_S6.to(logits_BV.device, non_blocking=True),
                               greedy_B, tickets)
    table_S6 = host_S6.to(logits_BV.device, non_blocking=cuda)
    ks = [row[1] for row in table]
    top_p = any(row[2] < 1.0 for row in table)
    # Rows without a top-k measure their nucleus against their whole row (draw_reference).
    mass = row_mass(logits_BV, table_S6) if top_p and not all(ks) else None
    if (mass is not None and logits_BV.device.type == "cpu"
            and all(row[1] or row[2] < 1.0 for row in table)):
        # Every row keeps a top-k or a nucleus: the best N of each row suffice where the nuclei
        # fit in them (a host check, free on the CPU), before a sort of every logit.
        n = max(max(ks), CPU_FIRST_CANDIDATES)
        while n < V:
            values, ids = ranked_candidates(logits_BV, n)
            drawn = draw_reference(values, ids, table_S6, _draw_out(B, greedy_B, logits_BV),
                                   ranked=True, top_p=True, row_mass_S1=mass, whole=False)
            if drawn is not None:
                return drawn
            n *= 4
    if all(ks):  # the candidates: the best max(k) of each row, best first
        values, ids = ranked_candidates(logits_BV, max(ks))
    elif top_p or any(ks):
        values, ids = ranked_candidates(logits_BV, None)
    else:  # temperature only: the whole row, as it is
        values, ids = logits_BV, None
    return draw_reference(values, ids, table_S6, _draw_out(B, greedy_B, logits_BV),
                          ranked=ids is not None, top_p=top_p, row_mass_S1=mass)


def sampling_table(params: Sequence[SamplingParams], seeds: Sequence[int],
                   positions: Sequence[int], V: int, kernel: bool) -> list[tuple]:
    """The rows of the sampler's table (TABLE_COLUMNS) for the rows of a batch that sample
    (none: every row is greedy); for the kernels (`kernel`) the rows with a top-k first."""
    # In float32's normal range: a smaller temperature would round to 0 (0 / 0), a larger one
    # to inf (-inf / inf: NaN for masked tokens).
    tiny, huge = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    table = []
    for i, p in enumerate(params):
        if not p.greedy:
            table.append((min(max(p.temperature, tiny), huge), p.top_k if p.top_k < V else 0,
                          p.top_p, *draw_key(seeds[i], positions[i]), i))
    if kernel:  # rows with a top-k first, then the whole rows (draw_on_kernels)
        table.sort(key=lambda row: row[1] == 0)
    return table


@dataclass(frozen=True)
class KernelDraws:
    """The launches of a table's draw on the kernels (draw_on_kernels), its rows with a top-k
    first: what shapes them, the same for every step of a steady batch (moeflow.infer.
    sampler_graphs keys its graphs by it)."""
    ranked: int  # rows with a top-k, drawn from one top-k launch of their largest k
    k: int
    ranked_top_p: bool  # any of them with a top-p
    whole: int  # rows drawn from their whole logits rows
    whole_top_p: bool  # any of them with a top-p (their nuclei bounded first)

    @staticmethod
    def of(table: list[tuple]) -> KernelDraws:
        ranked = [row for row in table if row[1]]
        whole = table[len(ranked):]
        return KernelDraws(len(ranked), max((row[1] for row in ranked), default=0),
                           any(row[2] < 1.0 for row in ranked), len(whole),
                           any(row[2] < 1.0 for row in whole))


def draw_on_kernels(logits_BV: torch.Tensor, draws: KernelDraws, table_S6: torch.Tensor,
                    greedy_B: torch.Tensor | None, tickets: torch.Tensor | None
                    ) -> torch.Tensor:
    """sample_tokens on CUDA with Triton, the table's rows with a top-k first: those drawn from
    their best k (moeflow.ops.top_k_triton), the rest from their whole rows
    (moeflow.ops.sample_triton), a nucleus bounded without a sort (moeflow.ops.nucleus_triton).
    No host work but the launches: what sampler_graphs captures."""
    from moeflow.ops.nucleus_triton import nucleus_bounds_triton
    from moeflow.ops.sample_triton import draw_triton
    B = logits_BV.shape[0]
    n = draws.ranked
    if greedy_B is None and draws.whole:
        greedy_B = greedy_tokens(logits_BV, tickets)  # whole rows: the draw's shift
    out = _draw_out(B, greedy_B, logits_BV)
    if n:
        values, ids = ranked_candidates(logits_BV, draws.k, tickets)
        draw_triton(values, ids, table_S6[:n], out, ranked=True, top_p=draws.ranked_top_p,
                    tickets=tickets)
    if draws.whole:
        bounds = nucleus_bounds_triton(logits_BV, table_S6[n:], greedy_B, tickets) \
            if draws.whole_top_p else None
        draw_triton(logits_BV, None, table_S6[n:], out, ranked=False, top_p=draws.whole_top_p,
                    argmax_B=greedy_B, tickets=tickets, bounds_S2=bounds)
    return out


def _draw_out(B: int, greedy_B: torch.Tensor | None, logits_BV: torch.Tensor) -> torch.Tensor:
    """The draw's output: the greedy tokens (rows not sampled keep theirs), or empty."""
    return (torch.empty(B, dtype=torch.int64, device=logits_BV.device) if greedy_B is None
            else greedy_B.clone())
