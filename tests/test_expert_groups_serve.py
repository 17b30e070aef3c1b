"""Expert groups at inference: the engine runs requests of different groups in one batch with
the tokens each gets alone, prefill with per-token groups equals the full forward, bad groups
are one-line errors; the HTTP server takes `expert_group`, falls back to its rule or default
group, refuses otherwise, and reports per-group load on /metrics."""

from __future__ import annotations

import pytest
import torch

from moeflow import ModelConfig, RouterConfig, Transformer
from moeflow.infer.engine import Engine, EngineConfig
from moeflow.infer.sampling import SamplingParams

VOCAB = 300
GREEDY = SamplingParams(max_new_tokens=6, temperature=0)


def grouped_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=4,
                      max_seq_len=64, moe_every=1, num_experts=4, expert_d_ff=32, init_std=0.1,
                      router=RouterConfig(top_k=1, expert_groups=(("code", 2), ("text", 2))))
    model = Transformer(cfg)
    for layer in model.moe_layers():  # routing that depends on the input, experts that differ
        torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
        torch.nn.init.normal_(layer.experts.w_out_EFD, std=0.3)
    return model.eval()


def prompts_and_groups(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = int(torch.randint(3, 10, (), generator=g))
        ids = torch.randint(0, VOCAB, (t,), generator=g).tolist()
        groups = i % 2 if i % 3 else torch.randint(0, 2, (t,), generator=g).tolist()
        out.append((ids, groups))
    return out


def test_mixed_group_batch_equals_each_request_alone():
    model = grouped_model()
    cases = prompts_and_groups(6)
    engine = Engine(model, EngineConfig(max_batch_size=4))  # 6 requests: joins mid-batch
    together = engine.generate([p for p, _ in cases], GREEDY, groups=[g for _, g in cases])
    alone = [Engine(model, EngineConfig(max_batch_size=1)).generate([p], GREEDY, groups=[g])[0]
             for p, g in cases]
    assert together == alone
    # the group changes the answer: the same prompt in the other group decodes other logits
    p, _ = cases[1]
    seen = {}
    for group in (0, 1):
        e = Engine(model, EngineConfig(max_batch_size=1))
        e.logits_hook = lambda rid, row, group=group: seen.setdefault(group, row.clone())
        e.generate([p], GREEDY, groups=[group])
    assert not torch.allclose(seen[0], seen[1])
    stats = engine.stats()
    decoded = sum(len(t) - 1 for t in together)  # the last token is sampled, not fed back
    assert sum(stats.group_tokens) == sum(len(p) for p, _ in cases) + decoded
    assert stats.expert_groups == (("code", 2), ("text", 2))


def test_prefill_with_per_token_groups_equals_the_full_forward():
    model = grouped_model(seed=3)
    ids, groups = [5, 17, 200, 3, 99, 42, 7], [0, 1, 1, 0, 1, 0, 0]
    rows = []
    engine = Engine(model, EngineConfig(max_batch_size=2))
    engine.logits_hook = lambda rid, row: rows.append(row.clone())
    out = engine.generate([ids], SamplingParams(max_new_tokens=3, temperature=0),
                          groups=[groups])[0]
    full = ids + out[:-1]
    full_groups = groups + [groups[-1]] * (len(out) - 1)
    with torch.no_grad():
        ref = model(torch.tensor([full]), inference=True,
                    groups=torch.tensor([full_groups])).logits[0]
    for i, row in enumerate(rows):
        torch.testing.assert_close(row, ref[len(ids) - 1 + i], rtol=1e-5, atol=1e-5)


def test_engine_refuses_missing_or_bad_groups():
    engine = Engine(grouped_model(), EngineConfig(max_batch_size=1))
    for groups, message in [(None, "routes inside expert groups (code, text)"),
                            ([0, 1], "or a list of 3 (one per prompt token), got 2 ids"),
                            (torch.tensor([0, 1]), "got 2 ids"),
                            (True, "got True"), ("code", "got 'code'"),
                            (2, "group id 2 outside [0, 2)")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[")):
            engine.add_request([1, 2, 3], GREEDY, groups=groups)
    assert not engine.has_work()


def test_multi_rank_engine_refuses_a_grouped_model():
    # the step broadcast to the other ranks (moeflow.infer.ranks) carries no group ids; any
    # channel object will do, the engine must refuse before using it
    with pytest.raises(ValueError, match="grouped model runs on one rank"):
        Engine(grouped_model(), EngineConfig(max_batch_size=1), channel=object())


# ---- HTTP ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grouped_dir(tmp_path_factory):
    from moeflow.data.tokenizer import BPETokenizer
    from moeflow.train.checkpoint import save_checkpoint
    from moeflow.train.run_config import TrainConfig

    run = tmp_path_factory.mktemp("grouped_run")
    texts = ["def hello(name):\n    return 'hello ' + name  # greet\n",
             "The quick brown fox jumps over the lazy dog."] * 5
    model = grouped_model()
    save_checkpoint(run, 1, model=model, optimizers=[torch.optim.SGD(model.parameters(), lr=0.1)],
                    state={}, tokenizer=BPETokenizer.train(texts, vocab_size=VOCAB),
                    model_config=model.config, run_config=TrainConfig())
    return run


def client_for(grouped_dir, **serve):
    from starlette.testclient import TestClient

    from moeflow.serve.app import create_app
    from moeflow.serve.config import ServeConfig
    from moeflow.serve.server import build_state

    state = build_state(ServeConfig(model=str(grouped_dir), device="cpu", served_model_name="g",
                                    **serve))
    return TestClient(create_app(state)), state


def complete(client, prompt, **extra):
    return client.post("/v1/completions", json={"model": "g", "prompt": prompt, "max_tokens": 4,
                                                "temperature": 0, **extra})


def test_http_expert_group_field_rule_default_and_metrics(grouped_dir):
    client, state = client_for(grouped_dir)
    tok = state.loaded.tokenizer
    code = "def f(x):\n    return x  # twice\n"
    ids = tok.encode(code)
    with client:
        r = complete(client, code, expert_group="text")
        assert r.status_code == 200, r.text
        want_text = Engine(state.loaded.model).generate(
            [ids], SamplingParams(max_new_tokens=4, temperature=0), groups=[1])[0]
        assert r.json()["usage"]["completion_tokens"] == len(want_text)
        assert r.json()["choices"][0]["text"] == tok.decode(want_text)
        per_token = ["code"] * (len(ids) - 1) + ["text"]
        assert complete(client, code, expert_group=per_token).status_code == 200
        for body, message in [({}, "expert_group: the model routes inside expert groups"),
                              ({"expert_group": "image"}, "'image' is not one of the model's "
                                                          "expert groups (code, text)"),
                              ({"expert_group": ["code"]}, "1 groups for a prompt of")]:
            r = complete(client, code, **body)
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
            assert r.json()["error"]["param"] == "expert_group"
        metrics = client.get("/metrics").text
    assert 'moeflow_group_tokens_total{group="text"}' in metrics
    text_tokens = [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith('moeflow_group_tokens_total{group="text"}')][0]
    assert text_tokens == len(ids) + 3 + 1 + 3  # the two requests' prompt tokens and decodes
    assert 'moeflow_group_expert_tokens_total{group="code",moe_layer="0"}' in metrics

    client, state = client_for(grouped_dir, group_rule="modality")
    with client:  # the rule labels the prompt: code and comment tokens, one forward
        assert complete(client, code).status_code == 200
        r = client.post("/v1/chat/completions", json={
            "model": "g", "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 2})
        assert r.status_code == 200, r.text
        g = state.worker.stats.group_tokens
        assert g[0] > 0 and g[1] > 0
    client, state = client_for(grouped_dir, default_group="code")
    with client:
        assert complete(client, "The lazy dog.").status_code == 200
        assert state.worker.stats.group_tokens[1] == 0
