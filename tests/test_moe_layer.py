"""Layer-level equivalences: MoE vs dense MLP, fast vs reference experts, vs a per-token MoE."""

import pytest
import torch

from moeflow import RouterConfig
from moeflow.config import FFNSpec
from moeflow.model.mlp import MLP
from moeflow.model.moe import MoELayer
from moeflow.ops.activation import apply_activation
from moeflow.ops.backend import Backends, set_backends

D, F = 16, 24


def make_layer(activation="gelu", bias=True, kind="moe", **spec_kw):
    router = spec_kw.pop("router", RouterConfig(top_k=2, dropless=True))
    spec = FFNSpec(kind=kind, d_ff=F, num_experts=spec_kw.pop("num_experts", 4), expert_d_ff=F,
                   router=router, **spec_kw)
    layer = MoELayer(spec, D, activation, bias)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def naive_moe(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition the fast layer must equal."""
    r = layer.router(x_TD)
    ex = layer.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(r.ids_TK.shape[1]):
            if not r.kept_TK[t, k]:
                continue
            e = r.ids_TK[t, k]
            h = x_TD[t] @ ex.w_in_EDI[e] + (ex.b_in_EI[e] if ex.b_in_EI is not None else 0)
            y = apply_activation(h, ex.activation) @ ex.w_out_EFD[e]
            y = y + (ex.b_out_ED[e] if ex.b_out_ED is not None else 0)
            out[t] += r.weights_TK[t, k] * y
    return out


@pytest.mark.parametrize("activation, bias", [("gelu", True), ("swiglu", False)])
def test_one_expert_top1_equals_dense_mlp(activation, bias):
    torch.manual_seed(0)
    layer = make_layer(activation, bias, num_experts=1, router=RouterConfig(top_k=1, dropless=True))
    mlp = MLP(D, F, activation, bias)
    with torch.no_grad():
        mlp.fc_in.weight.copy_(layer.experts.w_in_EDI[0].t())
        mlp.fc_out.weight.copy_(layer.experts.w_out_EFD[0].t())
        if bias:
            mlp.fc_in.bias.copy_(layer.experts.b_in_EI[0])
            mlp.fc_out.bias.copy_(layer.experts.b_out_ED[0])
    x = torch.randn(2, 7, D)
    y, routing = layer(x)
    assert torch.allclose(routing.weights_TK, torch.ones(14, 1))
    torch.testing.assert_close(y, mlp(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", [
    RouterConfig(top_k=2, dropless=True),
    RouterConfig(top_k=2, capacity_factor=0.5, eval_capacity_factor=0.5),
    RouterConfig(top_k=1, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=1),
])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_equals_naive_per_token_moe(router, activation):
    torch.manual_seed(0)
    layer = make_layer(activation, router=router).eval()
    x = torch.randn(40, D)
    y, routing = layer(x[None])
    if not router.dropless:
        assert int(routing.num_dropped) > 0  # the case really drops tokens
    torch.testing.assert_close(y[0], naive_moe(layer, x), rtol=1e-5, atol=1e-5)


def poison_allocator():
    """Free NaN-filled blocks so uninitialised memory reused by the next op is NaN, not zero."""
    for n in (64, 256, 1024, 4096, 16384):
        junk = torch.full((n,), float("nan"))
        del junk


@pytest.mark.parametrize("kind, shared, activation, bias", [
    ("moe", 0, "swiglu", False), ("moe", 2, "swiglu", False), ("residual_moe", 0, "gelu", True)])
def test_grouped_mm_path_equals_reference_path(kind, shared, activation, bias):
    torch.manual_seed(0)
    layer = make_layer(activation, bias, kind=kind, num_shared_experts=shared,
                       shared_d_ff=shared * F, num_experts=6,
                       router=RouterConfig(top_k=2, capacity_factor=0.8))
    x = torch.randn(3, 11, D)

    def run(backend):
        set_backends(layer, Backends(experts=backend))
        layer.zero_grad()
        poison_allocator()
        y, _ = layer(x)
        (y * torch.randn_like(y, generator=torch.Generator().manual_seed(1))).sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    y_ref, grads_ref = run("reference")
    # Three runs over freshly poisoned memory: each must match the reference, and repeat the
    # first bit for bit (a read of uninitialised memory would make them differ or go NaN).
    runs = [run("grouped_mm") for _ in range(3)]
    for y, grads in runs:
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for name, g in grads_ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5)
    for y, grads in runs[1:]:
        assert torch.equal(y, runs[0][0])
        assert all(torch.equal(grads[n], g) for n, g in runs[0][1].items())


def test_residual_moe_mixes_with_weights_that_sum_to_one():
    torch.manual_seed(0)
    layer = make_layer("gelu", kind="residual_moe")
    x_TD = torch.randn(9, D)
    y, _ = layer(x_TD[None])
    coef = torch.softmax(layer.residual_coef(x_TD), dim=-1)
    assert torch.allclose(coef.sum(-1), torch.ones(9))
    moe_out = naive_moe(layer, x_TD)
    expected = coef[:, :1] * moe_out + coef[:, 1:] * layer.residual_mlp(x_TD)
    torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-5)


def test_shared_experts_are_added_with_their_gate():
    torch.manual_seed(0)
    layer = make_layer("swiglu", False, num_shared_experts=1, shared_d_ff=F,
                       shared_expert_gate=True)
    x_TD = torch.randn(5, D)
    y, _ = layer(x_TD[None])
    gate = torch.sigmoid(layer.shared_gate(x_TD))
    expected = naive_moe(layer, x_TD) + gate * layer.shared(x_TD)
    torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-5)


def test_dispatch_is_an_exact_expert_sorted_permutation():
    torch.manual_seed(0)
    layer = make_layer(router=RouterConfig(top_k=2, capacity_factor=0.7))
    x_TD = torch.randn(30, D)
    r = layer.router(x_TD)
    x_ND, plan = layer.dispatcher.dispatch(x_TD, r)
    ends = [0] + plan.ends_E.tolist()
    for e in range(4):
        rows = plan.token_N[ends[e]:ends[e + 1]]
        expected = [t for t in range(30) for k in range(2)
                    if r.ids_TK[t, k] == e and r.kept_TK[t, k]]
        expected.sort(key=lambda t: int(r.slots_TK[t][r.ids_TK[t] == e][0]))
        assert rows.tolist() == expected
        assert torch.equal(x_ND[ends[e]:ends[e + 1]], x_TD[rows])
    token_TK = torch.arange(30)[:, None].expand(30, 2)
    assert torch.equal(plan.token_N[plan.row_TK[r.kept_TK]], token_TK[r.kept_TK])
