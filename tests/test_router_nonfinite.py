"""Router losses stay finite for any logits (±inf, NaN, 1e30) when the z-loss is off, through the
router (both backends), the MoE layer and a training step; with the z-loss on, the overflow is
reported as a non-finite loss before the optimizer step."""

from __future__ import annotations

import pytest

from tests._triton_cpu import DEVICE  # noqa: I001  (sets TRITON_INTERPRET first)

import torch  # noqa: E402

from moeflow import RouterConfig  # noqa: E402
from moeflow.config import FFNSpec  # noqa: E402
from moeflow.model.moe import MoELayer  # noqa: E402
from moeflow.model.router import Router  # noqa: E402
from moeflow.ops.backend import Backends, triton_available  # noqa: E402
from moeflow.train import NonFiniteLossError, TrainConfig, Trainer  # noqa: E402

from _train_small import write_config, write_corpus  # noqa: E402

NAN, INF = float("nan"), float("inf")
LOGITS = [[NAN, 0.0, 1.0, -1.0], [INF, -INF, NAN, 1.0], [-INF] * 4, [INF] * 4,
          [1e30, -1e30, 0.0, 2.0], [2e19, 0.0, 0.0, 0.0]]
BACKENDS = ["reference"] + (["triton"] if triton_available() else [])
# Triton's CPU interpreter warns on the overflows these tests provoke on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered",
                                        "ignore:invalid value encountered")


def _router_with_logits(cfg: RouterConfig, backend: str) -> tuple[Router, torch.Tensor]:
    logits = torch.tensor(LOGITS)
    router = Router(len(LOGITS), 4, cfg, Backends(router=backend)).to(DEVICE).train()
    with torch.no_grad():
        router.gate.weight.copy_(logits.t())
    return router, torch.eye(len(LOGITS), device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_zero_z_coef_keeps_the_loss_and_gradients_finite(backend, top_k):
    cfg = RouterConfig(top_k=top_k, capacity_factor=1.0, min_capacity=1, z_loss_coef=0.0)
    router, x = _router_with_logits(cfg, backend)
    r = router(x)
    assert torch.isinf(r.z_loss)  # the statistic overflows ...
    assert torch.isfinite(r.loss) and torch.isfinite(r.aux_loss)  # ... the objective does not
    assert torch.isfinite(r.weights_TK).all() and ((r.ids_TK >= 0) & (r.ids_TK < 4)).all()
    # Callers sum every statistic (the model stacks aux and z per layer): still finite gradients.
    (r.loss + r.weights_TK.sum() + torch.stack([r.aux_loss, r.z_loss]).sum() * 0).backward()
    assert torch.isfinite(router.gate.weight.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_positive_z_coef_reports_the_overflow(backend):
    router, x = _router_with_logits(RouterConfig(top_k=1, z_loss_coef=1e-3), backend)
    assert not torch.isfinite(router(x).loss)


def test_moe_layer_output_is_finite_for_non_finite_logits(monkeypatch):
    from moeflow.model import router as router_module

    crafted = torch.tensor(LOGITS)

    def logits_with_crafted_rows(x_TD, w_ED, finite=True):  # the first len(LOGITS) rows get LOGITS
        real = torch.nn.functional.linear(x_TD.float(), w_ED.float())
        rows = torch.arange(real.shape[0])[:, None] < crafted.shape[0]
        padded = torch.zeros_like(real)
        padded[:crafted.shape[0]] = crafted
        logits = torch.where(rows, padded, real)
        return router_module._finite(logits) if finite else logits

    monkeypatch.setattr(router_module, "router_logits", logits_with_crafted_rows)
    spec = FFNSpec(kind="residual_moe", d_ff=16, num_experts=4, expert_d_ff=16,
                   router=RouterConfig(top_k=2, capacity_factor=1.0, min_capacity=1))
    torch.manual_seed(0)
    layer = MoELayer(spec, d_model=8, activation="gelu", bias=True).train()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 2 * len(LOGITS), 8, requires_grad=True)
    y, routing = layer(x)
    assert torch.isfinite(y).all() and torch.isfinite(routing.loss)
    (y.sum() + routing.loss).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def _poison_gates(model: torch.nn.Module) -> None:
    """Gate rows whose logits are ~±1e30 and ±inf or NaN (products past the fp32 range)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.moe_layers():
            w = layer.router.gate.weight
            w[0] = torch.sign(torch.randn(w.shape[1], generator=g)) * 1e30
            w[1] = torch.sign(torch.randn(w.shape[1], generator=g)) * 3e38


@pytest.mark.parametrize("z_coef", [0.0, 1e-3])
def test_training_step_with_non_finite_router_logits(tmp_path, z_coef):
    corpus = write_corpus(tmp_path / "data")
    config = write_config(tmp_path / "micro.json", router={
        "top_k": 1, "min_capacity": 2, "z_loss_coef": z_coef})
    cfg = TrainConfig(model_config=str(config), data=(str(corpus),), out=str(tmp_path / "run"),
                      steps=2, batch_size=4, val_every=2, val_batches=1, progress=False,
                      device="cpu")
    trainer = Trainer(cfg)
    trainer.prepare()
    _poison_gates(trainer.model)
    with torch.no_grad():
        logits = trainer.model.moe_layers()[0].router.gate(torch.randn(8, 32))
    assert not torch.isfinite(logits).all()  # the poisoning does reach the logits
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    if z_coef:
        with pytest.raises(NonFiniteLossError, match="loss is inf at step 1"):
            trainer.run()
        after = trainer.model.state_dict()
        assert all(torch.equal(before[k], v, ) or not torch.isfinite(before[k]).all()
                   for k, v in after.items())
        return
    result = trainer.run()
    assert result.finished
    assert all(v is not None and v == v for _, v in result.val_losses)
    for name, p in trainer.model.named_parameters():
        if "router.gate" not in name:
            assert torch.isfinite(p).all(), name
