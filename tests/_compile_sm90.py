"""Compile cases for tests/test_kernels_compile_sm90.py, run in a process without
TRITON_INTERPRET (under the interpreter, @triton.jit gives interpreted functions, which do not
compile):

    python -m tests._compile_sm90 CASE [CASE ...]

exits 0 when every case compiled for sm_90 through ptxas, 3 when this Triton has no ptxas."""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moeflow.config import RouterConfig
from moeflow.infer import token_ring
from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops import (argmax_triton, cross_entropy_triton, decode_attention_triton,
                         decode_route_fused_triton, decode_route_triton, expert_bias_triton,
                         fp8_quantize_triton, grouped_mlp_triton, norm_triton, nucleus_triton,
                         permute_triton, persistent_mlp_triton, qk_rope_triton,
                         routing_choice_triton,
                         routing_grad_triton, routing_slots_triton, routing_triton,
                         sample_triton, skinny_linear_triton, slot_write_triton,
                         tiled_mlp_triton, top_k_triton)

NO_PTXAS = 3
SM90_SHARED_BYTES = 232448  # the most shared memory one block may use on sm_90 (227 KB)


def compile_sm90(fn, signature: dict[str, str], constexprs: dict, num_warps: int = 4,
                 num_stages: int = 3):
    """triton.compile of the jit function `fn` for sm_90: `signature` maps the runtime
    arguments to Triton types ("*bf16", "i32", "fp32"...); `constexprs` the rest, with the
    unit strides of contiguous tensors among them as 1 (a launch specializes an integer equal
    to 1 as that constant).

    Every other pointer and i32 argument is compiled as a multiple of 16, the variant the
    models' launches run: Triton specializes on 16-byte aligned tensors and sizes or strides
    divisible by 16, and only that variant gets vectorised loads and the software pipeliner
    (loads staged through shared memory by cp.async; the tiled up kernel's 128 x 128 tiles use
    32 KB of shared memory unaligned and 144 KB aligned). The kernel must fit sm_90's shared
    memory, else the launch fails on the GPU (checked at the launch's `num_stages`: each
    stage of the pipeline holds its own tiles)."""
    names = fn.arg_names
    missing = set(names) - set(signature) - set(constexprs)
    assert not missing, f"{fn.__name__}: no type or value for {sorted(missing)}"
    sig = {n: signature.get(n, "constexpr") for n in names}
    aligned = {(names.index(n),): [["tt.divisibility", 16]]
               for n, kind in signature.items() if kind.startswith("*") or kind == "i32"}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=aligned)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    assert kernel.metadata.shared <= SM90_SHARED_BYTES, (
        f"{fn.__name__}: {kernel.metadata.shared} bytes of shared memory, over sm_90's "
        f"{SM90_SHARED_BYTES}")
    if constexprs.get("PDL"):
        _check_waits_first(fn, kernel.asm["ptx"])
    return kernel


def _check_waits_first(fn, ptx: str) -> None:
    """A kernel launched with programmatic dependent launch may start while the kernel ahead
    still runs: it must not touch global memory before griddepcontrol.wait (moeflow.ops.pdl).
    An L2 prefetch (moeflow.ops.pdl.prefetch_l2: cp.async.bulk.prefetch) may come first: it
    reads nothing into the kernel."""
    body = "\n".join(line for line in ptx[ptx.index(".entry"):].splitlines()
                     if "cp.async.bulk.prefetch" not in line)
    wait = body.find("griddepcontrol.wait")
    first = min((i for i in (body.find(op) for op in ("ld.global", "st.global", "atom.global",
                                                     "red.global", "cp.async"))
                 if i >= 0), default=len(body))
    assert 0 <= wait < first, f"{fn.__name__}: global memory accessed before griddepcontrol.wait"


def _args(names: str, kind: str) -> dict[str, str]:
    return {n: kind for n in names.split()}


