"""`Backends` chooses every op's implementation for a whole model, and the fused ops fall back to
plain torch per call signature, with one warning naming the function."""

import dataclasses
import logging

import pytest
import torch

from moeflow import Backends, ModelConfig, RouterConfig, Transformer
from moeflow.model.attention import Attention
from moeflow.model.dispatch import LocalDispatcher
from moeflow.model.experts import Experts
from moeflow.model.norms import RMSNorm
from moeflow.model.router import Router
from moeflow.ops import backend, fused as fused_mod
from moeflow.ops.backend import ChoosesBackends


@pytest.mark.parametrize("field", ["router", "dispatch", "experts", "fuse"])
def test_unknown_backend_names_the_field(field):
    with pytest.raises(ValueError, match=rf"^{field}='nope': must be one of auto, reference"):
        Backends(**{field: "nope"})


def llama(**kw) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=64, n_layers=2, d_model=32, n_heads=4,
                       n_kv_heads=2, max_seq_len=16, qk_norm=True, moe_every=1, num_experts=4,
                       expert_d_ff=16, router=RouterConfig(top_k=2, dropless=True), **kw)


def test_constructor_and_set_backends_reach_every_choosing_module():
    chosen = Backends(router="reference", dispatch="reference", experts="grouped_mm",
                      fuse="reference")
    model = Transformer(llama(), backends=chosen)
    choosers = [m for m in model.modules() if isinstance(m, ChoosesBackends)]
    kinds = {type(m) for m in choosers}
    assert {Transformer, Router, Experts, LocalDispatcher, Attention, RMSNorm} <= kinds
    assert all(m.backends is chosen for m in choosers)
    model.set_backends(Backends.reference())
    assert all(m.backends == Backends.reference() for m in choosers)
    with pytest.raises(TypeError):
        model.set_backends("reference")


