"""A missed expert computed by the device and the CPU at once, split along d_ff (`cpu_experts=
"split"`).

A miss either copies the whole expert (6.4 ms for Mixtral's 352 MB at 55 GB/s on the H200) or
computes it on the CPU from the pinned store (Fiddler; 10 ms there for one row on 16 cores):
one of the two engines idles while the other works. Both can work on the same expert: the
expert MLP y = act(x W_in) W_out splits exactly along d_ff. The activation is elementwise per
d_ff column (SwiGLU pairs gate column j with up column j, both in the same share), and the down
projection sums over d_ff, so with columns [0, Fg) on the device and [Fg, F) on the CPU,
    y = act(x W_in[:, :Fg]) W_out[:Fg] + act(x W_in[:, Fg:]) W_out[Fg:]      (+ b_out once).
The device gets a transient copy of its share only (w_in's first Fg columns of gate and of up:
one 2D DMA, moeflow.infer.offload.column_copy; w_out's first Fg rows: contiguous) into a
staging buffer outside the cache; the CPU computes its share from views of the store.

Share: with copy_s the whole expert's copy and cpu_s(rows) its CPU time (both measured at
start, moeflow.infer.offload.cpu_experts.measure_costs), the CPU gets the fraction
f = copy_s / (copy_s + cpu_s(rows)) of the columns, so that both finish together after
copy_s · cpu_s / (copy_s + cpu_s): H200, 1 row: 6.44 · 10.0 / 16.44 = 3.9 ms instead of 6.44.
Fg is rounded to a multiple of `align` columns (128 on CUDA: the kernels' tiles and 16-byte
row alignment of the 2D copy); a split that rounds to no column on one side is not a split.

Which misses split (moeflow.infer.offload.offloaded_experts): with a free cache slot a miss is
copied whole into it as usual (the cache fills, later tokens hit); once every slot holds an
expert, a miss is split instead of evicting one. The split expert is not cached: a cached
expert would cost its whole copy, which is what the split avoids. The cache then keeps what
prefill and the first steps left in it; under random routing any fixed set of experts hits as
often as an evicting policy does (slots / experts: 0.21 on the H200 benchmark, the same as
LFU's and cyclic's measured 0.22), and under skewed routing a frequency-aware admission rule
would do better (not done).

Concurrency: the CPU shares of a layer run on a worker thread, started before the main thread
queues anything on the device, so the CPU starts at once while the main thread queues the
device shares (copies back to back on the copy stream, each computed as soon as it lands) and
the hits. torch's CPU kernels release the GIL, so the two threads do not take turns. The copy
into the one staging buffer waits (on the device, never on the host) for the kernel that read
the previous share. The main thread then waits for the worker, sends the CPU partials to the
device from pinned memory without a sync, and adds them to the device partials. Nothing after
the layer can be queued earlier: its combine needs the sum.

Exactness: each half is a matmul over a subset of d_ff, so the sum rounds differently from
the whole expert's matmul (one more rounding of the partial sums; fp32: ~1e-7 relative),
and the CPU's kernels differ from the device's anyway.

Legend: R rows, D model dim, F expert ffn dim, Fg the device's columns, H = 2 for SwiGLU (gate
and up halves of w_in) else 1, I = H·F.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from dataclasses import dataclass

import torch

from moeflow.infer.offload.column_copy import copy_columns
from moeflow.infer.offload.cpu_experts import CpuExpertCosts
from moeflow.infer.offload.expert_store import ExpertStore
from moeflow.infer.offload.streams import to_device_async
from moeflow.ops.activation import apply_activation
from moeflow.ops.backend import Backends, resolve_expert_backend


def host_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of `values` on `device` without a host sync."""
    return to_device_async(torch.tensor(values, dtype=torch.int64), device)


def device_columns(costs: CpuExpertCosts, rows: int, d_ff: int, align: int) -> int:
    """Fg: the columns the device computes, so that its copy and the CPU end together."""
    cpu_share = costs.copy_s / (costs.copy_s + costs.cpu_s(rows))
    return int(round((1.0 - cpu_share) * d_ff / align)) * align


@dataclass(frozen=True)
class SplitStats:
    experts: int  # missed experts split between the device and the CPU
    rows: int  # rows they computed
    cpu_columns: int  # d_ff columns the CPU computed, summed over them
    columns: int  # all their d_ff columns (experts · F)
    bytes_copied: int  # the device shares' host -> device bytes
    two_d_dma: bool  # device shares copied by one cudaMemcpy2DAsync (else a staged torch copy)

    @property
    def cpu_fraction(self) -> float:
        return self.cpu_columns / self.columns if self.columns else 0.0


