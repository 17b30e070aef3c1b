"""How a run trains a model: the frozen, validated run configuration (the model is ModelConfig).

Every `moeflow train` flag is one field here; the CLI builds its flags from these fields and
their `help` metadata, so there is no second list of options to keep in step.

A run writes its config to OUT/run.json (rewritten by each `--resume` with what that
invocation ran). `resume_config` builds a continuation from it, so `--resume` needs no other
flag: a flag given again must agree with the run's value or the resume is refused, naming it;
fields in RESUMABLE (bookkeeping) may change; `--stop-at` applies to one invocation only; and
`--steps N` may grow, which extends the run (even a finished one) with the lr schedule that
moeflow.train.schedule describes. `--preset`/`--config` given again are checked by content:
the network they describe must be the checkpoint's (a config file may have moved).

Batch sizes are global: `batch_size` windows per optimizer step over all ranks; `micro_batch`
is what one rank runs per forward pass, and gradient accumulation makes up the rest
(accum = batch_size / (micro_batch × world)).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeflow.data.groups import GROUP_RULES
from moeflow.validate import check, choice, fail, integer, number, option

DEVICES = ("auto", "cpu", "cuda")
STUDENT_INITS = ("teacher", "random")
PREGATE_LOSSES = ("topk-ce", "kl")  # moeflow.train.pregate.pregate_objective
# Fields a resumed run may set differently from the run it continues.
RESUMABLE = ("stop_at", "resume", "save_every", "keep_checkpoints", "save_at_end", "out", "device",
             "progress")
# Checked against the checkpoint's network rather than by value (see the module docstring).
MODEL_FIELDS = ("preset", "model_config")
# Fields naming files: compared as absolute paths ("builtin:" sources are names, not paths).
PATH_FIELDS = ("data", "teacher", "init")

# The peak learning rate when --lr is not given: the preset's below where its recipe is known,
# else DEFAULT_LR (the small presets', `tiny`'s and the demo's scale). The paper's MoE models
# (PR-MoE and MoS students included) take its recipe's lr for their base size (the
# Megatron-DeepSpeed scripts: 2e-4 on the 350M base, 1.2e-4 on the 1.3B one), its dense
# baselines GPT-3's (350M 3e-4, 1.3B 2e-4, 6.7B 1.2e-4). finegrained-1b: 3e-4, measured on an
# H200 at batch 4 (benchmarks/results/fp8, session 23): validation loss 4.18-4.23 after 200
# steps against 4.71-4.85 at 1e-3, which had loss spikes.
DEFAULT_LR = 1e-3
PRESET_LR = {
    "350m": 3e-4, "1.3b": 2e-4, "6.7b": 1.2e-4,
    "350m-moe128": 2e-4, "350m-pr-moe-32-64": 2e-4, "350m-mos-pr-moe-32-64": 2e-4,
    "1.3b-moe128": 1.2e-4, "1.3b-pr-moe-64-128": 1.2e-4, "1.3b-mos-pr-moe-64-128": 1.2e-4,
    "finegrained-1b": 3e-4,
}


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    preset: str = option("model preset to train (see `moeflow info`)", default="tiny")
    model_config: str | None = option("model config file (.json/.yaml) instead of --preset",
                                      flag="--config", default=None)
    data: tuple[str, ...] = option(
        "text files, directories of them, or JSONL files; default: the source files of the "
        "running Python's standard library (no download)", default=())
    init: str | None = option(
        "start from this checkpoint's weights, network and tokenizer (a run or checkpoint "
        "directory, `moeflow upcycle` output, a moeflow/HF model directory): a new run, fresh "
        "optimizer and schedule; --preset/--config are not used", default=None)
    text_field: str = option("JSONL field holding the text", default="text")
    group_field: str | None = option(
        "expert groups: the JSONL field naming each record's group (one of the model's "
        "router.expert_groups names); see moeflow/data/groups.py", default=None)
    group_rule: str | None = option(
        "expert groups: label every token by a rule instead (modality: Python code vs "
        "comments, strings and prose; the model's groups must include code and text)",
        choices=GROUP_RULES, default=None)
    vocab_size: int | None = option("BPE vocabulary size (default: the model's)", default=None)
    val_fraction: float = option("fraction of documents held out for validation", default=0.05)
    seq_len: int | None = option("tokens per training sequence (default: the model's max_seq_len)",
                                 default=None)
    # the schedule
    steps: int = option(
        "total optimizer steps: the length of the lr schedule. With --resume, a larger N "
        "extends the run, finished or not: from its next step the lr falls by a half cosine "
        "from its current value to the floor (min_lr_ratio × lr) at step N, so a finished "
        "run trains on at the floor (moeflow/train/schedule.py)", default=1000)
    batch_size: int = option("global batch: sequences per optimizer step over all ranks",
                             default=16)
    micro_batch: int | None = option("sequences per forward pass on one rank (default: all of the "
                                     "rank's share, no accumulation)", default=None)
    # off by default until the GPU benchmark has measured it (train_throughput.py --recompute).
    recompute: bool = option("activation checkpointing: keep only each block's input and "
                             "recompute its activations in the backward (less memory for a "
                             "larger micro-batch, about one more forward per step)",
                             default=False)
    # off by default: on the H200 it took a device-bound finegrained-1b step 166.7 -> 133.8 ms,
    # but an earlier per-module version slowed host-bound small models (Backends.dense says why).
    compile: bool = option("compile the dense part of each block (attention, norms, residuals, "
                           "dense FFNs) with torch.compile, one graph per block structure shared "
                           "by its layers; the first step pays the compilation (Backends.dense)",
                           default=False)
    # 0 by default: it saves memory at some speed (finegrained-1b on the H200: 133.8 -> 141.6 ms
    # a step with --compile at micro-batch 4); with it micro-batch 8 ran at 53.5 % MFU.
    loss_chunk: int = option("compute the LM head and cross-entropy together over chunks of this "
                             "many tokens, never holding the [tokens, vocabulary] logits (less "
                             "activation memory, one more head GEMM per chunk in backward; "
                             "moeflow/ops/linear_cross_entropy.py); 0: the plain loss",
                             default=0)
    # off by default: 2.0x slower than bf16 on the H200 (benchmarks/results/train_throughput).
    fp8: bool = option("run the attention, dense-MLP and expert matmuls in FP8 (e4m3 with "
                       "rowwise scales, forward and backward; moeflow/ops/fp8_linear.py): "
                       "torch._scaled_mm on a GPU of compute capability 8.9+ (the experts' "
                       "grouped kernel: 9.0), a plain-torch emulation of the same numerics "
                       "on the CPU; the LM head, router, embeddings and norms stay in high "
                       "precision, and validation runs without FP8. Measured so far: 2.0x "
                       "slower than bf16 on an H200 (finegrained-1b)", default=False)
    lr: float | None = option("peak learning rate (default: the preset's recipe where known, "
                              "e.g. 2e-4 for 350m-moe128, else 1e-3; PRESET_LR in "
                              "moeflow/train/run_config.py)", default=None)
    warmup_steps: int | None = option("linear warmup steps (default: min(100, steps/10))",
                                      default=None)
    min_lr_ratio: float = option("cosine decay floor as a fraction of --lr", default=0.1)
    weight_decay: float = option("AdamW weight decay (matrices only)", default=0.1)
    beta1: float = option("AdamW beta1", default=0.9)
    beta2: float = option("AdamW beta2", default=0.95)
    grad_clip: float = option("clip the global gradient norm to this (0 = off)", default=1.0)
    aux_loss_coef: float | None = option("load-balancing loss coefficient (default: the model's)",
                                         default=None)
    seed: int = option("seeds weights, data order and every RNG", default=0)
    # bookkeeping
    out: str = option("run directory: metrics.jsonl, checkpoints/", default="runs/train")
    save_every: int = option("checkpoint every N steps (0 = only at the end)", default=0)
    keep_checkpoints: int = option("checkpoints kept on disk (older ones are deleted)", default=2)
    save_at_end: bool = option("write a checkpoint when the run ends (--no-save-at-end: metrics "
                               "only, for a run nothing will load or resume)", default=True)
    stop_at: int | None = option("end the run after step K as an interruption would, leaving a "
                                 "checkpoint that --resume continues on the same schedule",
                                 default=None)
    resume: bool = option("continue the run in --out from its latest checkpoint", default=False)
    val_every: int = option("validate every N steps (and before the first and after the last)",
                            default=100)
    val_batches: int = option("validation micro-batches per validation point", default=8)
    device: str = option("auto (CUDA if available), cpu or cuda", default="auto")
    progress: bool = option("show a progress bar (a line every 10%% when not a terminal)",
                            default=True)
    # Mixture-of-Students distillation
    teacher: str | None = option("teacher checkpoint (run dir or checkpoint dir): distil it into "
                                 "this model", default=None)
    kd_alpha: float = option("weight of the distillation term", default=0.5)
    kd_temperature: float = option("softmax temperature of the soft labels", default=1.0)
    kd_stop_step: int | None = option("staged KD: steps from this one on train without the "
                                      "distillation term (default: distil throughout)",
                                      default=None)
    student_init: str = option("with --teacher: 'teacher' copies matching teacher layers into the "
                               "student, 'random' starts from scratch", default="teacher")
    # Pre-gated MoE: prefetch heads for expert offloading (moeflow.train.pregate)
    pregate: bool = option("fine-tune pre-gate heads of the --init model, backbone frozen: head l "
                           "predicts MoE layer l+1's experts from layer l's input (used by "
                           "serve/generate --prefetch pregate)", default=False)
    pregate_rank: int = option("with --pregate: each head is a linear map plus an MLP of this "
                               "width (0: linear only); see moeflow/model/pregate.py",
                               default=256)
    pregate_depth: int = option("with --pregate: hidden layers of the heads' MLP (1 or more)",
                                default=2)
    pregate_loss: str = option("with --pregate: the heads' objective, 'topk-ce' (the served "
                               "top-k as the target) or 'kl' (the next router's distribution)",
                               default="topk-ce")
    # Read-ME: a decoupled lookahead router for expert offloading (moeflow.train.lookahead)
    lookahead: bool = option("give the --init model a lookahead router that routes every MoE "
                             "layer from token ids alone: distil it from the layers' routers "
                             "(backbone frozen) for --lookahead-distill-steps, then route by it "
                             "and fine-tune the whole model (used by serve/generate --prefetch "
                             "lookahead); see moeflow/train/lookahead.py", default=False)
    lookahead_context: int = option("with --lookahead: tokens the router sees (the token and "
                                    "the ones before it)", default=2)
    lookahead_rank: int = option("with --lookahead: the router is a linear map of the window "
                                 "plus an MLP of this rank (0: linear only)", default=256)
    lookahead_distill_steps: int = option("with --lookahead: steps of phase 1 (distillation, "
                                          "backbone frozen); the rest fine-tune the model",
                                          default=100)

    def __post_init__(self) -> None:
        if isinstance(self.data, (list, str)):
            object.__setattr__(self, "data", tuple([self.data] if isinstance(self.data, str)
                                                   else self.data))
        if self.lr is None:
            from_preset = self.model_config is None and self.init is None
            object.__setattr__(self, "lr", PRESET_LR.get(self.preset, DEFAULT_LR)
                               if from_preset else DEFAULT_LR)
        if self.warmup_steps is None and isinstance(self.steps, int):
            object.__setattr__(self, "warmup_steps", min(100, self.steps // 10))
        for name in ("steps", "batch_size", "val_every", "val_batches", "keep_checkpoints"):
            integer(name, getattr(self, name), lo=1)
        for name in ("save_every", "warmup_steps", "seed"):
            integer(name, getattr(self, name), lo=0)
        for name in ("micro_batch", "vocab_size", "seq_len"):
            integer(name, getattr(self, name), lo=1, optional=True)
        if self.micro_batch is not None and self.batch_size % self.micro_batch:
            fail("micro_batch", self.micro_batch, f"must divide batch_size={self.batch_size}")
        check(self.warmup_steps <= self.steps, "warmup_steps", self.warmup_steps,
              f"must be <= steps={self.steps}")
        integer("stop_at", self.stop_at, lo=1, hi=self.steps, optional=True)
        number("lr", self.lr, lo=0, lo_open=True)
        number("min_lr_ratio", self.min_lr_ratio, lo=0, hi=1)
        number("weight_decay", self.weight_decay, lo=0)
        number("beta1", self.beta1, lo=0, hi=1, hi_open=True)
        number("beta2", self.beta2, lo=0, hi=1, hi_open=True)
        number("grad_clip", self.grad_clip, lo=0)
        number("val_fraction", self.val_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
        number("aux_loss_coef", self.aux_loss_coef, lo=0, optional=True)
        number("kd_alpha", self.kd_alpha, lo=0)
        integer("loss_chunk", self.loss_chunk, lo=0)
        check(self.loss_chunk == 0 or self.teacher is None, "loss_chunk", self.loss_chunk,
              "is not used with --teacher: distillation compares the student's full logits")
        number("kd_temperature", self.kd_temperature, lo=0, lo_open=True)
        integer("kd_stop_step", self.kd_stop_step, lo=0, optional=True)
        check(self.kd_stop_step is None or self.kd_stop_step <= self.steps, "kd_stop_step",
              self.kd_stop_step, f"is beyond steps={self.steps}, so the distillation would "
              f"never stop; leave it out to distil throughout, or raise --steps")
        choice("device", self.device, DEVICES)
        choice("student_init", self.student_init, STUDENT_INITS)
        choice("group_rule", self.group_rule, GROUP_RULES, optional=True)
        check(self.group_field is None or self.group_rule is None, "group_field",
              self.group_field, "and group_rule both label expert groups; give one of them")
        check(self.group_field is None or bool(self.group_field), "group_field",
              self.group_field, "must name a JSONL field")
        check(self.init is None or self.model_config is None, "init", self.init,
              "takes the network from its checkpoint; leave model_config (--config) out")
        check(self.init is None or self.teacher is None, "init", self.init,
              "cannot be combined with teacher (a student starts from its teacher)")
        check(bool(self.out), "out", self.out, "must name a directory")
        check(not self.pregate or self.init is not None, "pregate", self.pregate,
              "fine-tunes heads on a trained model: give its checkpoint with --init")
        check(not (self.fp8 and self.pregate), "fp8", self.fp8,
              "does nothing with --pregate: the backbone is frozen and the pre-gate heads, "
              "like the router, stay in high precision")
        integer("pregate_rank", self.pregate_rank, lo=0)
        integer("pregate_depth", self.pregate_depth, lo=1)
        choice("pregate_loss", self.pregate_loss, PREGATE_LOSSES)
        check(not self.lookahead or self.init is not None, "lookahead", self.lookahead,
              "distils a lookahead router from a trained model: give its checkpoint with --init")
        check(not (self.lookahead and self.pregate), "lookahead", self.lookahead,
              "and pregate cannot be combined (a lookahead model's routing is known before the "
              "forward; it needs no pre-gate heads)")
        integer("lookahead_context", self.lookahead_context, lo=1)
        integer("lookahead_rank", self.lookahead_rank, lo=0)
        integer("lookahead_distill_steps", self.lookahead_distill_steps, lo=0,
                hi=self.steps if self.lookahead else None)

    @property
    def distilling(self) -> bool:
        return self.teacher is not None

    def kd_active(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based, as in metrics.jsonl) uses the distillation
        term: staged KD switches it off from step kd_stop_step on."""
        return self.distilling and (self.kd_stop_step is None or step < self.kd_stop_step)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"] = list(self.data)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run config field {unknown[0]!r}")
        return cls(**{**data, "data": tuple(data.get("data", ()))})

    def save(self, path: str | Path) -> None:
        """Write atomically: a resume rewrites OUT/run.json, and a kill must not truncate it."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """Read a run.json; any problem is a one-line ValueError naming the file."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def differences(self, other: "TrainConfig") -> list[str]:
        """Fields (outside RESUMABLE and `steps`, which a resume may raise) on which `self` and
        `other` disagree, in field order."""
        return [f.name for f in dataclasses.fields(self)
                if f.name not in RESUMABLE + ("steps",)
                and getattr(self, f.name) != getattr(other, f.name)]


