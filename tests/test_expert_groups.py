"""Expert groups (moeflow.model.expert_groups): routing stays inside each token's group, one
group is the ungrouped router exactly, gradients reach only the group's experts, per-group
capacity and balance loss follow the documented rules, bad configs are one-line errors."""

import dataclasses
import json
import math
import zlib

import pytest
import torch

from moeflow import RouterConfig
from moeflow.config import ModelConfig
from moeflow.model import Transformer
from moeflow.model.expert_groups import TokenGroups, group_slices, token_groups
from moeflow.model.router import Router
from moeflow.ops.backend import Backends


def grouped_router(sizes, seed, d=16, **cfg):
    cfg = RouterConfig(expert_groups=tuple((f"g{i}", n) for i, n in enumerate(sizes)), **cfg)
    torch.manual_seed(seed)
    router = Router(d, sum(sizes), cfg)
    with torch.no_grad():
        router.gate.weight.normal_(0, 1.0)
    return router


def groups_of(ids_T: torch.Tensor, num_groups: int) -> TokenGroups:
    return token_groups(ids_T, ids_T.numel(), num_groups)


CASES = [  # (router config, training): every path that picks or drops assignments
    (dict(top_k=1), True),
    (dict(top_k=2), True),
    (dict(top_k=1, dropless=True), True),
    (dict(top_k=2, dropless=True), False),
    (dict(top_k=2, capacity_factor=0.5, min_capacity=0), True),
    (dict(top_k=1, capacity_factor=0.5, min_capacity=0, drop_policy="random"), True),
    (dict(top_k=2, score_func="sigmoid", capacity_factor=0.7), True),
    (dict(top_k=2, noise="rsample"), True),
    (dict(top_k=2, noise="rsample_second", expert_bias=True), True),
]


@pytest.mark.parametrize("cfg,training", CASES)
def test_no_token_is_routed_outside_its_group(cfg, training):
    """Property test: random group sizes, random group ids (empty groups included), random
    inputs; every assignment, kept or dropped, names an expert of the token's group, and the
    kept slots respect that group's capacity. Each case's inputs come from a seed of its own
    (crc32 of the case: str hashes vary with PYTHONHASHSEED, so every process drew others)."""
    gen = torch.Generator().manual_seed(zlib.crc32(str(cfg).encode()))
    for trial in range(6):
        G = int(torch.randint(1, 4, (), generator=gen))
        sizes = tuple(int(n) for n in torch.randint(2, 5, (G,), generator=gen))
        router = grouped_router(sizes, seed=trial, **cfg)
        router.train(training)
        if router.expert_bias is not None:  # a bias strongly favouring one group's experts
            router.expert_bias.copy_(torch.linspace(5.0, -5.0, sum(sizes)))
        T = int(torch.randint(1, 48, (), generator=gen))
        gid_T = torch.randint(0, G, (T,), generator=gen)
        if G > 1 and trial % 2:
            gid_T[gid_T == G - 1] = 0  # an empty group
        x = torch.randn(T, 16, generator=gen)
        groups = groups_of(gid_T, G)
        r = router(x, groups=groups)
        group_E = torch.repeat_interleave(torch.arange(G), torch.tensor(sizes))
        assert torch.equal(group_E[r.ids_TK], gid_T[:, None].expand_as(r.ids_TK))
        assert (r.weights_TK[~r.kept_TK] == 0).all()
        for g, (a, b) in enumerate(group_slices(sizes)):
            cap = router.config.capacity(groups.counts[g], sizes[g], training)
            if cap is not None:
                assert int(r.counts_E[a:b].max()) <= cap
                assert (r.slots_TK[r.kept_TK & (gid_T[:, None] == g)] < cap).all()
        # the model-level argument routes as the router does: inference ignores capacity
        r_inf = router(x, groups=groups, inference=True)
        assert torch.equal(group_E[r_inf.ids_TK], gid_T[:, None].expand_as(r_inf.ids_TK))
        assert bool(r_inf.kept_TK.all())


