"""`moeflow serve` pieces in-process: streaming detokenization, stop strings, request
validation, chat templates, checkpoint loading, metrics text, bench percentiles, config."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest

from moeflow.data import tokenizer as tokenizer_module
from moeflow.data.tokenizer import BPETokenizer
from moeflow.infer.text import IncrementalDecoder, TextStream
from moeflow.serve.chat import DEFAULT_TEMPLATE, ChatTemplate
from moeflow.serve.config import ServeConfig
from moeflow.serve.metrics import ServerMetrics
from moeflow.serve.protocol import (ChatRequest, CompletionRequest, Limits, RequestError,
                                    build_job, parse_body, validate)
from tests._serve_util import TEXTS, tiny_tokenizer


@pytest.fixture(scope="module")
def bpe():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tok(bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    bpe.save(path)
    return BPETokenizer.load(path)


def stream_text(tok, ids, stop=()):
    ts = TextStream(tok, stop)
    out = "".join(ts.push(t) for t in ids)
    return out + ts.finish(), ts.stopped


def test_incremental_decoding_equals_decoding_at_once(tok):
    rng = random.Random(0)
    cases = [tok.encode(t) for t in TEXTS[:4]]                       # real text, multi-byte
    cases += [[rng.randrange(tok.vocab_size) for _ in range(60)] for _ in range(20)]  # any ids
    for ids in cases:
        dec = IncrementalDecoder(tok)
        deltas = [dec.push(t) for t in ids]
        assert "".join(deltas) + dec.flush() == tok.decode(ids)
    # A character split over byte tokens is held back until it is complete.
    ids = tok.encode("東")
    assert len(ids) > 1
    dec = IncrementalDecoder(tok)
    assert [dec.push(t) for t in ids][:-1] == [""] * (len(ids) - 1)


def test_text_stream_cuts_at_the_first_stop_string_even_across_tokens(tok):
    text = "def hello(name):\n    return 'hello ' + name\n"
    ids = tok.encode(text)
    assert stream_text(tok, ids) == (text, False)
    for stop in (("return",), ("lo(na",), ("zzz", "'hello"), ("\n",)):
        out, stopped = stream_text(tok, ids, stop)
        cut = min(text.find(s) for s in stop if s in text)
        assert (out, stopped) == (text[:cut], True), stop
    # Nothing after the stop is ever emitted, even in intermediate deltas.
    ts = TextStream(tok, ("return",))
    emitted = "".join(ts.push(t) for t in ids)
    assert "ret" not in emitted and ts.stopped


LIMITS = Limits(vocab_size=320, max_seq_len=64, capacity=10, default_max_tokens=16)


def job(tok, body, schema=CompletionRequest):
    return build_job(validate(schema, {"model": "m", **body}), LIMITS, tok, ChatTemplate())


def test_text_stream_drops_the_templates_reply_prefix_once(tok):
    assert ChatTemplate().reply_prefix == " " and ChatTemplate("{{ x }}").reply_prefix == ""
    for text, want in ((" hello  world", "hello  world"), ("hello", "hello"),
                       ("  two spaces", " two spaces"), (" ", "")):
        ids = tok.encode(text)
        ts = TextStream(tok, drop_prefix=" ")
        assert "".join(ts.push(t) for t in ids) + ts.finish() == want, text
    ts = TextStream(tok, stop=("wor",), drop_prefix=" ")
    assert "".join(ts.push(t) for t in tok.encode(" hello world")) + ts.finish() == "hello "


def test_build_job_applies_defaults_seeds_and_stops(tok, bpe):
    j = job(tok, {"prompt": ["ab", [5, 6, 7]], "n": 3, "seed": 5, "temperature": 0.5,
                  "top_k": -1, "stop": "x", "stop_token_ids": [9]})
    assert j.num_sequences == 6 and j.prompts[1] == (5, 6, 7) and j.prompt_of(4) == 1
    assert [p.seed for p in j.params] == [5, 6, 7, 8, 9, 10]
    assert all(p.max_new_tokens == 16 and p.top_k == 0 and p.temperature == 0.5
               for p in j.params)
    assert j.params[0].stop_token_ids == (9, bpe.eot_id) and j.stop == ("x",)
    j = job(tok, {"prompt": "ab", "ignore_eos": True, "max_tokens": 3})
    assert j.params[0].stop_token_ids == () and j.params[0].max_new_tokens == 3
    chat = job(tok, {"messages": [{"role": "user", "content": "hi"}]}, ChatRequest)
    assert chat.params[0].max_new_tokens == 64 - len(chat.prompts[0])  # chat: up to the window
    assert tok.decode(list(chat.prompts[0])) == "User: hi\n\nAssistant:"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": 64}, "max_tokens"),
    ({"prompt": [1] * 60, "max_tokens": 5}, "max_tokens"),
    ({"prompt": [1] * 64}, "prompt"),
    ({"prompt": ["ok", [1, 320]]}, "prompt[1]"),
    ({"prompt": "x", "n": 4, "best_of": 2}, "best_of"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "stop_token_ids": [400]}, "stop_token_ids"),
    ({"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"prompt": "x", "seed": 2**63}, "seed"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
])
def test_invalid_requests_name_the_field(tok, body, param):
    with pytest.raises(RequestError) as e:
        job(tok, body)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.message.startswith(param)


@pytest.mark.parametrize("raw, word", [(b"", "empty"), (b"{", "JSON"), (b"[]", "object"),
                                       (b"1e999999", "object"), (b"[" * 5000, "nested"),
                                       (b"9" * 5000, "JSON")])
def test_parse_body_refuses_non_objects(raw, word):
    with pytest.raises(RequestError) as e:
        parse_body(raw)
    assert e.value.status == 400 and word in e.value.message


def test_chat_templates(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ChatTemplate().render(msgs) == "System: be brief\n\nUser: hi\n\nAssistant:"
    assert ChatTemplate().source == DEFAULT_TEMPLATE
    hf_style = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}"
                "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    t = ChatTemplate(hf_style, bos_token="<s>", eos_token="</s>")
    assert t.render(msgs[1:]) == "<s><|user|>hi</s><|assistant|>"
    with pytest.raises(RequestError) as e:
        build_job(validate(ChatRequest, {"model": "m", "messages": msgs}), LIMITS, tok, t)
    assert e.value.param == "messages" and "System role not supported" in e.value.message
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_loads_a_training_run_and_a_hf_directory(tmp_path, bpe, monkeypatch):
    import torch

    from moeflow import ModelConfig, RouterConfig, Transformer
    from moeflow.interop.pretrained import save_hf
    from moeflow.serve.loader import load_for_serving
    from tests._serve_util import save_training_checkpoint

    reads = []
    read = tokenizer_module._read
    monkeypatch.setattr(tokenizer_module, "_read", lambda path: reads.append(path) or read(path))
    run = save_training_checkpoint(tmp_path / "run")
    loaded = load_for_serving(run, device="cpu")
    assert loaded.kind == "moeflow-train" and loaded.chat_template.is_default
    assert loaded.tokenizer.eos_ids == (bpe.eot_id,) and not loaded.model.training
    assert loaded.tokenizer.eos_token == "<|endoftext|>" and not loaded.tokenizer.add_special_tokens
    assert len(reads) == 1  # the tokenizer file is read once

    cfg = ModelConfig(name="t", arch="llama", vocab_size=320, n_layers=2, d_model=32, n_heads=4,
                      n_kv_heads=2, max_seq_len=64, moe_kind="moe", moe_every=1, num_experts=4,
                      expert_d_ff=16, qk_norm=True,
                      router=RouterConfig(top_k=2, dropless=True, normalize_topk=True))
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    save_hf(Transformer(cfg), hf)
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_for_serving(hf, device="cpu")
    bpe.save(hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|endoftext|>"}, "bos_token": None,
        "chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                         "{% endfor %}[assistant]"}))
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    reads.clear()
    loaded = load_for_serving(hf, device="cpu", dtype="bfloat16")
    assert loaded.kind == "qwen3_moe" and len(reads) == 1
    assert loaded.tokenizer.eos_ids == (7, 8, bpe.eot_id)
    assert loaded.tokenizer.add_special_tokens and loaded.tokenizer.bos_token == ""
    assert loaded.chat_template.render([{"role": "user", "content": "x"}]) == \
        "[user]x[assistant]"
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="does not exist"):
        load_for_serving(tmp_path / "missing")
    with pytest.raises(ValueError, match="no moeflow checkpoint|config.json"):
        load_for_serving(tmp_path)


def test_metrics_exposition_parses_with_its_labels_and_buckets():
    from prometheus_client.parser import text_string_to_metric_families

    from moeflow.infer.engine import EngineStats

    m, other = ServerMetrics(), ServerMetrics()
    m.requests.labels('/v1/"x"', 200).inc()
    for v in (0.004, 0.1, 0.7, 300.0):
        m.latency.observe(v)
    stats = EngineStats(running=1, waiting=2, cache_used=3, cache_capacity=64,
                        tokens_generated=9, expert_counts=((5, 0), (1, 4)))
    body, content_type = m.render(stats, outstanding=2, inflight=1, draining=False)
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode())
               for s in family.samples}
    assert samples[("moeflow_requests_total", (("endpoint", '/v1/"x"'), ("status", "200")))] == 1
    assert samples[("moeflow_admitted_sequences", ())] == 2
    assert samples[("moeflow_queue_depth", ())] == 2
    assert samples[("moeflow_engine_tokens_generated_total", ())] == 9
    assert samples[("moeflow_expert_tokens_total", (("expert", "1"), ("moe_layer", "1")))] == 4
    buckets = {dict(k[1])["le"]: v for k, v in samples.items()
               if k[0] == "moeflow_request_latency_seconds_bucket"}
    assert (buckets["0.005"], buckets["0.1"], buckets["1.0"], buckets["120.0"],
            buckets["+Inf"]) == (1, 2, 3, 3, 4)
    assert samples[("moeflow_request_latency_seconds_count", ())] == 4
    # One registry per app: the other app's counters did not move.
    other_body, _ = other.render(None, outstanding=0, inflight=0, draining=False)
    assert b'moeflow_requests_total{' not in other_body
    assert b"moeflow_expert_tokens_total" not in other_body


def test_percentiles_match_numpy():
    from moeflow.serve.bench import percentile

    rng = random.Random(1)
    xs = [rng.random() for _ in range(37)]
    assert len(set(xs)) == len(xs)  # distinct and unsorted: rank and interpolation both matter
    for q in (0, 10, 25, 50, 62.5, 90, 99, 100):
        assert math.isclose(percentile(xs, q), float(np.percentile(xs, q))), q
    assert math.isnan(percentile([], 50))


def test_serve_config_and_cli_errors(capsys):
    from moeflow.cli import main

    with pytest.raises(ValueError, match="max_batch=0"):
        ServeConfig(model="x", max_batch=0)
    with pytest.raises(ValueError, match="drain_timeout=nan"):
        ServeConfig(model="x", drain_timeout=float("nan"))
    assert ServeConfig(model="x", max_batch=3, max_queue=4).capacity == 7
    from moeflow.serve.server import torch_threads

    assert torch_threads(ServeConfig(model="x", device="cpu")) == max(1, os.cpu_count() - 1)
    assert torch_threads(ServeConfig(model="x", device="cpu", threads=3)) == 3
    with pytest.raises(ValueError, match="threads=0"):
        ServeConfig(model="x", threads=0)
    assert main(["serve", "--model", "/nonexistent/ckpt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeflow: error:") and "does not exist" in err and err.count("\n") == 1


def test_worker_survives_a_failing_step_and_aborts_free_the_cache():
    import asyncio

    import torch

    from moeflow import Transformer
    from moeflow.infer import Engine, EngineConfig, SamplingParams
    from moeflow.serve.worker import EngineFailure, EngineWorker
    from tests._serve_util import CONTEXT, tiny_config

    class FlakyEngine(Engine):
        fail_next = False
        fail_add = False

        def add_request(self, *args, **kw):
            if self.fail_add:
                self.fail_add = False
                raise KeyError("bug")
            return super().add_request(*args, **kw)

        def step(self):
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("boom")
            return super().step()

    torch.manual_seed(0)
    engine = FlakyEngine(Transformer(tiny_config()), EngineConfig(max_batch_size=2))
    long = SamplingParams(max_new_tokens=100, temperature=0)

    async def drain(handle):
        events = []
        while not (handle.done and handle.events.empty()):
            events.append(await handle.events.get())
        return events

    async def scenario():
        worker = EngineWorker(engine, capacity=3)
        worker.start()
        try:
            assert worker.try_admit(2) and not worker.try_admit(2) and worker.outstanding == 2
            engine.fail_next = True
            handle = await worker.submit([(1, 2), (3, 4)], [long, long], "a")
            events = await drain(handle)
            assert {type(e) for _, e in events} == {EngineFailure}
            assert "boom" in events[0][1].message and worker.outstanding == 0
            # Still serving: a request runs to completion after the failure.
            assert worker.try_admit(1)
            handle = await worker.submit([(5, 6, 7)], [SamplingParams(max_new_tokens=5,
                                                                      temperature=0)], "b")
            events = await drain(handle)
            assert len(events) == 5 and events[-1][1].finish_reason == "length"
            # Abort mid-generation: the sequence ends with "abort" and its cache is freed.
            assert worker.try_admit(1)
            handle = await worker.submit([(8, 9)], [long], "c")
            first = await handle.events.get()
            assert first[1].token_id is not None
            worker.abort(handle)
            rest = await drain(handle)
            assert rest[-1][1].finish_reason == "abort" and len(rest) < 99
            for _ in range(100):
                s = worker.stats
                if s.running == 0 and s.cache_used == 0:
                    break
                await asyncio.sleep(0.01)
            assert (s.running, s.waiting, s.cache_used, worker.outstanding) == (0, 0, 0, 0)
            # The engine's own validation surfaces as ValueError and releases the slots.
            assert worker.try_admit(1)
            with pytest.raises(ValueError, match="max_new_tokens"):
                await worker.submit([(1,) * (CONTEXT - 50)], [long], "d")
            assert worker.outstanding == 0
            engine.fail_add = True
            assert worker.try_admit(1)
            with pytest.raises(RuntimeError, match="could not add"):
                await worker.submit([(1, 2)], [long], "e")
            assert worker.outstanding == 0 and worker.alive
        finally:
            worker.stop()
        assert not worker.alive

    asyncio.run(scenario())
