"""The training loop: data → model → loss (+ router loss, + KD) → clipped AdamW step → metrics.

    trainer = Trainer(TrainConfig(preset="tiny", steps=200, out="runs/t"))
    result = trainer.run()

`prepare()` does everything that can fail on bad input (data, tokenizer, model, teacher,
checkpoint compatibility) before anything is written to the run directory; `run()` then trains.

Exact resumption on CPU: the run's state is the model, the AdamW state, the step (the learning
rate is a pure function of it and of the schedule's segments), the loader position and the RNG
states; all are checkpointed and restored, validation runs inside a forked RNG, and metrics rows
after the checkpoint are dropped, so an interrupted and resumed run writes the same losses as an
uninterrupted one. The loop runs with torch's deterministic algorithms on CPU, so this holds on
a busy machine too (moeflow.train.determinism).

Extending a run: resuming with a larger `steps` than the checkpoint's schedule was planned for
extends it (a finished run too). The lr is then not the plain warmup-cosine of the new total:
from the next step on it falls by a half cosine from its current value to the floor
(min_lr_ratio × lr) at the new last step, so a finished run, already at the floor, trains on
at the floor; see moeflow.train.schedule. The segments are saved in state.json, so an extended
run that is interrupted resumes bit-exactly as well.

Non-finite losses or gradient norms raise `NonFiniteLossError` before the optimizer step, so
the weights, the optimizer state and the last checkpoint stay as they were. SIGINT/SIGTERM stop
the loop at the next step boundary with a checkpoint (moeflow.train.interrupt).

Starting weights: random (seeded), a teacher's layers (Mixture-of-Students, moeflow.train.
distill), or `init`: any checkpoint moeflow.interop.pretrained.load_model_dir reads (a run, a
`moeflow upcycle` output, a moeflow/HF model directory), whose network and tokenizer the run
takes; the optimizer and the schedule start fresh.

Data (moeflow.train.run_data): text (files, directories, JSONL, a built-in corpus) tokenized
with a BPE tokenizer trained on its training split, or a prepared dataset directory
(moeflow.data.prepared) with its own tokens and tokenizer.

Expert groups: a model whose router names expert_groups trains on tokens that each carry a
group id, from a JSONL field (`group_field`) or a rule (`group_rule`), see moeflow.data.groups;
the ids travel with the tokens through the same windows and micro-batches into
`model(..., groups=...)` in training and validation. Such a model without a group source is
refused rather than trained with every token in group 0: that would train only the first
group's experts and leave the others at their random init, with nothing in the metrics to say
why. A prepared dataset brings its own group labels (`moeflow prepare-data --group-field F` or
`--group-rule modality`), stored by name and mapped to the model's groups by run_data; an ungrouped
model trains on such a dataset and ignores them (a one-pool baseline on the same tokens).

Parallel training overrides the small steps rather than the loop: `parallelize` (shard
experts), `build_optimizer`, `sync_gradients` (all-reduce), `clip_gradients` (global norm),
`reduce_stats` (metrics and validation of the global batch), `local_optimizers` and
`checkpoint_group` (each rank checkpoints its share; moeflow.train.checkpoint); `rank`/`world`
pick each rank's slice of every global batch and of the validation windows (see
moeflow.data.loader and moeflow.parallel.trainer).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moeflow.config import ModelConfig
from moeflow.data.loader import BatchLoader, micro_batches, validation_indices
from moeflow.interop.pretrained import load_model_dir
from moeflow.model import Transformer
from moeflow.ops.backend import Backends, compile_blocker
from moeflow.ops.linear_cross_entropy import next_token_loss
from moeflow.train import checkpoint as ckpt_io
from moeflow.train.added_part import load_with_added_part
from moeflow.train.determinism import deterministic_on_cpu
from moeflow.train.distill import init_student_from_teacher, kd_loss
from moeflow.train.group_stats import dropped_per_expert, group_load_summary, group_step_stats
from moeflow.train.interrupt import StopRequest
from moeflow.train.lookahead import distill_objective, validation_counts
from moeflow.train.metrics import MetricsWriter
from moeflow.train.pregate import freeze_backbone, pregate_objective, recall_counts
from moeflow.train.progress import ProgressReporter
from moeflow.train.run_config import TrainConfig
from moeflow.train.run_data import check_group_source, is_prepared_run, load_run_data
from moeflow.train.schedule import LRSchedule


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; training stopped before the optimizer step."""


