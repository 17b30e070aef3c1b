import json
import re

import pytest
import torch

import moeflow
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


# ---- per-layer FFN layout ------------------------------------------------------------------

MIXED = ("dense", "moe:4", "residual_moe:8", "moe:2", "dense")


def layout(entries=MIXED, **kw) -> ModelConfig:
    base = dict(vocab_size=64, n_layers=len(entries), d_model=32, n_heads=4, max_seq_len=16,
                ffn_layout=entries)
    return ModelConfig(**{**base, **kw})


def test_interval_fields_derive_the_layout():
    assert moe().ffn_layout == ("dense", "moe:4", "dense", "moe:4")
    cfg = moe(n_layers=5, moe_every=1, first_moe_layer=2, num_experts=(2, 4, 8),
              moe_kind="residual_moe")
    assert cfg.ffn_layout == ("dense", "dense", "residual_moe:2", "residual_moe:4",
                              "residual_moe:8")
    assert moe(moe_every=0, num_experts=()).ffn_layout == ("dense",) * 4


def test_explicit_layout_derives_num_experts_and_moe_kind():
    cfg = layout()
    assert cfg.moe_every == 0
    assert cfg.moe_layer_indices() == (1, 2, 3)
    assert cfg.num_experts == (4, 8, 2)
    assert cfg.moe_kind == "mixed"
    assert [s.kind for s in cfg.ffn_specs()] == ["dense", "moe", "residual_moe", "moe", "dense"]
    assert [s.num_experts for s in cfg.ffn_specs()] == [0, 4, 8, 2, 0]
    assert layout(("residual_moe:4", "dense")).moe_kind == "residual_moe"
    assert layout(("dense", "moe:4")).moe_kind == "moe"
    # agreeing redundant fields are accepted
    assert layout(num_experts=(4, 8, 2), moe_kind="mixed") == cfg
    assert layout(("moe:3", "dense", "moe:3"), num_experts=3).num_experts == (3, 3)
    both = moe(ffn_layout=("dense", "moe:4", "dense", "moe:4"))
    assert both == moe() and both.moe_every == 2


@pytest.mark.parametrize("config", [
    lambda: layout(),
    lambda: layout(("residual_moe:4", "residual_moe:4", "dense")),
    lambda: layout(("dense", "dense")),
    lambda: moe(),
    lambda: moe(moe_kind="residual_moe", num_experts=(2, 6)),
])
def test_layout_round_trips(config, tmp_path):
    cfg = config()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    cfg.save(tmp_path / "c.yaml")
    assert ModelConfig.load(tmp_path / "c.yaml") == cfg
    assert cfg.replace() == cfg


def test_replace_switches_between_interval_and_layout():
    interval = moe()
    explicit = interval.replace(ffn_layout=MIXED[:4])
    assert explicit.moe_every == 0 and explicit.ffn_layout == MIXED[:4]
    assert explicit.num_experts == (4, 8, 2) and explicit.moe_kind == "mixed"
    deeper = interval.replace(n_layers=6)  # the interval re-derives
    assert deeper.ffn_layout == ("dense", "moe:4") * 3
    assert interval.replace(num_experts=(4, 6)).ffn_layout[3] == "moe:6"
    back = explicit.replace(moe_every=1, num_experts=2)
    assert back.ffn_layout == ("moe:2",) * 4
    with pytest.raises(ValueError, match=r"^ffn_layout=.*needs one entry per layer \(n_layers=6\)"):
        explicit.replace(n_layers=6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ffn_layout=("dense", "moe:4", "dense", "dense")),
     r"^ffn_layout\[3\]='dense' disagrees with moe_every=2, first_moe_layer=1, "
     r"num_experts=\(4, 4\), moe_kind='moe', which make layer 3 'moe:4'"),
    (dict(ffn_layout=("dense", "residual_moe:4", "dense", "moe:4")),
     r"^ffn_layout\[1\]='residual_moe:4' disagrees with moe_every=2"),
    (dict(moe_every=0, num_experts=(4, 8), ffn_layout=("dense", "moe:4", "dense", "moe:4")),
     r"^num_experts=\(4, 8\) disagrees with ffn_layout, whose MoE layers have \(4, 4\) experts"),
    (dict(moe_every=0, num_experts=(), moe_kind="moe",
          ffn_layout=("residual_moe:4", "dense", "dense", "dense")),
     r"^moe_kind='moe' disagrees with ffn_layout, whose MoE layers are 'residual_moe'"),
    (dict(moe_kind="mixed"), r"^moe_kind='mixed': must be one of moe, residual_moe"),
])
def test_layout_and_interval_fields_must_agree(kwargs, message):
    with pytest.raises(ValueError, match=message):
        moe(**kwargs)


