"""Upcycled MoE vs the dense model trained on vs an MoE from scratch, at equal token budgets.

    python benchmarks/upcycle_compare.py --scale gpu --out $OUT     # one H200, 229 s
    nice python benchmarks/upcycle_compare.py --scale cpu --out runs/upcycle-cpu   # 2 CPU cores

On `moeflow reproduce`'s data (builtin:interpreter, prepared once), with its GPT family
(moeflow.reproduce.family: LayerNorm, GELU MLP of width 4d, top-1 routing with capacity factor 1,
aux-loss coefficient 0.01; at the gpu scale the dense model is reproduce's dense-S):

1. dense: the dense model trained for `pretrain_steps` (the upcycling source).
2. Five continuations of `continue_steps` each, with one fresh schedule (warmup + cosine, the
   same peak lr) and the same batches in the same order:
   - dense-continued: the dense model itself (`train --init` from it);
   - upcycled-copy: `moeflow upcycle --method copy`, E experts top-1 on every other layer (the
     reproduce family's moe-S layout): the same active parameters as the dense model + routers;
   - upcycled-copy-normal-router: the same with the router drawn from N(0, init_std) instead
     of zero (--router-init normal), so tokens spread over the experts from the first step;
   - upcycled-partition: `--method partition`, the same layers split into E neuron groups, top-k
     (the total parameters of the dense model + routers, k/E of its FFN active);
   - (then the scratch arm below, for both budgets)
3. moe-scratch: the upcycled-copy config from random weights, trained for
   pretrain_steps + continue_steps, so it can be read at the continuation's budget (the same
   tokens as each continuation) and at the whole budget (the same tokens as dense pretraining +
   continuation, i.e. equal total training tokens).

Writes OUT/upcycle_compare.json (every arm's validation curve, final loss, time, parameters),
OUT/upcycle_compare.md (the table) and OUT/loss.png (validation loss vs tokens: x counts every
token the weights have been trained on, dense pretraining included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow.config import ModelConfig  # noqa: E402
from moeflow.data.prepared import DataSpec, is_prepared, prepare_dataset  # noqa: E402
from moeflow.interop.upcycle import UpcycleConfig, upcycle  # noqa: E402
from moeflow.reproduce.family import ROUTER  # noqa: E402
from moeflow.reproduce.scale import SCALES  # noqa: E402
from moeflow.train import TrainConfig  # noqa: E402
from moeflow.train.trainer import Trainer  # noqa: E402


@dataclass(frozen=True)
class CompareScale:
    data: DataSpec
    n_layers: int
    d_model: int
    head_dim: int
    seq_len: int
    batch_size: int
    lr: float
    pretrain_steps: int
    continue_steps: int
    val_every: int
    val_batches: int
    experts: int
    partition_top_k: int
    calib_tokens: int


_GPU = SCALES["gpu"]
COMPARE_SCALES = {
    # reproduce's gpu scale with dense-S as the dense model
    "gpu": CompareScale(data=_GPU.data, n_layers=_GPU.n_layers, d_model=_GPU.widths[0],
                        head_dim=_GPU.head_dim, seq_len=_GPU.seq_len,
                        batch_size=_GPU.batch_size, lr=_GPU.lr, pretrain_steps=1000,
                        continue_steps=500, val_every=50, val_batches=4, experts=8,
                        partition_top_k=2, calib_tokens=32768),
    # sized for ~15 minutes of 2 busy shared CPU cores (~1 K tokens/s measured)
    "cpu": CompareScale(data=DataSpec(source=("builtin:interpreter",), vocab_size=2048,
                                      val_fraction=0.05, max_bytes=6 << 20,
                                      tokenizer_sample_bytes=2 << 20),
                        n_layers=4, d_model=64, head_dim=16, seq_len=128, batch_size=8,
                        lr=3e-3, pretrain_steps=160, continue_steps=100, val_every=20,
                        val_batches=4, experts=4, partition_top_k=2, calib_tokens=8192),
}


def _train(out: Path, data: Path, s: CompareScale, steps: int, device: str, **kw) -> dict:
    cfg = TrainConfig(data=(str(data),), steps=steps, batch_size=s.batch_size, lr=s.lr,
                      warmup_steps=max(steps // 10, 1), val_every=s.val_every,
                      val_batches=s.val_batches, out=str(out), progress=False, seed=0,
                      device=device, **kw)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.run()
    seconds = time.perf_counter() - start
    from moeflow.model.transformer import count_parameters

    total, active = count_parameters(trainer.model)
    return {"val": result.val_losses, "seconds": round(seconds, 1),
            "tokens_per_step": s.batch_size * s.seq_len, "params_total": total,
            "params_active": active, "final_val_loss": result.val_losses[-1][1]}


def _plot(arms: dict, pre_tokens: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, arm in arms.items():
        offset = pre_tokens if arm["starts_after_pretraining"] else 0
        xs = [offset + step * arm["tokens_per_step"] for step, _ in arm["val"]]
        ax.plot([x / 1e6 for x in xs], [v for _, v in arm["val"]], label=name,
                linestyle="--" if name == "dense" else "-")
    ax.axvline(pre_tokens / 1e6, color="grey", linewidth=0.8)
    ax.set_xlabel("tokens trained on, dense pretraining included (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_ylim(top=min(max(v for a in arms.values() for _, v in a["val"][1:]) + 0.2, 8))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _at(val: list, step: int) -> float:
    return next(v for s, v in val if s == step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=list(COMPARE_SCALES), default="gpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()
    s = COMPARE_SCALES[args.scale]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = out / "data"
    if not is_prepared(data):
        prepare_dataset(s.data, data)
    dense_cfg = ModelConfig(name="dense", arch="gpt", vocab_size=s.data.vocab_size,
                            n_layers=s.n_layers, d_model=s.d_model,
                            n_heads=s.d_model // s.head_dim, max_seq_len=s.seq_len,
                            router=ROUTER)
    dense_cfg.save(out / "dense.json")
    arms: dict[str, dict] = {}
    arms["dense"] = _train(out / "runs/dense", data, s, s.pretrain_steps, args.device,
                           model_config=str(out / "dense.json"))
    upcycled = {}
    # copy with its default zero router (every token ties on expert 0 until the router moves,
    # so the first steps drop most MoE-layer tokens at capacity 1) and with a N(0, init_std)
    # router (ties broken from step 0, near-uniform load)
    for name, method, k, router_init in (("copy", "copy", 1, None),
                                         ("copy-normal", "copy", 1, "normal"),
                                         ("partition", "partition", s.partition_top_k, None)):
        t = time.perf_counter()
        r = upcycle(UpcycleConfig(source=str(out / "runs/dense"), experts=s.experts, top_k=k,
                                  method=method, router_init=router_init, moe_every=2,
                                  out=str(out / f"models/{name}"),
                                  calib_data=(str(data),), calib_tokens=s.calib_tokens))
        upcycled[name] = {**{k2: v for k2, v in r.report.items() if k2 != "config"},
                          "seconds": round(time.perf_counter() - t, 1)}
        print("\n".join(r.summary()), flush=True)
    continued = {"dense-continued": out / "runs/dense",
                 "upcycled-copy": out / "models/copy",
                 "upcycled-copy-normal-router": out / "models/copy-normal",
                 "upcycled-partition": out / "models/partition"}
    for name, init in continued.items():
        arms[name] = _train(out / f"runs/{name}", data, s, s.continue_steps, args.device,
                            init=str(init))
        print(name, arms[name]["final_val_loss"], flush=True)
    ModelConfig.load(out / "models/copy/config.json").save(out / "moe-scratch.json")
    arms["moe-scratch"] = _train(out / "runs/moe-scratch", data, s,
                                 s.pretrain_steps + s.continue_steps, args.device,
                                 model_config=str(out / "moe-scratch.json"))
    for name, arm in arms.items():
        arm["starts_after_pretraining"] = name in continued
    pre_tokens = s.pretrain_steps * s.batch_size * s.seq_len
    cont_tokens = s.continue_steps * s.batch_size * s.seq_len
    scratch = arms["moe-scratch"]["val"]
    rows = [
        ("dense (the source, after pretraining)", arms["dense"], 0, pre_tokens,
         arms["dense"]["final_val_loss"]),
        *[(name, arms[name], pre_tokens, cont_tokens, arms[name]["final_val_loss"])
          for name in continued],
        ("moe-scratch at the continuation's budget", arms["moe-scratch"], 0, cont_tokens,
         _at(scratch, s.continue_steps)),
        ("moe-scratch at the whole budget", arms["moe-scratch"], 0, pre_tokens + cont_tokens,
         arms["moe-scratch"]["final_val_loss"]),
    ]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and \
        args.device != "cpu" else f"CPU ({platform.processor() or platform.machine()})"
    lines = [f"# Upcycling comparison, scale {args.scale} ({device}, {date.today()})", "",
             f"Command: `python benchmarks/upcycle_compare.py --scale {args.scale} --out OUT`",
             f"Dense: {s.n_layers} layers, d {s.d_model}, seq {s.seq_len}, batch "
             f"{s.batch_size}; MoE layers 1, 3, ... with {s.experts} experts; copy top-1, "
             f"partition top-{s.partition_top_k}. Validation: {s.val_batches} batches of "
             f"{s.batch_size} held-out windows.", "",
             "| model | total params | active params | tokens before | tokens in this run "
             "| val loss |", "|---|---:|---:|---:|---:|---:|"]
    for name, arm, before, tokens, loss in rows:
        lines.append(f"| {name} | {arm['params_total']:,} | {arm['params_active']:,} | "
                     f"{before / 1e6:.2f} M | {tokens / 1e6:.2f} M | {loss:.4f} |")
    step0 = {name: arms[name]["val"][0][1] for name in continued}
    lines += ["", "Step-0 validation loss of each continuation (before any further training): "
              + ", ".join(f"{k} {v:.4f}" for k, v in step0.items()),
              "", "Training seconds: " + ", ".join(f"{k} {a['seconds']}" for k, a in
                                                   arms.items()),
              f"Total wall time: {time.perf_counter() - t0:.0f} s"]
    (out / "upcycle_compare.md").write_text("\n".join(lines) + "\n")
    (out / "upcycle_compare.json").write_text(json.dumps(
        {"scale": args.scale, "device": device, "date": str(date.today()),
         "torch": torch.__version__, "settings": dataclasses.asdict(s),
         "arms": arms, "upcycle": upcycled,
         "wall_seconds": round(time.perf_counter() - t0, 1)}, indent=2, default=str) + "\n")
    _plot(arms, pre_tokens, out / "loss.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