@dataclass
class TrainResult:
    step: int  # steps completed
    finished: bool  # reached cfg.steps (False: stopped at --stop-at or by a signal)
    val_losses: list[tuple[int, float]]  # (step, val_loss) of this invocation
    expert_load: list[list[int]] | None  # at the last validation point
    moe_layers: list[int]
    checkpoint: Path | None  # the run's latest checkpoint (written now, or resumed from)
    interrupted_by: str | None = None  # "SIGINT"/"SIGTERM" when a signal stopped the run
    start_step: int = 0  # the step this invocation started from (the checkpoint's on resume)
    # The last validation at or before start_step (step 0's on a fresh run; on a resume read
    # from metrics.jsonl), so a summary compares with where this invocation began.
    val_start: tuple[int, float] | None = None
    # Expert groups: {group: share (of the last validation's assignments), max_load (its
    # busiest expert over the group's mean), dropped_frac (mean over this invocation's steps)}
    groups: dict[str, dict[str, float]] | None = None

    def summary(self) -> list[str]:
        """What `moeflow train` prints when it ends."""
        lines = []
        last = self.val_losses[-1] if self.val_losses else None
        if last is not None and self.val_start is not None and self.val_start[0] < last[0]:
            lines.append(f"validation loss {self.val_start[1]:.4f} (step {self.val_start[0]}) "
                         f"-> {last[1]:.4f} (step {last[0]})")
        elif last is not None:
            lines.append(f"validation loss {last[1]:.4f} (step {last[0]})")
        if self.step == self.start_step and self.finished:
            lines.append(f"nothing to do: the run had already finished at step {self.step} "
                         f"(checkpoint: {self.checkpoint}); pass a larger --steps to extend it")
        else:
            saved = self.checkpoint if self.checkpoint is not None else "none (--no-save-at-end)"
            lines.append(f"{'finished' if self.finished else 'stopped'} at step {self.step}; "
                         f"checkpoint: {saved}")
        for name, g in (self.groups or {}).items():
            dropped = ("" if math.isnan(g["dropped_frac"]) else
                       f", {100 * g['dropped_frac']:.1f}% dropped in training")
            lines.append(f"expert group {name}: {100 * g['share']:.1f}% of assignments, busiest "
                         f"expert {g['max_load']:.2f}x the group mean{dropped}")
        return lines


def load_model_config(cfg: TrainConfig, base: ModelConfig | None = None) -> ModelConfig:
    """The run's network: `base` (the --init checkpoint's) or the preset/config file's, with the
    run's aux_loss_coef and vocab_size applied, and pre-gate heads added for a --pregate run."""
    if base is not None:
        if cfg.vocab_size is not None and cfg.vocab_size != base.vocab_size:
            raise ValueError(f"vocab_size={cfg.vocab_size}: the --init checkpoint's vocabulary is "
                             f"{base.vocab_size}")
        model_config = base
    elif cfg.model_config:
        model_config = ModelConfig.load(cfg.model_config)
    else:
        model_config = ModelConfig.from_name(cfg.preset)
    if cfg.aux_loss_coef is not None:
        from dataclasses import replace

        model_config = model_config.replace(
            router=replace(model_config.router, aux_loss_coef=cfg.aux_loss_coef))
    if cfg.vocab_size is not None:
        model_config = model_config.replace(vocab_size=cfg.vocab_size)
    if cfg.pregate:
        model_config = model_config.replace(pregate=True, pregate_rank=cfg.pregate_rank,
                                            pregate_depth=cfg.pregate_depth)
    if cfg.lookahead:  # pre-gate heads of the --init model are dropped (train.lookahead)
        model_config = model_config.replace(pregate=False, pregate_rank=0, pregate_depth=1,
                                            lookahead=cfg.lookahead_context,
                                            lookahead_rank=cfg.lookahead_rank)
    return model_config


