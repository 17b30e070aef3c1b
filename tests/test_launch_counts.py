"""Kernels and host syncs of one eager MoE layer call on the paths "auto" takes on CUDA, counted
on the CPU (benchmarks/host_path_cpu.py: Triton launches recorded, not run; aten ops that launch
a kernel), against the issue's minimal grouped_mm layer: a regression guard for issue 14's
small-T item ("count launches; remove syncs"), not a timing test. The bounds are the counts
measured in sessions 34-35 (benchmarks/results/host_ops/README.md): a change that adds a launch to
these paths fails here; raise a bound only with a reason in that README."""

import importlib.util
import sys
from pathlib import Path

import pytest

from tests._triton_cpu import DEVICE  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # host_path_cpu imports moe_layer's MinimalMoE
spec = importlib.util.spec_from_file_location("host_path_cpu",
                                              REPO / "benchmarks" / "host_path_cpu.py")
host_path = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_path)

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="counts the CUDA paths on a CPU")


def _kernels(counter) -> tuple[int, int, int]:
    triton = sum(v for k, v in counter.kernels.items() if k.startswith("triton:"))
    return sum(counter.kernels.values()), triton, sum(counter.syncs.values())


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "ds-1.3b+moe128"])
def test_a_decode_call_is_three_launches_and_never_waits(name):
    """Router (logits, choices, plan), experts (up and down in one launch), combine; the
    minimal layer launches ~20 kernels and synchronises on its bincount."""
    layer, x = host_path._layer(name, 8, D=64)
    layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    minimal = host_path._minimal(name, 8, 64).to(torch.bfloat16)
    with torch.no_grad():
        ours = host_path.launches(lambda: layer(x))
        theirs = host_path.launches(lambda: minimal(x[0]))
    assert _kernels(ours) == (3, 3, 0), ours.kernels
    assert _kernels(theirs)[0] > 10 and _kernels(theirs)[2] >= 1, theirs.kernels


@pytest.mark.parametrize("name, T, bound", [("qwen3-30b-a3b", 8, 23), ("qwen3-30b-a3b", 128, 23),
                                            ("ds-1.3b+moe128", 8, 28)])
def test_a_training_call_launches_fewer_kernels_than_the_minimal_layer(name, T, bound):
    """The one-launch router under autograd (session 35; 25 / 31 kernels with ten Triton
    launches through route_triton and the Triton dispatch before), up to 1024 assignments."""
    ours, theirs = host_path._train_calls(name, T, D=64)  # benchmark's own fwd+bwd calls
    kernels, triton, syncs = _kernels(host_path.launches(ours))
    their_kernels, _, their_syncs = _kernels(host_path.launches(theirs))
    assert kernels <= bound and triton == 7 and syncs == 0, (kernels, triton, syncs)
    assert kernels < their_kernels and their_syncs >= 1


def test_deepspeed_top2_training_with_a_capacity_launches_no_renormalisation_kernels():
    """DeepSpeed's top-2 gating with a capacity, the router loss in the objective: the one
    launch routes, the backward kernel differentiates the renormalisation over the kept routes
    (session 35: 56 kernels with route_triton and torch's renormalisation under autograd)."""
    from moeflow.config import FFNSpec, RouterConfig
    from moeflow.model.moe import MoELayer

    cfg = RouterConfig(top_k=2, capacity_factor=1.0, min_capacity=1)
    spec = FFNSpec(kind="moe", d_ff=64, num_experts=16, expert_d_ff=64, router=cfg)
    layer = MoELayer(spec, 64, "gelu", bias=False, backends=host_path.TRAIN)
    layer = layer.to(torch.bfloat16).train()
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)

    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y, routing = layer(x)
        ((y * g).sum() + routing.loss).backward()
    kernels, triton, syncs = _kernels(host_path.launches(run))
    assert kernels <= 38 and triton == 7 and syncs == 0, (kernels, triton, syncs)


@pytest.mark.parametrize("top_k, top_p, candidates", [(0, 1.0, None), (40, 0.95, "topk"),
                                                      (0, 0.95, "nucleus")])
def test_a_sampled_batch_is_drawn_in_one_launch_after_one_top_k_or_nucleus(top_k, top_p,
                                                                           candidates,
                                                                           monkeypatch):
    """The sampled rows of a 16-row step on the CUDA path (session 39): the candidates (one
    top-k launch in the total order, session 41; a top-p without a k: its nucleus bounded by
    four launches over bf16 keys, session 43, where a sort and 8 elementwise kernels ran), a
    copy of the greedy tokens, one draw launch, no sync (plus the table's copy to the device,
    a memcpy), whatever the batch size; the per-row chain it replaced launched ~16-19 kernels
    per row."""
    from moeflow.infer import sampling

    spec = importlib.util.spec_from_file_location("sampling_bench",
                                                  REPO / "benchmarks" / "sampling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sampling, "_use_kernel", lambda logits: True)
    B = 16
    logits = torch.randn(B, 1000).bfloat16()
    greedy = logits.argmax(-1)
    params = sampling.SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    tickets = torch.zeros(B, dtype=torch.int32)  # the engine's, kept across steps
    ours = host_path.launches(lambda: sampling.sample_tokens(
        logits, [params] * B, list(range(B)), [5] * B, greedy, tickets))
    draw = "triton:_draw_ranked_kernel" if candidates == "topk" else \
        "triton:_draw_whole_rows_kernel"
    kernels = dict(ours.kernels)
    assert kernels.pop("clone") == 1 and kernels.pop(draw) == 1 and not ours.syncs
    if candidates == "nucleus":  # four bits of the bf16 key a launch
        assert kernels == {"triton:_level_kernel": 4}, kernels
    elif candidates == "topk":  # one launch (topk's ~16 kernels and a refill's 1-18 before)
        assert kernels == {"triton:_top_k_kernel": 1}, kernels
    else:
        assert not kernels
    generators = [torch.Generator().manual_seed(i) for i in range(B)]

    def per_row():
        out = greedy.clone()
        for i in range(B):
            out[i] = bench.per_row_chain(logits[i:i + 1], params, generators[i])[0]
    assert _kernels(host_path.launches(per_row))[0] >= 7 * B