@pytest.mark.parametrize("entry, need", [
    ("moe:0", "the expert count E must be an integer >= 1"),
    ("moe:-2", "the expert count E must be an integer >= 1"),
    ("moe:4.0", "the expert count E must be an integer >= 1"),
    ("moe:04", "the expert count E must be an integer >= 1"),
    ("moe:", "the expert count E must be an integer >= 1"),
    ("moe", "must be 'dense', 'moe:E' or 'residual_moe:E'"),
    ("sparse:4", "must be 'dense', 'moe:E' or 'residual_moe:E'"),
    ("dense:4", "must be 'dense', 'moe:E' or 'residual_moe:E'"),
    (4, "must be 'dense', 'moe:E' or 'residual_moe:E'"),
])
def test_bad_layout_entry_names_field_layer_and_value(entry, need):
    with pytest.raises(ValueError, match=rf"^ffn_layout\[3\]={entry!r}: {re.escape(need)}$"):
        layout(("dense", "moe:4", "dense", entry))


def test_layout_checks_the_router_per_moe_layer():
    with pytest.raises(ValueError, match=r"^router.top_k=3: must be <= num_experts \(2\)"):
        layout(router=RouterConfig(top_k=3))
    with pytest.raises(ValueError, match=r"^ffn_layout=.*needs one entry per layer"):
        layout(n_layers=3)