@pytest.mark.parametrize("cfg,training", CASES)
def test_one_group_is_the_ungrouped_router_exactly(cfg, training):
    E, T = 6, 40
    grouped = grouped_router((E,), seed=1, **cfg)
    plain = Router(16, E, RouterConfig(**cfg))
    plain.load_state_dict(grouped.state_dict())
    x = torch.randn(T, 16, generator=torch.Generator().manual_seed(2))
    if plain.expert_bias is not None:
        for r in (plain, grouped):
            r.expert_bias.copy_(torch.linspace(0.3, -0.3, E))
    for groups in (None, groups_of(torch.zeros(T, dtype=torch.long), 1)):
        results = []
        for router in (plain, grouped):
            router.train(training)
            torch.manual_seed(7)  # the same noise and RTS order for both
            results.append(router(x, groups=groups if router is grouped else None))
        a, b = results
        for field in dataclasses.fields(a):
            va, vb = getattr(a, field.name), getattr(b, field.name)
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), field.name
            else:
                assert va == vb, field.name


def test_per_group_capacity_and_balance_loss_follow_the_documented_rule():
    """Two groups of 2 experts; 6 tokens of group 0 all want expert 0, 2 tokens of group 1."""
    router = grouped_router((2, 2), seed=0, d=4, top_k=1, capacity_factor=1.0, min_capacity=0)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 10.0  # input dim 0 drives expert 0 (group 0)
        router.gate.weight[3, 1] = 10.0  # input dim 1 drives expert 3 (group 1)
    x = torch.zeros(8, 4)
    x[:6, 0] = 1.0
    x[6:, 1] = 1.0
    gid = torch.tensor([0] * 6 + [1] * 2)
    router.train(True)
    r = router(x, groups=groups_of(gid, 2))
    # group 0: ceil(6 / 2 · 1.0) = 3 slots; group 1: ceil(2 / 2) = 1 slot
    assert r.counts_E.tolist() == [3, 0, 0, 1]
    assert r.capacity == 3 and int(r.num_dropped) == 3 + 1
    # aux = Σ_g E_g · Σ_{e∈g} f_e^g · Σ_t p_te / T; f from assignments before dropping
    p = torch.softmax(torch.tensor([10.0, 0.0]), 0)
    expected = (2 * (1.0 * 6 * p[0]) + 2 * (1.0 * 2 * p[0])) / 8
    assert math.isclose(float(r.aux_loss.detach()), float(expected), rel_tol=1e-6)


def tiny_grouped(sizes=(2, 2), **router) -> ModelConfig:
    base = ModelConfig.from_name("tiny")
    groups = tuple((f"g{i}", n) for i, n in enumerate(sizes))
    return base.replace(num_experts=sum(sizes), vocab_size=128, router=dataclasses.replace(
        base.router, expert_groups=groups, **router))


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradients_reach_only_the_tokens_groups_experts(top_k):
    sizes = (3, 2, 3)
    torch.manual_seed(0)
    model = Transformer(tiny_grouped(sizes, top_k=top_k, dropless=True))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 24), generator=gen)
    groups = torch.randint(0, 3, (2, 24), generator=gen)
    groups[groups == 2] = 0  # group 2 has no tokens at all
    for g in (0, 1):
        model.zero_grad(set_to_none=True)
        out = model(ids, groups=groups)
        # The last layer's output, at group g's tokens only: whatever the earlier layers mixed,
        # the last MoE layer's other-group experts and gate rows take no part in it.
        (out.logits[groups == g].float().pow(2).sum()).backward()
        layer = model.moe_layers()[-1]
        for h, (a, b) in enumerate(group_slices(sizes)):
            w_grad = layer.experts.w_in_EDI.grad[a:b]
            gate_grad = layer.router.gate.weight.grad[a:b]
            if h == g:
                assert w_grad.abs().sum() > 0 and gate_grad.abs().sum() > 0
            else:
                assert (w_grad == 0).all() and (gate_grad == 0).all(), (g, h)
    # The whole objective (every token, balance loss included): a group without tokens gets
    # no gradient in any layer.
    model.zero_grad(set_to_none=True)
    out = model(ids, groups=groups)
    (out.logits.float().pow(2).mean() + out.router_loss).backward()
    for layer in model.moe_layers():
        a, b = group_slices(sizes)[2]
        assert (layer.experts.w_in_EDI.grad[a:b] == 0).all()
        assert (layer.router.gate.weight.grad[a:b] == 0).all()
        assert layer.experts.w_in_EDI.grad[:a].abs().sum() > 0