def resume_config(given: dict[str, Any]) -> TrainConfig:
    """The config that continues the run in given["out"] (or the default --out): the run's
    OUT/run.json with the fields in `given` (the flags on the command line) applied.

    ValueError naming the field when a given value contradicts the run, when `steps` is
    smaller than the run's, or when OUT holds no run.
    """
    out = Path(given.get("out", TrainConfig.out))
    path = out / "run.json"
    if not path.is_file():
        from moeflow.train.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(out) if out.is_dir() else None
        if ckpt is None:
            raise ValueError(f"--resume: {str(out)!r} holds no checkpoint to resume")
        path = ckpt / "run.json"
    saved = TrainConfig.load(path)
    changes: dict[str, Any] = {"stop_at": None, "resume": True, "out": str(out)}
    for name, value in given.items():
        if isinstance(value, list):
            value = tuple(value)
        have = getattr(saved, name)
        if name in RESUMABLE or name in MODEL_FIELDS:
            changes[name] = value
        elif name == "steps" and isinstance(value, int) and value >= saved.steps:
            changes[name] = value
        elif _normalised(name, value) != _normalised(name, have):
            hint = ("; --steps can only grow (extend the run)" if name == "steps" else
                    f"; leave the flag out to continue with the run's {name}")
            raise ValueError(f"cannot resume {str(out)!r}: {name}={value!r} but the run used "
                             f"{name}={have!r}{hint}")
    if "preset" in given and "model_config" not in given:
        changes["model_config"] = None
    return saved.replace(**changes)


def _normalised(name: str, value: Any) -> Any:
    def path(p: Any) -> Any:
        return os.path.abspath(p) if isinstance(p, str) and not p.startswith("builtin:") else p

    if name not in PATH_FIELDS:
        return value
    return tuple(map(path, value)) if isinstance(value, tuple) else path(value)

