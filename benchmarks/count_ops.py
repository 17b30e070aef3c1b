"""Host work per call, counted: aten ops (and, on CUDA, kernels) of one MoE layer and one step.

At small T the MoE layer and the moe-S training step are host-bound (issue 14, item 3;
benchmarks/results/train_step_profile/): the time goes to dispatching ops, not to computing
them. This script counts that work so changes can be compared without a timer:

- aten ops: every op that reaches the dispatcher below autograd (a TorchDispatchMode counting
  each call, forward and backward), which is what each op's host cost scales with;
- on CUDA also the kernels that ran and the host-device syncs, from torch.profiler.

Cases (one call each, after two warm-up calls):
- `train-layer`: one MoE layer as moe-S trains it (the reproduce family's router: top-1,
  capacity factor 1.0, GELU experts with biases; bf16 autocast on CUDA), fwd and fwd+bwd;
- `infer-layer`: a Qwen3-like layer served (dropless top-k with renormalised weights, SwiGLU,
  no biases, `inference=True`, no autograd), fwd;
- `minimal-*`: the minimal grouped_mm layer of the issue's comparison (sort by expert, two
  grouped GEMMs, index_add combine), in the same two configurations;
- `step:<stage>`: one whole `Trainer.train_step` of the reproduce family's stages (gpu-scale
  model shapes, vocabulary shrunk and batch tiny so that it runs on a CPU in seconds; op
  counts do not depend on either);
- CUDA only, `decode-layer-T<n>/<path>`: one MoE layer of the Qwen3-30B-A3B shape (D 2048,
  128 experts, top-8 renormalised, expert F 768, SwiGLU, bf16) served at each of
  --decode-tokens, inference forward, on `auto` (the one-launch decode router) and on
  `router=triton` (the multi-kernel fused router and the dispatch gather: the path before the
  decode router) and on `router=triton_decode_fused` (the decode router computing its own
  logits: four kernels per layer expected), with each kernel's name, so the lists can be
  compared launch by launch.

    python benchmarks/count_ops.py --out DIR [--device cpu|cuda] [--stages dense-S,moe-S]
    python benchmarks/count_ops.py --out DIR --device cuda --stages '' --decode-tokens 1,16

writes DIR/count_ops_<device>.json (per case: total ops, kernels, syncs, the op histogram) and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moeflow.config import FFNSpec, RouterConfig
from moeflow.model.moe import MoELayer
from moeflow.ops.backend import Backends, set_backends
from moeflow.reproduce.family import build_stages
from moeflow.reproduce.scale import get_scale

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")


class OpCounter(TorchDispatchMode):
    """Counts every aten op call (by overload packet name) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> Counter:
    """The aten ops of one call of `fn`."""
    with OpCounter() as counter:
        fn()
    return counter.counts


