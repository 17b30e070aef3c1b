"""After a stage trains: its final validation loss on a larger set, and its serving latency.

Final evaluation: `eval_windows` windows spread over the validation split (the same windows for
every stage), routed dropless as served; MoE models are also evaluated with the paper's eval
capacity factor 1.0, which drops tokens (the difference is reported, not hidden). On CUDA both
run under bf16 autocast, as the trainer validates.

Serving: the model in bf16 on CUDA (fp32 on a CPU) in moeflow's engine with CUDA graphs, timed
by moeflow.infer.timing: decode ms per step at each batch size of the scale and the prefill of
one `prefill_tokens` prompt; prompts are validation text.
"""

from __future__ import annotations

import dataclasses
import platform
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from moeflow.data.loader import PackedTokens, validation_windows
from moeflow.data.prepared import load_prepared
from moeflow.infer.engine import Engine, EngineConfig
from moeflow.infer.timing import decode_ms, prefill_ms
from moeflow.model import Transformer
from moeflow.model.transformer import parameter_counts
from moeflow.reproduce.scale import Scale
from moeflow.train import checkpoint as ckpt_io


@torch.no_grad()
def eval_loss(model: Transformer, windows: torch.Tensor, micro_batch: int) -> dict:
    """Mean next-token cross-entropy over `windows` [N, L+1] and the dropped-assignment share."""
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else nullcontext()
    total, count, dropped, assignments = 0.0, 0, 0, 0
    model.eval()
    for chunk in windows.split(micro_batch):
        chunk = chunk.to(device)
        with autocast:
            out = model(chunk[:, :-1])
        total += float(F.cross_entropy(out.logits.float().flatten(0, 1), chunk[:, 1:].flatten(),
                                       reduction="sum"))
        count += chunk[:, 1:].numel()
        dropped += sum(int(r.num_dropped) for r in out.routing)
        assignments += sum(r.num_assignments for r in out.routing)
    return {"loss": total / count, "dropped_frac": dropped / max(assignments, 1)}


def _with_eval_capacity(model: Transformer, factor: float) -> Transformer:
    cfg = model.config
    capped = cfg.replace(router=dataclasses.replace(cfg.router, eval_capacity_factor=factor))
    with torch.device(next(model.parameters()).device):
        twin = Transformer(capped)
    twin.load_state_dict(model.state_dict())
    return twin


def measure_stage(run_dir: Path, data_dir: Path, scale: Scale, device: str) -> dict:
    ckpt = ckpt_io.latest_checkpoint(run_dir)
    model, _ = ckpt_io.load_for_inference(ckpt, device)
    total, active = parameter_counts(model.config)
    data = load_prepared(data_dir)
    windows = validation_windows(PackedTokens(data.val_tokens, scale.seq_len, "validation"),
                                 scale.eval_windows)
    micro = scale.micro_batch or scale.batch_size
    result = {"params_total": total, "params_active": active,
              "eval_windows": int(windows.shape[0]),
              "val": eval_loss(model, windows, micro)}
    if model.config.is_moe:
        result["val_capacity_1"] = eval_loss(_with_eval_capacity(model, 1.0), windows, micro)

    if device == "cuda":
        model = model.to(torch.bfloat16)
    engine = Engine(model, EngineConfig(max_batch_size=max(scale.decode_batches)))
    pool = torch.from_numpy(data.val_tokens.astype("int64"))
    prompt = min(32, scale.seq_len // 4)
    result["decode_ms"] = {str(b): decode_ms(engine, b, scale.decode_steps, pool, prompt)
                           for b in scale.decode_batches}
    result["prefill_ms"] = prefill_ms(engine, scale.prefill_tokens, pool)
    result["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result["torch"], result["python"] = torch.__version__, platform.python_version()
    return result