def fp8_quantize():
    m = fp8_quantize_triton
    for is_bf16 in (True, False):
        bits = "*i16" if is_bf16 else "*i32"
        compile_sm90(m._chunk_amax_kernel,
                     {"t_ptr": bits, "partial_ptr": "*i32", **_args("R C chunk stride_r", "i32")},
                     {"stride_c": 1, "IS_BF16": is_bf16, "BLOCK_R": 16, "BLOCK_C": 128})
        for block_s in (1, 4):
            compile_sm90(m._quantize_kernel,
                         {"t_ptr": bits, "partial_ptr": "*i32", "q_ptr": "*u8",
                          "inverse_ptr": "*fp32",
                          **_args("R C chunk splits stride_r", "i32")},
                         {"stride_c": 1, "IS_BF16": is_bf16, "BLOCK_R": 16, "BLOCK_C": 128,
                          "BLOCK_S": block_s})


def stream_experts():
    m = grouped_mlp_triton
    blocks = {"BLOCK_E": 128, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}
    for swiglu, gather in ((True, True), (False, False)):
        compile_sm90(m._up_kernel.fn,
                     {"x_ptr": "*bf16", "token_ptr": "*i64", "ends_ptr": "*i64",
                      "w_ptr": "*bf16", "b_ptr": "*bf16", "h_ptr": "*bf16",
                      **_args("D F E M_BUCKET A_BUCKET", "i32")},
                     {"SWIGLU": swiglu, "HAS_BIAS": not swiglu, "GATHER": gather, **blocks,
                      "PDL": True})
        compile_sm90(m._down_kernel.fn,
                     {"h_ptr": "*bf16", "ends_ptr": "*i64", "w_ptr": "*bf16", "b_ptr": "*bf16",
                      "y_ptr": "*bf16", **_args("D F E M_BUCKET A_BUCKET", "i32")},
                     {"HAS_BIAS": not swiglu, **blocks, "PDL": True}, num_warps=8)
        # Both in one launch, with the wait on the counts; gathering, also placing the rows,
        # with and without w_out rows loaded before the wait: the batch-1 config as launched
        # (FEW_ACTIVE_CONFIG, its stages included; in fp32 it would not fit, which is why
        # only half-precision weights take it).
        few = {k: v for k, v in m.FEW_ACTIVE_CONFIG.items() if k.startswith("num_")}
        for place, pre_k in ((False, 0), (True, 0), (True, 256)) if gather else ((False, 0),):
            launch = few if pre_k else {}
            compile_sm90(m._moe_stream_kernel.fn,
                         {"x_ptr": "*bf16", "token_ptr": "*i64", "ends_ptr": "*i64",
                          "w_in_ptr": "*bf16", "b_in_ptr": "*bf16", "h_ptr": "*bf16",
                          "w_out_ptr": "*bf16", "b_out_ptr": "*bf16", "y_ptr": "*bf16",
                          "count_ptr": "*i32", **_args("ids_ptr slots_ptr row_ptr", "*i64"),
                          **_args("T K D F E ACTIVE M_BUCKET A_BUCKET", "i32")},
                         {"SWIGLU": swiglu, "HAS_IN_BIAS": not swiglu,
                          "HAS_OUT_BIAS": not swiglu, "GATHER": gather, "PLACE": place,
                          "BLOCK_E": 128, "BLOCK_M": 16, "BLOCK_C": 8, "UP_N": 64, "UP_K": 64,
                          "DOWN_N": 128, "DOWN_K": 64, "PRE_K": pre_k, "PDL": True},
                         **launch)


def tiled_experts():
    """The largest tiles of the tiled kernels' configs (SwiGLU's two accumulators: 128x128)."""
    m = tiled_mlp_triton
    blocks = {"BLOCK_E": 128, "BLOCK_M": 128, "BLOCK_K": 64}
    compile_sm90(m._up_tiled_kernel.fn,
                 {"x_ptr": "*bf16", "token_ptr": "*i64", "ends_ptr": "*i64", "w_ptr": "*bf16",
                  "b_ptr": "*bf16", "h_ptr": "*bf16",
                  **_args("D F E M_BUCKET A_BUCKET", "i32")},
                 {"SWIGLU": True, "HAS_BIAS": False, "GATHER": True, "BLOCK_N": 128, **blocks,
                  "PDL": True},
                 num_warps=8)
    compile_sm90(m._down_tiled_kernel.fn,
                 {"h_ptr": "*bf16", "ends_ptr": "*i64", "w_ptr": "*bf16", "b_ptr": "*bf16",
                  "y_ptr": "*bf16", **_args("D F E M_BUCKET A_BUCKET", "i32")},
                 {"HAS_BIAS": True, "BLOCK_N": 256, **blocks, "PDL": True}, num_warps=8)


