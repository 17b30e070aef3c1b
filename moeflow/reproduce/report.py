"""The reproduction's report: each paper claim beside its small-scale measurement, and the plots.

Writes DIR/report.json (everything measured, machine-readable), DIR/report.md (tables and
plots), DIR/loss.png (validation loss against tokens and against training FLOPs, every model on
one plot) and DIR/expert_load.png (each MoE model's expert load per layer, as a multiple of the
uniform share, so layers with different expert counts share one colour scale).

A claim's verdict: "holds" when the small-scale target is met, "partly" when the effect points
the paper's way but misses the target, "does not hold" otherwise, or "not measured" when a stage
it needs has not run. Losses in claims are the final evaluation's (moeflow.reproduce.measure:
more windows than the training-time validation, routed dropless as served).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moeflow.data.prepared import read_info
from moeflow.model.flops import training_flops_per_token
from moeflow.reproduce.family import STAGES, TEACHER, Stage
from moeflow.reproduce.progress import stage_flops
from moeflow.reproduce.scale import Scale
from moeflow.train.metrics import read_metrics

HOLDS, PARTLY, FAILS, UNMEASURED = "holds", "partly", "does not hold", "not measured"


@dataclass(frozen=True)
class Claim:
    key: str
    paper: str  # the paper's claim and figure
    target: str  # what counts as holding at this scale
    measured: str  # the numbers
    verdict: str
    remedy: str  # what would make it hold, when it does not


def _curve(run_dir: Path, flops_per_token: float) -> list[dict]:
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    return [{"step": r["step"], "tokens": r["tokens"], "flops": r["tokens"] * flops_per_token,
             "val_loss": r["val_loss"]} for r in rows if "val_loss" in r]


def _last_expert_load(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [r for r in read_metrics(path) if r.get("expert_load") and r["step"] > 0]
    if not rows:
        return None
    return {"step": rows[-1]["step"], "moe_layers": rows[-1]["moe_layers"],
            "expert_load": rows[-1]["expert_load"]}


def _verdict(holds: bool, partly: bool) -> str:
    return HOLDS if holds else PARTLY if partly else FAILS


def build_claims(models: dict[str, dict], scale: Scale) -> list[Claim]:
    def loss(name):
        m = models.get(name, {}).get("measure")
        return None if m is None else m["val"]["loss"]

    L = {name: loss(name) for name in STAGES}
    claims = []

    def unmeasured(key, paper, target, need):
        claims.append(Claim(key, paper, target, f"needs {', '.join(need)}", UNMEASURED, ""))

    # 1. MoE beats its dense base model at equal tokens.
    paper = "350M+MoE-128 reaches a far lower loss than the 350M dense model it is built on"
    target = "moe-S beats dense-S by >= 0.05 nats at equal tokens"
    if L["dense-S"] is None or L["moe-S"] is None:
        unmeasured("moe_beats_dense", paper, target, ["dense-S", "moe-S"])
    else:
        d = L["dense-S"] - L["moe-S"]
        claims.append(Claim("moe_beats_dense", paper, target,
                            f"dense-S {L['dense-S']:.4f}, moe-S {L['moe-S']:.4f}: {d:+.4f} nats",
                            _verdict(d >= 0.05, d > 0),
                            "more tokens per expert and more experts (the paper: 300B tokens, "
                            "128 experts); at < 100M tokens MoE gains are a few hundredths"))

    # 2. ... and gets there in fewer steps.
    paper = "MoE reaches the dense model's quality with a fraction of the training"
    target = "moe-S reaches dense-S's final validation loss in <= 50% of the steps"
    cd, cm = models.get("dense-S", {}).get("curve"), models.get("moe-S", {}).get("curve")
    if not cd or not cm:
        unmeasured("moe_reaches_dense_sooner", paper, target, ["dense-S", "moe-S"])
    else:
        goal = cd[-1]["val_loss"]
        hit = next((p["step"] for p in cm if p["step"] > 0 and p["val_loss"] <= goal), None)
        frac = None if hit is None else hit / scale.steps
        if hit:
            measured = (f"dense-S ends at {goal:.4f}; moe-S is there at step {hit} of "
                        f"{scale.steps} ({100 * frac:.0f}%)")
        else:
            measured = (f"dense-S ends at {goal:.4f}; moe-S never gets there "
                        f"({cm[-1]['val_loss']:.4f})")
        claims.append(Claim("moe_reaches_dense_sooner", paper, target, measured,
                            _verdict(frac is not None and frac <= 0.5, frac is not None),
                            "a longer run: the MoE's lead grows with tokens"))

    # 3. MoE matches the quality-equivalent (larger) dense model at lower training cost.
    paper = ("350M+MoE-128 matches the 1.3B dense model (4× the parameters) at ~5× less "
             "training compute")
    target = ("moe-S closes >= 50% of the loss gap from dense-S to dense-L (paper: 100%) at "
              "<= 1.4× dense-S's training time")
    need = ["dense-S", "dense-L", "moe-S"]
    if any(L[n] is None for n in need):
        unmeasured("moe_matches_larger_dense", paper, target, need)
    else:
        gap = L["dense-S"] - L["dense-L"]
        closed = (L["dense-S"] - L["moe-S"]) / gap if gap > 0 else float("nan")
        t = {n: models[n]["train_seconds"] for n in need}
        ratio = t["moe-S"] / t["dense-S"]
        flops = {n: models[n]["train_flops"] for n in need}
        measured = (f"gap dense-S→dense-L {gap:.4f} nats, moe-S closes {100 * closed:.0f}%; "
                    f"training time moe-S/dense-S {ratio:.2f}×, dense-L/moe-S "
                    f"{t['dense-L'] / t['moe-S']:.2f}× (FLOPs dense-L/moe-S "
                    f"{flops['dense-L'] / flops['moe-S']:.2f}×)")
        claims.append(Claim("moe_matches_larger_dense", paper, target, measured,
                            _verdict(closed >= 0.5 and ratio <= 1.4,
                                     closed > 0 and (closed >= 0.5 or ratio <= 1.4)),
                            "more experts and tokens (quality grows with expert count and "
                            "training length); a faster MoE step for the time ratio"))

    # 4. PR-MoE keeps MoE quality with far fewer parameters.
    paper = "PR-MoE 52B → 31B (350M: 13B → 4B) parameters at the same quality"
    target = "pr-moe-S within 0.02 nats of moe-S with >= 30% fewer parameters"
    if L["moe-S"] is None or L["pr-moe-S"] is None:
        unmeasured("pr_moe_keeps_quality", paper, target, ["moe-S", "pr-moe-S"])
    else:
        d = L["pr-moe-S"] - L["moe-S"]
        pm = models["moe-S"]["measure"]["params_total"]
        pp = models["pr-moe-S"]["measure"]["params_total"]
        fewer = 1 - pp / pm
        claims.append(Claim("pr_moe_keeps_quality", paper, target,
                            f"moe-S {L['moe-S']:.4f} ({pm / 1e6:.1f}M params), pr-moe-S "
                            f"{L['pr-moe-S']:.4f} ({pp / 1e6:.1f}M, {100 * fewer:.0f}% fewer): "
                            f"{d:+.4f} nats",
                            _verdict(d <= 0.02 and fewer >= 0.3, d <= 0.05 and fewer >= 0.3),
                            "more tokens for the residual MLP and the small expert pools"))

    # 5. Mixture-of-Students keeps the teacher's quality with fewer layers.
    paper = "MoS with 12.5% fewer layers keeps 99.3% of the PR-MoE teacher's accuracy"
    target = "mos-S (staged KD) within 1% of pr-moe-S's loss with 25% fewer layers"
    if L["mos-S"] is None or L[TEACHER] is None:
        unmeasured("mos_keeps_quality", paper, target, ["pr-moe-S", "mos-S"])
    else:
        rel = L["mos-S"] / L[TEACHER] - 1
        claims.append(Claim("mos_keeps_quality", paper, target,
                            f"pr-moe-S {L[TEACHER]:.4f}, mos-S {L['mos-S']:.4f}: "
                            f"{100 * rel:+.2f}%", _verdict(rel <= 0.01, rel <= 0.03),
                            "the paper removes 12.5% of the layers, not 25%; a longer run"))

    # 6. Staged KD beats KD throughout, which beats no KD.
    paper = "KD helps early and hurts late: stopping it part-way (staged KD) is best"
    target = "final loss: staged KD <= KD throughout <= no KD"
    names = ["mos-S", "mos-S-kd-always", "mos-S-no-kd"]
    if any(L[n] is None for n in names):
        unmeasured("staged_kd_best", paper, target, names)
    else:
        a, b, c = (L[n] for n in names)
        claims.append(Claim("staged_kd_best", paper, target,
                            f"staged {a:.4f}, throughout {b:.4f}, none {c:.4f}",
                            _verdict(a <= b <= c, a <= min(b, c)),
                            "a student that outgrows the teacher's soft labels (longer runs)"))

    # 7. The MoE serves faster than its quality-equivalent dense model.
    paper = "MoE inference up to 4.5× faster and 9× cheaper than the quality-equivalent dense"
    target = "moe-S decodes at batch 1 in <= 1/2 of dense-L's latency (partly: <= 0.9×)"
    dm, dl = (models.get(n, {}).get("measure") for n in ("moe-S", "dense-L"))
    if dm is None or dl is None:
        unmeasured("moe_serves_faster", paper, target, ["moe-S", "dense-L"])
    else:
        b1 = str(min(scale.decode_batches))
        r = dm["decode_ms"][b1] / dl["decode_ms"][b1]
        bn = str(max(scale.decode_batches))
        claims.append(Claim("moe_serves_faster", paper, target,
                            f"decode b{b1}: moe-S {dm['decode_ms'][b1]:.2f} ms, dense-L "
                            f"{dl['decode_ms'][b1]:.2f} ms ({r:.2f}×); b{bn}: "
                            f"{dm['decode_ms'][bn]:.2f} vs {dl['decode_ms'][bn]:.2f} ms; prefill "
                            f"{scale.prefill_tokens}: {dm['prefill_ms']:.2f} vs "
                            f"{dl['prefill_ms']:.2f} ms", _verdict(r <= 0.5, r <= 0.9),
                            "models large enough to be bound by weight bandwidth rather than "
                            "by per-layer launch latency (both are small here)"))
    return claims


STYLES = {"dense-S": "-", "dense-M": "-", "dense-L": "-", "moe-S": "--", "pr-moe-S": "-.",
          "mos-S": ":", "mos-S-kd-always": (0, (3, 1, 1, 1)), "mos-S-no-kd": (0, (1, 3))}


def _plot_losses(path: Path, models: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, m in models.items():
        curve = [p for p in m.get("curve", []) if p["step"] > 0]
        if not curve:
            continue
        style = STYLES.get(name, "-")
        for ax, key in zip(axes, ("tokens", "flops")):
            ax.plot([p[key] for p in curve], [p["val_loss"] for p in curve], linestyle=style,
                    label=name)
    axes[0].set_xlabel("training tokens")
    axes[1].set_xlabel("training FLOPs (teacher forward included for students)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("validation loss: every model of the reproduction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_expert_load(path: Path, models: dict[str, dict]) -> bool:
    loads = {n: m["expert_load"] for n, m in models.items() if m.get("expert_load")}
    if not loads:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = max(len(x) for load in loads.values() for x in load["expert_load"])
    rows = [len(load["moe_layers"]) for load in loads.values()]
    fig, axes = plt.subplots(len(loads), 1, figsize=(max(6.0, 0.25 * width + 3), 0.8 + 0.75 *
                                                      sum(rows) + 0.35 * len(rows)),
                             squeeze=False, constrained_layout=True,
                             gridspec_kw={"height_ratios": rows})
    image = None
    for ax, (name, load) in zip(axes[:, 0], loads.items()):
        rel = np.full((len(load["moe_layers"]), width), np.nan)
        for i, counts in enumerate(load["expert_load"]):
            c = np.asarray(counts, dtype=float)
            rel[i, :len(c)] = c / max(c.sum(), 1) * len(c)
        image = ax.imshow(rel, aspect="auto", cmap="coolwarm", vmin=0, vmax=2,
                          interpolation="nearest")
        ax.set_yticks(range(len(load["moe_layers"])), [f"layer {i}" for i in load["moe_layers"]])
        ax.set_xticks(range(0, width, max(1, width // 16)))
        ax.set_title(f"{name} (validation at step {load['step']})", fontsize=9)
    axes[-1, 0].set_xlabel("expert")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="load / uniform share (1 = balanced)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(x, spec=".4f"):
    return "–" if x is None else format(x, spec)


def _markdown(report: dict, claims: list[Claim], has_load: bool) -> str:
    sc, data = report["scale"], report["data"]
    lines = ["# moeflow reproduce — the DeepSpeed-MoE paper's claims at small scale "
             f"({sc['name']})", ""]
    if sc["name"] == "smoke":
        lines += ["**Smoke scale**: every stage for a handful of steps, to check the machinery. "
                  "The numbers below mean nothing about the claims.", ""]
    env = report["environment"]
    lines += [f"- date: {report['date']}; device: {env['device']}; torch {env['torch']}; "
              f"python {env['python']}",
              f"- commands: {'; '.join(f'`{c}`' for c in report['commands']) or '–'}",
              f"- data: {data['source']}: {data['documents']:,} documents "
              f"({data['bytes'] / 1e6:,.1f} MB after dropping {data['duplicates']:,} duplicate "
              f"files), {data['train_tokens']:,} training and {data['val_tokens']:,} validation "
              f"tokens, BPE vocabulary {data['vocab_size']}",
              f"- every stage: {sc['steps']} steps × {sc['batch_size']} sequences × "
              f"{sc['seq_len']} tokens = {report['tokens_per_stage']:,} tokens "
              f"({report['epochs_per_stage']:.2f} epochs of the training split), lr {sc['lr']} "
              f"(warmup {sc['warmup_steps']}, cosine to {sc['min_lr_ratio']}×), seed {sc['seed']}",
              f"- wall time: {report['wall_seconds'] / 60:.1f} min in all (data preparation "
              f"{data['seconds']:.0f} s)", "", "## Claims", "",
              "| claim (paper) | target at this scale | measured | verdict |",
              "|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c.paper} | {c.target} | {c.measured} | **{c.verdict}** |")
    failing = [c for c in claims if c.verdict in (PARTLY, FAILS)]
    if failing:
        lines += ["", "What would make the missed ones hold:", ""]
        lines += [f"- {c.key}: {c.remedy}" for c in failing]
    lines += ["", "## Models", "",
              "| model | layers | d | experts per MoE layer | params total / active | "
              "train time s | tokens/s | train FLOPs | val loss (dropless) | "
              "val loss (capacity 1.0) | decode b1 ms | decode bN ms | prefill ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        me = m.get("measure") or {}
        dec = me.get("decode_ms", {})
        keys = sorted(dec, key=int)
        cap = me.get("val_capacity_1")
        cap_s = "–" if cap is None else \
            f"{cap['loss']:.4f} ({100 * cap['dropped_frac']:.1f}% dropped)"
        lines.append(
            f"| {name} | {m['n_layers']} | {m['d_model']} | "
            f"{'/'.join(map(str, m['experts'])) or '–'} | "
            f"{_fmt(me.get('params_total', 0) / 1e6, '.1f')}M / "
            f"{_fmt(me.get('params_active', 0) / 1e6, '.1f')}M | "
            f"{_fmt(m.get('train_seconds'), '.1f')} | "
            f"{_fmt(m.get('tokens_per_s'), ',.0f')} | {m['train_flops']:.2e} | "
            f"{_fmt(me.get('val', {}).get('loss'))} | {cap_s} | "
            f"{_fmt(dec.get(keys[0]) if keys else None, '.2f')} | "
            f"{_fmt(dec.get(keys[-1]) if keys else None, '.2f')} (b{keys[-1] if keys else '–'}) | "
            f"{_fmt(me.get('prefill_ms'), '.2f')} |")
    lines += ["", "Validation loss in the claims and this table: the final evaluation over "
              f"{report['eval_windows']} validation windows, routed dropless as the engine serves. "
              "Training time: the seconds of the training steps (validation and checkpoints "
              "excluded). Decode: ms per engine step (one token per sequence), bf16 with CUDA "
              "graphs on a GPU; prefill: one prompt of "
              f"{sc['prefill_tokens']} tokens.", "", "## Plots", "", "![loss](loss.png)", ""]
    if has_load:
        lines += ["![expert load](expert_load.png)", ""]
    return "\n".join(lines) + "\n"


def write_report(out: Path, manifest: dict, scale: Scale, stages: dict[str, Stage]) -> Path:
    data = read_info(out / "data")
    models = {}
    for name in STAGES:
        stage, entry = stages[name], manifest["stages"].get(name, {})
        per_token = training_flops_per_token(stage.model, scale.seq_len)
        run_dir = out / "runs" / name
        m = {"n_layers": stage.model.n_layers, "d_model": stage.model.d_model,
             "experts": list(stage.model.num_experts), "kd": stage.kd,
             "status": entry.get("status", "not run"),
             "train_flops": stage_flops(stage, stages, scale),
             "curve": _curve(run_dir, stage_flops(stage, stages, scale) / scale.tokens_per_stage),
             "expert_load": _last_expert_load(run_dir) if stage.model.is_moe else None,
             "flops_per_token": per_token}
        if entry.get("status") == "done":
            m["train_seconds"] = entry["train_seconds"]
            m["tokens_per_s"] = scale.tokens_per_stage / max(entry["train_seconds"], 1e-9)
            m["measure"] = entry.get("measure")
        models[name] = m
    claims = build_claims(models, scale)
    wall = data.seconds + sum(e.get("wall_seconds", 0) + e.get("measure", {}).get("seconds", 0)
                              for e in manifest["stages"].values())
    measured = next((m["measure"] for m in models.values() if m.get("measure")), {})
    report = {
        "date": manifest.get("created", time.strftime("%Y-%m-%d"))[:10],
        "commands": manifest.get("commands", []),
        "environment": {"device": measured.get("device", "–"),  # where the models were measured
                        "torch": measured.get("torch", torch.__version__),
                        "python": measured.get("python", platform.python_version())},
        "scale": scale.to_dict(), "data": {**data.spec.__dict__, **{
            k: v for k, v in data.__dict__.items() if k != "spec"}, "source": ", ".join(
                data.spec.source), "vocab_size": data.spec.vocab_size},
        "tokens_per_stage": scale.tokens_per_stage,
        "epochs_per_stage": scale.tokens_per_stage / max(data.train_tokens, 1),
        "eval_windows": next((m["measure"]["eval_windows"] for m in models.values()
                              if m.get("measure")), scale.eval_windows),
        "wall_seconds": wall, "models": models,
        "claims": [c.__dict__ for c in claims],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot_losses(out / "loss.png", models)
    has_load = _plot_expert_load(out / "expert_load.png", models)
    path = out / "report.md"
    path.write_text(_markdown(report, claims, has_load))
    return path
