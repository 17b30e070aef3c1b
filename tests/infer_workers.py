"""Multi-rank inference for the gloo tests: tiny models, one request script, the rank worker.

The script (`drive`) makes requests join and leave mid-batch (one finishes on its first token,
one is aborted, one arrives while others run), so the scheduler's slot moves reach the other
ranks too. The same script runs on the 1-process engine (the reference) and on rank 0 of a
multi-rank engine; the rank worker lives here because spawned children unpickle it by name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moeflow import ModelConfig, RouterConfig, Transformer
from moeflow.config import MLAConfig
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.infer.ranks import StepChannel
from moeflow.interop.pretrained import find_model_dir
from moeflow.parallel import ParallelConfig
from moeflow.parallel.inference import InferenceParallel, load_shard
from moeflow.parallel.launch import init_distributed
from moeflow.parallel.trainer import ParallelTrainer
from moeflow.train import TrainConfig

VOCAB = 97
CONFIGS = {
    # DeepSpeed-MoE's PR-MoE: Residual-MoE layers with 2 and 4 experts (EP=4 slices the first).
    "gpt": dict(arch="gpt", n_layers=3, moe_every=1, first_moe_layer=1, num_experts=(2, 4),
                moe_kind="residual_moe", d_ff=48, router=RouterConfig(top_k=1, dropless=True)),
    # Qwen3-MoE: GQA, per-head qk norm, SwiGLU experts top-2 renormalised, a shared expert.
    "qwen3": dict(arch="llama", n_layers=2, n_kv_heads=2, qk_norm=True, moe_kind="moe",
                  moe_every=1, num_experts=8, expert_d_ff=16, num_shared_experts=1,
                  router=RouterConfig(top_k=2, dropless=True, normalize_topk=True)),
    # DeepSeek-V3: MLA, shared expert, sigmoid scores with expert bias.
    "mla": dict(arch="llama", n_layers=2, moe_kind="moe", moe_every=1, num_experts=4,
                expert_d_ff=16, num_shared_experts=1,
                mla=MLAConfig(q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8,
                              qk_rope_head_dim=4, v_head_dim=8),
                router=RouterConfig(top_k=2, dropless=True, score_func="sigmoid",
                                    expert_bias=True)),
}
ENGINE = EngineConfig(max_batch_size=3, max_seq_len=32)


def make_model(kind: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, d_model=32, n_heads=4, max_seq_len=32,
                                init_std=0.1), **CONFIGS[kind]})
    model = Transformer(cfg)
    with torch.no_grad():
        for layer in model.moe_layers():  # routing that depends on the input, not on ties
            torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
            if layer.router.expert_bias is not None:
                layer.router.expert_bias.normal_(0, 0.05)
    return model.eval()


def drive(engine: Engine) -> dict:
    """Run the request script; returns {request: tokens} and {(request, index): logits}."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (6, 3, 4, 5, 2)]
    budget = [5, 1, 4, 4, 3]  # request 1 stops on its first token (its slot is reused at once)
    logits: dict[tuple[str, int], torch.Tensor] = {}
    tokens: dict[str, list[int]] = {}

    def hook(rid, row_V):
        logits[(rid, len(tokens.setdefault(rid, [])))] = row_V.detach().clone()

    engine.logits_hook = hook

    def add(i):
        engine.add_request(prompts[i], SamplingParams(max_new_tokens=budget[i], temperature=0),
                           request_id=f"r{i}")

    for i in range(3):
        add(i)
    step = 0
    while engine.has_work() or step < 3:
        if step == 1:
            add(3)  # joins while the batch is full: waits for request 1's slot
        if step == 2:
            engine.abort("r0")  # leaves mid-generation: the last running request moves
            add(4)
        for ev in engine.step():
            if ev.token_id is not None:
                tokens.setdefault(ev.request_id, []).append(ev.token_id)
        step += 1
    return {"tokens": tokens, "logits": logits}


def trained_config(path: Path) -> Path:
    """The PR-MoE of CONFIGS["gpt"] as a model config file for `moeflow train`."""
    cfg = ModelConfig(**{**dict(vocab_size=320, d_model=32, n_heads=4, max_seq_len=32,
                                init_std=0.1), **CONFIGS["gpt"]})
    cfg.save(path)
    return path


def engine_worker(rank, world, scenarios, ckpt_root, kill_last=None, train=None):
    """Each scenario {name: (model kind, tp, ep, a2a)}: this rank's shard read from the
    checkpoint `ckpt_root`/kind (a model directory, or a training run: its latest checkpoint,
    as `moeflow serve` finds it), an engine over it; rank 0 drives the script, the others
    follow. `train` (TrainConfig kwargs): first, all ranks train that run at EP=world and
    checkpoint it (the scenarios may then serve it).
    `kill_last` (a results directory): then the last rank dies without a word while following
    the last scenario's engine, and rank 0 reports how its next step ended."""
    out = {}
    cpu = torch.device("cpu")
    if train is not None:
        ParallelTrainer(TrainConfig(**train), ParallelConfig(ep=world),
                        init_distributed("cpu")).run()
    for name, (kind, tp, ep, a2a) in scenarios.items():
        path = find_model_dir(Path(ckpt_root) / kind).path
        model = load_shard(path, InferenceParallel(tp=tp, ep=ep, a2a=a2a), cpu)
        engine = Engine(model, ENGINE, StepChannel(dist.group.WORLD, 0, cpu))
        if rank == 0:
            out[name] = drive(engine)
            engine.close()
        else:
            engine.follow()
        out[f"{name}/params"] = sum(p.numel() for p in model.parameters())
    if kill_last is not None:
        engine = Engine(model, ENGINE, StepChannel(dist.group.WORLD, 0, cpu))
        if rank == world - 1:
            torch.save(out, Path(kill_last) / f"rank{rank}.pt")
            os._exit(0)  # dies mid-service: no stop, no goodbye to the process group
        if rank == 0:
            engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0))
            start = time.monotonic()
            try:
                while engine.has_work():
                    engine.step()
                out["after kill"] = "finished"
            except RuntimeError as e:
                out["after kill"] = f"RuntimeError: {e}"
            out["after kill s"] = time.monotonic() - start
        else:
            try:
                engine.follow()
            except RuntimeError:
                pass
    return out
