"""How `moeflow serve` runs: the frozen, validated server configuration.

Every `moeflow serve` flag is one field here (the CLI maps 1:1 onto them). Admission is bounded
by sequences, not HTTP requests: a request asking for n choices of k prompts holds n*k of the
`max_batch + max_queue` slots, so the memory and latency a client can claim are bounded too.

Threads on CPU: torch's intra-op threads spin at barriers, and when they outnumber the free
cores (the event loop and the clients need one too) a tiny model's step slows down tens of
times (measured: 13 vs 403 tokens/s on 2 busy cores). So on CPU the default is one thread
fewer than the cores, leaving one for HTTP; `threads` overrides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    model: str                                # checkpoint directory
    served_model_name: str | None = None      # name clients send as `model` (default: dir name)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16                       # sequences the engine runs per step
    max_queue: int = 64                       # sequences waiting for a batch slot; more -> 429
    max_seq_len: int | None = None            # context window (default: the model's)
    cache_tokens: int | None = None           # KV capacity in tokens (default: engine's)
    max_body_bytes: int = 1 << 20             # larger request bodies -> 413, never parsed
    drain_timeout: float = 30.0               # seconds SIGTERM waits for in-flight requests
    device: str = "auto"                      # auto | cpu | cuda
    dtype: str | None = None                  # float32 | bfloat16 | float16 (default: as stored)
    default_max_tokens: int = 16              # /v1/completions without max_tokens (OpenAI's 16)
    threads: int | None = None                # torch intra-op threads (default: see below)
    log_level: str = "warning"

    def __post_init__(self) -> None:
        def positive_int(name: str, lo: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r}: must be an integer >= {lo}")

        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model={self.model!r}: must be a checkpoint directory")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError(f"served_model_name={self.served_model_name!r}: must not be empty")
        positive_int("port", 0)
        if self.port > 65535:
            raise ValueError(f"port={self.port!r}: must be <= 65535")
        positive_int("max_batch")
        positive_int("max_queue", 0)
        positive_int("max_body_bytes", 64)
        positive_int("default_max_tokens")
        for name in ("max_seq_len", "cache_tokens", "threads"):
            if getattr(self, name) is not None:
                positive_int(name)
        if not (isinstance(self.drain_timeout, (int, float)) and math.isfinite(self.drain_timeout)
                and self.drain_timeout >= 0):
            raise ValueError(f"drain_timeout={self.drain_timeout!r}: must be a number >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: must be auto, cpu or cuda")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: must be float32, bfloat16 or float16")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"log_level={self.log_level!r}: must be critical, error, warning, "
                             f"info or debug")

    @property
    def capacity(self) -> int:
        """Sequences admitted at once: running plus waiting."""
        return self.max_batch + self.max_queue