def _recall_note(row: dict[str, Any]) -> str:
    if "val_lookahead_agreement" in row:
        return (f"  own routers' loss {row['val_loss_own_routers']:.4f}, lookahead agreement "
                f"{row['val_lookahead_agreement']:.3f}")
    if "val_pregate_recall" not in row:
        return ""
    return (f"  pre-gate recall {row['val_pregate_recall']:.3f} "
            f"(zero-shot {row['val_zero_shot_recall']:.3f})")


class Trainer:
    def __init__(self, config: TrainConfig, *, rank: int = 0, world: int = 1,
                 reporter: ProgressReporter | None = None) -> None:
        self.cfg = config
        self.rank, self.world = rank, world
        self.out = Path(config.out)
        self._reporter = reporter
        self.prepared = False

    # ---- overridable steps ------------------------------------------------------------

    def resolve_device(self) -> torch.device:
        if self.cfg.device == "cuda" or (self.cfg.device == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise ValueError("device='cuda' but no CUDA device is available")
            return torch.device("cuda")
        return torch.device("cpu")

    def build_model(self, model_config: ModelConfig) -> torch.nn.Module:
        with torch.device(self.device):
            return Transformer(model_config, self.backends())

    def backends(self) -> Backends:
        """The implementation choices the run asks for (moeflow.ops.backend)."""
        return Backends(dense="compiled" if self.cfg.compile else "auto",
                        matmul="fp8" if self.cfg.fp8 else "auto")

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """Weight decay on matrices only (not norms, biases, or the router's bias)."""
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW; on CUDA torch's fused kernel (each tensor list in one pass, where the default
        foreach implementation runs op by op: benchmarks/optimizer_step.py), on the CPU torch's
        default (the exact-resumption tests' reference)."""
        return torch.optim.AdamW(self.param_groups(model), lr=self.cfg.lr,
                                 betas=(self.cfg.beta1, self.cfg.beta2), eps=1e-8,
                                 fused=True if self.device.type == "cuda" else None)

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Spread the (full, initialised) model over ranks; nothing to do on one process."""
        return model

    def sync_gradients(self) -> None:
        """Average gradients over data-parallel ranks; nothing to do on one process."""

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip to the global gradient norm; returns the norm before clipping (a 0-dim tensor:
        reading it is the step's host sync)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reduce_stats(self, sums: dict[str, torch.Tensor], counts: list[torch.Tensor] | None
                     ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor] | None]:
        """This rank's step statistics (0-dim tensors) -> the global batch's; identity on one
        process."""
        return sums, counts

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def train_state(self, step: int) -> dict[str, Any]:
        """state.json of a checkpoint at `step` (the step itself is added by the writer)."""
        return {"tokens": self.tokens_seen, "loader": self.loader.state_dict(),
                "scheduler": {"kind": "warmup_cosine", "step": step,
                              "segments": self.schedule.state_dict()},
                "world_size": self.world}

    def local_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers holding this rank's share of the optimizer state."""
        return [self.optimizer]

    @property
    def checkpoint_group(self):
        """The process group checkpoints are written over (None: this process alone)."""
        return None

    def save(self, step: int) -> Path:
        """Write checkpoint `step` (collective: every rank writes its share)."""
        return ckpt_io.save_checkpoint(
            self.out, step, model=self.model, optimizers=self.local_optimizers(),
            state=self.train_state(step), tokenizer=self.tokenizer,
            model_config=self.model_config, run_config=self.cfg, keep=self.cfg.keep_checkpoints,
            group=self.checkpoint_group, rank=self.rank)

    def restore(self, ckpt: Path) -> None:
        """Load weights, optimizer, loader position, schedule and RNG states (compatibility
        checked); a larger cfg.steps than the checkpoint's plan extends the schedule."""
        ckpt_io.load_trainer_state(ckpt, self.model, self.local_optimizers())
        state = ckpt_io.load_state(ckpt)
        self.loader.load_state_dict(state["loader"])
        self.start_step = int(state["step"])
        self.tokens_seen = int(state["tokens"])
        segments = state.get("scheduler", {}).get("segments")
        if segments:
            self.schedule = self.schedule.with_segments(segments)
        else:  # written before extensions existed: the plan was the run's own steps
            planned = ckpt_io.load_run_config(ckpt).steps
            self.schedule = self.schedule.with_segments([[0, planned]])
        if self.cfg.steps < self.schedule.total_steps:
            raise ValueError(f"steps={self.cfg.steps}: the run in {str(self.out)!r} is planned "
                             f"for {self.schedule.total_steps} steps; --steps can only grow")
        self.schedule = self.schedule.extended(self.start_step, self.cfg.steps)
        if self.cfg.stop_at is not None and self.cfg.stop_at <= self.start_step:
            raise ValueError(f"stop_at={self.cfg.stop_at}: the run is already at step "
                             f"{self.start_step}")
        ckpt_io.restore_rng(ckpt, state.get("python_rng"))

    def forward_loss(self, input_BT: torch.Tensor, target_BT: torch.Tensor, step: int,
                     groups_BT: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(objective to minimise, statistics) for one micro-batch at 1-based `step`;
        `groups_BT`: the input tokens' expert groups (grouped models)."""
        if self.cfg.pregate:
            return pregate_objective(self.model, input_BT, self.cfg.pregate_loss)
        if self.cfg.lookahead and step <= self.cfg.lookahead_distill_steps:
            with self.autocast():
                return distill_objective(self.model, input_BT)
        with self.autocast():
            out = self.model(input_BT, groups=groups_BT, hidden_only=self.cfg.loss_chunk > 0,
                             recompute=self.cfg.recompute)
            # in autocast: the fused head's GEMM in the autocast dtype, as lm_head's (the plain
            # loss of fp32 logits is an fp32 op either way)
            ce = next_token_loss(out, self.model.lm_head.weight, target_BT, self.cfg.loss_chunk)
        objective = ce + out.router_loss
        stats = {"loss": ce.detach(), "aux_loss": out.aux_loss.detach(),
                 "dropped_frac": out.dropped_fraction,
                 "counts": [r.counts_E.detach() for r in out.routing]}
        if groups_BT is not None:
            stats["dropped"] = [dropped_per_expert(r) for r in out.routing]
        if self.cfg.kd_active(step):
            with torch.no_grad(), self.autocast():
                # Routed as served: dropless, no noise (see moeflow.model.router).
                teacher_groups = groups_BT if self.teacher.config.router.expert_groups else None
                teacher_logits = self.teacher(input_BT, inference=True,
                                              groups=teacher_groups).logits
            kd = kd_loss(out.logits, teacher_logits, self.cfg.kd_temperature)
            objective = objective + self.cfg.kd_alpha * self.cfg.kd_temperature ** 2 * kd
            stats["kd_loss"] = kd.detach()
        return objective, stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss and per-layer expert loads of the global validation windows: each
        rank runs its share and `reduce_stats` combines them. Leaves every RNG as it found it."""
        devices = [self.device] if self.device.type == "cuda" else []
        share = self.val_windows.chunk(self.world)[self.rank]
        group_share = (self.val_groups.chunk(self.world)[self.rank].split(self.micro_batch)
                       if self.val_groups is not None else [None] * len(
                           share.split(self.micro_batch)))
        with torch.random.fork_rng(devices=devices):
            self.model.eval()
            try:
                total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
                recall = torch.zeros(3, dtype=torch.float64, device=self.device)
                own = torch.zeros(3, dtype=torch.float64, device=self.device)
                loads = [torch.zeros(n, dtype=torch.int64, device=self.device)
                         for n in self.model_config.num_experts]
                for chunk, groups in zip(share.split(self.micro_batch), group_share):
                    chunk = chunk.to(self.device)
                    groups = None if groups is None else groups[:, :-1].to(self.device)
                    with self.autocast():
                        out = self.model(chunk[:, :-1], groups=groups)
                    ce = F.cross_entropy(out.logits.float().flatten(0, 1),
                                         chunk[:, 1:].flatten(), reduction="sum")
                    total += ce.double()
                    count += chunk[:, 1:].numel()
                    for load, r in zip(loads, out.routing):
                        load += r.counts_E
                    if self.cfg.pregate:
                        recall = recall + recall_counts(self.model, chunk[:, :-1])
                    if self.cfg.lookahead:
                        with self.autocast():
                            own = own + validation_counts(
                                self.model, chunk[:, :-1], chunk[:, 1:],
                                [r.ids_TK for r in out.routing])
            finally:
                self.model.train()
        sums = {"val_loss": total / count}
        if self.cfg.pregate:
            sums.update(pregate_hits=recall[0], zero_shot_hits=recall[1], routes=recall[2])
        if self.cfg.lookahead:
            sums.update(own_loss=own[0] / count, agree=own[1], routes=own[2])
        sums, loads = self.reduce_stats(sums, loads)
        val_loss = float(sums["val_loss"])
        extra = {}
        if self.cfg.pregate:  # hit rates of the heads and of zero-shot pre-gating (batch 1)
            routes = float(sums["routes"])
            extra = {"val_pregate_recall": float(sums["pregate_hits"]) / routes,
                     "val_zero_shot_recall": float(sums["zero_shot_hits"]) / routes}
        if self.cfg.lookahead:  # the quality cost and how far routing moved from the original
            extra = {"val_loss_own_routers": float(sums["own_loss"]),
                     "val_lookahead_agreement": float(sums["agree"]) / float(sums["routes"])}
        return {**extra, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                "moe_layers": list(self.model_config.moe_layer_indices()),
                "expert_load": [x.tolist() for x in loads],
                # expert groups: contiguous id ranges of expert_load (moeflow.model.expert_groups)
                **({"expert_groups": [list(g) for g in self.model_config.router.expert_groups]}
                   if self.model_config.router.expert_groups else {})}

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # ---- setup -------------------------------------------------------------------------

    @property
    def reporter(self) -> ProgressReporter:
        if self._reporter is None:
            self._reporter = ProgressReporter(self.cfg.steps, self.start_step,
                                              enabled=self.cfg.progress)
        return self._reporter

    def prepare(self) -> None:
        """Everything that can fail on bad input; writes nothing."""
        cfg = self.cfg
        self.device = self.resolve_device()
        if cfg.fp8 and self.device.type == "cuda" and \
                torch.cuda.get_device_capability(self.device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(self.device)
            raise ValueError(f"fp8: {torch.cuda.get_device_name(self.device)} (compute "
                             f"capability {major}.{minor}) has no FP8 tensor cores (8.9+); "
                             "the emulation would be slower than bf16, train without --fp8")
        blocker = compile_blocker(self.device) if cfg.compile else None
        if blocker:
            raise ValueError(f"compile: {blocker}; train without --compile")
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size={cfg.batch_size}: must be a multiple of the "
                             f"world size {self.world}")
        self.micro_batch = cfg.micro_batch or cfg.batch_size // self.world
        if cfg.batch_size % (self.micro_batch * self.world):
            raise ValueError(f"micro_batch={self.micro_batch}: batch_size={cfg.batch_size} must "
                             f"be a multiple of micro_batch × world ({self.world})")
        self.grad_accum = cfg.batch_size // (self.micro_batch * self.world)

        resume_ckpt = self._check_out_dir()
        init_model, init_tokenizer, base = None, None, None
        if cfg.init is not None and resume_ckpt is None:
            init_model, init_tokenizer, _ = load_model_dir(cfg.init)
            base = init_model.config
        elif cfg.init is not None:  # resuming: the network is the checkpoint's
            base = ckpt_io.load_model_config(resume_ckpt)
        model_config = load_model_config(cfg, base)
        check_group_source(cfg, model_config, is_prepared_run(cfg))
        self.teacher, teacher_tokenizer = None, None
        if cfg.distilling:
            self.teacher, teacher_tokenizer = ckpt_io.load_for_inference(cfg.teacher, self.device)
            self.teacher.requires_grad_(False)
            t_vocab = self.teacher.config.vocab_size
            if cfg.vocab_size is not None and cfg.vocab_size != t_vocab:
                raise ValueError(f"vocab_size={cfg.vocab_size}: a student shares its teacher's "
                                 f"tokenizer (vocabulary {t_vocab})")
            model_config = model_config.replace(vocab_size=t_vocab)
            t_groups = self.teacher.config.router.group_names
            if t_groups and t_groups != model_config.router.group_names:
                raise ValueError(f"the teacher's expert groups ({', '.join(t_groups)}) differ "
                                 f"from the student's "
                                 f"({', '.join(model_config.router.group_names) or 'none'})")
        self.seq_len = cfg.seq_len or model_config.max_seq_len
        if self.seq_len > model_config.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len}: exceeds the model's max_seq_len "
                             f"{model_config.max_seq_len}")
        if self.teacher is not None and self.seq_len > self.teacher.config.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len}: exceeds the teacher's max_seq_len "
                             f"{self.teacher.config.max_seq_len}")
        self.model_config = model_config

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        source_tokenizer = teacher_tokenizer or init_tokenizer
        data = load_run_data(cfg, model_config, self.seq_len, resume_ckpt, source_tokenizer)
        self.tokenizer, self.train_data, self.val_data = data.tokenizer, data.train, data.val
        # Global, like the batch: the same windows at any world size (each rank takes a share).
        val_idx = validation_indices(self.val_data, cfg.val_batches * self.micro_batch * self.world)
        # An equal share per rank: the same forwards (so the same expert all-to-alls) and the
        # same token count (so the mean of the ranks' means is the global mean). A short split
        # gave uneven shares: an IndexError, a collective mismatch or a skewed loss.
        usable = len(val_idx) // self.world * self.world
        if usable == 0:
            raise ValueError(f"val_fraction={cfg.val_fraction}: the validation split holds "
                             f"{len(val_idx)} windows of {self.seq_len} tokens, fewer than the "
                             f"{self.world} ranks that each validate a share; raise "
                             f"--val-fraction or lower --seq-len")
        val_idx = val_idx[:usable]
        self.val_windows = self.val_data.windows(val_idx)
        self.val_groups = self.val_data.group_windows(val_idx)
        self.loader = BatchLoader(self.train_data, cfg.batch_size, cfg.seed)

        self.model = self.build_model(model_config)
        self.layer_mapping = None
        if resume_ckpt is not None:
            self._check_resumable(resume_ckpt)
        elif self.teacher is not None and cfg.student_init == "teacher":
            self.layer_mapping = init_student_from_teacher(self.model, self.teacher)
        elif init_model is not None and cfg.pregate:
            load_with_added_part(self.model, init_model.state_dict(), "pregate")
        elif init_model is not None and cfg.lookahead:
            # pre-gate heads of the checkpoint predict routers that no longer route
            load_with_added_part(self.model, init_model.state_dict(), "lookahead",
                                 dropped=("pregate.",))
        elif init_model is not None:
            self.model.load_state_dict(init_model.state_dict())
        if cfg.pregate:
            freeze_backbone(self.model)
        self.model = self.parallelize(self.model)
        self.optimizer = self.build_optimizer(self.model)
        self.start_step, self.tokens_seen = 0, 0
        self.schedule = LRSchedule.planned(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        self.resume_ckpt = resume_ckpt
        if resume_ckpt is not None:
            self.restore(resume_ckpt)
        self.prepared = True

    @property
    def restarted(self) -> bool:
        """--resume of a run that had written no checkpoint: it trains again from step 0."""
        return self.cfg.resume and self.resume_ckpt is None

    def _check_out_dir(self) -> Path | None:
        """The checkpoint to resume from, or None for a fresh run into an empty --out."""
        out, cfg = self.out, self.cfg
        if cfg.resume:
            ckpt = ckpt_io.latest_checkpoint(out) if out.is_dir() else None
            if ckpt is None and not (out / "run.json").is_file():
                raise ValueError(f"--resume: {str(out)!r} holds no checkpoint to resume")
            # A run stopped before its first checkpoint starts again from step 0 (restarted).
            return ckpt
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            what = "a run" if (out / "run.json").exists() else "other files"
            raise ValueError(f"--out {str(out)!r} already holds {what}; pass --resume to "
                             f"continue it or choose another --out")
        return None

    def _check_resumable(self, ckpt: Path) -> None:
        ckpt_io.check_compatible(self.model, ckpt)
        saved_model = ckpt_io.load_model_config(ckpt)
        if saved_model != self.model_config:
            mine, theirs = self.model_config.to_dict(), saved_model.to_dict()
            field = next(k for k in mine if mine[k] != theirs.get(k))
            raise ValueError(f"cannot resume {str(self.out)!r}: model config field {field!r} is "
                             f"{mine[field]!r} here but {theirs.get(field)!r} in the checkpoint")
        saved_run = ckpt_io.load_run_config(ckpt)
        diff = self.cfg.differences(saved_run)
        if diff:
            f = diff[0]
            raise ValueError(f"cannot resume {str(self.out)!r}: {f}={getattr(self.cfg, f)!r} "
                             f"but the run used {f}={getattr(saved_run, f)!r}")

    # ---- the loop ----------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (1-based `step`); returns its metrics row."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = self.schedule.at(step - 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch, groups = self.loader.next_windows()
        self.optimizer.zero_grad(set_to_none=True)
        # Statistics stay on the device until the step's one host sync (the metrics row below):
        # a float() per micro-batch would stall the CPU until the GPU caught up, every time.
        sums: dict[str, torch.Tensor] = {}
        per_expert: dict[str, list[torch.Tensor]] = {}  # "counts" (and "dropped": groups)
        micros = micro_batches(batch, self.rank, self.world, self.micro_batch)
        group_micros = (micro_batches(groups, self.rank, self.world, self.micro_batch)
                        if groups is not None else [None] * len(micros))
        for micro, group in zip(micros, group_micros):
            micro = micro.to(self.device)
            group = None if group is None else group[:, :-1].to(self.device)
            objective, stats = self.forward_loss(micro[:, :-1], micro[:, 1:], step, group)
            (objective / self.grad_accum).backward()
            stats["objective"] = objective.detach()
            for key, value in stats.items():
                if key in ("counts", "dropped"):
                    have = per_expert.get(key)
                    per_expert[key] = value if have is None else [
                        a + b for a, b in zip(have, value)]
                else:
                    # no division by 1 and no add onto 0.0: the same sums, 8 ops fewer per step
                    value = value.double()
                    if self.grad_accum != 1:
                        value = value / self.grad_accum
                    sums[key] = value if key not in sums else sums[key] + value
        self.sync_gradients()
        # One reduction for both per-expert lists: counts first, then drops (grouped models).
        counts, dropped = per_expert.get("counts"), per_expert.get("dropped")
        sums, merged = self.reduce_stats(sums, None if counts is None else counts + (dropped or []))
        if merged is not None:
            counts, dropped = merged[:len(counts)], merged[len(counts):] or None
        grad_norm = self.clip_gradients(cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        keys = sorted(sums)
        values = torch.stack([grad_norm.to(torch.float64)] +
                             [sums[k].to(grad_norm.device) for k in keys]).tolist()
        grad_norm, sums = values[0], dict(zip(keys, values[1:]))
        # A non-finite loss on any rank reaches every rank through reduce_stats, so all of
        # them stop here together, before the optimizer step.
        objective = sums.pop("objective")
        if not math.isfinite(objective):
            self._non_finite("loss", objective, step)
        if not math.isfinite(grad_norm):
            self._non_finite("gradient norm", grad_norm, step)
        self.optimizer.step()
        if self.model_config.router.expert_bias and counts:
            self.model.update_expert_biases(counts)
        tokens = cfg.batch_size * self.seq_len
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - t0
        row = {"step": step, "tokens": self.tokens_seen, "lr": lr, **sums,
               "grad_norm": grad_norm, "tokens_per_s": tokens / max(elapsed, 1e-9)}
        if dropped:
            row.update(group_step_stats(self.model_config.router, counts, dropped))
        return row

    def _non_finite(self, what: str, value: float, step: int) -> None:
        try:
            last = ckpt_io.latest_checkpoint(self.out) if self.out.is_dir() else None
        except ckpt_io.CheckpointError:  # the loss is the error to report here
            last = None
        kept = f"; last good checkpoint: {last}" if last else "; no checkpoint was written yet"
        raise NonFiniteLossError(f"{what} is {value} at step {step}; stopped before the "
                                 f"optimizer step{kept}")

    def run(self) -> TrainResult:
        if not self.prepared:
            self.prepare()
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_writer:
            cfg.save(self.out / "run.json")
            if self.resume_ckpt is None:
                self.model_config.save(self.out / "config.json")
        # Rows after the checkpoint go (all of a restarted run's: it validates step 0 again).
        keep = self.start_step if self.resume_ckpt else (-1 if self.restarted else None)
        metrics = MetricsWriter(self.out / "metrics.jsonl", resume_step=keep) \
            if self.is_writer else None
        val_start = metrics.last_validation() if metrics is not None else None
        reporter = self.reporter
        val_losses: list[tuple[int, float]] = []
        last_val: dict[str, Any] | None = None
        step, ckpt = self.start_step, self.resume_ckpt
        end = min(cfg.stop_at, cfg.steps) if cfg.stop_at else cfg.steps
        if self.resume_ckpt is not None:
            reporter.note(f"resumed from {self.resume_ckpt} at step {step}")
        elif self.restarted:
            reporter.note("the run had written no checkpoint: training it again from step 0")
        stop = StopRequest()
        dropped: dict[str, float] = {}  # expert groups: summed dropped fraction of these steps
        try:
            with stop, deterministic_on_cpu(self.device):  # see moeflow.train.determinism
                if step == 0:
                    last_val = self.evaluate()
                    val_losses.append((0, last_val["val_loss"]))
                    val_start = val_losses[0]
                    self._write(metrics, {"step": 0, "tokens": 0, **last_val})
                    reporter.note(f"step 0  val loss {last_val['val_loss']:.4f}"
                                  f"{_recall_note(last_val)}")
                while step < end:
                    step += 1
                    row = self.train_step(step)
                    for name, frac in row.get("group_dropped_frac", {}).items():
                        dropped[name] = dropped.get(name, 0.0) + frac
                    if step % cfg.val_every == 0 or step == cfg.steps:
                        last_val = self.evaluate()
                        val_losses.append((step, last_val["val_loss"]))
                        row.update(last_val)
                    self._write(metrics, row)
                    reporter.step(step, row)
                    if "val_loss" in row:
                        reporter.note(f"step {step}  val loss {row['val_loss']:.4f}  "
                                      f"ppl {row['val_ppl']:.1f}{_recall_note(row)}")
                    interrupted = self.stop_requested(stop.requested)
                    if interrupted or (cfg.save_every and step % cfg.save_every == 0) \
                            or (step == end and cfg.save_at_end):
                        ckpt = self.save(step)
                    if interrupted:
                        break
        finally:
            reporter.close()
            if metrics is not None:
                metrics.close()
        if stop.requested:
            reporter.note(f"{stop.signal_name}: stopped at step {step} of {cfg.steps} with a "
                          f"checkpoint; continue with --resume")
        elif step < cfg.steps:
            reporter.note(f"stopped at step {step} of {cfg.steps}; continue with --resume")
        groups = None
        if last_val is not None and last_val.get("expert_groups"):
            steps_run = max(step - self.start_step, 1)
            groups = {name: {**g, "dropped_frac": dropped.get(name, float("nan") * steps_run)
                             / steps_run}
                      for name, g in group_load_summary(last_val).items()}
        return TrainResult(step=step, finished=step == cfg.steps, val_losses=val_losses,
                           expert_load=last_val["expert_load"] if last_val else None,
                           moe_layers=list(self.model_config.moe_layer_indices()),
                           checkpoint=ckpt, interrupted_by=stop.signal_name,
                           start_step=self.start_step, val_start=val_start, groups=groups)

    def stop_requested(self, local: bool) -> bool:
        """Whether to stop after this step; one process decides alone (ranks agree in the
        parallel trainer)."""
        return local

    def _write(self, metrics: MetricsWriter | None, row: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(row)
