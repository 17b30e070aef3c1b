"""The Triton decode attention (moeflow.ops.decode_attention_triton) vs the reference it replaces
(DecodeView's two scatters, then moeflow.infer.slot_cache.decode_attention in plain torch), and
an engine decoding through it.

Under Triton's interpreter (no GPU) on small shapes, fp32 only: the interpreter multiplies
bf16 tl.dot operands as their raw 16-bit integers (triton 3.6, runtime/interpreter.py
create_dot), so bf16 runs on a GPU only. The cache is filled with random values
everywhere, so a kernel that read a position past a sequence's length, or missed the new key,
would differ from the reference by far more than rounding; the length-0 row sees only its new
key, whose value it must return."""

import itertools

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow import ModelConfig, RouterConfig, Transformer  # noqa: E402
from moeflow.config import MLAConfig  # noqa: E402
from moeflow.infer import Engine, EngineConfig, SamplingParams  # noqa: E402
from moeflow.infer.slot_cache import decode_attention  # noqa: E402
from moeflow.ops import backend  # noqa: E402
from moeflow.ops.backend import Backends  # noqa: E402
from moeflow.ops.decode_attention_triton import (decode_attention_triton, num_splits,  # noqa: E402
                                                 one_block, work_split)


def reference(q_BHd, k_BGd, v_BGd, k_NGMd, v_NGMd, lengths_B, kv_len):
    """DecodeView's reference path on copies of the cache: (y, k cache, v cache)."""
    k_NGMd, v_NGMd = k_NGMd.clone(), v_NGMd.clone()
    B, G = k_BGd.shape[:2]
    at = lengths_B.view(B, 1, 1, 1)
    k_NGMd[:B].scatter_(2, at.expand(B, G, 1, k_NGMd.shape[-1]), k_BGd[:, :, None])
    v_NGMd[:B].scatter_(2, at.expand(B, G, 1, v_NGMd.shape[-1]), v_BGd[:, :, None])
    visible_BS = torch.arange(kv_len, device=q_BHd.device)[None, :] <= lengths_B[:, None]
    y = decode_attention.reference(q_BHd, k_NGMd[:B, :, :kv_len], v_NGMd[:B, :, :kv_len],
                                   visible_BS)
    return y, k_NGMd, v_NGMd


