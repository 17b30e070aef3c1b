"""How `moeflow serve` runs: the frozen, validated server configuration.

Every `moeflow serve` flag is one field here: the CLI generates its flags from these fields and
their help metadata (moeflow.cli.add_dataclass_flags). Admission is bounded by sequences, not
HTTP requests: a request asking for n choices of k prompts holds n*k of the
`max_batch + max_queue` slots, so the memory and latency a client can claim are bounded too.

Threads on CPU: torch's intra-op threads spin at barriers, and when they outnumber the free
cores (the event loop and the clients need one too) a tiny model's step slows down tens of
times (measured: 13 vs 403 tokens/s on 2 busy cores). So on CPU the default is one thread
fewer than the cores, leaving one for HTTP; `threads` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.data.groups import GROUP_RULES
from moeflow.infer.offload.config import OffloadConfig
from moeflow.infer.scheduler import BATCHING
from moeflow.parallel.inference import InferenceParallel
from moeflow.validate import check, choice, integer, number, option

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class ServeConfig:
    model: str = option("checkpoint: a training run / checkpoint directory, or a moeflow or HF "
                        "MoE directory with tokenizer.json")
    served_model_name: str | None = option("the name clients send (default: directory name)",
                                           default=None)
    host: str = option("address to listen on", default="127.0.0.1")
    port: int = option("port to listen on", default=8000)
    max_batch: int = option("sequences the engine runs per step", default=16)
    max_queue: int = option("sequences waiting for a batch slot; beyond it requests get 429",
                            default=64)
    max_seq_len: int | None = option("context window (default: the model's)", default=None)
    cache_tokens: int | None = option("KV cache capacity in tokens (default: the engine's)",
                                      default=None)
    max_body_bytes: int = option("larger request bodies get 413 without being parsed",
                                 default=1 << 20)
    drain_timeout: float = option("seconds SIGTERM waits for in-flight requests before aborting "
                                  "them", default=30.0)
    device: str = option("where the model runs (auto: CUDA if available)", choices=DEVICES,
                         default="auto")
    dtype: str | None = option("cast the weights (default: as stored)", choices=DTYPES,
                               default=None)
    default_max_tokens: int = option("max_tokens of /v1/completions requests that set none",
                                     default=16)
    threads: int | None = option("torch intra-op threads (default on CPU: cores - 1, one left "
                                 "for HTTP)", default=None)
    log_level: str = option("server log level", choices=LOG_LEVELS, default="warning")
    # expert groups (moeflow.serve.protocol): for requests that name no `expert_group`
    group_rule: str | None = option("label the prompt tokens of requests naming no expert_group "
                                    "by this rule (modality: Python code vs text)",
                                    choices=GROUP_RULES, default=None)
    default_group: str | None = option("the expert group of requests naming none that "
                                       "--group-rule does not label", default=None)
    batching: str = option("admission order of waiting requests (expert-aware: those whose "
                           "predicted experts overlap the running batch's most; needs a model "
                           "with a lookahead router, see train --lookahead)",
                           choices=BATCHING, default="fifo")
    # --gpu-memory and its companions: flags generated from OffloadConfig's own fields.
    offload: OffloadConfig | None = None
    # --tp, --ep and companions (under torchrun): flags generated from InferenceParallel's fields.
    parallel: InferenceParallel = InferenceParallel()

    def __post_init__(self) -> None:
        check(isinstance(self.model, str) and bool(self.model), "model", self.model,
              "must be a checkpoint directory")
        check(self.served_model_name is None or bool(self.served_model_name.strip()),
              "served_model_name", self.served_model_name, "must not be empty")
        integer("port", self.port, lo=0, hi=65535)
        integer("max_batch", self.max_batch, lo=1)
        integer("max_queue", self.max_queue, lo=0)
        integer("max_body_bytes", self.max_body_bytes, lo=64)
        integer("default_max_tokens", self.default_max_tokens, lo=1)
        for name in ("max_seq_len", "cache_tokens", "threads"):
            integer(name, getattr(self, name), lo=1, optional=True)
        number("drain_timeout", self.drain_timeout, lo=0)
        choice("device", self.device, DEVICES)
        choice("dtype", self.dtype, DTYPES, optional=True)
        choice("log_level", self.log_level, LOG_LEVELS)
        choice("group_rule", self.group_rule, GROUP_RULES, optional=True)
        choice("batching", self.batching, BATCHING)
        check(self.offload is None or isinstance(self.offload, OffloadConfig), "offload",
              self.offload, "must be an OffloadConfig or None")
        check(isinstance(self.parallel, InferenceParallel), "parallel", self.parallel,
              "must be an InferenceParallel")
        check(self.offload is None or self.parallel.world == 1, "offload", self.offload,
              "expert offloading runs on one process (--tp 1 --ep 1)")

    @property
    def capacity(self) -> int:
        """Sequences admitted at once: running plus waiting."""
        return self.max_batch + self.max_queue
