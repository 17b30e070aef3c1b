"""Training's activation-memory options. `--loss-chunk`: the LM head and cross-entropy fused
over chunks (moeflow.ops.linear_cross_entropy): the loss and both gradients of the plain
F.cross_entropy(lm_head(h)), in fp32 to rounding and in bf16 under autocast to a bf16 step,
ignore_index honoured; a run with it follows the plain run's losses. `--recompute`: activation
checkpointing per block, the same run bit for bit on the CPU, each block run again in the
backward. One-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeflow.ops.linear_cross_entropy import VOCAB_ALIGN, head_logits, linear_cross_entropy
from moeflow.train import TrainConfig

from _train_small import assert_follows, cli_in_process, train_argv, train_variants


def plain_and_fused(dtype, chunk, autocast=False, N=53, D=24, V=61):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(N, D, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=dtype, requires_grad=True)
    target = torch.randint(0, V, (N,), generator=g)
    target[::7] = -100
    out = {}
    for name, fn in (("plain", lambda: F.cross_entropy(F.linear(h, w).float(), target)),
                     ("fused", lambda: linear_cross_entropy(h, w, target, chunk))):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn()
        loss.backward()
        out[name] = (loss.detach(), h.grad.clone(), w.grad.clone())
        h.grad = w.grad = None
    return out["plain"], out["fused"]


@pytest.mark.parametrize("chunk", [1, 8, 53, 100])
def test_fp32_equals_the_plain_loss_and_gradients(chunk):
    (loss, gh, gw), (loss_f, gh_f, gw_f) = plain_and_fused(torch.float32, chunk)
    torch.testing.assert_close(loss_f, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh_f, gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw_f, gw, rtol=1e-5, atol=1e-7)


def test_under_autocast_the_head_runs_in_bf16_as_the_plain_one():
    (loss, gh, gw), (loss_f, gh_f, gw_f) = plain_and_fused(torch.float32, 16, autocast=True)
    assert torch.equal(loss_f, loss)  # the same bf16 logits, the same fp32 sums per chunk
    # gradients: both from bf16 GEMMs; the fused one accumulates the weight's over chunks in fp32
    torch.testing.assert_close(gh_f, gh, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(gw_f, gw, rtol=2e-2, atol=1e-3)
    with pytest.raises(ValueError, match="chunk=0: must be a positive"):
        linear_cross_entropy(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2).long(), 0)


@pytest.mark.parametrize("V", [61, VOCAB_ALIGN, 2 * VOCAB_ALIGN + 1])
def test_head_logits_are_the_plain_head_with_its_gradients(V):
    """The head multiplies through a weight padded to VOCAB_ALIGN rows in training (aligned
    GEMMs); the logits are a [.., V] view of that product: the same values and gradients."""
    g = torch.Generator().manual_seed(V)
    h = torch.randn(2, 5, 24, generator=g, requires_grad=True)
    w = torch.randn(V, 24, generator=g, requires_grad=True)
    target = torch.randint(0, V, (2, 5), generator=g)
    grads = []
    for fn in (F.linear, head_logits):
        logits = fn(h, w)
        assert logits.shape == (2, 5, V)
        F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        grads.append((logits.detach(), h.grad.clone(), w.grad.clone()))
        h.grad = w.grad = None
    for plain, padded in zip(*grads):
        torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-6)
    assert grads[1][2].shape == (V, 24)
    if V % VOCAB_ALIGN:  # padded: a strided view of the wider product
        assert head_logits(h, w).stride(-2) == V + -V % VOCAB_ALIGN
    with torch.no_grad():  # inference keeps the plain product (no weight copy)
        assert head_logits(h, w).is_contiguous()


def test_training_with_loss_chunk_follows_the_plain_run(tmp_path, corpus, config):
    runs = train_variants(tmp_path, config, corpus, 4, plain=(), fused=("--loss-chunk", "48"))
    # the chunked fp32 sums round differently in the last bits: the fused path did run
    assert runs["fused"] != runs["plain"]
    assert_follows(runs["fused"], runs["plain"], rel=1e-4)
    r = cli_in_process(*train_argv(config, corpus, tmp_path / "bad", "--loss-chunk", "-1"))
    assert r.returncode == 2 and "loss_chunk" in r.stderr and r.stderr.count("\n") == 1
    with pytest.raises(ValueError, match="loss_chunk.*distillation compares"):
        TrainConfig(loss_chunk=64, teacher=str(tmp_path / "teacher"))


def test_recompute_gives_the_same_run(tmp_path, corpus, config):
    """--recompute (activation checkpointing per block): on the CPU the recomputed activations
    are the kept ones bit for bit, so the run's losses and weights are the plain run's. With
    --loss-chunk too (the model returns its final-normed hidden states to the fused head) the
    run follows the plain one as a --loss-chunk run does: to the chunked sums' fp32 rounding."""
    runs = train_variants(tmp_path, config, corpus, 3, plain=(), recompute=("--recompute",),
                          both=("--recompute", "--loss-chunk", "40"))
    assert runs["recompute"] == runs["plain"]
    assert_follows(runs["both"], runs["plain"], rel=1e-4)  # the --loss-chunk run's bound


def test_recompute_runs_each_block_again_in_the_backward():
    from moeflow import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layers=2, d_model=16, n_heads=2,
                                    max_seq_len=16, moe_every=2, num_experts=4))
    calls, block = [], model.blocks[1]
    # Counted by wrapping (module hooks do not fire on the recompute); without autograd the
    # model runs forward_deferred instead of forward.
    for name in ("forward", "forward_deferred"):
        def counting(*args, run=getattr(block, name), **kwargs):
            calls.append(1)
            return run(*args, **kwargs)
        setattr(block, name, counting)
    ids = torch.randint(0, 64, (2, 8))
    grads = {}
    for recompute in (False, True):
        calls.clear()
        model.zero_grad()
        out = model(ids, recompute=recompute)
        (out.logits.float().square().mean() + out.router_loss).backward()
        grads[recompute] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        assert len(calls) == (2 if recompute else 1)
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True], strict=True))
    with torch.no_grad():  # nothing to recompute without autograd
        calls.clear()
        model(ids, recompute=True)
        assert len(calls) == 1