def count_kernels(fn) -> dict:
    """Kernels and host-device syncs of one call of `fn` on CUDA (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = launches = 0
    syncs: Counter[str] = Counter()
    names: Counter[str] = Counter()
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            names[evt.name[:80]] += 1
        elif evt.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"):
            launches += 1
        elif evt.name in SYNC_EVENTS:
            syncs[evt.name] += 1
    # the trailing synchronize above is the measurement's own
    syncs["cudaDeviceSynchronize"] -= 1
    return {"kernels": kernels, "launches": launches, "syncs": dict(+syncs),
            "kernel_names": dict(names.most_common())}


def measure(fn, device: torch.device, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    ops = count_ops(fn)
    row = {"ops": sum(ops.values()), "histogram": dict(ops.most_common())}
    if device.type == "cuda":
        row.update(count_kernels(fn))
    return row


# ---- the minimal reference layer -----------------------------------------------------------


class MinimalMoE(nn.Module):
    """The issue's minimal layer: softmax top-k router, sort by expert, two grouped GEMMs
    (per-expert matmuls where torch._grouped_mm does not run), index_add combine. Dropless:
    it has no capacity, so in the training configuration it computes every assignment."""

    def __init__(self, d: int, f: int, num_experts: int, k: int, swiglu: bool, bias: bool,
                 normalize: bool) -> None:
        super().__init__()
        self.k, self.swiglu, self.normalize = k, swiglu, normalize
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, d, 2 * f if swiglu else f) * d ** -0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, f, d) * f ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(num_experts, self.w1.shape[-1])) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, d)) if bias else None

    @staticmethod
    def _mm(x, w, offs, ends):
        if ends is None:
            return torch._grouped_mm(x, w, offs=offs)
        return torch.cat([x[lo:hi] @ w[e] for e, (lo, hi) in enumerate(zip([0] + ends[:-1], ends))])

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        E = self.w1.shape[0]
        probs = self.gate(x_TD).float().softmax(-1)
        w_TK, ids_TK = probs.topk(self.k, dim=-1)
        if self.normalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        order = ids_TK.flatten().argsort(stable=True)
        expert_N = ids_TK.flatten()[order]
        offs = torch.bincount(expert_N, minlength=E).cumsum(0).to(torch.int32)
        token_N = order // self.k
        dtype = torch.get_autocast_dtype(x_TD.device.type) \
            if torch.is_autocast_enabled(x_TD.device.type) else x_TD.dtype
        w1, w2, x = self.w1.to(dtype), self.w2.to(dtype), x_TD.to(dtype)
        grouped = (dtype == torch.bfloat16) if x.is_cuda else (dtype == torch.float32)
        ends = None if grouped else offs.tolist()
        h = self._mm(x[token_N], w1, offs, ends)
        if self.b1 is not None:
            h = h + self.b1.to(dtype)[expert_N]
        h = F.silu(h[:, :h.shape[1] // 2]) * h[:, h.shape[1] // 2:] if self.swiglu else F.gelu(h)
        y = self._mm(h, w2, offs, ends)
        if self.b2 is not None:
            y = y + self.b2.to(dtype)[expert_N]
        y = y * w_TK.flatten()[order, None].to(dtype)
        return torch.zeros_like(x).index_add_(0, token_N, y)


# ---- cases ---------------------------------------------------------------------------------


def layer_cases(device: torch.device, T: int) -> dict:
    family = build_stages(get_scale("gpu"))["moe-S"].model
    spec = next(s for s in family.ffn_specs() if s.is_moe)
    d = family.d_model
    train_layer = MoELayer(spec, d, "gelu", family.mlp_bias).to(device).train()
    infer_spec = FFNSpec(kind="moe", d_ff=0, num_experts=32, expert_d_ff=128, router=RouterConfig(
        top_k=4, dropless=True, normalize_topk=True, aux_loss_coef=0.001))
    infer_layer = MoELayer(infer_spec, d, "swiglu", False).to(device).eval()
    minimal_train = MinimalMoE(d, spec.expert_d_ff, spec.num_experts, 1, False, True,
                               False).to(device)
    minimal_infer = MinimalMoE(d, 128, 32, 4, True, False, True).to(device).eval()
    for m in (train_layer, infer_layer):
        for p in m.parameters():
            nn.init.normal_(p, std=0.05)
    x = torch.randn(1, T, d, device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    x_infer = x.to(torch.bfloat16) if device.type == "cuda" else x
    if device.type == "cuda":
        infer_layer, minimal_infer = infer_layer.bfloat16(), minimal_infer.bfloat16()

    def train_fwd(layer, moeflow: bool):
        """(output, router loss): moeflow's layer returns its routing, whose weighted loss the
        training objective adds; the minimal layer has none."""
        def run():
            with autocast:
                out = layer(x) if moeflow else layer(x.view(T, d))
            return (out[0], out[1].loss) if moeflow else (out, None)
        return run

    def train_fwd_bwd(layer, moeflow: bool):
        fwd = train_fwd(layer, moeflow)

        def run():
            layer.zero_grad(set_to_none=True)
            y, router_loss = fwd()
            loss = y.float().square().mean()
            if router_loss is not None:
                loss = loss + router_loss
            loss.backward()
        return run

    def infer_fwd(layer, moeflow: bool):
        def run():
            with torch.no_grad():
                return layer(x_infer, inference=True) if moeflow else layer(x_infer.view(T, d))
        return run

    return {
        "train-layer/fwd": train_fwd(train_layer, True),
        "train-layer/fwd+bwd": train_fwd_bwd(train_layer, True),
        "minimal-train-layer/fwd": train_fwd(minimal_train, False),
        "minimal-train-layer/fwd+bwd": train_fwd_bwd(minimal_train, False),
        "infer-layer/fwd": infer_fwd(infer_layer, True),
        "minimal-infer-layer/fwd": infer_fwd(minimal_infer, False),
    }


def decode_cases(device: torch.device, tokens: list[int]) -> dict:
    """The Qwen3-30B-A3B MoE layer served at decode sizes, on the default path, on the
    path before the one-launch decode router (router=triton) and on the fused-logits one."""
    spec = FFNSpec(kind="moe", d_ff=768, num_experts=128, expert_d_ff=768, router=RouterConfig(
        top_k=8, normalize_topk=True, dropless=True, aux_loss_coef=0.001))
    layer = MoELayer(spec, 2048, "swiglu", False).to(device).eval()
    for p in layer.parameters():
        nn.init.normal_(p, std=2048 ** -0.5)
    layer = layer.bfloat16()
    paths = {"auto": Backends(), "router=triton": Backends(router="triton"),
             "router=triton_decode_fused": Backends(router="triton_decode_fused")}
    cases = {}
    for T in tokens:
        x = torch.randn(1, T, 2048, device=device, dtype=torch.bfloat16)
        for label, backends in paths.items():
            def run(x=x, backends=backends):
                set_backends(layer, backends)
                with torch.no_grad():
                    return layer(x, inference=True)
            cases[f"decode-layer-T{T}/{label}"] = run
    return cases


def step_case(stage_name: str, device: torch.device, workdir: Path):
    """One Trainer.train_step of a reproduce-family stage (vocab 512, 2 sequences of 64; the
    text is the standard library's json package, which tokenizes in well under a second)."""
    import json as json_package

    from moeflow.train.run_config import TrainConfig
    from moeflow.train.trainer import Trainer

    model = build_stages(get_scale("gpu"))[stage_name].model
    model = replace(model, vocab_size=512)
    cfg_path = workdir / f"{stage_name}.json"
    model.save(cfg_path)
    trainer = Trainer(TrainConfig(
        model_config=str(cfg_path), data=(str(Path(json_package.__file__).parent),),
        seq_len=64, steps=100, batch_size=2, lr=1e-3, warmup_steps=2, seed=0,
        out=str(workdir / f"run-{stage_name}"), progress=False, device=device.type, val_every=1000))
    trainer.prepare()
    step = iter(range(1, 1000))
    return lambda: trainer.train_step(next(step))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=128, help="T of the layer cases")
    ap.add_argument("--stages", default="dense-S,moe-S", help="'' for no training steps")
    ap.add_argument("--label", default="", help="tag stored with the results (e.g. before)")
    ap.add_argument("--decode-tokens", default="1,16",
                    help="T of the decode-layer cases (CUDA only; '' for none)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = layer_cases(device, args.tokens)
    if device.type == "cuda" and args.decode_tokens:
        cases.update(decode_cases(device, [int(t) for t in args.decode_tokens.split(",")]))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, args.stages.split(",")):
            cases[f"step:{name}"] = step_case(name, device, Path(tmp))
        for name, fn in cases.items():
            results[name] = measure(fn, device)
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "label": args.label, "tokens": args.tokens, "cases": results}
    path = out / f"count_ops_{device.type}{'_' + args.label if args.label else ''}.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    cuda = device.type == "cuda"
    print(f"{'case':32s} {'aten ops':>9s}" + (f" {'kernels':>8s} {'syncs':>6s}" if cuda else ""))
    for name, row in results.items():
        extra = (f" {row['kernels']:8d} {sum(row['syncs'].values()):6d}" if cuda else "")
        print(f"{name:32s} {row['ops']:9d}{extra}")
    for name, row in results.items():
        if name.startswith("decode-layer"):
            print(f"\n{name}: {row['kernels']} kernels")
            for kernel, n in row["kernel_names"].items():
                print(f"  {n:3d}  {kernel}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
