"""When the engine's sampled draws are captured and replayed (moeflow.infer.sampler_graphs): the
policy, with the capture and the kernels stood in for on the CPU (the tokens of real replays
against the reference draws: tests/test_engine_cuda.py)."""

import torch

from moeflow.infer import sampler_graphs
from moeflow.infer.sampler_graphs import MAX_GRAPHS, SamplerGraphs
from moeflow.infer.sampling import KernelDraws, SamplingParams, sampling_table


class FakeGraph:
    """Stands in for a captured draw: replay() writes the token its static table asks for."""

    def __init__(self, log, table_S6, out_B):
        self.log, self.table_S6, self.out_B = log, table_S6, out_B

    def replay(self):
        self.log.append("replay")
        self.out_B.copy_(self.table_S6[:, 3].long())


def fake_draw(log):
    def draw(logits_BV, draws, table_S6, greedy_B, tickets):
        log.append("eager")
        return table_S6[:, 3].long().clone()
    return draw


def graphs_on_cpu(monkeypatch, log):
    monkeypatch.setattr(sampler_graphs, "draw_on_kernels", fake_draw(log))
    graphs = SamplerGraphs(torch.device("cpu"))

    def capture(logits_BV, draws, host_S6, greedy_B, tickets):
        log.append("capture")
        table_S6 = host_S6.clone()
        graph = FakeGraph(log, table_S6, torch.empty(len(host_S6), dtype=torch.long))
        return graph, table_S6, graph.out_B

    monkeypatch.setattr(graphs, "_capture", capture)
    return graphs


GREEDY = torch.zeros(1, dtype=torch.long)


def draw(graphs, logits, draws, key_lo, greedy=GREEDY):
    host = torch.zeros(1, 6, dtype=torch.float64)
    host[0, 3] = key_lo
    return int(graphs.draw(logits, draws, host, greedy, None)[0])


def test_a_shape_is_captured_when_it_repeats_and_replays_each_steps_own_table(monkeypatch):
    log = []
    graphs = graphs_on_cpu(monkeypatch, log)
    logits = torch.zeros(1, 8)
    steady = KernelDraws(0, 0, False, 1, True)
    # The first draw of a shape runs eagerly; the second in a row captures and replays; every
    # replay draws from the table of its own step (the key column here).
    assert [draw(graphs, logits, steady, k) for k in (5, 6, 7, 8)] == [5, 6, 7, 8]
    assert log == ["eager", "capture", "replay", "replay", "replay"]
    log.clear()
    # Another shape once (a request joined, then finished): eager, and the first replays on.
    other = KernelDraws(1, 4, False, 0, False)
    assert [draw(graphs, logits, other, 9), draw(graphs, logits, steady, 10)] == [9, 10]
    assert log == ["eager", "replay"]
    # The same shape over other logits or greedy tokens (another batch bucket's buffers) is
    # another graph.
    log.clear()
    assert draw(graphs, torch.zeros(1, 8), steady, 11) == 11
    assert draw(graphs, logits, steady, 12, torch.zeros(1, dtype=torch.long)) == 12
    assert log == ["eager", "eager"]


def test_a_mix_changing_every_step_is_never_captured_and_old_shapes_are_dropped(monkeypatch):
    log = []
    graphs = graphs_on_cpu(monkeypatch, log)
    logits = torch.zeros(1, 8)
    shapes = [KernelDraws(1, k, False, 0, False) for k in range(1, 2 * MAX_GRAPHS + 2)]
    for step, shape in enumerate(shapes):
        draw(graphs, logits, shape, step)
    assert log == ["eager"] * len(shapes)
    for shape in shapes:  # each twice in a row: captured, at most MAX_GRAPHS kept
        draw(graphs, logits, shape, 0)
        draw(graphs, logits, shape, 0)
    assert log.count("capture") == len(shapes) and len(graphs.graphs) == MAX_GRAPHS
    assert [key[0] for key in graphs.graphs] == shapes[-MAX_GRAPHS:]


def test_kernel_draws_follow_the_table_rows_with_a_top_k_first():
    params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.9, top_k=40, top_p=0.8)]
    table = sampling_table(params, [1] * 5, [10] * 5, 1000, kernel=True)
    assert [row[5] for row in table] == [2, 4, 0, 3]  # top-k rows first, each group in order
    assert KernelDraws.of(table) == KernelDraws(2, 40, True, 2, True)
    # A top-k of the whole vocabulary is none; the CPU path keeps the batch's order.
    table = sampling_table([SamplingParams(top_k=1000), SamplingParams(top_k=3)], [1, 2],
                           [5, 5], 1000, kernel=False)
    assert [(row[1], row[5]) for row in table] == [(0, 0), (3, 1)]
    assert KernelDraws.of(sampling_table(params[3:4], [1], [1], 1000, True)) == \
        KernelDraws(0, 0, False, 1, False)
