"""Prometheus metrics for the server, through prometheus_client with one registry per app.

Each app owns a `ServerMetrics` and so its own `CollectorRegistry` (never the process-global
default), so two servers in one process, as in tests, do not share counts. Counters and
histograms are only touched from the event-loop thread. Engine figures (running, waiting, cache
use, per-expert load) come from the latest `EngineStats` snapshot that the engine thread
publishes after every step, handed to `render` at scrape time; per-expert counts are cumulative
tokens routed to each expert of each MoE layer, so `rate()` over them shows the live load
balance. With expert groups, per-group tokens, per-group expert load and balance too.
`render` negotiates the exposition format from the Accept header (Prometheus text
0.0.4 by default, OpenMetrics when asked for).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)
PREFIX = "moeflow_"


class _EngineCollector:
    """The engine snapshot's figures, read at each scrape."""

    def __init__(self) -> None:
        self.stats = None

    def collect(self):
        s = self.stats
        if s is None:
            return
        for name, help, value in (
                ("engine_running", "sequences in the running batch", s.running),
                ("queue_depth", "sequences waiting for a batch slot", s.waiting),
                ("cache_used_tokens", "KV cache in use (tokens)", s.cache_used),
                ("cache_capacity_tokens", "KV cache capacity (tokens)", s.cache_capacity)):
            yield GaugeMetricFamily(PREFIX + name, help, value=value)
        yield CounterMetricFamily(PREFIX + "engine_tokens_generated",
                                  "tokens the engine generated", value=s.tokens_generated)
        experts = CounterMetricFamily(PREFIX + "expert_tokens",
                                      "tokens routed to each expert (cumulative, per MoE layer)",
                                      labels=("moe_layer", "expert"))
        for layer, counts in enumerate(s.expert_counts):
            for expert, c in enumerate(counts):
                experts.add_metric((str(layer), str(expert)), c)
        yield experts
        if s.expert_groups:
            yield from _group_families(s)


def _group_families(s):
    """Expert groups: tokens per group, and each group's experts' load per MoE layer (its
    assignments, and its busiest expert relative to the group's mean: 1 = balanced)."""
    tokens = CounterMetricFamily(PREFIX + "group_tokens", "tokens processed per expert group "
                                 "(prompt and generated, cumulative)", labels=("group",))
    load = CounterMetricFamily(PREFIX + "group_expert_tokens",
                               "tokens routed to the experts of each group (cumulative, per MoE "
                               "layer)", labels=("moe_layer", "group"))
    balance = GaugeMetricFamily(PREFIX + "group_max_expert_load",
                                "busiest expert of the group over the group's mean load "
                                "(cumulative counts; 1 = balanced)", labels=("moe_layer", "group"))
    for (name, _), count in zip(s.expert_groups, s.group_tokens):
        tokens.add_metric((name,), count)
    for layer, counts in enumerate(s.expert_counts):
        start = 0
        for name, size in s.expert_groups:
            mine = counts[start:start + size]
            start += size
            load.add_metric((str(layer), name), sum(mine))
            if sum(mine):
                balance.add_metric((str(layer), name), max(mine) * len(mine) / sum(mine))
    yield tokens
    yield load
    yield balance


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(PREFIX + "requests", "HTTP requests by endpoint and status code",
                                ("endpoint", "status"), registry=r)
        self.finished = Counter(PREFIX + "sequences_finished",
                                "generated sequences by finish reason", ("reason",), registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens",
                                     "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens",
                                         "tokens generated for clients", registry=r)
        self.disconnects = Counter(PREFIX + "client_disconnects",
                                   "requests whose client went away before the end", registry=r)
        self.rejected = Counter(PREFIX + "rejected", "generation requests refused", ("reason",),
                                registry=r)
        self.latency = Histogram(PREFIX + "request_latency_seconds",
                                 "time from request to last token (generation endpoints)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "time from request to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.admitted = Gauge(PREFIX + "admitted_sequences",
                              "sequences admitted and not yet finished", registry=r)
        self.inflight = Gauge(PREFIX + "inflight_requests",
                              "generation HTTP requests being served", registry=r)
        self.draining = Gauge(PREFIX + "draining", "1 while shutting down (new requests get 503)",
                              registry=r)
        self._engine = _EngineCollector()
        r.register(self._engine)

    def render(self, stats, outstanding: int, inflight: int, draining: bool,
               accept: str = "") -> tuple[bytes, str]:
        """(body, content type) of a scrape; `stats` is the latest EngineStats or None."""
        self.admitted.set(outstanding)
        self.inflight.set(inflight)
        self.draining.set(int(draining))
        self._engine.stats = stats
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
