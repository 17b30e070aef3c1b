"""Computing a missed expert on the CPU instead of copying it (Fiddler, Kamahori et al. 2024).

A miss costs a whole expert's copy over PCIe (Mixtral: 352 MB in bf16, ~6 ms at 55 GB/s) even
when the layer routes one token to it. The CPU holds that expert already (the pinned store), and
one token's pass through it reads the same bytes from host DRAM, with no bus in between. So for
a missed expert with few rows, sending the rows to the host, running the expert there and
sending the result back is faster than the copy; with many rows (prefill) the GPU wins.

The choice is per expert and per layer call: compute on the CPU when
    cpu_fixed_s + rows · cpu_per_row_s  <  copy_s
with the three costs measured once when the engine starts (`measure_costs`), on this machine,
with the model's own expert shape and dtype: copy_s = one expert's host→device copy on the
copy stream; the CPU line is fitted through the time of one expert on 1 and on `PROBE_ROWS`
rows, round trip of the rows included (on CUDA: device→host, compute, host→device). On the CPU
(the simulated device of the tests) the same measurement runs, with memcpy as the "copy".

Modes (OffloadConfig.cpu_experts): "off" (always copy), "auto" (the rule above), "always"
(every miss computes on the CPU: the rule's upper bound for benchmarks, and the tests' way to
exercise the path), "split" (the device and the CPU each compute a share of every miss that
would evict: moeflow.infer.offload.split_experts, with the same measured costs). An expert
computed on the CPU is not loaded into the cache (it evicts nothing), and it is never one the
cache already holds: hits always compute on the device.

The CPU runs the plain-torch expert MLP (moeflow.ops.expert_mlp.expert_mlp_reference) on views
of the store's tensors (no copy of the weights), in the model's dtype. Memory-mapped experts
(expert_store="mmap") are read from their mapped pages the same way; only when the checkpoint
stores another dtype than the served one is the expert converted, one expert per call.

Legend: R rows, D model dim.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from moeflow.infer.offload.expert_store import ExpertStore
from moeflow.infer.offload.mapped_store import MappedExpertStore
from moeflow.ops.expert_mlp import expert_mlp_reference

MODES = ("off", "auto", "always", "split")
PROBE_ROWS = 16


@dataclass(frozen=True)
class CpuExpertCosts:
    copy_s: float  # one expert, host -> device
    cpu_fixed_s: float  # one expert on the CPU: rows' round trip and call overhead
    cpu_per_row_s: float  # ... plus this per row

    def cpu_s(self, rows: int) -> float:
        return self.cpu_fixed_s + rows * self.cpu_per_row_s

    @property
    def max_rows(self) -> int:
        """The most rows for which the CPU beats the copy (0: never)."""
        if self.cpu_fixed_s >= self.copy_s:
            return 0
        if self.cpu_per_row_s <= 0:
            return 1 << 30
        return max(0, int((self.copy_s - self.cpu_fixed_s) / self.cpu_per_row_s - 1e-9))


@dataclass(frozen=True)
class CpuExpertStats:
    experts: int  # expert calls computed on the CPU
    rows: int  # rows they computed
    costs: CpuExpertCosts | None  # what the rule used ("auto", "split"), or None


class CpuExperts:
    """Runs experts of the store on the CPU and decides which misses go there."""

    def __init__(self, store: ExpertStore | MappedExpertStore, activation: str, mode: str,
                 costs: CpuExpertCosts | None) -> None:
        if mode not in MODES:
            raise ValueError(f"cpu_experts={mode!r}: must be one of {', '.join(MODES)}")
        if mode in ("auto", "split") and costs is None:
            raise ValueError(f"cpu_experts={mode!r} needs the measured costs")
        self.store, self.activation, self.mode, self.costs = store, activation, mode, costs
        self.experts = self.rows = 0

    def prefers_cpu(self, rows: int) -> bool:
        """For a missed expert with `rows` rows: compute it on the CPU rather than copy it?"""
        if self.mode in ("off", "split"):  # split: moeflow.infer.offload.split_experts
            return False
        return self.mode == "always" or self.costs.cpu_s(rows) < self.costs.copy_s

    def run(self, layer: int, e: int, x_RD: torch.Tensor) -> torch.Tensor:
        """Expert e of `layer` on host rows x_RD; returns the host output rows."""
        w_in_1DI, w_out_1FD, b_in_1I, b_out_1D = (
            None if t is None else t.to(self.store.dtype).unsqueeze(0)
            for t in self.store.expert(layer, e))
        y_RD = expert_mlp_reference(x_RD, torch.tensor([x_RD.shape[0]]), w_in_1DI, b_in_1I,
                                    w_out_1FD, b_out_1D, self.activation, False)
        self.experts += 1
        self.rows += x_RD.shape[0]
        return y_RD

    def stats(self) -> CpuExpertStats:
        return CpuExpertStats(self.experts, self.rows,
                              self.costs if self.mode in ("auto", "split") else None)


def _median_s(fn, sync, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure_costs(store: ExpertStore | MappedExpertStore, activation: str, copy_one,
                  device: torch.device, repeats: int = 5) -> CpuExpertCosts:
    """Time one expert's copy (`copy_one()` issues it on the copy stream) and its CPU compute
    on 1 and PROBE_ROWS rows, the rows' trip from and back to `device` included."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    copy_s = _median_s(copy_one, sync, repeats)
    cpu = CpuExperts(store, activation, "always", None)
    D = store.expert(0, 0)[0].shape[0]
    dtype = store.dtype
    gen = torch.Generator().manual_seed(0)
    at = {}
    for rows in (1, PROBE_ROWS):
        x_RD = torch.randn(rows, D, generator=gen).to(dtype).to(device)
        at[rows] = _median_s(lambda x=x_RD: cpu.run(0, 0, x.to("cpu")).to(device), sync,
                             repeats)
    per_row = max(0.0, (at[PROBE_ROWS] - at[1]) / (PROBE_ROWS - 1))
    return CpuExpertCosts(copy_s=copy_s, cpu_fixed_s=max(0.0, at[1] - per_row),
                          cpu_per_row_s=per_row)
