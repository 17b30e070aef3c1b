"""Which persistent grouped-GEMM loops Triton warp-specialises on sm_90, compiled on the CPU.

    python benchmarks/ws_compile_probe.py      # no GPU needed (ptxas from Triton's wheel)

Why (session 47): moeflow.ops.persistent_mlp_triton asks for `tl.range(warp_specialize=True)`
on sm_90, yet Triton 3.6 compiles its kernels to the same PTX with or without it. This probe
compiles a down-projection tile loop two ways and prints, per launch config, whether the TTGIR
holds a `ttg.warp_specialize` op, the PTX's setmaxnreg (producer and consumer register
budgets) and its threads per block:

- `tile_list`: the product's down kernel (moeflow.ops.persistent_mlp_triton._down_kernel: per
  tile, reductions over the per-expert vectors of tiled_mlp_triton.tile_list / list_tile inside
  the loop);
- `tile_table`: the same tile's work, its (expert, first row, row end, first column) loaded
  from a table in global memory, nothing with a region of its own inside the loop (not in the
  product: a probe of its own below).

Printed on 2026-12-06 (Triton 3.6): with 8 warps neither is specialised (Hopper's pass leaves
8-warp loops alone); with 4 warps the `tile_list` loop fails Triton's pass (on stderr: "Other
parent ops are not supported", from its TaskIdPropagation) and the `tile_table` loop is
specialised: 384 threads (three warpgroups), setmaxnreg 256 / 40 / 120 / 232 among its
partitions, at 128 x 128 (3 or 4 stages) and 128 x 256 (3) tiles; 64 x 256 fails.
"""
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moeflow.ops import persistent_mlp_triton as pm


@triton.jit
def _down_tile_table(h_desc, table_ptr, total_ptr, w_desc, y_ptr, D, F,
                     NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    total = tl.load(total_ptr)
    for t in tl.range(tl.program_id(0), total, NUM_PROGRAMS, warp_specialize=True):
        e = tl.load(table_ptr + 4 * t)
        m0 = tl.load(table_ptr + 4 * t + 1)
        hi = tl.load(table_ptr + 4 * t + 2)
        n0 = tl.load(table_ptr + 4 * t + 3)
        _tile(h_desc, w_desc, y_ptr, D, F, e, m0, hi, n0, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _tile(h_desc, w_desc, y_ptr, D, F, e, m0, hi, n0, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, F, BLOCK_K):
        acc = tl.dot(h_desc.load([m0, k0]), w_desc.load([e * F + k0, n0]), acc)
    rows = m0 + tl.arange(0, BLOCK_M)
    n = n0 + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * D + n[None, :], acc.to(tl.bfloat16),
             mask=(rows < hi)[:, None] & (n < D)[None, :])


def _compile(fn, signature: dict, constexprs: dict, warps: int, stages: int):
    names = fn.arg_names
    sig = {n: signature.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n, kind in signature.items() if kind.startswith("*") or kind == "i32"}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def main() -> None:
    for loop, fn in (("tile_list", pm._down_kernel), ("tile_table", _down_tile_table)):
        for bm, bn, warps, stages in ((128, 256, 8, 4), (128, 128, 4, 3), (128, 128, 4, 4),
                                      (128, 256, 4, 3), (64, 256, 4, 3)):
            sig = {"h_desc": f"tensordesc<bf16[{bm}, 64]>",
                   "w_desc": f"tensordesc<bf16[64, {bn}]>", "y_ptr": "*bf16", "D": "i32",
                   "F": "i32"}
            sig.update({"ends_ptr": "*i64", "E": "i32", "b_ptr": "*bf16",
                        "y_desc": f"tensordesc<bf16[{bm}, {bn}]>"} if loop == "tile_list" else
                       {"table_ptr": "*i32", "total_ptr": "*i32"})
            consts = {"NUM_PROGRAMS": 132, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64,
                      **({"BLOCK_E": 128, "HAS_BIAS": False, "WS": True, "STORE_SPLIT": 0}
                         if loop == "tile_list" else {})}
            label = f"{loop:10s} {bm}x{bn} warps {warps} stages {stages}:"
            try:
                k = _compile(fn, sig, consts, warps, stages)
            except Exception as exc:  # noqa: BLE001  (a loop the pass rejects is the result)
                print(label, "does not compile:", str(exc).splitlines()[-1][:80], flush=True)
                continue
            ptx = k.asm["ptx"]
            print(label, "specialised" if "ttg.warp_specialize" in k.asm["ttgir"] else
                  "not specialised", "| setmaxnreg", re.findall(r"setmaxnreg\.\w+\.sync\.aligned"
                                                                 r"\.u32\s+(\d+)", ptx),
                  "| threads", re.findall(r"reqntid (\d+)", ptx),
                  "| shared", k.metadata.shared, flush=True)


if __name__ == "__main__":
    main()
