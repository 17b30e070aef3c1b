"""One MoE layer, timed against the hardware floor and against peer implementations, in one run.

    PYTHONPATH=. python benchmarks/moe_layer.py                       # everything (one GPU)
    PYTHONPATH=. python benchmarks/moe_layer.py --shapes qwen3-30b-a3b --tokens 8 4096

First measures the GPU's copy bandwidth (device-to-device copy, bytes read + written) and bf16
GEMM rate (8192³ matmul), then for each shape (d, f, E, k) and token count T, forward (no grad)
and forward+backward (input and all weight gradients), bf16:
  floor = max(bytes / bandwidth, FLOPs / rate)
  forward:  FLOPs = 2·T·k·D·(I+F) + 2·T·D·E (router) + shared expert; bytes = weights of the
            experts this input actually hits + router + shared weights + x in and y out.
  fwd+bwd:  3× the forward FLOPs; weights read twice and their gradients written once (3× weight
            bytes) plus 3× the activation bytes.
  The floor counts the (token, expert) pairs moeflow's router keeps (capacity drops included)
  and the experts they hit.
Implementations: moeflow (backend "auto": the fast paths), moeflow+graph and
hf-grouped_mm+graph (forward replayed from a CUDA graph captured for that T, as servers run
decode steps: no per-launch host cost; forward only), moeflow-ref (all plain-torch
references), moeflow-route_triton (the multi-kernel router forced: training calls of up to 1024
assignments take the one-launch router since session 35; run only when named, as an A/B in one
process), "minimal" (the issue's yardstick: softmax top-k, argsort, gather, two
`torch._grouped_mm` calls, index_add; dropless, about 30 lines), DeepSpeed
`deepspeed.moe.layer.MoE` (capacity factor 1.0, one process group of one rank),
transformers `MixtralSparseMoeBlock` with experts_implementation "eager" and "grouped_mm" (its
experts are always gated: the GELU shape gets a gated GELU of width 2F/3, equal
parameters and FLOPs). Peers use their own softmax top-k routers; the DeepSeek shared expert is
the same dense torch MLP added to their output. Times: median of CUDA-event-timed calls (≥ 5,
about 0.25 s of them) after warm-up. A cell whose single call takes more than 10 s is skipped,
with the larger token counts of that implementation; an OOM is recorded as such. Writes
moe_layer_<GPU>_<date>.json and .md into --out (rewritten after every implementation, so an
interrupted run keeps what it measured); a cell that did not run says why instead of a time.

With --rounds N (N > 1) every implementation of a shape is built at once and each (T, mode) is
timed N times, all implementations one after the other in each round, in an order rotated from
round to round: the small-T cells are bound by the host's launch cost, which moves by up to 2x
between runs and machines, so implementations timed minutes apart (the default schedule, one
implementation at a time) can meet different hosts. The cell is the median of its rounds; the
JSON keeps the rounds and in how many of them moeflow beat each peer.

    PYTHONPATH=. python benchmarks/moe_layer.py --tokens 8 128 --rounds 5

Routing per shape follows the model each shape comes from: Mixtral and Qwen3 softmax top-k with
renormalised weights, dropless; ds-1.3b+moe128 top-1 with capacity factor 1.0 (DeepSpeed-MoE);
DeepSeek-V3 sigmoid scores, 8 groups / top-4 groups, expert bias, scaling 2.5, dropless.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

from moeflow.config import FFNSpec, RouterConfig
from moeflow.model.moe import MoELayer
from moeflow.ops.backend import Backends

SHAPES = {  # name: (D, F, E, k, activation, shared experts, router)
    "mixtral-8x7b": (4096, 14336, 8, 2, "swiglu", 0,
                     RouterConfig(top_k=2, normalize_topk=True, dropless=True)),
    "ds-1.3b+moe128": (2048, 8192, 128, 1, "gelu", 0,
                       RouterConfig(top_k=1, capacity_factor=1.0, eval_capacity_factor=1.0)),
    "qwen3-30b-a3b": (2048, 768, 128, 8, "swiglu", 0,
                      RouterConfig(top_k=8, normalize_topk=True, dropless=True)),
    "deepseek-v3": (7168, 2048, 256, 8, "swiglu", 1,
                    RouterConfig(top_k=8, score_func="sigmoid", normalize_topk=True,
                                 routed_scaling=2.5, num_groups=8, topk_groups=4,
                                 expert_bias=True, dropless=True)),
}
# Slowest last, so a run cut short loses the least telling cells.
IMPLS = ("moeflow", "minimal", "hf-grouped_mm", "deepspeed", "moeflow+graph", "minimal+graph",
         "hf-grouped_mm+graph", "hf-eager", "moeflow-ref", "moeflow-route_triton")
# Run only when named: moeflow with another path forced, for an A/B in one process.
VARIANTS = ("moeflow-route_triton",)
GRAPH = "+graph"  # forward replayed from a CUDA graph captured for that T (decode-style serving)
MAX_CALL_S = 10.0  # a cell whose single call takes longer is skipped (and larger T with it)
DEVICE = "cuda"  # where layers are built (a CPU smoke test of build() sets "cpu")


class MinimalMoE(nn.Module):
    """The issue's yardstick: the least a grouped_mm MoE layer can do in plain torch. Softmax
    top-k (renormalised where the shape's router does), one argsort of the flat expert ids, one
    gather, two `torch._grouped_mm` calls around the activation, weights applied to the rows and
    `index_add_` back into token order. Dropless for every shape (no capacity)."""

    def __init__(self, d: int, f: int, e: int, k: int, activation: str, renorm: bool) -> None:
        super().__init__()
        self.k, self.activation, self.renorm = k, activation, renorm
        self.gate = nn.Linear(d, e, bias=False)
        self.w_in = nn.Parameter(torch.empty(e, d, 2 * f if activation == "swiglu" else f))
        self.w_out = nn.Parameter(torch.empty(e, f, d))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        probs_TE = self.gate(x_TD).float().softmax(-1)
        w_TK, ids_TK = probs_TE.topk(self.k, dim=-1)
        if self.renorm:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        order_N = ids_TK.flatten().argsort()
        token_N = order_N // self.k
        offs_E = torch.bincount(ids_TK.flatten(), minlength=self.w_in.shape[0]).cumsum(0)
        h_NI = torch._grouped_mm(x_TD[token_N], self.w_in, offs=offs_E.to(torch.int32))
        if self.activation == "swiglu":
            g_NF, u_NF = h_NI.chunk(2, dim=-1)
            h_NF = nn.functional.silu(g_NF) * u_NF
        else:
            h_NF = nn.functional.gelu(h_NI)
        y_ND = torch._grouped_mm(h_NF, self.w_out, offs=offs_E.to(torch.int32))
        y_ND = y_ND * w_TK.flatten()[order_N, None].to(y_ND.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)


class DenseMLP(nn.Module):
    """The expert / shared-expert MLP for the peers (SwiGLU or GELU), bias-free."""

    def __init__(self, d: int, f: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d, 2 * f if activation == "swiglu" else f, bias=False)
        self.w_out = nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = self.w_in(x)
        if self.activation == "swiglu":
            g, u = h.chunk(2, dim=-1)
            h = nn.functional.silu(g) * u
        else:
            h = nn.functional.gelu(h)
        return self.w_out(h)


def measure_bandwidth() -> float:
    src = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), budget_s=0.5)  # noqa: F821 (closure; a later del frees it)
    del src, dst
    return 2 * 2 * 1024**3 / (ms * 1e-3)  # bytes read + written per second


def measure_gemm_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_fn(lambda: a @ b, budget_s=1.0)
    return 2 * n**3 / (ms * 1e-3)


def time_fn(fn, budget_s: float = 0.25, min_reps: int = 5, max_reps: int = 50,
            warmup: int = 3) -> float:
    """Median milliseconds of `fn` over CUDA-event-timed runs, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    if once > 0.3:  # slow cells (the references' loops): three calls are enough for a median
        min_reps = 3
    reps = int(min(max_reps, max(min_reps, budget_s / max(once, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def _init_(module: nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def shared_gate(shape: str) -> torch.Tensor:
    """The router gate [E, D] every implementation of `shape` gets: drawn from a fixed seed
    (on the CPU, so any device gets the same values), so that every implementation routes a
    given x to the same experts. Each used to draw its own: at small T, which experts a call
    hits is what the weight-bound cells cost (Mixtral T = 8: 16 assignments hit 7 or 8 of the 8
    experts, 0.28 ms of fwd+bwd weight traffic per expert on the H200; ds-1.3b T = 128: ~81 of
    128, 0.05 ms each), so two builds of one implementation differed by up to 0.27 ms (session
    36). Peers whose gate computes in bf16 may still break a near-tie the other way."""
    D, _, E = SHAPES[shape][:3]
    gen = torch.Generator().manual_seed(20261205)
    return torch.randn(E, D, generator=gen) * D ** -0.5


def gate_weight(impl: str, module: nn.Module) -> torch.Tensor:
    """The [E, D] router gate parameter of a module build() made (a peer's comes in a
    ModuleList, with the shared expert if the shape has one)."""
    if impl.startswith("moeflow"):
        return module.router.gate.weight
    peer = module[0]
    if impl.removesuffix(GRAPH) == "deepspeed":
        return peer.deepspeed_moe.gate.wg.weight
    return peer.gate.weight  # the minimal layer; transformers' Mixtral block


def build(impl: str, shape: str):
    """(fn, module) for one implementation of `shape`: fn(x_TD) -> y_TD; module holds the
    parameters. Random weights (std D^-1/2), the router gate shared_gate(shape)'s."""
    fn, module = _build_impl(impl.removesuffix(GRAPH), shape)
    with torch.no_grad():
        gate_weight(impl, module).copy_(shared_gate(shape))
    return fn, module


def _build_impl(impl: str, shape: str):
    D, F, E, k, act, shared, router = SHAPES[shape]
    dev, dt = DEVICE, torch.bfloat16
    if impl.startswith("moeflow"):
        spec = FFNSpec(kind="moe", d_ff=F, num_experts=E, expert_d_ff=F,
                       num_shared_experts=shared, shared_d_ff=F * shared, router=router)
        backends = {"moeflow-ref": Backends.reference(),
                    "moeflow-route_triton": Backends(router="triton")}.get(impl, Backends())
        layer = MoELayer(spec, D, act, bias=False, backends=backends).to(dev, dt)
        _init_(layer, D ** -0.5)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.normal_(0, 0.01)
        return lambda x: layer(x)[0], layer
    shared_mlp = DenseMLP(D, F * shared, act).to(dev, dt) if shared else None
    if impl == "minimal":
        peer = MinimalMoE(D, F, E, k, act, router.normalize_topk).to(dev, dt)
        run = peer
    elif impl == "deepspeed":
        from deepspeed.moe.layer import MoE
        peer = MoE(D, DenseMLP(D, F, act).to(dev, dt), num_experts=E, ep_size=1, k=k,
                   capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4).to(dev, dt)
        peer.set_deepspeed_parallelism()
        run = lambda x: peer(x)[0]  # noqa: E731
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        # Mixtral's experts are always gated; for the GELU shape they get a gated GELU of width
        # 2F/3 (rounded to 64), the same parameters and FLOPs as the plain GELU expert.
        f_hf = F if act == "swiglu" else round(2 * F / 3 / 64) * 64
        cfg = MixtralConfig(hidden_size=D, intermediate_size=f_hf, num_local_experts=E,
                            num_experts_per_tok=k, hidden_act="silu" if act == "swiglu" else "gelu")
        cfg._experts_implementation = impl.removeprefix("hf-")
        peer = MixtralSparseMoeBlock(cfg).to(dev, dt)
        run = lambda x: peer(x[None])[0]  # noqa: E731  (the block takes [B, T, D])
    _init_(peer, D ** -0.5)
    mods = nn.ModuleList([peer] + ([shared_mlp] if shared_mlp is not None else []))
    if shared_mlp is not None:
        _init_(shared_mlp, D ** -0.5)
        return (lambda x: run(x) + shared_mlp(x)), mods
    return run, mods


def floors(shape: str, T: int, kept: int, active_experts: int, bw: float, rate: float) -> dict:
    """Floor of one layer call: `kept` routed (token, expert) pairs hit `active_experts` experts."""
    D, F, E, k, act, shared, _ = SHAPES[shape]
    I = 2 * F if act == "swiglu" else F
    expert_params = D * (I + F)
    shared_params = shared * D * 3 * F
    flops = 2 * (kept * expert_params + T * (shared_params + D * E))
    w_bytes = 2 * (active_experts * expert_params + shared_params + D * E)
    act_bytes = 2 * 2 * T * D
    fwd = max((w_bytes + act_bytes) / bw, flops / rate) * 1e3
    fb = max((3 * w_bytes + 3 * act_bytes) / bw, 3 * flops / rate) * 1e3
    return {"fwd_floor_ms": fwd, "fwdbwd_floor_ms": fb, "flops": flops, "weight_bytes": w_bytes,
            "active_experts": active_experts, "kept_assignments": kept,
            "fwd_bound": "memory" if (w_bytes + act_bytes) / bw > flops / rate else "compute"}


class TooSlow(Exception):
    pass


class NotApplicable(Exception):
    pass


def run_cell(fn, params, x, g, mode, graph=False):
    if graph:
        if mode != "fwd":
            raise NotApplicable("forward only (graphs are the inference configuration)")
        with torch.no_grad():
            for _ in range(3):  # compile, autotune and size the allocator before capture
                fn(x)
            torch.cuda.synchronize()
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                fn(x)
        step = cuda_graph.replay
        step()
        torch.cuda.synchronize()
        return time_fn(step, warmup=1)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x)
    else:
        def step():
            for p in params:
                p.grad = None
            x.grad = None
            fn(x).backward(g)
    step()  # first call: compilation, autotuning, allocator warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    if once > MAX_CALL_S:
        raise TooSlow(f"{once:.1f} s per call (> {MAX_CALL_S:.0f} s)")
    return time_fn(step, warmup=0 if once > 0.3 else 1)


class Cell:
    """One implementation's layer on one shape, and the (mode -> reason) of the modes it is too
    slow for at some T: larger T are not tried."""

    def __init__(self, impl: str, shape: str) -> None:
        self.impl = impl
        self.fn, self.mod = build(impl, shape)
        self.params = [p for p in self.mod.parameters() if p.requires_grad]
        self.too_slow: dict[str, str] = {}

    def floor(self, row: dict, x: torch.Tensor, bw: float, rate: float) -> None:
        """moeflow's routing of x gives the row's floor (the pairs it keeps, the experts hit)."""
        with torch.no_grad():
            routing = self.mod.router(x)
        kept = int(routing.kept_TK.sum())
        row["floor"] = floors(row["shape"], row["T"], kept,
                              int((routing.counts_E > 0).sum()), bw, rate)
        row["dropped"] = int(routing.num_dropped)

    def time(self, row: dict, x: torch.Tensor, g: torch.Tensor, mode: str) -> float | None:
        """One timing of this implementation on x in `mode` (ms), or None with the reason in
        row["skipped"]."""
        key = f"{self.impl}/{mode}"
        if mode in self.too_slow:
            row["skipped"][key] = self.too_slow[mode]
            return None
        xi = x.clone().requires_grad_(mode != "fwd")
        ms = None
        try:
            ms = run_cell(self.fn, self.params, xi, g, mode, graph=self.impl.endswith(GRAPH))
        except NotApplicable as exc:
            row["skipped"][key] = str(exc)
        except TooSlow as exc:
            row["skipped"][key] = str(exc)
            self.too_slow[mode] = f"T={row['T']} already took {exc}"
        except torch.OutOfMemoryError:
            row["skipped"][key] = "out of GPU memory"
        except Exception as exc:  # noqa: BLE001
            row["skipped"][key] = f"failed: {exc!r}"[:200]
        del xi
        for p in self.params:
            p.grad = None
        torch.cuda.empty_cache()
        return ms


def _build(impl: str, shape: str, rows: dict, modes) -> Cell | None:
    try:
        return Cell(impl, shape)
    except Exception as exc:  # noqa: BLE001  (a peer that cannot be built)
        for row in rows.values():
            for mode in modes:
                row["skipped"][f"{impl}/{mode}"] = f"build failed: {exc!r}"[:200]
        print(f"{shape} {impl}: build failed: {exc!r}"[:300], flush=True)
        torch.cuda.empty_cache()
        return None


def _inputs(shape: str, tokens) -> dict[int, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    D = SHAPES[shape][0]
    return {T: torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            for T in tokens}


def _show(row: dict, key: str, mode: str) -> None:
    t = row["times_ms"].get(key)
    fl = row.get("floor", {}).get("fwd_floor_ms" if mode == "fwd" else "fwdbwd_floor_ms")
    shown = f"{t:.3f} ms ({t / fl:.2f}x floor)" if t and fl else row["skipped"].get(key)
    print(f"{row['shape']} T={row['T']} {key}: {shown}", flush=True)


def run_shape_impl_by_impl(shape: str, rows: dict, args, bw: float, rate: float, save) -> None:
    """One implementation at a time (built, timed at every T and mode, freed): the least GPU
    memory, but each implementation meets the host as it is minutes apart."""
    xs = _inputs(shape, args.tokens)
    for impl in args.impls:
        cell = _build(impl, shape, rows, args.modes)
        if cell is None:
            continue
        for T, row in rows.items():
            if impl == "moeflow":
                cell.floor(row, xs[T], bw, rate)
            g = torch.randn_like(xs[T])
            for mode in args.modes:
                ms = cell.time(row, xs[T], g, mode)
                if ms is not None:
                    row["times_ms"][f"{impl}/{mode}"] = ms
                _show(row, f"{impl}/{mode}", mode)
        del cell
        torch.cuda.empty_cache()
        save()


def run_shape_interleaved(shape: str, rows: dict, args, bw: float, rate: float, save) -> None:
    """Every implementation built at once; each (T, mode) timed in args.rounds rounds, every
    round all implementations one after the other, in an order rotated from round to round,
    so that each meets the host in the same states as the others (the host-bound small-T cells
    move by up to 2x between runs and machines, benchmarks/results/moe_layer). A cell's time is
    the median of its rounds; the rounds are kept (row["rounds_ms"]), and row["wins"] counts
    the rounds moeflow was faster than each peer."""
    xs = _inputs(shape, args.tokens)
    cells = [c for c in (_build(i, shape, rows, args.modes) for i in args.impls) if c is not None]
    for T, row in rows.items():
        if cells and cells[0].impl == "moeflow":
            cells[0].floor(row, xs[T], bw, rate)
        g = torch.randn_like(xs[T])
        rounds = row.setdefault("rounds_ms", {})
        for mode in args.modes:
            for r in range(args.rounds):
                order = cells[r % len(cells):] + cells[:r % len(cells)]
                for cell in order:
                    key = f"{cell.impl}/{mode}"
                    if key in row["skipped"]:
                        continue
                    ms = cell.time(row, xs[T], g, mode)
                    if ms is not None:
                        rounds.setdefault(key, []).append(ms)
            for cell in cells:
                key = f"{cell.impl}/{mode}"
                if rounds.get(key):
                    row["times_ms"][key] = statistics.median(rounds[key])
                    row["skipped"].pop(key, None)
                _show(row, key, mode)
            row.setdefault("wins", {})[mode] = wins(rounds, mode)
        save()
    del cells
    torch.cuda.empty_cache()


def wins(rounds: dict[str, list[float]], mode: str) -> dict[str, str]:
    """Per eager peer (and moeflow variant): in how many of the rounds both ran moeflow was the
    faster, "k/n"."""
    ours = rounds.get(f"moeflow/{mode}", [])
    out = {}
    for key, theirs in rounds.items():
        impl = key.split("/")[0]
        if key.endswith("/" + mode) and impl != "moeflow" and not impl.endswith(GRAPH):
            n = min(len(ours), len(theirs))
            out[impl] = f"{sum(a < b for a, b in zip(ours, theirs))}/{n}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=[8, 128, 4096, 16384])
    ap.add_argument("--impls", nargs="*", default=[i for i in IMPLS if i not in VARIANTS])
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--rounds", type=int, default=1,
                    help="> 1: time every (T, mode) this many times, the implementations "
                         "interleaved (all built at once; run_shape_interleaved)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the markdown of a results file")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as fh:
            result = json.load(fh)
        impls = [i for i in IMPLS if any(k.startswith(i + "/") for row in result["rows"]
                                         for k in (*row["times_ms"], *row["skipped"]))]
        with open(args.render.removesuffix(".json") + ".md", "w") as fh:
            fh.write(markdown(result, impls, args.modes))
        return
    if args.impls[0] != "moeflow" and "moeflow" in args.impls:
        args.impls.remove("moeflow")
        args.impls.insert(0, "moeflow")  # its routing gives each row's floor
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    if "deepspeed" in args.impls:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="29517")
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl", verbose=False)
    bw, rate = measure_bandwidth(), measure_gemm_rate()
    print(f"{props.name}: copy bandwidth {bw / 1e12:.2f} TB/s, bf16 GEMM {rate / 1e12:.0f} "
          f"TFLOP/s", flush=True)
    result = {"gpu": props.name, "date": datetime.date.today().isoformat(),
              "command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
              "bandwidth_Bps": bw, "bf16_flops": rate, "rounds": args.rounds, "rows": []}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"moe_layer_{props.name.replace(' ', '-')}_{result['date']}")

    def save() -> None:
        with open(stem + ".json", "w") as fh:
            json.dump(result, fh, indent=1)
        with open(stem + ".md", "w") as fh:
            fh.write(markdown(result, args.impls, args.modes))

    for shape in args.shapes:
        rows = {T: {"shape": shape, "T": T, "times_ms": {}, "skipped": {}} for T in args.tokens}
        result["rows"] += rows.values()
        run_shape = run_shape_impl_by_impl if args.rounds == 1 else run_shape_interleaved
        run_shape(shape, rows, args, bw, rate, save)
    print(markdown(result, args.impls, args.modes))


def markdown(result: dict, impls, modes) -> str:
    lines = [f"# MoE layer benchmark — {result['gpu']}, {result['date']}", "",
             f"Command: `{result['command']}` (torch {result['torch']}). Measured copy bandwidth "
             f"{result['bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 GEMM "
             f"{result['bf16_flops'] / 1e12:.0f} TFLOP/s. Each cell: median ms (× floor)"
             + (f", the median of {result['rounds']} interleaved rounds"
                if result.get("rounds", 1) > 1 else "") + ".", ""]
    notes = []
    all_impls = impls
    for mode in modes:
        impls = [i for i in all_impls if mode == "fwd" or not i.endswith(GRAPH)]
        lines += [f"## {mode}", "",
                  "| shape | T | floor ms | " + " | ".join(impls) + " |",
                  "|---|---|---|" + "---|" * len(impls)]
        for row in result["rows"]:
            fl = row.get("floor", {}).get("fwd_floor_ms" if mode == "fwd" else "fwdbwd_floor_ms")
            cells = []
            for impl in impls:
                key = f"{impl}/{mode}"
                if key in row["times_ms"]:
                    t = row["times_ms"][key]
                    cells.append(f"{t:.3f} ({t / fl:.1f}×)" if fl else f"{t:.3f}")
                else:
                    why = row["skipped"].get(key, "not run (the run ended before this cell)")
                    notes.append(f"{row['shape']} T={row['T']} {key}: {why}")
                    cells.append(f"— [{len(notes)}]")
            fl_s = f"{fl:.3f}" if fl else "?"
            lines.append(f"| {row['shape']} | {row['T']} | {fl_s} | " + " | ".join(cells) + " |")
        lines.append("")
    if notes:
        lines += ["Not timed:", ""] + [f"{i + 1}. {n}" for i, n in enumerate(notes)] + [""]
    return "\n".join(lines + targets(result, modes))


def targets(result: dict, modes) -> list[str]:
    """moeflow against issue 14's targets: forward ≤ 1.5× floor for T ≥ 1024 (eager), ≤ 2× floor
    from a CUDA graph for T ≤ 128 (moeflow+graph, where timed); faster than every peer in every
    cell, fwd and fwd+bwd (eager against eager; graph against graph as a note)."""
    lines = ["## moeflow against the targets (issue 14)", "",
             "| shape | T | mode | floor ms | moeflow (× floor) | floor target | met "
             "| fastest peer ms | faster than every peer |", "|---" * 9 + "|"]
    for mode in modes:
        for row in result["rows"]:
            fl = row.get("floor", {}).get("fwd_floor_ms" if mode == "fwd" else "fwdbwd_floor_ms")
            t = row["times_ms"].get(f"moeflow/{mode}")
            if not fl or t is None:
                continue
            g = row["times_ms"].get(f"moeflow{GRAPH}/{mode}")
            goal, met = "—", "—"
            if mode == "fwd" and row["T"] >= 1024:
                goal, met = "≤ 1.5× eager", "yes" if t / fl <= 1.5 else "no"
            elif mode == "fwd" and row["T"] <= 128:
                goal = "≤ 2× graph"
                met = ("yes" if g / fl <= 2.0 else "no") + f" ({g / fl:.2f}×)" if g else "not timed"
            peers = {k.split("/")[0]: v for k, v in row["times_ms"].items()
                     if k.endswith("/" + mode) and not k.startswith("moeflow")
                     and not k.split("/")[0].endswith(GRAPH)}
            best = min(peers.items(), key=lambda kv: kv[1]) if peers else None
            verdict = ("yes" if all(t < v for v in peers.values()) else "no") if peers else "?"
            won = row.get("wins", {}).get(mode)
            if won:
                verdict += "; rounds won: " + ", ".join(f"{p} {kn}" for p, kn in won.items())
            hg = row["times_ms"].get(f"hf-grouped_mm{GRAPH}/{mode}")
            if g is not None and hg is not None:
                verdict += (f"; graphs: {g:.3f} ({g / fl:.2f}×) vs {hg:.3f} "
                            f"({'faster' if g < hg else 'slower'})")
            best_s = f"{best[0]} {best[1]:.3f}" if best else "none timed"
            lines.append(f"| {row['shape']} | {row['T']} | {mode} | {fl:.3f} | {t:.3f} "
                         f"({t / fl:.2f}×) | {goal} | {met} | {best_s} | {verdict} |")
    return lines + [""]


if __name__ == "__main__":
    main()
