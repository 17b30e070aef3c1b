import json

import pytest

from moeflow import PRESETS, ModelConfig, RouterConfig


def moe(**kw) -> ModelConfig:
    base = dict(vocab_size=64, n_layers=4, d_model=32, n_heads=4, max_seq_len=16,
                moe_every=2, num_experts=4)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kwargs, field", [
    (dict(router=RouterConfig(top_k=5)), "router.top_k"),
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=(4, 8, 16)), "num_experts"),
    (dict(d_model=30), "d_model"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(arch="bert"), "arch"),
    (dict(moe_kind="sparse"), "moe_kind"),
    (dict(n_layers=0), "n_layers"),
    (dict(router=RouterConfig(num_groups=3)), "router.num_groups"),
])
def test_bad_model_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        moe(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(capacity_factor=0), "router.capacity_factor"),
    (dict(eval_capacity_factor=-1.0), "router.eval_capacity_factor"),
    (dict(top_k=0), "router.top_k"),
    (dict(drop_policy="lottery"), "router.drop_policy"),
    (dict(noise="pink"), "router.noise"),
    (dict(score_func="relu"), "router.score_func"),
    (dict(min_capacity=-1), "router.min_capacity"),
    (dict(num_groups=2, topk_groups=3), "router.topk_groups"),
])
def test_bad_router_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        RouterConfig(**kwargs)


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="unknown model config field 'n_layer'"):
        ModelConfig.from_dict({"n_layer": 3})
    with pytest.raises(ValueError, match="unknown router config field 'topk'"):
        ModelConfig.from_dict({"router": {"topk": 2}})


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_and_yaml_round_trip(name, tmp_path):
    cfg = PRESETS[name]
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    for suffix in (".json", ".yaml"):
        path = tmp_path / f"c{suffix}"
        cfg.save(path)
        assert ModelConfig.load(path) == cfg


def test_malformed_file_is_one_line_value_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.load(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must be a mapping"):
        ModelConfig.load(path)


def test_defaults_resolve_and_replace_rederives():
    cfg = moe()
    assert (cfg.d_ff, cfg.n_kv_heads, cfg.head_dim, cfg.expert_d_ff) == (128, 4, 8, 128)
    assert cfg.attn_bias and cfg.tie_embeddings  # gpt
    wider = cfg.replace(d_model=64)
    assert (wider.d_ff, wider.head_dim, wider.expert_d_ff) == (256, 16, 256)
    llama = cfg.replace(arch="llama")
    assert not llama.attn_bias and not llama.tie_embeddings


def test_pyramid_layout_and_layer_specs():
    cfg = PRESETS["350m-pr-moe-32-64"]
    specs = cfg.ffn_specs()
    moe_layers = [i for i, s in enumerate(specs) if s.is_moe]
    assert moe_layers == list(range(1, 24, 2))
    assert [specs[i].num_experts for i in moe_layers] == [32] * 10 + [64] * 2
    assert all(specs[i].kind == "residual_moe" for i in moe_layers)
    assert all(s.kind == "dense" for i, s in enumerate(specs) if i % 2 == 0)
    student = PRESETS["350m-mos-pr-moe-32-64"]
    assert student.n_layers == 21 and student.num_experts == (32,) * 8 + (64,) * 2


def test_capacity_formula():
    r = RouterConfig(top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4)
    assert r.capacity(100, 8, training=True) == 32  # ceil(2*100/8*1.25) = ceil(31.25)
    assert r.capacity(100, 8, training=False) == 50
    assert r.capacity(8, 8, training=True) == 4  # floored at min_capacity
    assert r.capacity(3, 8, training=True) == 3  # never more than the tokens
    assert RouterConfig(dropless=True).capacity(100, 8, True) is None
