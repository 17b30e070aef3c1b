"""PNG plots of a run directory, from its metrics.jsonl.

loss.png: training loss per step and validation loss at the validation points, against tokens
seen (tokens make runs with different batch sizes comparable). expert_load.png: one heatmap row
per MoE layer, one column per expert, coloured by the expert's load relative to uniform: its
share of the layer's assignments times the layer's expert count E, averaged over the validation
points after step 0 (step 0 alone for a run that never validated later). Relative load is what
makes layers comparable: a raw share of 1/E would colour a balanced 4-expert layer (0.25) and a
balanced 8-expert layer (0.125) differently, showing the expert count instead of the imbalance.
Here 1 is balanced in every layer (the colour scale's neutral centre), above 1 overloaded,
below 1 starved. A PR-MoE's pyramid shows as rows of different lengths; cells past a layer's
expert count are blank. With expert groups (rows naming `expert_groups`), black lines separate
the groups' expert ranges, each range is named above the heatmap, and load is relative to
uniform *inside the group* (share of the group's assignments × the group's experts): a group
that gets few tokens is not "starved", its experts are only compared with each other.
expert_groups.png (grouped runs): each group's share of the token→expert assignments and the
share of them dropped by the group's capacity, per training step (moeflow.train.group_stats).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moeflow.train.metrics import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} holds no metrics.jsonl (not a moeflow run directory)")
    rows = read_metrics(path)
    if rows and not any("tokens" in r for r in rows):
        raise ValueError(f"{path} is not a language-model training run's (no token counts; a "
                         f"forecast run's? see moeflow forecast eval)")
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train and not val:
        raise ValueError(f"{path} holds no losses yet")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.8,
                label="train")
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.append(run_dir / "loss.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)

    loads = [r for r in val if r.get("expert_load")]
    if loads:
        from matplotlib.colors import TwoSlopeNorm

        layers, steps, relative = relative_expert_load(loads)
        width = relative.shape[1]
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * width + 2), 0.6 * len(layers) + 1.8))
        cmap = plt.get_cmap("coolwarm").with_extremes(bad="white")
        top = max(2.0, float(np.nanmax(relative)))
        im = ax.imshow(relative, aspect="auto", cmap=cmap,
                       norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top))
        ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
        ax.set_xlabel("expert")
        when = f"steps {steps[0]}–{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
        inside = " inside each group" if loads[-1].get("expert_groups") else ""
        ax.set_title(f"expert load relative to uniform{inside}\n(share × experts; 1 = "
                     f"balanced), validation, {when}", fontsize=9, pad=16 if inside else 6)
        fig.colorbar(im, ax=ax, label="load × group experts" if inside else "load × E")
        start = 0
        for name, size in loads[-1].get("expert_groups", []):  # expert groups: named id ranges
            if start:
                ax.axvline(start - 0.5, color="black", linewidth=1.5)
            ax.text(start + size / 2 - 0.5, -0.52, name, ha="center", va="bottom", fontsize=8)
            start += size
        fig.tight_layout()
        out.append(run_dir / "expert_load.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)
    grouped = [r for r in train if r.get("group_assignments")]
    if grouped:
        out.append(_plot_groups(plt, run_dir, grouped))
    return out


def _plot_groups(plt, run_dir: Path, rows: list[dict]) -> Path:
    names = list(rows[-1]["group_assignments"])
    steps = [r["step"] for r in rows]
    fig, (share_ax, drop_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        total = [max(sum(r["group_assignments"].values()), 1) for r in rows]
        share_ax.plot(steps, [r["group_assignments"][name] / t for r, t in zip(rows, total)],
                      label=name)
        drop_ax.plot(steps, [100 * r["group_dropped_frac"][name] for r in rows], label=name)
    share_ax.set_title("share of token→expert assignments", fontsize=9)
    drop_ax.set_title("dropped by the group's capacity (%)", fontsize=9)
    for ax in (share_ax, drop_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{run_dir.name}: expert groups, training steps", fontsize=10)
    fig.tight_layout()
    path = run_dir / "expert_groups.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def relative_expert_load(rows: list[dict]) -> tuple[list[int], list[int], np.ndarray]:
    """(MoE layer indices, steps used, [layers, max experts] load × E averaged over those
    steps; NaN past a layer's expert count) from metrics rows holding expert_load."""
    later = [r for r in rows if r["step"] > 0] or rows
    layers = later[-1]["moe_layers"]
    width = max(len(x) for x in later[-1]["expert_load"])
    relative = np.full((len(layers), width), np.nan)
    for i in range(len(layers)):
        counts = np.array([r["expert_load"][i] for r in later], dtype=float)
        ranges = [(0, counts.shape[1])]
        if later[-1].get("expert_groups"):  # load relative to uniform inside each group
            ends = np.cumsum([n for _, n in later[-1]["expert_groups"]])
            ranges = list(zip([0, *ends[:-1]], ends))
        for start, end in ranges:
            part = counts[:, start:end]
            share = part / np.maximum(part.sum(axis=1, keepdims=True), 1)
            relative[i, start:end] = share.mean(axis=0) * (end - start)
    return layers, [r["step"] for r in later], relative
