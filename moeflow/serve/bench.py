"""`moeflow bench-serve`: a closed-loop load generator for any OpenAI-compatible server.

C clients each send streaming requests one after another until N have been sent. Per request
it measures the latency (request sent -> last byte), the time to first token (request sent ->
first chunk carrying text) and the output tokens (from the final usage chunk, requested with
stream_options.include_usage). Reported: throughput (requests/s and output tokens/s over the
wall time of the whole run), latency and TTFT percentiles over successful requests, and failures
by HTTP status with the first reason the server gave for each (its error message), so a run
whose every request is refused says why. `ignore_eos` is sent by default so every request
generates exactly max_tokens and runs are comparable (turn it off for servers that refuse
unknown fields).

Sizing: the default prompt is one sentence of 44 ASCII bytes, so with a byte-level tokenizer it
is at most 44 tokens and the default 32 (or the README's 64) new tokens fit a context of 128,
the `tiny` preset's. Before sending anything the bench reads the model's context from
/v1/models (`max_model_len`, where the server reports it) and refuses a --max-tokens that
leaves no room for the prompt.

Example:
  moeflow bench-serve --url http://127.0.0.1:8000 --concurrency 8 --requests 200 --max-tokens 64
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from moeflow.validate import check, integer, number, option


@dataclass(frozen=True)
class BenchConfig:
    url: str = option("the server's base URL", default="http://127.0.0.1:8000")
    concurrency: int = option("clients sending requests at once", default=8)
    requests: int = option("requests to send in all", default=100)
    model: str | None = option("model name (default: the server's first)", default=None)
    prompt: str = option("the prompt of every request",
                         default="The quick brown fox jumps over the lazy dog.")
    max_tokens: int = option("tokens to generate per request", default=32)
    temperature: float = option("sampling temperature", default=0.0)
    chat: bool = option("use /v1/chat/completions", default=False)
    ignore_eos: bool = option("send ignore_eos, so every request generates exactly max-tokens "
                              "(--no-ignore-eos: let requests end at end-of-sequence)",
                              default=True)
    timeout: float = option("per-request seconds", default=300.0)

    def __post_init__(self) -> None:
        for name in ("concurrency", "requests", "max_tokens"):
            integer(name, getattr(self, name), lo=1)
        check(isinstance(self.url, str) and self.url.startswith(("http://", "https://")), "url",
              self.url, "must start with http:// or https://")
        number("temperature", self.temperature, lo=0)
        number("timeout", self.timeout, lo=0, lo_open=True)


@dataclass
class Sample:
    ok: bool
    status: int | str
    latency: float = 0.0
    ttft: float | None = None
    output_tokens: int = 0
    reason: str | None = None   # why it failed: the server's error message, or the exception


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class BenchResult:
    config: dict
    duration_s: float
    succeeded: int
    failed: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)   # failure status -> the first reason given
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    latency_s: dict = field(default_factory=dict)
    ttft_s: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        def row(name: str, d: dict) -> str:
            return f"{name:<12}" + "".join(f"{d[k] * 1000:>10.1f}" for k in ("p50", "p90", "p99",
                                                                              "mean"))
        c = self.config
        lines = [f"{c['url']}  concurrency {c['concurrency']}  requests {c['requests']}  "
                 f"max_tokens {c['max_tokens']}",
                 f"succeeded {self.succeeded}, failed {sum(self.failed.values())} "
                 f"{self.failed or ''}  in {self.duration_s:.2f} s",
                 f"throughput  {self.requests_per_s:.2f} req/s, "
                 f"{self.output_tokens_per_s:.1f} output tok/s",
                 f"{'(ms)':<12}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
                 row("latency", self.latency_s), row("TTFT", self.ttft_s)]
        lines += [f"failed {status}: {reason}" for status, reason in self.reasons.items()]
        return "\n".join(lines)


def _summary(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99),
            "mean": sum(values) / len(values) if values else math.nan}


async def _one(client, config: BenchConfig, model: str) -> Sample:
    body = {"model": model, "max_tokens": config.max_tokens, "temperature": config.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.chat:
        body["messages"] = [{"role": "user", "content": config.prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = config.prompt
        path = "/v1/completions"
    start = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return Sample(False, r.status_code, reason=_error_message(await r.aread()))
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Sample(False, "stream_error",
                                  reason=_error_message(json.dumps(chunk).encode()))
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for ch in chunk.get("choices", []):
                    text = ch.get("text") or (ch.get("delta") or {}).get("content")
                    if text and ttft is None:
                        ttft = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - a failed request is a data point, not a crash
        return Sample(False, type(e).__name__, reason=str(e) or type(e).__name__)
    if not done:
        return Sample(False, "no_done", reason="the stream ended without data: [DONE]")
    return Sample(True, 200, time.perf_counter() - start, ttft, tokens)


async def run_bench_async(config: BenchConfig) -> BenchResult:
    import httpx

    limits = httpx.Limits(max_connections=config.concurrency,
                          max_keepalive_connections=config.concurrency)
    async with httpx.AsyncClient(base_url=config.url.rstrip("/"), limits=limits,
                                 timeout=config.timeout) as client:
        model = await _check_model(client, config)
        remaining = iter(range(config.requests))
        samples: list[Sample] = []

        async def client_loop() -> None:
            for _ in remaining:
                samples.append(await _one(client, config, model))

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(config.concurrency)))
        duration = time.perf_counter() - start
    ok = [s for s in samples if s.ok]
    reasons: dict = {}
    for s in samples:
        if not s.ok:
            reasons.setdefault(str(s.status), s.reason)
    return BenchResult(
        config={**asdict(config), "model": model}, duration_s=duration, succeeded=len(ok),
        failed=dict(Counter(str(s.status) for s in samples if not s.ok)), reasons=reasons,
        requests_per_s=len(ok) / duration, output_tokens_per_s=sum(s.output_tokens for s in ok)
        / duration, latency_s=_summary([s.latency for s in ok]),
        ttft_s=_summary([s.ttft for s in ok if s.ttft is not None]))


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body, else the body itself (shortened)."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = None
    text = message if isinstance(message, str) else body.decode(errors="replace")
    return " ".join(text.split())[:300] or "(empty response body)"


async def _check_model(client, config: BenchConfig) -> str:
    """The model to request (the server's first unless given); ValueError when the server
    cannot be reached, or its context leaves no room for the prompt beside max_tokens."""
    import httpx

    try:
        r = await client.get("/v1/models")
    except httpx.TransportError as e:
        raise ValueError(f"cannot reach {config.url}: {e or type(e).__name__}") from None
    if r.status_code != 200:
        raise ValueError(f"{config.url}/v1/models answered {r.status_code}: "
                         f"{_error_message(r.content)}")
    cards = r.json().get("data") or []
    if config.model is None and not cards:
        raise ValueError(f"{config.url}/v1/models lists no model")
    model = config.model or cards[0]["id"]
    card = next((c for c in cards if c.get("id") == model), {})
    context = card.get("max_model_len")
    if isinstance(context, int) and config.max_tokens >= context:
        raise ValueError(f"max_tokens={config.max_tokens}: the model {model!r} has a context of "
                         f"{context} tokens, which must hold the prompt and max_tokens; pass a "
                         f"smaller --max-tokens")
    return model


def run_bench(config: BenchConfig) -> BenchResult:
    return asyncio.run(run_bench_async(config))
