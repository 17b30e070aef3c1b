"""Regional compilation of the blocks' dense part (Backends(dense="compiled"), `moeflow train
--compile`): the same loss and gradients as eager to fp32 rounding, one graph per block
structure whatever the depth, nothing compiled without autograd, and a training run that
follows the eager run. Inductor compiles C++ on the CPU here, so the model is tiny and each
graph is compiled once per test process (the dynamo cache is keyed on the code, not the model).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from moeflow import ModelConfig, Transformer
from moeflow.ops.backend import Backends
from moeflow.train import TrainConfig

from _train_small import assert_follows, cli_in_process, losses, train_argv, train_variants

CONFIG = ModelConfig(vocab_size=64, n_layers=4, d_model=16, n_heads=2, max_seq_len=16,
                     moe_every=2, num_experts=4)


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def loss_and_grads(model, ids):
    model.zero_grad()
    out = model(ids)
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.router_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def test_compiled_blocks_match_eager_with_one_graph_per_block_structure():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Transformer(CONFIG)
    compiled = Transformer(CONFIG, Backends(dense="compiled"))
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(0, CONFIG.vocab_size, (3, 12))
    with torch.no_grad():  # inference keeps its own paths: nothing is compiled
        torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, rtol=0, atol=0)
    assert unique_graphs() == 0
    loss, grads = loss_and_grads(eager, ids)
    loss_c, grads_c = loss_and_grads(compiled, ids)
    # four blocks, two structures (dense FFN: the whole block; MoE FFN: its attention part)
    assert unique_graphs() == 2
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    assert grads_c.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)
    loss_and_grads(compiled, torch.randint(0, CONFIG.vocab_size, (3, 12)))  # new data, same graphs
    assert unique_graphs() == 2


def test_training_with_compile_follows_the_eager_run(tmp_path, corpus, config):
    graphs = []
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        before = unique_graphs()
        train_variants(tmp_path, config, corpus, 3, **{name: extra})
        graphs.append(unique_graphs() - before)
    assert graphs == [0, 2]
    assert_follows(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rel=1e-4)
    assert TrainConfig(compile=True).compile


def test_dense_backend_names_are_checked():
    with pytest.raises(ValueError, match="dense"):
        Backends(dense="inductor")
    assert Backends.reference().dense == "eager"


def test_compile_without_a_cpp_compiler_is_a_one_line_error(tmp_path, corpus, config,
                                                            monkeypatch):
    """On the CPU inductor writes C++: with no compiler on PATH `--compile` is refused before
    anything is written, not with inductor's traceback at the first step."""
    from moeflow.ops.backend import compile_blocker
    assert compile_blocker(torch.device("cpu")) is None  # this machine has g++
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CXX", raising=False)
    assert "C++ compiler" in compile_blocker(torch.device("cpu"))
    out = tmp_path / "run"
    # --device cpu: on a CUDA machine "auto" trains on the GPU, where inductor writes Triton
    r = cli_in_process(*train_argv(config, corpus, out, "--steps", "2", "--compile",
                                   "--device", "cpu"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("moeflow: error: compile: torch.compile on the CPU needs a C++")
    assert not out.exists()