class SplitExperts:
    """Staging buffer, copy/compute of the device shares, and the CPU worker."""

    def __init__(self, store: ExpertStore, activation: str, costs: CpuExpertCosts,
                 device: torch.device, copy_stream, backends: Backends = Backends()) -> None:
        le = store.layers[0]
        self.store, self.activation, self.costs, self.device = store, activation, costs, device
        self.backends, self.copy_stream = backends, copy_stream
        self.halves = 2 if activation == "swiglu" else 1
        self.d_ff = le.w_out_EFD.shape[1]
        # 128-column tiles on CUDA when F allows two of them, single columns otherwise.
        self.align = 128 if device.type == "cuda" and self.d_ff % 128 == 0 and \
            self.d_ff >= 256 else 1

        def staging(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.empty(t.shape[1:].numel(), dtype=t.dtype,
                                                      device=device)
        # One expert's worth (the budget plan's `staging`), flat: each share views its prefix.
        self.w_in, self.w_out = staging(le.w_in_EDI), staging(le.w_out_EFD)
        self.b_in, self.b_out = staging(le.b_in_EI), staging(le.b_out_ED)
        if device.type == "cuda":
            self.ready, self.free = torch.cuda.Event(), torch.cuda.Event()
        self.worker = concurrent.futures.ThreadPoolExecutor(1, "moeflow-split-cpu")
        self.experts = self.rows = self.cpu_columns = self.columns = self.bytes_copied = 0

    def columns_for(self, rows: int) -> int:
        """Fg for a miss with `rows` rows; 0 or F: no split (one side would get nothing)."""
        return device_columns(self.costs, rows, self.d_ff, self.align)

    # -- the CPU side (worker thread) -------------------------------------------------------

    def start_cpu(self, layer: int, jobs: list[tuple[int, int, torch.Tensor]]
                  ) -> concurrent.futures.Future:
        """Run the CPU shares of (expert, Fg, host rows x_RD) on the worker; the future's
        result: their outputs, in order."""
        return self.worker.submit(self._cpu_shares, layer, jobs)

    @torch.no_grad()
    def _cpu_shares(self, layer: int, jobs: list[tuple[int, int, torch.Tensor]]
                    ) -> list[torch.Tensor]:
        le, H, F = self.store.layers[layer], self.halves, self.d_ff
        out = []
        for e, Fg, x_RD in jobs:
            w_in_DHF = le.w_in_EDI[e].view(-1, H, F)  # views of the pinned store: no copy
            h_RI = torch.cat([x_RD @ w_in_DHF[:, k, Fg:] for k in range(H)], dim=-1)
            if le.b_in_EI is not None:
                h_RI = h_RI + le.b_in_EI[e].view(H, F)[:, Fg:].reshape(-1)
            out.append(apply_activation(h_RI, self.activation) @ le.w_out_EFD[e][Fg:])
        return out

    # -- the device side (main thread) ------------------------------------------------------

    def device_share(self, layer: int, e: int, Fg: int, x_RD: torch.Tensor) -> torch.Tensor:
        """Queue the copy of expert e's first Fg columns and their compute on x_RD (device
        rows); returns the partial output rows, b_out included. Never blocks the host."""
        le, H, F, D = self.store.layers[layer], self.halves, self.d_ff, x_RD.shape[1]
        w_in_1DI = self.w_in[:D * H * Fg].view(1, D, H * Fg)
        w_out_1FD = self.w_out[:Fg * D].view(1, Fg, D)
        b_in_1I = None if self.b_in is None else self.b_in[:H * Fg].view(1, H * Fg)
        b_out_1D = None if self.b_out is None else self.b_out.view(1, D)
        cuda = self.device.type == "cuda"
        if cuda:  # the last share's kernel must have read the staging buffer
            self.copy_stream.wait_event(self.free)
        with torch.cuda.stream(self.copy_stream) if cuda else contextlib.nullcontext():
            copy_columns(w_in_1DI.view(D * H, Fg), le.w_in_EDI[e].view(D * H, F),
                         self.copy_stream)
            w_out_1FD[0].copy_(le.w_out_EFD[e][:Fg], non_blocking=True)
            if b_in_1I is not None:
                copy_columns(b_in_1I.view(H, Fg), le.b_in_EI[e].view(H, F), self.copy_stream)
            if b_out_1D is not None:
                b_out_1D[0].copy_(le.b_out_ED[e], non_blocking=True)
        if cuda:
            self.ready.record(self.copy_stream)
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        ends_1 = host_to_device([x_RD.shape[0]], self.device)
        fn = resolve_expert_backend(self.backends.experts, x_RD, w_in_1DI, w_out_1FD)
        y_RD = fn(x_RD, ends_1, w_in_1DI, b_in_1I, w_out_1FD, b_out_1D, self.activation, False)
        if cuda:
            self.free.record(torch.cuda.current_stream(self.device))
        self.experts += 1
        self.bytes_copied += sum(t.numel() * t.element_size() for t in
                                 (w_in_1DI, w_out_1FD, b_in_1I, b_out_1D) if t is not None)
        self.rows += x_RD.shape[0]
        self.cpu_columns += F - Fg
        self.columns += F
        return y_RD

    def stats(self, two_d_dma: bool) -> SplitStats:
        return SplitStats(self.experts, self.rows, self.cpu_columns, self.columns,
                          self.bytes_copied, two_d_dma)

