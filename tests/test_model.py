import pytest
import torch
import torch.nn.functional as F

from moeflow import ModelConfig, RouterConfig, Transformer
from moeflow.infer.slot_cache import DecodeView, PrefillView, SlotKVCache


def small(arch="gpt", **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=97, n_layers=4, d_model=32, n_heads=4, max_seq_len=64,
                moe_every=2, num_experts=(4, 8), moe_kind="residual_moe",
                router=RouterConfig(top_k=1, dropless=True))
    return ModelConfig(**{**base, **kw})


LLAMA = dict(n_kv_heads=2, qk_norm=True, moe_kind="moe", num_shared_experts=1, expert_d_ff=24,
             router=RouterConfig(top_k=2, dropless=True, normalize_topk=True))


def test_gpt_and_llama_forward_shapes_and_heads():
    torch.manual_seed(0)
    gpt = Transformer(small())
    out = gpt(torch.randint(0, 97, (2, 10)))
    assert out.logits.shape == (2, 10, 97)
    assert gpt.lm_head.weight is gpt.tok_emb.weight and gpt.pos_emb is not None
    assert len(out.routing) == 2 and [r.layer for r in out.routing] == [1, 3]
    llama = Transformer(small("llama", **LLAMA))
    assert llama.lm_head.weight is not llama.tok_emb.weight and llama.pos_emb is None
    assert llama.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)
    assert llama(torch.randint(0, 97, (2, 10))).logits.shape == (2, 10, 97)


def test_routing_stats_account_for_every_assignment():
    torch.manual_seed(0)
    cfg = small(router=RouterConfig(top_k=2, capacity_factor=0.5, min_capacity=0))
    out = Transformer(cfg)(torch.randint(0, 97, (2, 16)))
    for r in out.routing:
        assert r.num_assignments == 2 * 16 * 2
        assert int(r.counts_E.sum()) + int(r.num_dropped) == r.num_assignments
    assert 0 < out.dropped_fraction < 1
    assert out.router_loss.item() == pytest.approx(0.01 * out.aux_loss.item())


def test_loss_sums_are_per_layer_sums_summed_when_read_without_autograd():
    """The router/aux/z totals are the sums of each MoE layer's losses; a forward autograd
    records sums them at once (so they carry grad even when read under no_grad), one without
    autograd only when they are read (a served decode step never reads them)."""
    torch.manual_seed(0)
    cfg = small(router=RouterConfig(top_k=2, capacity_factor=0.5, min_capacity=0,
                                    z_loss_coef=0.1))
    model = Transformer(cfg)
    ids = torch.randint(0, 97, (2, 16))
    recorded = model(ids)
    with torch.no_grad():
        assert recorded.router_loss.requires_grad  # summed with the forward, not here
        plain = model(ids)
    assert "_loss_sums" in recorded.__dict__ and "_loss_sums" not in plain.__dict__
    assert len(plain.layer_losses) == 3 * len(plain.routing) == 6
    for out in (recorded, plain):
        per_layer = torch.stack(out.layer_losses).view(-1, 3)
        torch.testing.assert_close(out.router_loss, per_layer[:, 0].sum())
        torch.testing.assert_close(out.aux_loss, sum(r.aux_loss for r in out.routing))
        torch.testing.assert_close(out.z_loss, sum(r.z_loss for r in out.routing))
    torch.testing.assert_close(plain.router_loss, recorded.router_loss.detach())
    dense = Transformer(small(moe_every=0, num_experts=()))
    with torch.no_grad():
        assert dense(ids).router_loss.item() == 0 == dense(ids, hidden_only=True).z_loss.item()


@pytest.mark.parametrize("arch, extra", [("gpt", {}), ("llama", LLAMA)])
def test_forward_without_autograd_equals_the_recorded_forward_exactly(arch, extra):
    """Without autograd the blocks leave each residual add to the next norm
    (Block.forward_deferred); the outputs, the routing and the hidden state must equal the
    forward autograd records, bit for bit (dense and MoE blocks, both norm kinds)."""
    torch.manual_seed(0)
    model = Transformer(small(arch, **extra))
    ids = torch.randint(0, 97, (2, 12))
    recorded = model(ids, inference=True)
    with torch.no_grad():
        deferred = model(ids, inference=True)
        hidden = model(ids, inference=True, hidden_only=True).hidden
    assert recorded.logits.requires_grad and not deferred.logits.requires_grad
    assert torch.equal(deferred.logits, recorded.logits)
    assert torch.equal(hidden, model(ids, inference=True, hidden_only=True).hidden)
    for got, want in zip(deferred.routing, recorded.routing):
        assert torch.equal(got.ids_TK, want.ids_TK)
    # A forward hook on a block sees forward's (x, routing), so the model then runs forward.
    seen = []
    handle = model.blocks[1].register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    with torch.no_grad():
        hooked = model(ids, inference=True)
    handle.remove()
    assert len(seen) == 1 and seen[0].shape == (2, 12, model.config.d_model)
    assert torch.equal(hooked.logits, recorded.logits)


