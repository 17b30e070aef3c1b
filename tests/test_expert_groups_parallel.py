"""Expert groups under expert parallelism: 2 gloo ranks (EP=2, each rank half of the batch,
mixed groups on both) against one process on the whole batch: loss, balance loss and every
gradient agree. Groups are placed across ranks: with groups (3, 1) and 2 experts per rank,
group 0 spans both ranks and group 1 lives on rank 1 only."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moeflow.config import ModelConfig
from moeflow.model import Transformer
from moeflow.parallel.equality import expert_grads
from tests.parallel_workers import grouped_step_worker, spawn

SEED = 3


def grouped(**router) -> ModelConfig:
    base = ModelConfig.from_name("tiny")
    return base.replace(num_experts=4, vocab_size=128, router=dataclasses.replace(
        base.router, expert_groups=(("code", 3), ("text", 1)), **router))


CONFIGS = {
    "dropless": (grouped(dropless=True), {"ep": 2}),
    # capacity large enough that no rank drops: the fixed-capacity exchange sizes its buffers
    # by the largest group's capacity
    "capacity_exchange": (grouped(capacity_factor=8.0), {"ep": 2, "exchange": "capacity"}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 16), generator=gen)
    targets = torch.randint(0, 128, (4, 16), generator=gen)
    groups = torch.randint(0, 2, (4, 16), generator=gen)
    args = ({k: {"model": c.to_dict(), "parallel": p} for k, (c, p) in CONFIGS.items()},
            SEED, ids, groups, targets)
    ranks = spawn(grouped_step_worker, 2, args, tmp_path_factory.mktemp("groups"), 120)
    return ranks, ids, groups, targets


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ep2_with_groups_matches_one_process(runs, name):
    ranks, ids, groups, targets = runs
    torch.manual_seed(SEED)
    model = Transformer(CONFIGS[name][0])
    out = model(ids, groups=groups)
    ce = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    (ce + out.router_loss).backward()
    full = expert_grads(model)
    for rank in ranks:
        got = rank[name]
        torch.testing.assert_close(got["loss"], torch.stack([ce, out.aux_loss]).detach(),
                                   rtol=1e-5, atol=1e-6)
        assert got["expert_grads"]
        for key, grad in got["expert_grads"].items():
            torch.testing.assert_close(grad, full[key], rtol=1e-4, atol=1e-6)
        params = dict(model.named_parameters())
        assert any("router.gate" in n for n in got["dense"])
        for n, grad in got["dense"].items():
            torch.testing.assert_close(grad, params[n].grad, rtol=1e-4, atol=1e-6)
    # rank 1 holds experts 2-3: the last of group "code" and all of "text"
    held = {k.split(".")[2] for k in ranks[1][name]["expert_grads"]}
    assert held == {"2", "3"}
