"""Running the engine's decode step eagerly or as replayed CUDA graphs.

A decode step of a MoE model is hundreds of small kernels (norms, rope, routing, dispatch, two
expert kernels, combine, per layer); at batch 1 launching them from Python costs more than the
GPU needs to stream the weights. Capturing the step once and replaying it removes the launch
cost. Graphs need static shapes and addresses, so:

- the input tokens live in the engine's device buffer of each slot's next token
  (moeflow.infer.next_tokens), where the step before wrote its greedy tokens itself (and the
  host's sampling, rows that sample); the cached lengths and a real-row mask in one static
  device buffer, which the step advances itself (each real row's length by one), so a single
  host-to-device copy refreshes it only when the rows change (a request joins, finishes or
  moves; lookahead models, whose history rows change every step: each step);
- the batch is padded up to a bucket (powers of two up to the slot count); padded rows decode a
  dummy token into free cache slots (running sequences always occupy slots 0..B-1) and are masked
  out of the expert counts;
- keys are read up to a bucketed length S (powers of two, at least `MIN_KV_LEN`), masked past
  each sequence's own length;
- one graph per (batch bucket, S bucket), captured on first use after warm-up runs on a side
  stream (Triton autotuning and lazy initialisation must happen outside capture), each from the
  state the step found (the token buffer, the lengths, the expert counts it adds to), all sharing
  one memory pool since they never run concurrently.

The step updates that state itself and publishes its greedy tokens to the host itself (its
argmax writes them into the token ring, moeflow.infer.token_ring), so that between two replays
of a steady greedy batch the engine runs nothing: no counts' add, no token copy, no lengths
copied in, no copy out. Replays outside `GraphDecoder.__call__` (benchmarks) advance that state
too: `held_state()` puts it back after them, the token ring included. Capture's warm-up runs
also publish steps the host did not launch: the ring is resynchronised after them.

Both runners call the same `step_fn(tokens_B1, lengths_B, valid_B, kv_len) -> StepOutput`
(which also adds valid_B to lengths_B in place), so CPU tests exercise the exact computation
the graphs capture; `GraphDecoder` with capture=False runs the padded, bucketed step without
graphs (CPU tests of the padding). A model with a lookahead router (moeflow.model.lookahead)
also needs each row's `history` (the tokens before its input): `history_BH=` is then passed
too, from H more rows of the same buffer.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple

import torch

from moeflow.infer.token_ring import TokenRing

# The smallest key bucket: one 64-key block, the decode attention's (bf16, head dim 128) and,
# at batch 1, all its keys in one sliced block (moeflow.ops.decode_attention_triton.SLICED_KEYS:
# a 128-key bucket loads its 128 keys whatever the sequences' lengths). One more graph per batch
# bucket than a 128-key floor.
MIN_KV_LEN = 64


class StepOutput(NamedTuple):
    logits_BV: torch.Tensor
    # Each row's argmax (int64), computed inside the step and written into the token buffer
    # (the step's input), where the next step reads it: a greedy row's next input.
    greedy_B: torch.Tensor


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], StepOutput]


def _set_tokens(buffer: torch.Tensor, tokens: list[int] | None) -> None:
    """Host tokens into the device buffer (None: the buffer already holds them)."""
    if tokens is not None:
        buffer[:len(tokens)].copy_(torch.tensor(tokens, dtype=torch.int64))


class EagerDecoder:
    """Runs the step as is: batch and key length exactly as needed. `tokens`: the [slots]
    device buffer the input tokens are read from (moeflow.infer.next_tokens)."""

    def __init__(self, step_fn: StepFn, tokens: torch.Tensor) -> None:
        self.step_fn, self.tokens = step_fn, tokens

    def __call__(self, tokens: list[int] | None, lengths: list[int],
                 groups: list[int] | None = None, history: list[list[int]] | None = None
                 ) -> StepOutput:
        """Rows 0..n-1 (n = len(lengths)); `tokens`: their input tokens, or None when the buffer
        holds them; `groups`: each row's expert group (models with expert groups, which decode
        eagerly: the router reads each group's token count on the host, which capture forbids);
        `history`: each row's tokens before its input (lookahead models)."""
        _set_tokens(self.tokens, tokens)
        n = len(lengths)
        rows = [lengths, [1] * n] + ([groups] if groups is not None else [])
        H = 0 if history is None else len(history[0])
        rows += [list(col) for col in zip(*history)] if H else []
        inputs = torch.tensor(rows, dtype=torch.int64).to(self.tokens.device)
        extra = {} if groups is None else {"groups_B1": inputs[2, :, None]}
        if history is not None:
            extra["history_BH"] = inputs[len(rows) - H:].t()
        return self.step_fn(self.tokens[:n, None], inputs[0], inputs[1], max(lengths) + 1,
                            **extra)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class GraphDecoder:
    """Replays one captured CUDA graph per (batch bucket, key-length bucket)."""

    def __init__(self, step_fn: StepFn, tokens: torch.Tensor, max_len: int, *,
                 state: tuple[torch.Tensor, ...], capture: bool = True,
                 history: int | None = None, ring: TokenRing | None = None) -> None:
        """`tokens`: the [slots] device buffer the input tokens are read from (one per cache
        slot, moeflow.infer.next_tokens), which the step also writes (its greedy tokens);
        `history`: H, the tokens before each row's input that step_fn takes (None: none);
        `state`: the other tensors the step updates in place (beside the KV cache: the
        engine's expert counts). step_fn adds valid_B to lengths_B in place (each real row's
        length one longer); capture's warm-up runs put all of it back as they found it.
        `ring`: the token ring step_fn publishes into, resynchronised after capture's
        warm-ups and held with the rest of the state by held_state."""
        self.step_fn, self.tokens, self.max_len = step_fn, tokens, max_len
        self.num_slots = num_slots = tokens.numel()
        self.capture, self.history, self.ring = capture, history, ring
        rows = 2 + (history or 0)
        # Row 0: each slot's cached length (the step adds row 1 to it); row 1: 1 for a real
        # row, 0 for padding; then the history rows. `held`: the rows of the static buffer as
        # the last step left them (None: not known), so an unchanged batch copies nothing in.
        self.static = torch.zeros(rows, num_slots, dtype=torch.int64, device=tokens.device)
        self.held: list[list[int]] | None = None
        self.state = (tokens, self.static, *state)
        # Two pinned staging buffers, used by the copies in turn: the engine launches a step
        # before it has waited for the one before (pipelined decode), so the buffer the last
        # copy reads may not be rewritten yet; the one two copies back was read before a step
        # the engine has since waited for.
        self.host = [torch.zeros(rows, num_slots, dtype=torch.int64,
                                 pin_memory=tokens.device.type == "cuda") for _ in range(2)]
        self.copies_in = 0
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.last_key: tuple[int, int] | None = None  # (batch, key-length) bucket of the last step
        self.pool = None

    def buckets(self, n: int, kv_needed: int) -> tuple[int, int]:
        return (min(_pow2_at_least(n), self.num_slots),
                min(max(_pow2_at_least(kv_needed), MIN_KV_LEN), self.max_len))

    def __call__(self, tokens: list[int] | None, lengths: list[int],
                 groups: list[int] | None = None, history: list[list[int]] | None = None
                 ) -> StepOutput:
        """As EagerDecoder's; the outputs are the graph's static buffers (valid until the next
        call), cut to the n real rows."""
        if groups is not None:
            raise ValueError("GraphDecoder: models with expert groups decode eagerly")
        _set_tokens(self.tokens, tokens)
        n = len(lengths)
        B, S = self.buckets(n, max(lengths) + 1)
        self.last_key = (B, S)
        rows = [lengths, [1] * n]
        if self.history:
            rows += [list(col) for col in zip(*history)]
        if rows != self.held:
            host = self.host[self.copies_in % 2]
            self.copies_in += 1
            host.zero_()
            host[:, :n] = torch.tensor(rows, dtype=torch.int64)
            self.static.copy_(host, non_blocking=True)
        # What the step leaves there: the lengths one longer (history rows change each step).
        self.held = None if self.history else [[length + 1 for length in lengths], rows[1]]
        if not self.capture:
            out = self.step_fn(*self._args(B, S))
        else:
            if (B, S) not in self.graphs:
                self.graphs[B, S] = self._capture(B, S)
                if self.ring is not None:  # the warm-ups published
                    self.ring.resync()
            graph, out = self.graphs[B, S]
            graph.replay()
        return StepOutput(out.logits_BV[:n], out.greedy_B[:n])

    @contextlib.contextmanager
    def held_state(self) -> Iterator[None]:
        """For replays of the captured graphs outside __call__ (benchmarks timing them): the
        state they advance (lengths, next tokens, expert counts, the token ring) is put back
        afterwards, so the engine's next step finds it as the last one left it. The KV cache is
        not (the replays write the positions the next steps write again)."""
        ring = self.ring.held() if self.ring is not None else contextlib.nullcontext()
        with ring, restored(self.state):
            yield

    def _args(self, B: int, S: int) -> tuple:
        # Padded rows (n..B-1) read whatever token their free slot holds: always a valid id
        # (zeros, an earlier sequence's, or a padded row's own argmax); their results are unused.
        args = (self.tokens[:B, None], self.static[0, :B], self.static[1, :B], S)
        if self.history is not None:  # padded rows: history 0, a real token (masked out anyway)
            args += (None, self.static[2:, :B].t())
        return args

    def _capture(self, B: int, S: int) -> tuple[torch.cuda.CUDAGraph, StepOutput]:
        graph, outputs = capture_graph(self.step_fn, self._args(B, S), self.pool, self.state)
        self.pool = graph.pool()
        return graph, outputs


def warm_up(fn: Callable, args: tuple, state: tuple[torch.Tensor, ...] = (),
            runs: int = 2) -> None:
    """Run `fn(*args)` `runs` times, each from the same `state` (tensors fn updates in place:
    after each run they are put back as they were), so that the runs leave no trace there."""
    for _ in range(runs):
        with restored(state):
            fn(*args)


@contextlib.contextmanager
def restored(state: tuple[torch.Tensor, ...]) -> Iterator[None]:
    """The tensors of `state` as they were on entry, again on exit."""
    saved = [t.clone() for t in state]
    try:
        yield
    finally:
        for t, before in zip(state, saved):
            t.copy_(before)


def capture_graph(fn: Callable, args: tuple, pool, state: tuple[torch.Tensor, ...] = ()
                  ) -> tuple[torch.cuda.CUDAGraph, tuple]:
    """`fn(*args)` captured into `pool` (None: a new one), after two warm-up runs on a side
    stream (warm_up: `state` restored after each): Triton autotuning, torch.compile and lazy
    initialisation must happen outside capture. The warm-ups' other writes (KV cache) are the
    ones the replays repeat, from the same inputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up(fn, args, state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn(*args)
    return graph, outputs