# (H, G, dk, dv): MHA with hd 64 (GPT presets), GQA with hd 128 (Qwen3: 8 queries per kv head),
# and MLA's unequal, non-power-of-two key and value dims (G = H).
SHAPES = {"mha64": (2, 2, 64, 64), "gqa128": (8, 2, 128, 128), "mla": (2, 2, 24, 16)}
# (batch lengths, kv_len): one row, and three rows from length 0 to kv_len - 1; on a GPU also a
# bucket of realistic size (many splits of the default key block).
LENGTHS = {"b1": ([21], 40), "b3": ([0, 29, 47], 48)}
if ON_GPU:
    LENGTHS["long"] = ([0, 700, 2047, 1500], 2048)
    LENGTHS["b1_128"] = ([100], 128)  # bf16: four slices of one 128-key block
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("lengths", list(LENGTHS))
def test_decode_attention_matches_reference_and_writes_the_cache(dtype, shape, lengths):
    H, G, dk, dv = SHAPES[shape]
    lengths, kv_len = LENGTHS[lengths]
    B, N, M = len(lengths), len(lengths) + 1, kv_len + 5  # a free slot, positions past kv_len
    torch.manual_seed(len(lengths) * 100 + dk)
    q = (2 * torch.randn(B, H, dk, device=DEVICE)).to(dtype)
    k_new, v_new = (torch.randn(B, G, d, device=DEVICE).to(dtype) for d in (dk, dv))
    k_cache = torch.randn(N, G, M, dk, device=DEVICE).to(dtype)
    v_cache = torch.randn(N, G, M, dv, device=DEVICE).to(dtype)
    lengths_B = torch.tensor(lengths, device=DEVICE)
    y_ref, k_ref, v_ref = reference(q, k_new, v_new, k_cache, v_cache, lengths_B, kv_len)
    # Exact fp32 math on the same (rounded) inputs: the yardstick for bf16.
    y32, _, _ = reference(q.float(), k_new.float(), v_new.float(), k_cache.float(),
                          v_cache.float(), lengths_B, kv_len)
    # The chosen splits; one split (no merge); three (a merge); 16-key steps; the default step;
    # each merged by the merge kernel and (with tickets) by the last split of each kv head; and
    # the value dims in two slices (32 and more), with one split (16-key steps, or all keys in
    # one block) and with three merged.
    tickets = torch.zeros(B * G, dtype=torch.int32, device=DEVICE)
    runs = [(*run, None) for run in itertools.product((None, 1, 3), (16, None), (False, True))]
    if dv >= 32:
        runs += [(1, 16, True, 2), (3, 16, True, 2), (3, 16, False, 2), (1, 128, True, 2)]
    for splits, block_n, ticketed, slices in runs:
        k, v = k_cache.clone(), v_cache.clone()
        y = decode_attention_triton(q, k_new, v_new, k, v, lengths_B, kv_len, splits=splits,
                                    block_n=block_n, tickets=tickets if ticketed else None,
                                    value_splits=slices)
        assert not tickets.any()  # left at 0 for the next launch
        assert y.shape == (B, H, dv) and y.dtype == dtype
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)  # the new rows, nothing else
        for b, L in enumerate(lengths):
            assert torch.equal(k[b, :, L], k_new[b]) and torch.equal(v[b, :, L], v_new[b])
            assert torch.equal(k[b, :, L + 1:], k_cache[b, :, L + 1:])
        assert torch.equal(k[B:], k_cache[B:]) and torch.equal(v[B:], v_cache[B:])
        if dtype == torch.float32:
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        else:
            # bf16: the output is rounded once (2^-9 relative) and the probabilities once before
            # P·V (2^-9 each, on a convex combination of values), so |y - y32| stays below
            # 2^-8 · max|v|; the reference also rounds its scores and is the less exact one.
            bound = 2**-8 * max(float(v_cache.float().abs().max()),
                                float(v_new.float().abs().max()))
            err = float((y.float() - y32).abs().max())
            err_ref = float((y_ref.float() - y32).abs().max())
            assert err <= max(bound, err_ref), (err, err_ref, bound)
        zero = [b for b, L in enumerate(lengths) if L == 0]
        for b in zero:  # a sequence's first token attends to its own key only
            rows = v_new[b].repeat_interleave(H // G, dim=0)
            torch.testing.assert_close(y[b], rows, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"{dv} value dims do not make 3 value slices") as err:
        decode_attention_triton(q, k_new, v_new, k_cache.clone(), v_cache.clone(), lengths_B,
                                kv_len, value_splits=3)
    assert "\n" not in str(err.value)
    for bad in (tickets.long(), tickets[:-1]):
        with pytest.raises(ValueError, match="tickets must be int32 zeros, at least B·G") as err:
            decode_attention_triton(q, k_new, v_new, k_cache.clone(), v_cache.clone(),
                                    lengths_B, kv_len, tickets=bad)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prep", ["norm_rope", "norm", "rope"])
def test_kernel_prepares_raw_heads_like_the_qk_kernel(dtype, prep):
    """Raw q and k with QKPrep give the bits of the q/k norm + RoPE kernel followed by the
    attention kernel: the same output, the same prepared key stored in the cache."""
    from moeflow.model.rope import rope_cos_sin
    from moeflow.ops.decode_attention_triton import QKPrep
    from moeflow.ops.qk_rope_triton import qk_norm_rope_triton

    H, G, hd = 8, 2, 32
    lengths, kv_len = [0, 13, 30], 32
    B, M = len(lengths), kv_len + 3
    torch.manual_seed(len(prep))
    q = (3 * torch.randn(B, H, 1, hd, device=DEVICE)).to(dtype)
    k = (3 * torch.randn(B, G, 1, hd, device=DEVICE)).to(dtype)
    v = torch.randn(B, G, 1, hd, device=DEVICE).to(dtype)
    cache = torch.randn(B, G, M, hd, device=DEVICE).to(dtype), \
        torch.randn(B, G, M, hd, device=DEVICE).to(dtype)
    lengths_B = torch.tensor(lengths, device=DEVICE)
    qw, kw = (torch.rand(hd, device=DEVICE) + 0.5 for _ in range(2))
    if "norm" not in prep:
        qw = kw = None
    cos, sin = rope_cos_sin(lengths_B[:, None], hd, 10000.0, dtype)
    if "rope" not in prep:
        cos = sin = None
    q_p, k_p = qk_norm_rope_triton(q, k, qw, kw, 1e-6, cos, sin, False)
    k_ref, v_ref = (c.clone() for c in cache)
    y_ref = decode_attention_triton(q_p[:, :, 0], k_p[:, :, 0], v[:, :, 0], k_ref, v_ref,
                                    lengths_B, kv_len, splits=2, block_n=16)
    k_got, v_got = (c.clone() for c in cache)
    y = decode_attention_triton(q[:, :, 0], k[:, :, 0], v[:, :, 0], k_got, v_got, lengths_B,
                                kv_len, splits=2, block_n=16,
                                qk=QKPrep(qw, kw, 1e-6, None if cos is None else cos[:, 0],
                                          None if sin is None else sin[:, 0]))
    assert torch.equal(k_got, k_ref) and torch.equal(v_got, v_ref)
    assert torch.equal(y, y_ref)
    assert not torch.equal(k_got, cache[0])  # the prepared keys were stored
    from moeflow.ops.decode_attention_triton import prepares
    assert [prepares(d) for d in (8, 16, 24, 128)] == [False, True, False, True]
    with pytest.raises(ValueError, match="cannot be prepared"):
        decode_attention_triton(q[:, :, 0, :8], k[:, :, 0, :8], v[:, :, 0, :8],
                                cache[0][..., :8].contiguous(), cache[1][..., :8].contiguous(),
                                lengths_B, kv_len, qk=QKPrep(qw, kw, 1e-6, None, None)
                                if qw is not None else QKPrep(None, None, 0.0, cos[:, 0, :8],
                                                              sin[:, 0, :8]))


@pytest.mark.parametrize("splits, slices", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_positions_past_the_length_never_reach_the_output(splits, slices):
    """The split kernel loads its first block of cached rows before it knows the length
    (masked only at kv_len), so rows past a sequence's length are read: whatever they hold
    (NaN, inf, as an uninitialised cache may) must drop out of the scores and the values. The
    sequences are shorter than one split at 4 splits (then split 0 writes the output itself,
    no partials) and longer at 1-2."""
    H, G, d = 8, 2, 32
    lengths, kv_len = [5, 21, 0], 64
    B, M = len(lengths), kv_len + 3
    torch.manual_seed(splits)
    q = torch.randn(B, H, d, device=DEVICE)
    k_new, v_new = torch.randn(B, G, d, device=DEVICE), torch.randn(B, G, d, device=DEVICE)
    k_cache = torch.randn(B, G, M, d, device=DEVICE)
    v_cache = torch.randn(B, G, M, d, device=DEVICE)
    lengths_B = torch.tensor(lengths, device=DEVICE)
    tickets = torch.zeros(B * G, dtype=torch.int32, device=DEVICE)
    y_ref = decode_attention_triton(q, k_new, v_new, k_cache.clone(), v_cache.clone(), lengths_B,
                                    kv_len, splits=splits, block_n=16, tickets=tickets)
    for b, L in enumerate(lengths):  # past the length: NaN keys, infinite values
        k_cache[b, :, L:] = float("nan")
        v_cache[b, :, L:] = float("inf")
    y = decode_attention_triton(q, k_new, v_new, k_cache, v_cache, lengths_B, kv_len,
                                splits=splits, block_n=16, tickets=tickets, value_splits=slices)
    assert torch.equal(y, y_ref)
    assert not tickets.any()


def test_split_count_rule():
    cpu = torch.device("cpu")
    assert num_splits(4, 8192, 64, cpu) == 2  # CPU_PROGRAMS = 8
    assert num_splits(1, 64, 64, cpu) == 1  # never more splits than key blocks
    assert num_splits(256, 8192, 64, cpu) == 1
    # Up to SLICED_KEYS (128) keys: one split, value slices up to CPU_PROGRAMS programs, each
    # slice at least 32 value dims; where that is one slice, or past 128 keys, num_splits'.
    assert work_split(1, 64, 64, 128, cpu) == (1, 4)
    assert work_split(2, 40, 64, 128, cpu) == (1, 4)
    assert work_split(4, 64, 64, 128, cpu) == (1, 2)
    assert work_split(1, 64, 64, 64, cpu) == (1, 2)
    assert work_split(1, 64, 16, 24, cpu) == (4, 1)  # no slice of 32 dims: key splits
    assert work_split(8, 64, 16, 128, cpu) == (1, 1)
    assert work_split(1, 128, 64, 128, cpu) == (1, 4)
    assert work_split(8, 128, 64, 128, cpu) == (1, 1)
    assert work_split(1, 256, 64, 128, cpu) == (4, 1)
    assert work_split(1, 8192, 64, 128, cpu) == (8, 1)
    # A sliced split's keys in one block where 3 stages of its tiles fit shared memory, 16-bit
    # caches only (sm_90: 227 KB a program).
    assert one_block(76, 64, 128, 32, 2, 232448) == 128
    assert one_block(40, 64, 128, 32, 2, 232448) == 64
    assert one_block(128, 64, 128, 32, 2, 101376) == 64  # 120 KB of tiles: over 99 KB
    assert one_block(128, 64, 128, 32, 4, 232448) == 64  # fp32
    assert one_block(128, 64, 128, 32, 2, 0) == 64  # torch does not say
    if ON_GPU:  # batch 1 of the Qwen3 shape (4 kv heads) puts a program on every SM
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert 4 * num_splits(4, 8192, 64, torch.device(DEVICE)) >= sms
        gpu = torch.device(DEVICE)
        assert work_split(4, 64, 64, 128, gpu) == (1, 4)  # batch 1
        assert work_split(4, 128, 64, 128, gpu) == (1, 4)
        # batch 16: slices would take more than half the SMs; key splits as before
        assert work_split(64, 64, 64, 128, gpu) == (num_splits(64, 64, 64, gpu), 1)


def test_attention_backend_choice():
    q = torch.randn(2, 4, 8, device=DEVICE)  # "auto" looks at q's device
    with torch.no_grad():
        assert backend.resolve_attention_backend("auto", q) == ("triton" if ON_GPU
                                                               else "reference")
        assert backend.resolve_attention_backend("triton", q) == "triton"
        assert backend.resolve_attention_backend("reference", q) == "reference"
    assert backend.resolve_attention_backend("triton", q) == "reference"  # autograd on
    assert Backends.reference().attention == "reference"
    with pytest.raises(ValueError, match="attention"):
        Backends(attention="nope")


ENGINE_CONFIGS = {
    # Qwen3-like: grouped queries (2 per kv head), per-head q/k norm, top-2 experts.
    "gqa": dict(n_kv_heads=2, qk_norm=True, num_experts=4, expert_d_ff=16,
                router=RouterConfig(top_k=2, dropless=True, normalize_topk=True)),
    # DeepSeek-like MLA: key dim 12, value dim 8.
    "mla": dict(n_kv_heads=4, num_experts=4, expert_d_ff=16,
                mla=MLAConfig(q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8,
                              qk_rope_head_dim=4, v_head_dim=8),
                router=RouterConfig(top_k=2, dropless=True)),
}


@pytest.mark.parametrize("kind", list(ENGINE_CONFIGS))
def test_engine_decodes_the_same_through_the_triton_kernel(kind, monkeypatch):
    """Greedy tokens equal and logits close at every step, three requests of different lengths
    decoding together (one joins later: max_batch_size 2)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=61, n_layers=2, d_model=32, n_heads=4,
                      max_seq_len=32, moe_kind="moe", moe_every=1, init_std=0.1,
                      **ENGINE_CONFIGS[kind])
    model = Transformer(cfg).to(DEVICE).eval()
    prompts = [[5, 9, 1], [7, 2, 8, 3, 3, 4, 11], [1]]
    params = SamplingParams(max_new_tokens=5, temperature=0)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[-1])  # kv_len
        return decode_attention_triton(*args, **kwargs)

    monkeypatch.setattr("moeflow.ops.decode_attention_triton.decode_attention_triton", spy)
    runs = []
    for attention in ("reference", "triton"):
        model.set_backends(Backends(attention=attention))
        engine = Engine(model, EngineConfig(max_batch_size=2))
        seen: dict[str, list[torch.Tensor]] = {}
        engine.logits_hook = lambda rid, row: seen.setdefault(rid, []).append(row.float())
        runs.append((engine.generate(prompts, params), seen))
    (tokens_ref, logits_ref), (tokens, logits) = runs
    # Only the Triton engine calls the kernel: every layer of at least 4 decode steps.
    assert len(calls) % cfg.n_layers == 0 and len(calls) >= 4 * cfg.n_layers
    assert tokens == tokens_ref and all(len(t) == 5 for t in tokens)
    assert logits.keys() == logits_ref.keys()
    for rid in logits:
        torch.testing.assert_close(torch.stack(logits[rid]), torch.stack(logits_ref[rid]),
                                   rtol=1e-4, atol=1e-4)


def test_engine_decode_with_heads_prepared_in_the_kernel_equals_the_qk_kernel(monkeypatch):
    """A Qwen3-like model (q/k norm per head, RoPE) decoding with the Triton norms and decode
    attention: the attention kernel norms and rotates raw q/k itself (QKPrep, every layer of
    every decode step) and the logits equal, bit for bit, those of the same engine with the
    q/k kernel run first (prepares_qk turned off)."""
    from moeflow.infer.slot_cache import DecodeView

    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=61, n_layers=2, d_model=32, n_heads=4,
                      n_kv_heads=2, head_dim=16, max_seq_len=32, qk_norm=True, moe_kind="moe",
                      moe_every=1, init_std=0.1, num_experts=4, expert_d_ff=16,
                      router=RouterConfig(top_k=2, dropless=True))
    model = Transformer(cfg, backends=Backends(attention="triton", elementwise="triton",
                                               fuse="reference")).to(DEVICE).eval()
    prompts = [[5, 9, 1], [7, 2, 8, 3, 3, 4, 11]]
    params = SamplingParams(max_new_tokens=4, temperature=0)
    prepared = []

    def spy(*args, **kwargs):
        prepared.append(kwargs.get("qk") is not None)
        return decode_attention_triton(*args, **kwargs)

    monkeypatch.setattr("moeflow.ops.decode_attention_triton.decode_attention_triton", spy)
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(DecodeView, "prepares_qk", lambda self, q: False)
        engine = Engine(model, EngineConfig(max_batch_size=2))
        seen: dict[str, list[torch.Tensor]] = {}
        engine.logits_hook = lambda rid, row: seen.setdefault(rid, []).append(row.float())
        runs.append((engine.generate(prompts, params), seen, list(prepared)))
        prepared.clear()
    (tokens, logits, fused_calls), (tokens_ref, logits_ref, plain_calls) = runs
    assert fused_calls and all(fused_calls) and not any(plain_calls)
    assert tokens == tokens_ref
    for rid in logits:
        assert torch.equal(torch.stack(logits[rid]), torch.stack(logits_ref[rid]))