def _store_desc(blocks: dict) -> str:
    """The persistent kernels' output descriptor type for a config (its STORE_SPLIT pieces)."""
    split = blocks.get("STORE_SPLIT", 0) or 1
    return f"tensordesc<bf16[{blocks['BLOCK_M']}, {blocks['BLOCK_N'] // split}]>"


def persistent_experts():
    """The persistent expert kernels at every launch config _configs picks on sm_90 (warp
    specialised): the up kernel's short-row SwiGLU and GELU tiles, the down kernel's for short
    sums (its loops flattened) and long ones, and above LONG_EXPERT_ROWS both storing whole
    tiles through TMA; weights (and the down kernel's h) as TMA descriptors."""
    m = persistent_mlp_triton
    rows_f = ((256, 768, True), (256, 768, False), (1024, 768, True), (1024, 768, False),
              (256, 14336, True))
    for rows_per_expert, F, swiglu in rows_f:
        up, up_launch, down, down_launch = m._configs(True, F, rows_per_expert, swiglu)
        compile_sm90(m._up_kernel,
                     {"x_ptr": "*bf16", "token_ptr": "*i64", "ends_ptr": "*i64",
                      "w_desc": f"tensordesc<bf16[{up['BLOCK_K']}, {up['BLOCK_N']}]>",
                      "b_ptr": "*bf16", "h_ptr": "*bf16", "h_desc": _store_desc(up),
                      **_args("D F E", "i32")},
                     {"SWIGLU": swiglu, "HAS_BIAS": not swiglu, "GATHER": True, "BLOCK_E": 128,
                      "NUM_PROGRAMS": 132, "STORE_SPLIT": 0, **up, "WS": True}, **up_launch)
        compile_sm90(m._down_kernel,
                     {"h_desc": f"tensordesc<bf16[{down['BLOCK_M']}, {down['BLOCK_K']}]>",
                      "ends_ptr": "*i64",
                      "w_desc": f"tensordesc<bf16[{down['BLOCK_K']}, {down['BLOCK_N']}]>",
                      "b_ptr": "*bf16", "y_ptr": "*bf16", "y_desc": _store_desc(down),
                      **_args("D F E", "i32")},
                     {"HAS_BIAS": not swiglu, "BLOCK_E": 128, "NUM_PROGRAMS": 132,
                      "STORE_SPLIT": 0, "FLATTEN": False, **down, "WS": True}, **down_launch)


def qk_norm_rope():
    """The launcher's default tiles, with and without the KV-cache slot write, and one token
    per program, interleaved."""
    m = qk_rope_triton
    strides = "q_sb q_sh q_st"
    default = (m.BLOCK_T, m.BLOCK_H, m.NUM_WARPS)
    for interleave, write_kv, (block_t, block_h, warps) in ((False, False, default),
                                                            (False, True, default),
                                                            (True, False, (1, 4, 2))):
        compile_sm90(m._qk_norm_rope_kernel,
                     {"q_ptr": "*bf16", **_args(strides, "i32"),
                      "k_ptr": "*bf16", **_args(strides.replace("q_", "k_"), "i32"),
                      "qo_ptr": "*bf16", **_args(strides.replace("q_", "qo_"), "i32"),
                      "ko_ptr": "*bf16", **_args(strides.replace("q_", "ko_"), "i32"),
                      **_args("qw_ptr kw_ptr cos_ptr sin_ptr", "*bf16"),
                      **_args("c_b c_t H G T", "i32"), "eps": "fp32", "v_ptr": "*bf16",
                      **_args("v_sh v_st", "i32"), **_args("kc_ptr vc_ptr", "*bf16"),
                      "slot_ptr": "*i64", "M": "i32"},
                     {"HD": 128, "HALF": 64, "HAS_NORM": True, "HAS_ROPE": True,
                      "INTERLEAVE": interleave, "WRITE_KV": write_kv, "BLOCK_T": block_t,
                      "BLOCK_HQ": block_h, "BLOCK_HK": min(block_h, 4), "BLOCK_D": 64},
                     num_warps=warps)


