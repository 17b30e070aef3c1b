"""Prometheus metrics for the server, rendered in the text exposition format (version 0.0.4).

Counters and histograms live in one `ServerMetrics` object owned by the app (no process-global
registry, so two servers in one process, as in tests, do not share counts); they are only
touched from the event-loop thread, so they need no lock. Engine figures (running, waiting,
cache use, per-expert load) are gauges read from the latest `EngineStats` snapshot that the
engine thread publishes after every step; per-expert counts are cumulative tokens routed to
each expert of each MoE layer, so `rate()` over them shows the live load balance.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)
PREFIX = "moeflow_"


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in zip(names, values))
    return "{" + inner + "}"


def _escape(s: str) -> str:
    return s.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labels = PREFIX + name, help, labels
        self.values: dict[tuple, float] = defaultdict(float)

    def inc(self, *label_values, by: float = 1.0) -> None:
        self.values[tuple(label_values)] += by

    def get(self, *label_values) -> float:
        return self.values.get(tuple(label_values), 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.labels, key)} {_num(v)}")
        return out


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = PREFIX + name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)   # last: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cum = 0
        for bound, c in zip(self.buckets + (math.inf,), self.counts):
            cum += c
            out.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {cum}')
        out += [f"{self.name}_sum {_num(self.total)}", f"{self.name}_count {cum}"]
        return out


def _gauge(name: str, help: str, value: float) -> list[str]:
    name = PREFIX + name
    return [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {_num(value)}"]


class ServerMetrics:
    def __init__(self) -> None:
        self.requests = Counter("requests_total", "HTTP requests by endpoint and status code",
                                ("endpoint", "status"))
        self.finished = Counter("sequences_finished_total",
                                "generated sequences by finish reason", ("reason",))
        self.prompt_tokens = Counter("prompt_tokens_total", "prompt tokens of finished requests")
        self.generation_tokens = Counter("generation_tokens_total",
                                         "tokens generated for clients")
        self.disconnects = Counter("client_disconnects_total",
                                   "requests whose client went away before the end")
        self.rejected = Counter("rejected_total", "generation requests refused",
                                ("reason",))
        self.latency = Histogram("request_latency_seconds",
                                 "time from request to last token (generation endpoints)")
        self.ttft = Histogram("time_to_first_token_seconds",
                              "time from request to first generated token")

    def render(self, stats, outstanding: int, inflight: int, draining: bool) -> str:
        lines: list[str] = []
        for m in (self.requests, self.finished, self.prompt_tokens, self.generation_tokens,
                  self.disconnects, self.rejected, self.latency, self.ttft):
            lines += m.render()
        lines += _gauge("admitted_sequences", "sequences admitted and not yet finished",
                        outstanding)
        lines += _gauge("inflight_requests", "generation HTTP requests being served", inflight)
        lines += _gauge("draining", "1 while shutting down (new requests get 503)", int(draining))
        if stats is not None:
            lines += _gauge("engine_running", "sequences in the running batch", stats.running)
            lines += _gauge("queue_depth", "sequences waiting for a batch slot", stats.waiting)
            lines += _gauge("cache_used_tokens", "KV cache in use (tokens)", stats.cache_used)
            lines += _gauge("cache_capacity_tokens", "KV cache capacity (tokens)",
                            stats.cache_capacity)
            name = PREFIX + "engine_tokens_generated_total"
            lines += [f"# HELP {name} tokens the engine generated", f"# TYPE {name} counter",
                      f"{name} {stats.tokens_generated}"]
            name = PREFIX + "expert_tokens_total"
            lines += [f"# HELP {name} tokens routed to each expert (cumulative, per MoE layer)",
                      f"# TYPE {name} counter"]
            for layer, counts in enumerate(stats.expert_counts):
                for expert, c in enumerate(counts):
                    lines.append(f'{name}{{moe_layer="{layer}",expert="{expert}"}} {c}')
        return "\n".join(lines) + "\n"
