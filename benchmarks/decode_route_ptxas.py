"""Compile the fused-logits decode router (moeflow.ops.decode_route_fused_triton's
_decode_route_logits_kernel) for sm_90 without a GPU and print ptxas's registers and spills at
the tiles route_decode_fused picks, plus the ticket's atomic as emitted. CPU only:

    PYTHONPATH=. python benchmarks/decode_route_ptxas.py
"""
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moeflow.config import RouterConfig
from moeflow.ops import decode_route_fused_triton as m
from moeflow.ops.decode_route_triton import route_args

def compile_case(T, D, E, cfg, gate_dtype="bf16", x_dtype="bf16", capacity=None,
                 prenorm=False):
    gate_bytes = 2 if gate_dtype == "bf16" else 4
    scalars, meta = route_args(cfg, T, E, False, capacity)
    nw = m.route_warps(T, D, E, gate_bytes, whole_rows=prenorm)
    lt, le, ld = m.logits_tiles(T, D, E, gate_bytes, nw)
    names = ["x_ptr", "gate_ptr", "logits_ptr", "ticket_ptr", "part_ptr", "bias_ptr", "ids_ptr",
             "w_ptr", "kept_ptr", "slots_ptr", "counts_ptr", "ends_ptr", "row_ptr", "token_ptr",
             "dropped_ptr", "loss_ptr", "res_ptr", "h_ptr", "nw_ptr", "s_ptr", "eps", "T", "D",
             "E", "routed_scaling", "aux_coef", "z_coef", "capacity"]
    types = ["*" + x_dtype, "*" + gate_dtype, "*fp32", "*i32", "*fp32", "*fp32", "*i64",
             "*fp32", "*i8", "*i64", "*i64", "*i64", "*i64", "*i64", "*i64", "*fp32",
             "*" + x_dtype, "*" + x_dtype, "*" + x_dtype, "*" + x_dtype, "fp32", "i32",
             "i32", "i32", "fp32", "fp32", "fp32", "i32"]
    sig = dict(zip(names, types))
    blocks = -(-T // lt)
    consts = dict(meta, LT=lt, LE=le, LD=ld, SPLIT_PASS1=blocks > 1,
                  PART_BLOCKS=triton.next_power_of_2(blocks), ONE_CHUNK=ld >= D,
                  PLACE=capacity is not None, PRENORM=prenorm and ld >= D, PDL=True)
    for k in consts:
        sig[k] = "constexpr"
    # As a launch specialises them: pointers and the multiples of 16 among D and E 16-aligned.
    aligned = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(zip(names, types))
               if t.startswith("*") or (n in ("D", "E") and {"D": D, "E": E}[n] % 16 == 0)}
    src = ASTSource(fn=m._decode_route_logits_kernel, signature=sig,
                    constexprs={(list(sig).index(k),): v for k, v in consts.items()},
                    attrs=aligned)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    r = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", "/dev/null"],
                       capture_output=True, text=True)
    info = [line.strip() for line in r.stderr.splitlines()
            if "registers" in line or "spill" in line]
    print(f"T {T} D {D} E {E} K {cfg.top_k} capacity {capacity} {x_dtype}/{gate_dtype} "
          f"tiles (LT, LE, LD) "
          f"{(lt, le, ld)}{' with the add + norm' if consts['PRENORM'] else ''}: "
          + " | ".join(info), flush=True)
    return ptx

q = RouterConfig(top_k=8, normalize_topk=True, dropless=True)


def main() -> None:
    qwen3 = RouterConfig(top_k=8, normalize_topk=True, dropless=True)
    ptx = compile_case(1, 2048, 128, qwen3)
    print("ticket:", [line.strip() for line in ptx.splitlines() if "atom" in line])
    for T in (1, 2, 4, 8, 16):  # as served: the add + norm ahead computed in the kernel
        compile_case(T, 2048, 128, qwen3, prenorm=True)
    compile_case(2, 2048, 128, qwen3)
    compile_case(4, 2048, 128, qwen3)
    compile_case(8, 2048, 128, qwen3)
    compile_case(16, 2048, 128, qwen3)
    compile_case(16, 7168, 256, RouterConfig(top_k=8, score_func="sigmoid", normalize_topk=True,
                                             num_groups=8, topk_groups=4, dropless=True))
    compile_case(16, 2048, 128, RouterConfig(top_k=2), capacity=8)
    compile_case(64, 2048, 128, qwen3)
    compile_case(1, 4096, 8, RouterConfig(top_k=2, normalize_topk=True, dropless=True))
    compile_case(1, 7168, 256, RouterConfig(top_k=8, score_func="sigmoid", normalize_topk=True,
                                            num_groups=8, topk_groups=4, dropless=True))
    compile_case(1, 2048, 128, qwen3, "fp32", "fp32")
    # DeepSpeed-MoE's ds-1.3b+moe128 (top-1) and top-2 with a capacity: the third pass.
    compile_case(1, 2048, 128, RouterConfig(top_k=1), capacity=4)
    compile_case(8, 2048, 128, RouterConfig(top_k=1), capacity=4)
    compile_case(8, 2048, 128, RouterConfig(top_k=2), capacity=4)


if __name__ == "__main__":
    main()