def test_the_forward_runs_the_forced_expert_path(monkeypatch):
    calls = []
    for name in ("reference", "grouped_mm"):
        real = backend.EXPERT_BACKENDS[name]
        monkeypatch.setitem(backend.EXPERT_BACKENDS, name,
                            lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    torch.manual_seed(0)
    model = Transformer(llama(), backends=Backends(experts="reference"))
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits
        assert calls == ["reference"] * 2
        model.set_backends(dataclasses.replace(model.backends, experts="grouped_mm"))
        calls.clear()
        out = model(ids).logits
    assert calls == ["grouped_mm"] * 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_experts_under_autocast_get_operands_in_the_autocast_dtype(monkeypatch):
    """Training keeps fp32 weights and autocasts: the experts must receive bf16 operands (what
    autocast would give each matmul), else "auto" sees fp32 and picks the per-expert loop."""
    seen = []
    real = backend.EXPERT_BACKENDS["reference"]

    def spy(x, ends, w_in, b_in, w_out, b_out, *rest, **kwargs):
        seen.append((x.dtype, w_in.dtype, w_out.dtype, b_in.dtype, b_out.dtype))
        return real(x, ends, w_in, b_in, w_out, b_out, *rest, **kwargs)

    monkeypatch.setitem(backend.EXPERT_BACKENDS, "reference", spy)
    torch.manual_seed(0)
    experts = Experts(4, 16, 32, "gelu", bias=True, backends=Backends(experts="reference"))
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.1)
    x = torch.randn(12, 16)
    ends = torch.tensor([3, 6, 6, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, ends, parked=False)
    assert seen == [(torch.bfloat16,) * 5]
    weights = (experts.w_in_EDI, experts.b_in_EI, experts.w_out_EFD, experts.b_out_ED)
    want = real(x.bfloat16(), ends, *(w.bfloat16() for w in weights), "gelu", False)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.float().sum().backward()  # gradients reach the fp32 master weights
    assert experts.w_in_EDI.grad.dtype == torch.float32 and experts.w_in_EDI.grad.abs().sum() > 0
    seen.clear()
    experts(x, ends, parked=False)  # no autocast: fp32 as stored
    assert seen == [(torch.float32,) * 5]


# ---- fused ops: forcing and falling back ------------------------------------------------------

class FakeCompile:
    """Stands in for torch.compile: counts the twin's calls, fails for dtypes in `fail`."""

    def __init__(self, fail=(torch.float32,)):
        self.fail, self.calls = fail, 0

    def __call__(self, fn, fullgraph):
        def twin(*args, **kwargs):
            self.calls += 1
            if args[0].dtype in self.fail:
                raise RuntimeError("inductor: no C compiler\nmore detail")
            return fn(*args, **kwargs) + 1000  # tells the twin's result from the reference's
        return twin


def make_op():
    @fused_mod.fused
    def scaled_sum(x, w):
        if x.shape[-1] != w.shape[0]:
            raise ValueError("width mismatch")
        return (x * w).sum(-1)
    return scaled_sum


def test_fuse_choice_forces_or_skips_the_compiled_twin(monkeypatch):
    fake = FakeCompile(fail=())
    monkeypatch.setattr(fused_mod.torch, "compile", fake)
    op, x, w = make_op(), torch.randn(3, 4), torch.nn.Parameter(torch.randn(4))
    ref = (x * w).sum(-1)
    with torch.no_grad():
        torch.testing.assert_close(op(x, w, fuse="compiled"), ref + 1000)
        torch.testing.assert_close(op(x, w, fuse="reference"), ref)
        torch.testing.assert_close(op(x, w), ref)  # auto: CPU runs the reference
    assert fake.calls == 1
    assert torch.equal(op(x, w, fuse="compiled"), ref)  # autograd on: never the twin
    assert fake.calls == 1


def test_failed_twin_falls_back_for_its_signature_only_and_warns_once(monkeypatch, caplog):
    fake = FakeCompile(fail=(torch.float32,))
    monkeypatch.setattr(fused_mod.torch, "compile", fake)
    op = make_op()
    x32, w32 = torch.randn(3, 4), torch.randn(4)
    caplog.set_level(logging.DEBUG, logger="moeflow.ops.fused")
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(op(x32, w32, fuse="compiled"), (x32 * w32).sum(-1))
        assert fake.calls == 1  # later fp32 calls go straight to the reference
        x64, w64 = x32.double(), w32.double()
        assert torch.equal(op(x64, w64, fuse="compiled"), (x64 * w64).sum(-1) + 1000)
        assert fake.calls == 2  # another signature still gets the twin
        x16 = torch.randn(2, 5, 4)  # rank 3, fp32: another signature, fails again
        op(x16, w32, fuse="compiled")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "scaled_sum" in warnings[0].getMessage()
    assert "no C compiler" in warnings[0].getMessage()
    assert "more detail" not in warnings[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 1


def test_caller_errors_are_raised_not_taken_for_compile_failures(monkeypatch, caplog):
    fake = FakeCompile(fail=(torch.float32,))
    monkeypatch.setattr(fused_mod.torch, "compile", fake)
    op = make_op()
    with torch.no_grad():
        with pytest.raises(ValueError, match="width mismatch"):
            op(torch.randn(3, 4), torch.randn(5), fuse="compiled")
        op(torch.randn(3, 4), torch.randn(4), fuse="compiled")
    assert fake.calls == 2  # the bad call marked nothing: the good one still tried the twin
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # the good one's


def test_fuse_choice_by_device_and_autograd():
    cpu = torch.zeros(4)
    assert not backend.resolve_fuse("auto", cpu)
    with torch.no_grad():
        assert not backend.resolve_fuse("auto", cpu)
        assert backend.resolve_fuse("compiled", cpu)
        assert not backend.resolve_fuse("reference", cpu)


@pytest.mark.parametrize("rows_per_expert,grad,tma,ffn,want", [
    (1, False, True, 3, "stream"), (16, False, True, 3, "stream"), (17, False, True, 3, "tiled"),
    (64, False, True, 4096, "tiled"), (65, False, True, 4096, "persistent"),
    (128, False, False, 4096, "tiled"), (129, False, False, 4096, "grouped_mm_fused"),
    (512, False, True, 4096, "persistent"), (513, False, True, 4096, "grouped_mm_fused"),
    (4096, False, True, 1024, "persistent"), (4096, False, True, 1032, "grouped_mm_fused"),
    (129, False, False, 3, "grouped_mm_fused"), (4, True, True, 3, "grouped_mm_fused"),
    (300, True, True, 3, "grouped_mm_fused")])
def test_auto_experts_by_rows_per_expert_and_autograd(monkeypatch, rows_per_expert, grad, tma,
                                                      ffn, want):
    """"auto" experts on CUDA: weight streaming for few rows per expert; where TMA runs, the
    persistent grouped GEMM above PERSISTENT_MIN_ROWS_PER_EXPERT, up to
    PERSISTENT_MAX_ROWS_PER_EXPERT and for experts up to PERSISTENT_ANY_ROWS_MAX_FFN wide at
    any row count; else the tiled grouped GEMM up to TILED_MAX_ROWS_PER_EXPERT,
    torch._grouped_mm above; under autograd always torch._grouped_mm
    (stream, tiled and persistent have no backward). The rows are the gathered ones when the
    experts gather (num_rows), not the tokens."""
    monkeypatch.setattr(backend, "_triton_cuda", lambda x: True)
    monkeypatch.setattr(backend, "grouped_mm_supported", lambda *a: True)
    monkeypatch.setattr(backend, "tma_experts_supported", lambda *a: tma)
    E = 8
    w_in = torch.zeros(E, 4, 2 * ffn, requires_grad=grad)
    w_out = torch.zeros(E, ffn, 4, requires_grad=grad)
    tokens = torch.zeros(3, 4)
    fn = backend.resolve_expert_backend("auto", tokens, w_in, w_out, rows_per_expert * E)
    assert fn is backend.EXPERT_BACKENDS[want]
