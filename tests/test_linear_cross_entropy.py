"""The LM head and cross-entropy fused over chunks (moeflow.ops.linear_cross_entropy,
`train --loss-chunk`): the loss and both gradients of the plain F.cross_entropy(lm_head(h)),
in fp32 to rounding and in bf16 under autocast to a bf16 step, ignore_index honoured; a run
trained with it follows the plain run's losses; one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeflow.ops.linear_cross_entropy import linear_cross_entropy
from moeflow.train import TrainConfig

from _train_small import cli_in_process, losses, train_argv


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


def test_training_with_loss_chunk_follows_the_plain_run(tmp_path, corpus, config):
    runs = {}
    for name, extra in (("plain", ()), ("fused", ("--loss-chunk", "48"))):
        out = tmp_path / name
        r = cli_in_process(*train_argv(config, corpus, out, "--steps", "4", *extra))
        assert r.returncode == 0, r.stderr
        runs[name] = losses(out)
    # the chunked fp32 sums round differently in the last bits: the fused path did run
    assert runs["fused"] != runs["plain"]
    for (s, loss, val), (s_f, loss_f, val_f) in zip(runs["plain"], runs["fused"], strict=True):
        assert s == s_f
        for a, b in ((loss, loss_f), (val, val_f)):
            assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-4 * abs(a))
    r = cli_in_process(*train_argv(config, corpus, tmp_path / "bad", "--loss-chunk", "-1"))
    assert r.returncode == 2 and "loss_chunk" in r.stderr and r.stderr.count("\n") == 1
    with pytest.raises(ValueError, match="loss_chunk.*distillation compares"):
        TrainConfig(loss_chunk=64, teacher=str(tmp_path / "teacher"))
