"""The one place that decides which implementation of each op runs: `Backends` and its choosers.

A `Backends` names an implementation per op, "auto" or a name from that op's registry; a model
gets one through its constructor (`Transformer(config, backends=...)`) and
`Transformer.set_backends` replaces it for every layer at once. "auto" picks the fastest
implementation measured for the device, dtype and shape (benchmarks/NOTES-kernels.md holds the
measurements behind each rule); explicit names force a path, which is how the parity tests and
benchmarks compare every fast path with its plain-torch reference.

- router:   ROUTER_BACKENDS ("reference" = moeflow.model.router.route_reference, "triton" =
  moeflow.ops.routing_triton.route_triton, "triton_decode" = the one-launch route-and-plan
  kernel moeflow.ops.decode_route_triton where it applies (one_launch_bound and
  decode_route_fits: a few tokens, no Gumbel noise or Random Token Selection, dropless or with
  capacity drops), route_triton elsewhere;
  "triton_decode_fused" = its passes in the launch that computes the fp32 router logits
  too, moeflow.ops.decode_route_fused_triton, from the layer input and the gate weight (one
  launch for the router instead of five), where decode_route_fits without autograd,
  route_triton elsewhere; "auto" takes triton_decode_fused on CUDA where
  it fits (router_fuses_logits), else triton_decode, else route_triton).
- dispatch: DISPATCH_BACKENDS ("reference" = moeflow.model.dispatch's sort and gather,
  "triton" = moeflow.ops.permute_triton), for dispatch and combine.
- experts:  EXPERT_BACKENDS (callables with the signature of expert_mlp_reference; "stream" and
  "tiled", the weight-streaming and tiled grouped-GEMM kernels of moeflow.ops.grouped_mlp_triton
  and moeflow.ops.tiled_mlp_triton, and "persistent", moeflow.ops.persistent_mlp_triton's, are
  inference only; "auto" on CUDA in bf16: "stream" up to STREAM_MAX_ROWS_PER_EXPERT rows per
  expert, then "persistent" where it wins and TMA runs (above PERSISTENT_MIN_ROWS_PER_EXPERT, up
  to PERSISTENT_MAX_ROWS_PER_EXPERT or for narrow experts), else "tiled" up to
  TILED_MAX_ROWS_PER_EXPERT, else and in training "grouped_mm_fused").
- fuse:     FUSE_BACKENDS, the small-op chains of moeflow.ops.fused ("reference" = plain torch,
  "compiled" = their torch.compile twins whenever autograd is off, on any device and size;
  "auto" = compiled only on CUDA, without autograd, for inputs up to FUSE_MAX_ELEMENTS).
- elementwise: ELEMENTWISE_BACKENDS, RMSNorm, residual add + RMSNorm and q/k norm + RoPE
  ("reference" = as `fuse` decides; "triton" = one-pass kernels, moeflow.ops.norm_triton and
  moeflow.ops.qk_rope_triton, whenever autograd is off, on any device; "auto" = triton on CUDA
  without autograd: the compiled twins lose at prefill sizes, and at decode the compiled norm
  leaves the residual add to a kernel of its own; a batch-1 decode step of the Qwen3-30B-A3B
  shape on the H200 ran 143 kernels and ~130 µs of kernel time and gaps fewer with triton,
  benchmarks/results/decode_timeline).
- attention: ATTENTION_BACKENDS, the serving engine's decode attention over its slot cache
  (moeflow.infer.slot_cache.DecodeView; "reference" = two scatters storing the new key/value,
  then decode_attention as `fuse` decides; "triton" = moeflow.ops.decode_attention_triton, one
  split-K pass that also stores them, whenever autograd is off, on any device; "auto" = triton on
  CUDA without autograd). Prefill attention is SDPA either way.
- dense: DENSE_BACKENDS, the dense part of each block under autograd (training): its attention
  sub-layer (norm, attention, residual add, the next norm) and a dense FFN ("eager" = as the
  other fields choose; "compiled" = regional torch.compile, one graph per block structure,
  reused by every layer of that structure, moeflow.model.transformer.Block; "auto" = eager).
  The MoE FFN (routing, dispatch, expert kernels) stays eager either way. Each compiled call
  costs host time (~0.5-0.8 ms per region on the H200 host for an earlier per-module version,
  which slowed the host-bound steps of `moeflow reproduce`'s small models,
  benchmarks/results/train_step_profile), so it pays only where the GPU is the bottleneck: a
  finegrained-1b step on the H200 went 166.7 -> 133.8 ms (benchmarks/results/train_throughput);
  hence a choice (`moeflow train --compile`), not the default.
- matmul: MATMUL_BACKENDS, the dense linears (attention, MLA and dense-MLP projections,
  moeflow.model.linear) and the expert GEMMs ("reference" = the plain matmul in the compute
  dtype; "fp8" = FP8 with rowwise scales, moeflow.ops.fp8_linear and moeflow.ops.fp8_grouped,
  on torch._scaled_mm / torch._scaled_grouped_mm where they run (scaled_mm_supported,
  scaled_grouped_mm_supported) and their plain-torch reference elsewhere; "fp8_reference" =
  that reference everywhere; "stream" = the dense linears' weight-streaming kernel for a few
  rows, moeflow.ops.skinny_linear_triton, wherever linear_streams (inference, at most
  LINEAR_STREAM_MAX_ROWS rows), on any device, and the plain matmul elsewhere; "auto" =
  "stream" on CUDA in bf16/fp16, else "reference": FP8 only when asked). FP8 applies only to
  calls autograd records (training); forwards without autograd (validation, generation,
  serving) run as "auto" decides, so a model's inference does not depend on the FP8 choice.
  The LM head, router gates, embeddings and norms never run in FP8 (moeflow.model.linear says
  why), nor in the stream kernel, which only moeflow.model.linear.project calls. With an FP8
  matmul the experts' GEMMs are FP8's, so `experts` must stay "auto".

Triton modules are imported only when a Triton path is chosen, so CPU-only installs without
Triton never import it (and tests can switch on Triton's interpreter before the first import).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from moeflow.ops.expert_mlp import expert_mlp_fp8, expert_mlp_grouped_mm, expert_mlp_reference
from moeflow.ops.autocast import compute_dtype
from moeflow.validate import check, choice

ROUTER_BACKENDS = ("reference", "triton", "triton_decode", "triton_decode_fused")
DISPATCH_BACKENDS = ("reference", "triton")
FUSE_BACKENDS = ("reference", "compiled")
ELEMENTWISE_BACKENDS = ("reference", "triton")
ATTENTION_BACKENDS = ("reference", "triton")
DENSE_BACKENDS = ("eager", "compiled")
MATMUL_BACKENDS = ("reference", "fp8", "fp8_reference", "stream")

# Weight-streaming experts win while an expert averages at most this many rows; above it the
# grouped GEMM's tiles are better. Set from an earlier H100 comparison; the recorded runs agree
# at 1 and 8 rows per expert, the crossover itself is not re-measured (benchmarks/NOTES-kernels.md).
STREAM_MAX_ROWS_PER_EXPERT = 16

# Inference above that, up to this many rows per expert on average, runs the tiled Triton grouped
# GEMM (gather and activation fused); more rows, and training, run torch._grouped_mm. On the
# H200 (benchmarks/results/prefill_experts, 2026-12-02, two runs) the tiled kernels took
# 0.74-0.83x the time of gather + grouped_mm + activation + grouped_mm at 32 and 128 rows per
# expert (Qwen3-30B-A3B, 512 and 2048 tokens), 1.11x at 256 (4096 tokens) and 1.03-1.15x at 512
# (Qwen3 8192 tokens, Mixtral 2048 tokens); the 2048-token prefill of Qwen3-30B-A3B took 31.67
# instead of 37.14 ms. Where TMA runs, the persistent kernels take over above
# PERSISTENT_MIN_ROWS_PER_EXPERT (below); GPUs without it keep the tiled kernels up to here.
TILED_MAX_ROWS_PER_EXPERT = 128

# Inference above PERSISTENT_MIN_ROWS_PER_EXPERT, where TMA runs (tma_experts_supported), takes
# the persistent grouped GEMM (moeflow.ops.persistent_mlp_triton: gather and activation fused
# like the tiled kernels) up to PERSISTENT_MAX_ROWS_PER_EXPERT rows per expert, and at any row
# count for experts at most PERSISTENT_ANY_ROWS_MAX_FFN wide; torch._grouped_mm otherwise.
# Above 64 rows (session 26, its 64-row up tiles): on the H200 (benchmarks/results/
# prefill_experts) the two kernels alone took 0.47 against the tiled path's 0.51 ms at 128 rows
# per expert of Qwen3-30B-A3B (2048 tokens) and 1.30 against 1.69 at Mixtral-8x7B's 256
# (1024 tokens); at 64 rows (Qwen3, 1024 tokens) they tie (0.36 against 0.35). On the H200
# (benchmarks/results/prefill_experts, session 25, five calls back to back) it beat
# gather + grouped_mm + activation + grouped_mm by 4-10% at 256-1024 rows per expert of the
# Qwen3-30B-A3B shape (F 768) and 512 of Mixtral-8x7B (F 14336), and lost by 3-9% at 1024 rows
# of DeepSeek-V3-shaped experts (F 2048) and 2048 of Mixtral, where CUTLASS's GEMM rate
# (569-633 TFLOP/s against 552-582) outweighs the fused passes.
PERSISTENT_MIN_ROWS_PER_EXPERT = 64
PERSISTENT_MAX_ROWS_PER_EXPERT = 512
PERSISTENT_ANY_ROWS_MAX_FFN = 1024

# Inference linears of at most this many rows (x.numel() / K) may stream their weight
# (moeflow.ops.skinny_linear_triton); more rows run the plain matmul. 16 is the most the kernel
# takes (one MMA tile of rows). "auto" streams every weight (resolve_linear_backend): on the
# H200 (benchmarks/results/skinny_linear) the MMA kernel beat cuBLAS on the output projections
# (Qwen3-30B-A3B 4096 → 2048: 8.2-8.6 vs 9.5 µs at 1-16 rows, Mixtral 4096 → 4096: 12.0 vs
# 13.6 at 1 row), the one-row register GEMV on every projection (Qwen3 o 5.96 vs 9.33 µs, qkv
# 6.88 vs 8.38; 2026-12-03), and the swapped tiles on the wide qkv projection at 4-16 rows
# (8.05-8.18 vs 8.25-8.51 µs, session 17), where the unswapped kernel had lost (9.1 vs 8.1).
LINEAR_STREAM_MAX_ROWS = 16

# The one-launch decode router handles up to this many assignments (T·K). It runs in one
# program, so its time grows with T·K, while what it saves is launches, which cost the same at
# any T; prefill chunks, far above the bound, keep the multi-program kernels. Measured on the
# H200 (benchmarks/results/decode_route, 2026-12-02), the fused-logits kernel that "auto" takes
# against router_logits + the multi-program route and plan it replaces (router_logits' share
# read off the table's unfused column): eagerly it wins at every T·K to 1024 (256: 132 vs
# ~354 µs; launch-bound); replayed in a CUDA graph it wins to 128 (24.6 vs ~40), ties at 256
# (45.3 vs ~44) and loses from 512 (86.1 vs ~57). One bound for both: a bound that moved with
# capture (512 eagerly, 128 while capturing, until 2026-12-02) routed a captured prefill
# differently from the same forward run eagerly (logits summed in another order, so near-ties
# could flip) and failed tests/test_engine_cuda.py's captured = uncaptured test on the H200;
# with the one bound it passed there (session 10, benchmarks/results/gpu_tests_*_session10.log).
DECODE_ROUTE_MAX_ASSIGNMENTS = 256
# Training calls (autograd: never captured, so the reason for one bound above does not hold):
# the bound where the one program still won eagerly in the measurement above (T·K 1024:
# route+plan 155 against 266 µs), which covers issue 14's Qwen3 T = 128 fwd+bwd cell, bound by
# the host. Its GPU time at 1024 (153 against 67 µs replayed, 2026-12-02; session 22 timed the
# plan program alone at 76 µs for 256 assignments, so 1024 may take ~300) hides under the
# host's issue time there: measured on the H200 (session 36, benchmarks/results/moe_layer),
# Qwen3 T = 128 fwd+bwd 2.083 against route_triton's 2.496 ms; where the GPU binds it costs
# +0.05 ms of 6.4 (ds-1.3b T = 128, 128 experts with a capacity). At real training sizes
# route_triton runs.
TRAIN_ROUTE_MAX_ASSIGNMENTS = 1024

# Decode calls of at most this many tokens let the experts' one-launch stream kernel place the
# rows (moeflow.ops.grouped_mlp_triton: one 16-row tile holds every token an expert can have)
# instead of the router's last program (its pass 2, moeflow.ops.decode_route_triton).
EXPERTS_PLACE_MAX_TOKENS = 16

# Fusing pays where launches dominate (decode: a few rows). On large inputs the shape-dynamic
# compiled twins measured slower than plain torch: prefill of 2048 tokens of the Qwen3-30B-A3B
# shape took 102 ms fused vs 78 ms plain on an H100 (benchmarks/results/generate.md), so above
# this many elements in the first argument "auto" runs the reference.
FUSE_MAX_ELEMENTS = 1 << 20


def _stream(*args, **kwargs):
    from moeflow.ops.grouped_mlp_triton import expert_mlp_stream
    return expert_mlp_stream(*args, **kwargs)


def _tiled(*args, **kwargs):
    from moeflow.ops.tiled_mlp_triton import expert_mlp_tiled
    return expert_mlp_tiled(*args, **kwargs)


def _persistent(*args, **kwargs):
    from moeflow.ops.persistent_mlp_triton import expert_mlp_persistent
    return expert_mlp_persistent(*args, **kwargs)


def _grouped_fused(*args, **kwargs):
    from moeflow.ops.grouped_mlp_triton import expert_mlp_grouped_fused
    return expert_mlp_grouped_fused(*args, **kwargs)


EXPERT_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": expert_mlp_reference,
    "grouped_mm": expert_mlp_grouped_mm,
    "grouped_mm_fused": _grouped_fused,  # grouped_mm + one-pass Triton activation (fwd + bwd)
    "stream": _stream,  # Triton weight-streaming kernels, inference only
    "tiled": _tiled,  # Triton grouped GEMM, gather and activation fused, inference only
    "persistent": _persistent,  # the same, persistent over the tiles (TMA, Hopper), inference
}


@dataclass(frozen=True)
class Backends:
    """Which implementation each op of a model runs: "auto" or a name from the op's registry."""

    router: str = "auto"
    dispatch: str = "auto"
    experts: str = "auto"
    fuse: str = "auto"
    elementwise: str = "auto"
    attention: str = "auto"
    dense: str = "auto"
    matmul: str = "auto"

    def __post_init__(self) -> None:
        for name, names in (("router", ROUTER_BACKENDS), ("dispatch", DISPATCH_BACKENDS),
                            ("experts", tuple(EXPERT_BACKENDS)), ("fuse", FUSE_BACKENDS),
                            ("elementwise", ELEMENTWISE_BACKENDS),
                            ("attention", ATTENTION_BACKENDS),
                            ("dense", DENSE_BACKENDS), ("matmul", MATMUL_BACKENDS)):
            choice(name, getattr(self, name), ("auto", *names))
        check(self.experts == "auto" or not self.fp8, "experts", self.experts,
              f"cannot be chosen with matmul={self.matmul!r}: the FP8 path runs its own expert "
              "GEMMs; leave experts 'auto'")

    @property
    def fp8(self) -> bool:
        """Whether the matmuls run in FP8 (where autograd records them)."""
        return self.matmul in ("fp8", "fp8_reference")

    @classmethod
    def reference(cls) -> "Backends":
        """Plain torch everywhere."""
        return cls(router="reference", dispatch="reference", experts="reference",
                   fuse="reference", elementwise="reference", attention="reference",
                   dense="eager", matmul="reference")