@pytest.mark.parametrize("arch, extra", [("gpt", {}), ("llama", LLAMA)])
def test_slot_cache_decoding_equals_full_forward(arch, extra):
    """Per sequence a prefill and a chunk after the cached tokens, then batched one-token steps
    with every sequence at its own position (sequence b is b tokens ahead)."""
    torch.manual_seed(0)
    model = Transformer(small(arch, **extra)).eval()
    ids = torch.randint(0, 97, (3, 26))
    full = model(ids).logits
    cache = SlotKVCache.for_model(model, num_slots=3, max_len=32)
    for b in range(3):
        start, mid, end = 0, 9 + b, 14 + b
        for lo, hi in ((start, mid), (mid, end)):
            got = model(ids[b:b + 1, lo:hi], cache=PrefillView(cache, b, lo)).logits
            torch.testing.assert_close(got[0], full[b, lo:hi], rtol=1e-4, atol=1e-5)
    rows = torch.arange(3)
    for step in range(9):
        lengths = 14 + rows + step
        view = DecodeView(cache, lengths, int(lengths.max()) + 1)
        got = model(ids[rows, lengths][:, None], cache=view).logits
        torch.testing.assert_close(got[:, 0], full[rows, lengths], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_give_rope_cos_sin_bits(dtype):
    """The model's rope tables (moeflow.model.rope.RopeTables) look the cos and sin up instead
    of computing them per step: the same bits as rope_cos_sin at any positions (a decode batch
    of scattered lengths, the last one included) and for 0..T-1 (the slice views), one table
    per dtype; the MLA models' tables span their rotated dims only."""
    from moeflow.model.rope import RopeTables, rope_cos_sin
    tables = RopeTables(64, 1e6, 4096)
    pos = torch.tensor([[0], [1], [37], [1000], [4095]])
    for got, want in zip(tables.at(pos, dtype), rope_cos_sin(pos, 64, 1e6, dtype)):
        assert got.dtype == dtype and got.shape == (5, 1, 64) and torch.equal(got, want)
    for got, want in zip(tables.first(300, "cpu", dtype),
                         rope_cos_sin(torch.arange(300)[None], 64, 1e6, dtype)):
        assert got.shape == (1, 300, 64) and torch.equal(got, want)
    assert tables.at(pos, torch.float16)[0].dtype == torch.float16
    model = Transformer(small("llama", **LLAMA))  # tables first built in inference mode
    ids = torch.randint(0, 97, (2, 10))
    with torch.inference_mode():
        model(ids)
    model(ids).logits.sum().backward()  # then trained: the tables are not inference tensors
    from moeflow.config import MLAConfig
    mla = MLAConfig(q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8)
    mla = Transformer(small("llama", **dict(LLAMA, qk_norm=False), mla=mla))
    assert mla.rope.head_dim == 4 and Transformer(small()).rope is None  # GPT: learned


def test_sequence_longer_than_context_is_refused():
    model = Transformer(small(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_tiny_moe_overfits_one_batch():
    torch.manual_seed(0)
    cfg = small(router=RouterConfig(top_k=1, capacity_factor=1.25, min_capacity=4))
    model = Transformer(cfg)
    batch = torch.randint(0, 97, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(100):
        out = model(batch[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        (loss + out.router_loss).backward()
        opt.step()
    assert first > 4.0  # ln(97) = 4.57 at init
    assert loss.item() < 0.5, f"loss {first:.2f} -> {loss.item():.2f}"


def test_expert_bias_balancing_moves_load():
    torch.manual_seed(0)
    router = RouterConfig(top_k=1, dropless=True, expert_bias=True, bias_update_rate=0.05)
    cfg = small("llama", **{**LLAMA, "router": router})
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.gate.weight[0] += 0.5  # skew towards expert 0
    ids = torch.randint(0, 97, (4, 32))

    def imbalance():
        counts = [r.counts_E.float() for r in model(ids).routing]
        return sum((c.max() / c.mean()).item() for c in counts)

    before = imbalance()
    for _ in range(40):
        model.update_expert_biases([r.counts_E for r in model(ids).routing])
    assert imbalance() < before
