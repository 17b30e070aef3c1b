"""benchmarks/moe_layer.py compares like with like: every implementation of a shape gets the same
router gate (shared_gate), so a given input hits the same experts in each. At small T the cells
are bound by the weights of the experts hit; with a gate drawn per build, two builds of moeflow
itself differed by up to 0.27 ms on the H200 (session 36). Built on the CPU at a tiny shape."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from moeflow.config import RouterConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def moe_layer(monkeypatch):
    spec = importlib.util.spec_from_file_location("moe_layer", REPO / "benchmarks" / "moe_layer.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "moe_layer", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "DEVICE", "cpu")
    monkeypatch.setitem(module.SHAPES, "tiny", (64, 32, 16, 2, "swiglu", 0,
                                                RouterConfig(top_k=2, normalize_topk=True,
                                                             dropless=True)))
    return module


def test_every_implementation_routes_to_the_same_experts(moe_layer):
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    torch.manual_seed(1)  # each build draws its other weights from the global generator
    chosen = {}
    for impl in ("moeflow", "moeflow-route_triton", "minimal", "hf-grouped_mm"):
        _, module = moe_layer.build(impl, "tiny")
        gate = moe_layer.gate_weight(impl, module)
        assert torch.equal(gate.float(), moe_layer.shared_gate("tiny").to(torch.bfloat16).float())
        with torch.no_grad():
            if impl.startswith("moeflow"):
                ids = module.router(x).ids_TK
            else:  # the peers' gates: a bf16 linear, then top-k of its scores
                ids = torch.nn.functional.linear(x, gate).float().topk(2, dim=-1).indices
        chosen[impl] = ids.sort(dim=-1).values
    for impl, ids in chosen.items():
        assert torch.equal(ids, chosen["moeflow"]), impl