def test_model_with_one_group_equals_the_ungrouped_model():
    cfg = tiny_grouped((4,), top_k=2)
    plain_cfg = cfg.replace(router=dataclasses.replace(cfg.router, expert_groups=()))
    torch.manual_seed(0)
    grouped = Transformer(cfg)
    plain = Transformer(plain_cfg)
    plain.load_state_dict(grouped.state_dict())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    a = plain(ids)
    b = grouped(ids, groups=torch.zeros_like(ids))
    c = grouped(ids)
    for out in (b, c):
        assert torch.equal(a.logits, out.logits)
        assert torch.equal(a.router_loss, out.router_loss)


def test_grouped_model_refuses_bad_group_ids_and_the_triton_router():
    torch.manual_seed(0)
    model = Transformer(tiny_grouped((2, 2)))
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"group ids must be in \[0, 2\)"):
        model(ids, groups=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match=r"group ids must be in \[0, 2\)"):
        model(ids, groups=torch.full_like(ids, -1))
    with pytest.raises(ValueError, match="one group id per token"):
        model(ids, groups=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer group ids"):
        model(ids, groups=torch.zeros(1, 8))
    plain = Transformer(ModelConfig.from_name("tiny").replace(vocab_size=128))
    with pytest.raises(ValueError, match="no expert groups"):
        plain(ids, groups=torch.zeros_like(ids))
    model.set_backends(Backends(router="triton"))
    with pytest.raises(ValueError, match="cannot route within expert groups"):
        model(ids, groups=torch.zeros_like(ids))


@pytest.mark.parametrize("changes,message", [
    (dict(num_experts=(4, 8)), r"must split every MoE layer's experts: they sum to 4 but the "
                               r"layers have \[4, 8\]"),
    (dict(router=dict(expert_groups=[["code", 2], ["code", 2]])), "distinct names"),
    (dict(router=dict(expert_groups=[["code", 0], ["text", 4]])), "expert_groups\\['code'\\]"),
    (dict(router=dict(expert_groups=[["code", 1], ["text", 3]], top_k=2)),
     r"smallest expert group's experts \(1\)"),
    (dict(router=dict(expert_groups=[["code", 2], ["text", 2]], num_groups=2)),
     "group-limited routing does not combine"),
    (dict(router=dict(expert_groups="code")), "list of \\[name, number of experts\\] pairs"),
])
def test_bad_group_configs_are_one_line_errors(changes, message):
    base = ModelConfig.from_name("tiny").to_dict()
    base.update(num_experts=4, ffn_layout=None)
    base["router"]["expert_groups"] = [["code", 2], ["text", 2]]
    for key, value in changes.items():
        if key == "router":
            base["router"].update(value)
        else:
            base[key] = value
    with pytest.raises(ValueError, match=message) as err:
        ModelConfig.from_dict(base)
    assert "\n" not in str(err.value)


def test_grouped_config_round_trips_through_json_and_yaml(tmp_path):
    cfg = tiny_grouped((1, 3))
    for name in ("c.json", "c.yaml"):
        cfg.save(tmp_path / name)
        assert ModelConfig.load(tmp_path / name) == cfg
    assert cfg.router.group_names == ("g0", "g1") and cfg.router.group_sizes == (1, 3)


def test_expert_load_plot_names_the_groups(tmp_path):
    rows = [{"step": 0, "loss": 5.0, "tokens": 0},
            {"step": 4, "tokens": 64, "val_loss": 4.0, "moe_layers": [1], "expert_groups":
             [["code", 3], ["text", 1]], "expert_load": [[5, 1, 2, 8]]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from matplotlib import pyplot as plt

    from moeflow.train.plots import plot_run

    seen = []
    original = plt.Axes.text
    plt.Axes.text = lambda self, x, y, s, **kw: seen.append((x, s)) or original(self, x, y, s,
                                                                                 **kw)
    try:
        written = plot_run(tmp_path)
    finally:
        plt.Axes.text = original
    assert tmp_path / "expert_load.png" in written
    assert seen == [(1.0, "code"), (3.0, "text")]