def fused_decode_router():
    """Both decode routers: Qwen3-30B-A3B's dropless top-8 (with the add + norm ahead of it),
    and DeepSpeed-MoE's top-1 (ds-1.3b+moe128) and top-2 with a capacity (the third pass)."""
    m, fused = decode_route_triton, decode_route_fused_triton
    outputs = {"ids_ptr": "*i64", "w_ptr": "*fp32", "kept_ptr": "*i8",
               **_args("slots_ptr counts_ptr ends_ptr row_ptr token_ptr dropped_ptr", "*i64"),
               "loss_ptr": "*fp32"}
    scalars = {**_args("routed_scaling aux_coef z_coef", "fp32"), "capacity": "i32"}
    qwen3 = RouterConfig(top_k=8, normalize_topk=True, dropless=True)
    for T, D, E, cfg, capacity in ((1, 2048, 128, qwen3, None), (16, 2048, 128, qwen3, None),
                                   (8, 2048, 128, RouterConfig(top_k=1), 4),
                                   (8, 2048, 128, RouterConfig(top_k=2), 4)):
        # dropless (the served decode): the experts place the rows and the add + norm ahead
        # runs in the kernel (route_warps' whole_rows)
        prenorm = capacity is None
        _, meta = m.route_args(cfg, T, E, False, capacity)
        warps = fused.route_warps(T, D, E, whole_rows=prenorm)
        lt, le, ld = fused.logits_tiles(T, D, E, 2, warps)
        compile_sm90(fused._decode_route_logits_kernel,
                     {"x_ptr": "*bf16", "gate_ptr": "*bf16", "logits_ptr": "*fp32",
                      "ticket_ptr": "*i32", "part_ptr": "*fp32", "bias_ptr": "*fp32",
                      **outputs, **_args("res_ptr h_ptr nw_ptr s_ptr", "*bf16"),
                      "eps": "fp32", **_args("T D E", "i32"), **scalars},
                     dict(meta, LT=lt, LE=le, LD=ld, SPLIT_PASS1=T > lt,
                          PART_BLOCKS=triton.next_power_of_2(-(-T // lt)), ONE_CHUNK=ld >= D,
                          PLACE=not prenorm, PRENORM=prenorm and ld >= D, PDL=True),
                     num_warps=warps)
        compile_sm90(m._decode_route_kernel,
                     {"logits_ptr": "*fp32", "bias_ptr": "*fp32", **outputs,
                      **_args("T E", "i32"), **scalars}, dict(meta, PDL=True),
                     num_warps=m.ONE_PROGRAM_WARPS)
        assert not prenorm or ld >= D, "the served decode router splits D: no norm inside"


def dropless_router():
    """The fused router's dropless path at a Qwen3-30B-A3B prefill (2048 tokens, top-8 of 128:
    blocks of 8 tokens) and DeepSpeed's top-2 (first-choice balance)."""
    m = routing_triton
    for K, first_choice in ((8, False), (2, True)):
        compile_sm90(m._topk_kernel,
                     {**_args("logits_ptr noise_ptr bias_ptr", "*fp32"), "ids_ptr": "*i64",
                      **_args("w_ptr lse_ptr psum_ptr", "*fp32"), "hist_ptr": "*i32",
                      **_args("T E NB", "i32"), "routed_scaling": "fp32"},
                     {"K": K, "SOFTMAX": True, "SEL": routing_choice_triton.SEL_SCORES,
                      "HAS_NOISE": False, "HIST": True, "HAS_BIAS": False, "NORMALIZE": True,
                      "GROUPS": 1, "TOPK_GROUPS": 1, "GROUP_TOP2": True, "BLOCK_T": 8,
                      "BLOCK_E": 128, "BLOCK_G": 1, "BLOCK_K": K})
        compile_sm90(routing_slots_triton._dropless_scan_kernel,
                     {**_args("hist_ptr offsets_ptr totals_ptr", "*i32"),
                      **_args("psum_ptr lse_ptr pe_part_ptr z_part_ptr", "*fp32"),
                      **_args("T E NB", "i32")},
                     {"K": K, "BLOCK_R": 256, "BLOCK_C": 32, "BLOCK_Z": 256},
                     num_warps=m.scan_warps(256, 32))
        plan = compile_sm90(routing_slots_triton._dropless_plan_kernel,
                     {"ids_ptr": "*i64", **_args("hist_ptr offsets_ptr totals_ptr", "*i32"),
                      **_args("pe_part_ptr z_part_ptr", "*fp32"), "slots_ptr": "*i64",
                      "kept_ptr": "*i8",
                      **_args("row_ptr token_ptr ends_ptr counts_ptr balance_ptr dropped_ptr",
                              "*i64"),
                      "loss_ptr": "*fp32", **_args("T E NB NQ", "i32"),
                      **_args("aux_coef z_coef", "fp32")},
                     {"K": K, "FIRST_CHOICE_BALANCE": first_choice, "BLOCK_T": 8,
                      "BLOCK_E": 128, "BLOCK_K": K, "BLOCK_Q": 32})
        # It loads back what it stored (after a barrier): never through the read-only cache.
        assert "ld.global.nc" not in plan.asm["ptx"], "plan kernel: non-coherent loads"


def training_route_dispatch():
    """What a training step runs around the experts: the fused router's backward with and
    without the losses' gradient (LOSS_GRAD), the dispatch with and without dropped rows
    (their ranks from the kept flags' running count), and the combine's backward; Qwen3-30B-A3B
    sizes, bf16 rows."""
    for softmax, loss_grad in ((True, True), (True, False), (False, True)):
        compile_sm90(routing_grad_triton._route_bwd_kernel,
                     {"logits_ptr": "*fp32", "ids_ptr": "*i64", "kept_ptr": "*i8",
                      **_args("gw_ptr gloss_ptr", "*fp32"), "balance_ptr": "*i64",
                      "dlogits_ptr": "*fp32", **_args("T E", "i32"),
                      **_args("routed_scaling aux_coef z_coef", "fp32")},
                     {"K": 8, "SOFTMAX": softmax, "NORMALIZE": True, "LOSS_GRAD": loss_grad,
                      "BLOCK_T": 8, "BLOCK_E": 128})
    for has_drops in (True, False):
        compile_sm90(permute_triton._dispatch_kernel,
                     {"x_ptr": "*bf16", **_args("ids_ptr slots_ptr", "*i64"), "kept_ptr": "*i8",
                      **_args("counts_ptr kept_cum_ptr row_ptr token_ptr ends_ptr", "*i64"),
                      "out_ptr": "*bf16", **_args("N E D", "i32")},
                     {"K": 8, "HAS_DROPS": has_drops, "GATHER": True, "BLOCK_A": 16,
                      "BLOCK_E": 128, "BLOCK_D": 256})
    compile_sm90(permute_triton._combine_bwd_kernel,
                 {**_args("g_ptr y_ptr", "*bf16"), "row_ptr": "*i64", "kept_ptr": "*i8",
                  "w_ptr": "*fp32", "gy_ptr": "*bf16", "gw_ptr": "*fp32", **_args("T D", "i32")},
                 {"K": 8, "BLOCK_T": 4, "BLOCK_D": 512})


def skinny_linear():
    """The MMA kernel at linear_config's tiles and stages (the qkv projection's swapped ones,
    the output projection's), and the one-row GEMV at gemv_config's (one stage, as launched)."""
    for has_bias, (N, K) in ((True, (2048, 4096)), (False, (5120, 2048))):
        config = skinny_linear_triton.linear_config(N, K)
        compile_sm90(skinny_linear_triton._linear_kernel,
                     {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16",
                      **_args("M N K stride_xm stride_wn", "i32")},
                     {"stride_xk": 1, "stride_wk": 1,
                      "HAS_BIAS": has_bias, "DOT_PRECISION": "tf32", "BLOCK_M": 16,
                      "BLOCK_N": config["BLOCK_N"], "BLOCK_K": config["BLOCK_K"],
                      "SWAP": config["SWAP"], "PREFETCH_ROWS": N // 128, "PDL": True},
                     num_warps=config["num_warps"], num_stages=config["num_stages"])
        # The one-row GEMV at the Qwen3-30B-A3B projections' configs (gemv_config): output, qkv.
        for N, K in ((2048, 4096), (5120, 2048)):
            config = skinny_linear_triton.gemv_config(N, K)
            compile_sm90(skinny_linear_triton._gemv_kernel,
                         {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16",
                          "N": "i32", "stride_wn": "i32"},
                         {"stride_xk": 1, "stride_wk": 1, "K": K, "HAS_BIAS": has_bias,
                          "BLOCK_N": config["BLOCK_N"], "BLOCK_K": config["BLOCK_K"],
                          "PREFETCH_ROWS": N // 128,
                          "PDL": True},
                         num_warps=config["num_warps"], num_stages=1)


def slot_write():
    compile_sm90(slot_write_triton._slot_write_kernel,
                 {**_args("k_ptr v_ptr kc_ptr vc_ptr", "*bf16"), "slot_ptr": "*i64",
                  **_args("T G M sk_g sk_t sv_g sv_t", "i32")},
                 {"DK": 128, "DV": 128, "BLOCK_T": 32, "BLOCK_DK": 128, "BLOCK_DV": 128})


def rms_norm():
    """The norm kernel plain, with a residual, and with a MoE combine of 8 rows as the
    residual (the decode layer's add + norm with the combine folded in)."""
    for residual, combine_k in ((False, 0), (True, 0), (True, 8)):
        compile_sm90(norm_triton._rms_norm_kernel,
                     {**_args("x_ptr h_ptr w_ptr s_ptr y_ptr", "*bf16"), "row_ptr": "*i64",
                      "kept_ptr": "*i8", "cw_ptr": "*fp32", "D": "i32", "eps": "fp32"},
                     {"HAS_RESIDUAL": residual, "COMBINE_K": combine_k, "BLOCK": 2048,
                      "PREFETCH": True, "PDL": True},
                     num_warps=8)


def decode_attention():
    """The split kernel as Qwen3-30B-A3B decodes (8 queries per kv head, heads of 128, bf16),
    with raw q/k prepared in the kernel (norm + RoPE, each alone) and without, the splits
    merged by the last split (with raw q/k) and by the merge kernel (and that kernel); one
    split in four value slices (64-key blocks, and one 128-key block in four or two slices: the
    batch-1 rule up to 128 keys) and split ones merged."""
    for norm, rope, merge, single, block_dv, block_n in (
            (True, True, True, False, 128, 64), (True, False, False, False, 128, 64),
            (False, True, False, False, 128, 64), (False, False, False, False, 128, 64),
            (True, True, False, True, 32, 64), (True, True, True, False, 32, 64),
            (True, True, False, True, 32, 128), (True, True, False, True, 64, 128)):
        split = compile_sm90(decode_attention_triton._split_kernel,
                             {"q_ptr": "*bf16", **_args("sq_b sq_h", "i32"),
                              "kn_ptr": "*bf16", **_args("skn_b skn_g", "i32"),
                              "vn_ptr": "*bf16", **_args("svn_b svn_g", "i32"),
                              "kc_ptr": "*bf16", **_args("skc_n skc_g skc_m", "i32"),
                              "vc_ptr": "*bf16", **_args("svc_n svc_g svc_m", "i32"),
                              "len_ptr": "*i64", **_args("m_ptr l_ptr acc_ptr", "*fp32"),
                              "out_ptr": "*bf16", **_args("so_b so_h", "i32"),
                              **_args("qw_ptr kw_ptr cos_ptr sin_ptr", "*bf16"), "c_b": "i32",
                              "eps": "fp32", "tickets_ptr": "*i32",
                              **_args("G P CHUNK kv_len", "i32"),
                              "scale_log2": "fp32"},
                             {"Q": 8, "DK": 128, "DV": 128, "BLOCK_Q": 16, "BLOCK_N": block_n,
                              "BLOCK_DK": 128, "BLOCK_DV": block_dv, "SINGLE": single,
                              "PRECISION": "tf32", "PREP_NORM": norm, "PREP_ROPE": rope,
                              "MERGE": merge, "BLOCK_QM": 8, "BLOCK_P": 4, "BLOCK_DVM": 128,
                              "PREFETCH": True, "PDL": True})
        if merge:  # the merging split loads partials other programs stored: coherent loads
            assert "ld.global.nc" not in split.asm["ptx"], "split kernel: non-coherent loads"
    # The merge kernel, for long contexts' splits (64 of them at head dim 128).
    compile_sm90(decode_attention_triton._merge_kernel,
                 {**_args("m_ptr l_ptr acc_ptr", "*fp32"), "len_ptr": "*i64", "out_ptr": "*bf16",
                  **_args("so_b so_h H P CHUNK", "i32")},
                 {"DV": 128, "BLOCK_P": 64, "BLOCK_DV": 128, "PDL": True})


def training_losses_and_biases():
    """The cross-entropy's softmax passes over bf16 logits and the experts' bias passes."""
    for kernel, sig in ((cross_entropy_triton._lse_picked_kernel,
                         {"logits_ptr": "*bf16", "target_ptr": "*i64",
                          **_args("lse_ptr picked_ptr", "*fp32"), **_args("V stride_c", "i32")}),
                        (cross_entropy_triton._softmax_grad_kernel,
                         {"logits_ptr": "*bf16", **_args("lse_ptr weight_ptr", "*fp32"),
                          "target_ptr": "*i64", **_args("V P stride_c", "i32")})):
        compile_sm90(kernel, sig, {"BLOCK_V": 2048}, num_warps=8)
    blocks = {"SPLITS": 4, "BLOCK_R": 16, "BLOCK_F": 256}
    for swiglu in (False, True):
        compile_sm90(expert_bias_triton._act_bias_fwd_kernel,
                     {**_args("h_ptr b_ptr a_ptr", "*bf16"), "ends_ptr": "*i64", "F": "i32"},
                     {"SWIGLU": swiglu, **blocks})
        compile_sm90(expert_bias_triton._act_bias_bwd_kernel,
                     {**_args("h_ptr b_ptr ga_ptr gh_ptr", "*bf16"), "ends_ptr": "*i64",
                      "gb_ptr": "*fp32", **_args("F E", "i32")}, {"SWIGLU": swiglu, **blocks})
    compile_sm90(expert_bias_triton._add_bias_fwd_kernel,
                 {**_args("y_ptr b_ptr out_ptr", "*bf16"), "ends_ptr": "*i64",
                  **_args("N X E", "i32")}, {"PARKED": 64, **blocks})
    compile_sm90(expert_bias_triton._bias_grad_kernel,
                 {"g_ptr": "*bf16", "ends_ptr": "*i64", "gb_ptr": "*fp32",
                  **_args("X E", "i32")}, blocks)


def sampled_draw():
    """The sampler's draws: over top-k or sorted candidates with top-p and with top-k alone,
    and over whole rows in tiles (temperature only, and inside a nucleus's bounds); bf16
    logits, the launchers' tiles and warps (151,936 logits: 75 tiles); the top-k at 40 and
    1,024 candidates; the nucleus's launches."""
    for top_p in (True, False):
        compile_sm90(sample_triton._draw_ranked_kernel,
                     {"val_ptr": "*bf16", "id_ptr": "*i64", "table_ptr": "*fp64",
                      "out_ptr": "*i64", **_args("stride_v stride_i N", "i32")},
                     {"TOP_P": top_p, "BLOCK": sample_triton.BLOCK}, num_warps=8)
    for bounded in (False, True):
        bounds = {"bounds_ptr": "*i64"} if bounded else {}
        compile_sm90(sample_triton._draw_whole_rows_kernel,
                     {"val_ptr": "*bf16", "table_ptr": "*fp64", "argmax_ptr": "*i64",
                      "score_ptr": "*fp32", "at_ptr": "*i32", "out_ptr": "*i64",
                      "tickets_ptr": "*i32", **bounds, **_args("stride_v V P", "i32")},
                     {"BLOCK": sample_triton.BLOCK, "BLOCK_P": 128, "BOUNDED": bounded,
                      "BITS": 16, **({} if bounded else {"bounds_ptr": None})}, num_warps=8)
    # The nucleus's launches at Qwen3's vocabulary (149 tiles), every shift of bf16 and fp32.
    for dtype, bits in (("*bf16", 16), ("*fp32", 32)):
        for shift in range(bits - nucleus_triton.DIGIT, -1, -nucleus_triton.DIGIT):
            compile_sm90(nucleus_triton._level_kernel,
                         {"val_ptr": dtype, "table_ptr": "*fp64", "argmax_ptr": "*i64",
                          "bounds_ptr": "*i64", "mass_ptr": "*fp32", "ge_ptr": "*fp32",
                          "tie_n_ptr": "*i32", "tie_e_ptr": "*fp32", "tickets_ptr": "*i32",
                          **_args("stride_v V P", "i32")},
                         {"SHIFT": shift, "FIRST": shift == bits - nucleus_triton.DIGIT,
                          "BITS": bits, "BLOCK": nucleus_triton.BLOCK, "BLOCK_P": 256},
                         num_warps=nucleus_triton.NUM_WARPS)
    # The greedy tokens' argmax (Qwen3's vocabulary: 38 tiles), with and without publishing
    # them into the token ring, as the decode graphs launch it (PDL).
    for publish in (False, True):
        compile_sm90(argmax_triton._argmax_kernel,
                     {"x_ptr": "*bf16", "val_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*i64",
                      "tickets_ptr": "*i32", "words_ptr": "*i64", "seq_ptr": "*i64",
                      **_args("stride_b V P B ring_cols", "i32")},
                     {"BLOCK": argmax_triton.BLOCK, "BLOCK_P": 64, "PDL": True,
                      "PUBLISH": publish, "RING_SLOTS": token_ring.SLOTS,
                      "TAG_MOD": token_ring.TAG_MOD})
    # The top-k: the launcher's (tile, candidates, k block, key bits, warps) at Qwen3's
    # vocabulary for k = 40 in bf16 and fp32, and for the largest k.
    for dtype, k in (("*bf16", 40), ("*fp32", 40), ("*bf16", top_k_triton.MAX_K)):
        tile = top_k_triton.top_k_tile(151936, k)
        block_c = next_power_of_2(cdiv(151936, tile) * k)
        compile_sm90(top_k_triton._top_k_kernel,
                     {"x_ptr": dtype, "cand_key_ptr": "*u32", "cand_id_ptr": "*i32",
                      "tickets_ptr": "*i32", "out_val_ptr": dtype, "out_id_ptr": "*i64",
                      **_args("stride_x V K T", "i32")},
                     {"TILE": tile, "BLOCK_C": block_c, "BLOCK_K": max(16, next_power_of_2(k)),
                      "BITS": 16 if dtype == "*bf16" else 32},
                     num_warps=min(32, max(4, max(tile, block_c) // 512)))


CASES = {f.__name__: f for f in (fp8_quantize, stream_experts, tiled_experts, persistent_experts,
                                 slot_write, sampled_draw,
                                 qk_norm_rope, fused_decode_router, dropless_router,
                                 training_route_dispatch, skinny_linear, rms_norm,
                                 decode_attention, training_losses_and_biases)}

if __name__ == "__main__":
    try:
        for name in sys.argv[1:]:
            CASES[name]()
    except FileNotFoundError as e:  # a Triton build without its bundled ptxas
        print(f"no ptxas: {e}", file=sys.stderr)
        sys.exit(NO_PTXAS)