class ChoosesBackends:
    """Marks a module whose forward chooses implementations by its `backends`, given at
    construction; `set_backends` replaces it throughout a model."""

    backends: Backends


def set_backends(model: nn.Module, backends: Backends) -> None:
    """Give `backends` to every part of `model` that chooses implementations."""
    if not isinstance(backends, Backends):
        raise TypeError(f"set_backends needs a Backends, got {type(backends).__name__}")
    for module in model.modules():
        if isinstance(module, ChoosesBackends):
            module.backends = backends


@functools.cache
def triton_available() -> bool:
    """Looked up once per process: the choosers ask on every CUDA layer call, and a package
    search there is host time in the decode hot path."""
    return importlib.util.find_spec("triton") is not None


def _triton_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and triton_available()


def grouped_mm_supported(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs for these operands (device, dtype, 16-byte alignment)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    aligned = all(t.shape[-1] * t.element_size() % 16 == 0 for t in (x, w_in, w_out))
    if x.device.type == "cuda":
        return (x.dtype == torch.bfloat16 and aligned
                and torch.cuda.get_device_capability(x.device)[0] >= 9)
    return x.device.type == "cpu" and x.dtype == torch.float32 and aligned


def tma_experts_supported(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> bool:
    """Whether the persistent expert kernels (moeflow.ops.persistent_mlp_triton: weights and h
    through TMA) run: grouped_mm_supported's conditions on CUDA (sm_90+, bf16, 16-byte rows of
    x and both weights), plus 16-byte rows of h ([N, F]) and 16-byte weight base addresses."""
    return (x.is_cuda and grouped_mm_supported(x, w_in, w_out)
            and w_out.shape[1] * w_out.element_size() % 16 == 0
            and all(w.data_ptr() % 16 == 0 for w in (w_in, w_out)))


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on these tensors (None entries are skipped): what every
    inference-only path (no backward) checks before it runs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def scaled_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch._scaled_mm's rowwise FP8 kernel runs the three GEMMs of x · weightᵀ
    (moeflow.ops.fp8_linear): CUDA sm89+, bf16 compute dtype, and every dimension a multiple of
    16 — the tokens too, which the weight gradient contracts."""
    if not (x.is_cuda and compute_dtype(x) == torch.bfloat16 and hasattr(torch, "_scaled_mm")):
        return False
    rows = x.numel() // x.shape[-1]
    return (torch.cuda.get_device_capability(x.device) >= (8, 9)
            and all(d % 16 == 0 for d in (rows, *weight.shape)))


def scaled_grouped_mm_supported(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor
                                ) -> bool:
    """Whether torch._scaled_grouped_mm runs the expert GEMMs (moeflow.ops.fp8_grouped): CUDA
    sm90 or sm100 (torch builds it for those only), bf16, the weights' widths multiples of 16,
    fewer than 1024 experts (the kernel's limit)."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_scaled_grouped_mm")):
        return False
    return (torch.cuda.get_device_capability(x.device)[0] in (9, 10) and w_in.shape[0] < 1024
            and all(d % 16 == 0 for d in (*w_in.shape[1:], *w_out.shape[1:])))


def linear_streams(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the weight-streaming kernel (moeflow.ops.skinny_linear_triton) computes
    x · weightᵀ as the plain linear would: autograd does not record the call (the kernel has no
    backward), x has at most LINEAR_STREAM_MAX_ROWS rows, and x and weight share the dtype the
    matmul runs in (autocast would change it)."""
    rows = math.prod(x.shape[:-1])
    return (not records_grad(x, weight) and rows <= LINEAR_STREAM_MAX_ROWS
            and x.dtype == weight.dtype == compute_dtype(x))


def resolve_linear_backend(requested: str, x: torch.Tensor, weight: torch.Tensor) -> str:
    """"reference" (the plain linear), "fp8" (torch._scaled_mm), "fp8_reference" (its
    plain-torch reference) or "stream" (the weight-streaming kernel) for x · weightᵀ. FP8 only
    when asked and autograd records the call; other calls stream where linear_streams, when
    asked for (on any device) or under "auto" on CUDA in bf16/fp16, and run the plain linear
    elsewhere (a forced "stream" too: training and prefill keep cuBLAS). Wide weights (N > K)
    stream too since the kernel's swapped tiles (session 17: Qwen3-30B-A3B qkv at 4 and 16
    rows 8.05 / 8.18 µs against cuBLAS's 8.25 / 8.51, benchmarks/results/skinny_linear)."""
    if requested in ("fp8", "fp8_reference") and records_grad(x, weight):
        return "fp8" if requested == "fp8" and scaled_mm_supported(x, weight) else "fp8_reference"
    if requested == "reference" or not linear_streams(x, weight):
        return "reference"
    if requested == "stream" or (_triton_cuda(x) and x.dtype in (torch.bfloat16, torch.float16)):
        return "stream"
    return "reference"


def resolve_expert_backend(requested: str, x: torch.Tensor, w_in: torch.Tensor,
                           w_out: torch.Tensor, num_rows: int | None = None,
                           matmul: str = "auto") -> Callable[..., torch.Tensor]:
    """`num_rows`: the rows the experts compute when that is not x.shape[0] (x holds the tokens
    and the expert kernel gathers its rows, see DispatchPlan.gather_N). `matmul`: an FP8 choice
    (Backends.matmul) takes over where autograd records the call; x and the weights are then
    in the compute dtype."""
    if matmul in ("fp8", "fp8_reference") and records_grad(x, w_in, w_out):
        kernel = matmul == "fp8" and scaled_grouped_mm_supported(x, w_in, w_out)
        return functools.partial(expert_mlp_fp8, kernel=kernel)
    if requested == "auto":
        requested = "reference"
        if grouped_mm_supported(x, w_in, w_out):
            requested = "grouped_mm"
            if _triton_cuda(x):
                rows = x.shape[0] if num_rows is None else num_rows
                requested = "grouped_mm_fused"
                if not records_grad(x, w_in, w_out):
                    E = w_in.shape[0]
                    if rows <= STREAM_MAX_ROWS_PER_EXPERT * E:
                        requested = "stream"
                    elif (rows > PERSISTENT_MIN_ROWS_PER_EXPERT * E
                          and (rows <= PERSISTENT_MAX_ROWS_PER_EXPERT * E
                               or w_out.shape[1] <= PERSISTENT_ANY_ROWS_MAX_FFN)
                          and tma_experts_supported(x, w_in, w_out)):
                        requested = "persistent"
                    elif rows <= TILED_MAX_ROWS_PER_EXPERT * E:
                        requested = "tiled"
    return EXPERT_BACKENDS[requested]


def one_launch_bound(cfg, capacity: int | None, noise: str, reduces_stats: bool,
                     grad: bool) -> int:
    """How many assignments (T·K) the one-launch router (moeflow.ops.decode_route_triton) may
    route in this call; 0 where it may not route it at all. It drops in position order only
    (it reproduces route_reference's drops exactly; Random Token Selection needs the RNG's
    permutation), adds no Gumbel noise and sums no statistics over ranks. Without autograd
    the bound is DECODE_ROUTE_MAX_ASSIGNMENTS; under autograd (`grad`: training calls, which
    are never captured; the backward is route_triton's kernel) TRAIN_ROUTE_MAX_ASSIGNMENTS."""
    if (capacity is not None and cfg.drop_policy != "position"
            or noise in ("rsample", "rsample_second") or reduces_stats):
        return 0
    return TRAIN_ROUTE_MAX_ASSIGNMENTS if grad else DECODE_ROUTE_MAX_ASSIGNMENTS


def decode_route_fits(tokens_T: torch.Tensor, cfg, bound: int) -> bool:
    """Whether the one-launch router (moeflow.ops.decode_route_triton) routes this call: at
    most `bound` (one_launch_bound) assignments, whether or not a CUDA graph is being
    captured. `tokens_T`: anything with a row per token (the logits, or the router's input for
    the fused-logits kernel)."""
    return tokens_T.shape[0] * cfg.top_k <= bound


def router_fuses_logits(requested: str, x_TD: torch.Tensor, cfg, num_experts: int,
                        bound: int) -> bool:
    """Whether the router hands its input to the fused-logits decode kernel
    ("triton_decode_fused") instead of computing the logits first (never under autograd: the
    router passes a bound of 0 then): asked for, or "auto" on CUDA where the one-launch
    router applies (decode_route_fits; as resolve_router_backend's rule, E <= 1024 in equal
    groups; no expert groups). Measured on the H200 (benchmarks/results/decode_study,
    2026-12-02, Qwen3-30B-A3B shape, dropless, two runs each): 942 -> 702 kernels and 4.20 ->
    3.81 ms of kernel time per batch-1 decode step; graph replay 4.59 / 5.10 -> 4.49 / 4.32
    ms, batch 16 13.50 / 13.94 -> 13.34 / 12.98 ms."""
    if cfg.expert_groups or not decode_route_fits(x_TD, cfg, bound):
        return False
    if requested == "triton_decode_fused":
        return True
    return (requested == "auto" and _triton_cuda(x_TD) and num_experts <= 1024
            and num_experts % cfg.num_groups == 0)


def resolve_router_backend(requested: str, logits_TE: torch.Tensor, cfg, bound: int = 0) -> str:
    """"triton" (fused routing kernels) on CUDA for up to 1024 experts in equal groups, and
    "triton_decode" (one launch, which also plans the dispatch, dropless or with capacity
    drops in position order) where decode_route_fits; the reference router for expert groups
    (moeflow.model.expert_groups: the kernels do not mask a token's experts to its group, nor
    apply per-group capacities), where asking for a Triton router is an error."""
    if cfg.expert_groups:
        if requested != "auto" and requested != "reference":
            raise ValueError(f"backends.router={requested!r}: the fused routing kernels cannot "
                             "route within expert groups (router.expert_groups); use 'auto' or "
                             "'reference'")
        return "reference"
    if requested == "auto":
        E = logits_TE.shape[-1]
        fits = (logits_TE.dtype == torch.float32 and E <= 1024 and E % cfg.num_groups == 0)
        requested = "triton_decode" if _triton_cuda(logits_TE) and fits else "reference"
    if (requested in ("triton_decode", "triton_decode_fused")
            and not decode_route_fits(logits_TE, cfg, bound)):
        return "triton"
    return requested


def resolve_dispatch_backend(requested: str, x: torch.Tensor) -> str:
    """"triton" (closed-form mapping table + gather, fused combine) on CUDA."""
    if requested != "auto":
        return requested
    return "triton" if _triton_cuda(x) else "reference"


def resolve_fuse(requested: str, x: torch.Tensor) -> bool:
    """Whether a fused op runs its compiled twin for first argument `x`. Never under autograd:
    the twin gets detached Parameters (moeflow.ops.fused), and training keeps the reference."""
    if requested == "reference" or torch.is_grad_enabled():
        return False
    return requested == "compiled" or (x.is_cuda and x.numel() <= FUSE_MAX_ELEMENTS)


def resolve_elementwise_backend(requested: str, x: torch.Tensor) -> str:
    """"triton" or "reference" for a norm / q-k-RoPE call with first argument `x`. Never Triton
    under autograd (the kernels have no backward): training keeps the reference."""
    if requested == "reference" or torch.is_grad_enabled():
        return "reference"
    if requested == "triton":
        return "triton"
    return "triton" if _triton_cuda(x) else "reference"


def resolve_attention_backend(requested: str, q: torch.Tensor) -> str:
    """"triton" or "reference" for one decode-attention call with queries `q`. Never Triton
    under autograd (the kernel has no backward)."""
    if requested == "reference" or torch.is_grad_enabled():
        return "reference"
    if requested == "triton":
        return "triton"
    return "triton" if _triton_cuda(q) else "reference"


def compile_blocker(device: torch.device) -> str | None:
    """Why torch.compile cannot compile for `device` on this machine, or None: inductor writes
    C++ for the CPU (a compiler must be on PATH, or named by CXX) and Triton for CUDA. Checked
    up front so a run asking for compiled blocks fails in one line instead of at its first
    step with inductor's traceback."""
    if device.type == "cuda":
        return None if triton_available() else "torch.compile on CUDA needs Triton installed"
    compilers = (os.environ.get("CXX"), "g++", "clang++", "c++")
    if not any(c and shutil.which(c) for c in compilers):
        return "torch.compile on the CPU needs a C++ compiler (g++ or clang++ on PATH, or CXX)"
    return None


def compiles_dense(requested: str) -> bool:
    """Whether a block runs its dense part compiled: asked for, under autograd (inference has
    its own fused paths and CUDA graphs, moeflow.infer)."""
    return requested == "compiled" and torch.is_grad_enabled()
