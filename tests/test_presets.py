import pytest

from moeflow import PRESETS, parameter_counts

PAPER_TOTALS = {
    "350m-moe128": 13e9,
    "1.3b-moe128": 52e9,
    "350m-pr-moe-32-64": 4e9,
    "1.3b-pr-moe-64-128": 31e9,
    "350m-mos-pr-moe-32-64": 3.5e9,
    "1.3b-mos-pr-moe-64-128": 27e9,
}


@pytest.mark.parametrize("name, paper", PAPER_TOTALS.items())
def test_moe_presets_match_paper_within_3_percent(name, paper):
    total, _ = parameter_counts(PRESETS[name])
    assert abs(total - paper) / paper <= 0.03, f"{name}: {total / 1e9:.3f}B vs {paper / 1e9}B"


def test_dense_presets_and_active_parameters():
    dense = {n: parameter_counts(PRESETS[n]) for n in ("350m", "1.3b", "6.7b")}
    for name, paper in (("350m", 350e6), ("1.3b", 1.3e9), ("6.7b", 6.7e9)):
        total, active = dense[name]
        assert total == active
        assert abs(total - paper) / paper < 0.03
    # Top-1 MoE-128 activates one expert per MoE layer: active = dense model + the gates.
    total, active = parameter_counts(PRESETS["350m-moe128"])
    gates = 12 * 128 * 1024
    assert active == dense["350m"][0] + gates
    # Residual-MoE activates the dense branch plus one expert.
    _, pr_active = parameter_counts(PRESETS["350m-pr-moe-32-64"])
    assert pr_active > active


def test_modern_presets_are_sparse():
    total, active = parameter_counts(PRESETS["qwen3-30b-a3b"])
    assert 29e9 < total < 32e9 and 3.0e9 < active < 3.6e9
    total, active = parameter_counts(PRESETS["finegrained-1b"])
    assert active < total / 4


def test_parameter_counts_build_nothing_and_import_no_compiler():
    """Counting builds on the meta device with torch's own initialisers skipped: no values, and
    no torch._dynamo import (meta `normal_` went through torch._refs, which imported it: ~1 s of
    `moeflow info`). Counts are the ones a real model has."""
    import subprocess
    import sys

    code = ("import sys; from moeflow import PRESETS, parameter_counts; "
            "print(*parameter_counts(PRESETS['tiny'])); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    from moeflow import PRESETS, Transformer
    from moeflow.model.transformer import count_parameters

    assert [int(out[0]), int(out[1])] == list(count_parameters(Transformer(PRESETS["tiny"])))
    assert out[2] == "False"