def test_mixed_layout_model_runs_and_reloads(tmp_path, capsys):
    from moeflow import Transformer
    from moeflow.cli import main
    from moeflow.interop import save_pretrained
    from moeflow.model.mlp import MLP
    from moeflow.model.moe import MoELayer

    cfg = layout(router=RouterConfig(top_k=2, dropless=True))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ffns = [block.ffn for block in model.blocks]
    assert [type(f) for f in ffns] == [MLP, MoELayer, MoELayer, MoELayer, MLP]
    assert [f.experts.num_experts for f in ffns[1:4]] == [4, 8, 2]
    assert [f.residual_mlp is not None for f in ffns[1:4]] == [False, True, False]
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape == (2, 9, cfg.vocab_size) and torch.isfinite(out.logits).all()
    assert [r.layer for r in out.routing] == [1, 2, 3]
    assert [r.counts_E.numel() for r in out.routing] == [4, 8, 2]
    assert [int(r.counts_E.sum()) for r in out.routing] == [2 * 9 * 2] * 3  # dropless, top-2

    save_pretrained(model, tmp_path / "mf")
    again = moeflow.from_pretrained(tmp_path / "mf")
    assert again.config == cfg
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out.logits)
    cfg.save(tmp_path / "mixed.json")
    capsys.readouterr()
    assert main(["info", "--config", str(tmp_path / "mixed.json"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["moe_layers"], info["experts_per_moe_layer"]) == ([1, 2, 3], [4, 8, 2])
    assert info["moe_kind"] == "mixed"


def _configs():
    from moeflow.infer.engine import EngineConfig
    from moeflow.infer.sampling import SamplingParams
    from moeflow.parallel.mesh import ParallelConfig
    from moeflow.serve.bench import BenchConfig
    from moeflow.serve.config import ServeConfig
    from moeflow.train.run_config import TrainConfig

    serve = lambda **kw: ServeConfig(model="x", **kw)  # noqa: E731
    return [
        (TrainConfig, dict(batch_size=True), "batch_size", "must be an integer >= 1"),
        (TrainConfig, dict(lr=float("inf")), "lr", "must be a finite number > 0"),
        (TrainConfig, dict(beta2=1.0), "beta2", "must be a finite number in [0, 1)"),
        (TrainConfig, dict(stop_at=5, steps=4, warmup_steps=0), "stop_at",
         "must be an integer in [1, 4]"),
        (TrainConfig, dict(device="tpu"), "device", "must be one of auto, cpu, cuda"),
        (ParallelConfig, dict(ep=0), "ep", "must be an integer >= 1"),
        (ParallelConfig, dict(exchange="all"), "exchange", "must be one of auto, uneven, capacity"),
        (serve, dict(port=70000), "port", "must be an integer in [0, 65535]"),
        (serve, dict(drain_timeout=-1), "drain_timeout", "must be a finite number >= 0"),
        (serve, dict(dtype="int8"), "dtype", "must be one of float32, bfloat16, float16"),
        (EngineConfig, dict(max_batch_size=None), "max_batch_size", "must be an integer >= 1"),
        (EngineConfig, dict(cache_tokens=1.5), "cache_tokens", "must be an integer >= 1"),
        (SamplingParams, dict(top_p=0.0), "top_p", "must be a finite number in (0, 1]"),
        (SamplingParams, dict(temperature=float("nan")), "temperature",
         "must be a finite number >= 0"),
        (BenchConfig, dict(requests=0), "requests", "must be an integer >= 1"),
        (BenchConfig, dict(timeout=0), "timeout", "must be a finite number > 0"),
        (RouterConfig, dict(noise_eps=1.0), "router.noise_eps",
         "must be a finite number in [0, 1)"),
        (RouterConfig, dict(top_k=2.0), "router.top_k", "must be an integer >= 1"),
        (moe, dict(norm_eps=0), "norm_eps", "must be a finite number > 0"),
        # an expert count with no MoE layer for it silently built a dense model
        (ModelConfig, dict(n_layers=2, d_model=32, n_heads=4, num_experts=8), "num_experts",
         "makes no layer MoE without moe_every (1: every layer, 2: every other) or an "
         "ffn_layout"),
        # a stop step past the run's end silently distilled throughout
        (TrainConfig, dict(kd_stop_step=4000, steps=1000), "kd_stop_step",
         "is beyond steps=1000, so the distillation would never stop; leave it out to distil "
         "throughout, or raise --steps"),
    ]


@pytest.mark.parametrize("case", range(len(_configs())))
def test_every_config_reports_a_bad_value_the_same_way(case):
    make, kwargs, field, need = _configs()[case]
    value = kwargs[field.removeprefix("router.")]
    with pytest.raises(ValueError) as err:
        make(**kwargs)
    assert str(err.value) == f"{field}={value!r}: {need}"


def test_presets_are_data_and_from_name_builds_them():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(moeflow.__file__).with_name("presets.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("moeflow")]  # no cycle with config
    assert set(PRESETS) == set(moeflow.presets.PRESET_FIELDS)
    for name, cfg in PRESETS.items():
        assert ModelConfig.from_name(name) == cfg and cfg.name == name
    with pytest.raises(ValueError, match="unknown preset 'nope'; known presets: 350m, "):
        ModelConfig.from_name("nope")


def test_lr_defaults_to_the_presets_recipe(tmp_path):
    """--lr left out: the preset's recipe (PRESET_LR), DEFAULT_LR for other models and for
    networks from --config or --init; an explicit lr wins; run.json keeps the resolved value,
    so a resume trains on at it."""
    from moeflow.train.run_config import DEFAULT_LR, PRESET_LR, TrainConfig

    assert set(PRESET_LR) <= set(PRESETS)
    assert TrainConfig(preset="350m-moe128").lr == 2e-4
    assert TrainConfig(preset="1.3b-pr-moe-64-128").lr == 1.2e-4
    assert TrainConfig(preset="finegrained-1b").lr == 3e-4
    assert TrainConfig(preset="tiny").lr == DEFAULT_LR == 1e-3
    assert TrainConfig(preset="350m-moe128", lr=5e-4).lr == 5e-4
    assert TrainConfig(preset="350m-moe128", model_config="m.json").lr == DEFAULT_LR
    assert TrainConfig(preset="350m-moe128", init="run").lr == DEFAULT_LR
    TrainConfig(preset="1.3b-moe128", out=str(tmp_path)).save(tmp_path / "run.json")
    assert TrainConfig.load(tmp_path / "run.json").lr == 1.2e-4
