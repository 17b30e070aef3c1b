"""The serving engine: continuous batching over a slot KV cache, streaming one event per token.

The caller drives it (single-threaded): `add_request` queues a prompt, each `step()` decodes one
token for every running request (one batched forward, replayed as a CUDA graph on GPU), then
admits waiting requests into free cache slots and prefills them (one forward per prompt, which
also yields their first token; on GPU replayed as a CUDA graph per prompt-length bucket,
moeflow.infer.prefill_graphs), and returns the step's `TokenEvent`s. Requests leave the batch
the step they stop; `abort` frees a request's slot at once.

Pipelined decode: tokens are sampled on the device and stay there as the next step's input
(moeflow.infer.next_tokens), so each `step()` launches its decode forward first and only then
reads the previous call's sampled tokens and turns them into events: the host's work (that
read, stop checks, events, the caller's handling of them, admissions) overlaps the GPU's next
step instead of leaving the GPU idle. A step's events are therefore returned by the following
`step()` call (a prefill's first token by its own call). A request that stops on a stop token,
or reaches max_new_tokens while batch-mates go on, has already been given one more decode row
(the rows are the slots), whose token is dropped; no step is launched when every running
request is sure to reach max_new_tokens with the step in flight. Engines that read
tokens on the host before each forward decode one step at a time: several ranks (the step
broadcast carries the tokens), lookahead routers (the token history), offloading and expert
groups.

Why a request's tokens do not depend on its batch-mates: every forward the engine runs routes
with `inference=True` (dropless, so no competition for expert slots, and no router noise), every
row attends only to its own slot, and a sampled token is a function of its row's logits, the
request's parameters and seed (`SamplingParams.seed`, else a random one drawn at add_request) and
the token's position (moeflow.infer.sampling: counter-based noise, no generator state). The
routing mode is an argument of the engine's forwards, not a setting of the model: the engine
changes nothing on the model it is given (not even `model.training`), so a model shared with a
trainer trains as before. The one exception is `EngineConfig.offload` (`--gpu-memory`): a
model that does not fit the GPU must be placed by the engine, which moves its experts to host
memory behind a GPU expert cache and the rest to the device (moeflow.infer.offload.placement).

On several ranks (tensor slicing × expert parallelism, moeflow.parallel.inference) every rank
builds an Engine over its shard of the model with the same `channel` (moeflow.infer.ranks):
rank 0 is driven as above and broadcasts the inputs of every forward it runs; the other ranks
call `follow()`, which runs the same forwards until rank 0's `close()`. Decode then runs eagerly
(the token exchange reads split sizes on the host, which graph capture forbids). Grouped models are
refused on several ranks for now (the step broadcast carries no group ids).

Expert groups (a model whose router names expert_groups, moeflow.model.expert_groups): every
request carries its tokens' groups, `add_request(..., groups=g)` with one group id for the
whole request or one per prompt token; generated tokens continue in the last prompt token's
group. A request without groups is refused (a silent group 0 would answer from the wrong
experts). Requests of different groups share every forward: the decode batch passes one group
per row, and routing keeps each row inside its group, so a request's tokens are the same as
when it runs alone. Grouped models decode eagerly (no CUDA graphs): the router reads each
group's token count on the host. `stats()` adds the groups' expert ranges and tokens per group.

Lookahead routing (a model with a lookahead router, moeflow.model.lookahead): each forward also
passes every row's tokens before its input (the router's window), taken from the request. An
offloading engine may then prefetch a whole step's experts from the tokens alone
(`--prefetch lookahead`), and `batching="expert-aware"` admits the waiting requests whose
predicted experts overlap most with the running batch's (moeflow.infer.scheduler).

This is moeflow's one inference path: `moeflow generate` and the demo (moeflow.infer.text) and
the server (moeflow.serve) all decode through it. The reference it is tested against is the
plain full-sequence forward, `model(ids, inference=True)`.

Example:
    engine = Engine(model, EngineConfig(max_batch_size=8))
    rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=16, temperature=0))
    while engine.has_work():
        for event in engine.step():
            print(event.request_id, event.token_id, event.finish_reason)

Legend: B running requests (batch rows), V vocabulary, L MoE layers, T tokens, K top-k.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import secrets
from collections.abc import Iterable
from typing import Any, Callable

import torch

from moeflow.infer.decode_graphs import EagerDecoder, GraphDecoder, StepOutput
from moeflow.infer.engine_types import EngineConfig, EngineStats, TokenEvent
from moeflow.infer.next_tokens import NextTokens, SampledTokens
from moeflow.infer.prefill_graphs import GraphPrefiller
from moeflow.infer.sampler_graphs import SamplerGraphs
from moeflow.infer.offload.placement import ExpertOffload, offload_experts
from moeflow.infer.ranks import StepChannel, StepOp
from moeflow.infer.sampling import SamplingParams, greedy_tokens, kernels_on, sample_tokens
from moeflow.infer.scheduler import Request, Scheduler
from moeflow.infer.slot_cache import DecodeView, PrefillView, SlotKVCache, SlotPrefillView
from moeflow.ops.backend import resolve_expert_backend
from moeflow.ops.expert_mlp import expert_mlp_reference

__all__ = ["Engine", "EngineConfig", "EngineStats", "TokenEvent", "count_experts",
           "graph_capturable"]


def _token_ids(prompt_ids: Any) -> list[int]:
    """A prompt as a list of Python ints: a sequence or 1-d tensor of integers (no bools,
    floats or strings, which int() would quietly turn into other ids)."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Iterable):
        raise ValueError(f"prompt_ids: expected a list of token ids, got "
                         f"{type(prompt_ids).__name__}")
    ids = []
    for t in prompt_ids:
        if isinstance(t, bool):
            raise ValueError(f"prompt_ids: {t!r} is not a token id")
        try:
            ids.append(operator.index(t))
        except TypeError:
            raise ValueError(f"prompt_ids: {t!r} is not a token id (an integer)") from None
    return ids


def graph_capturable(model: torch.nn.Module) -> bool:
    """False when a decode step would run the plain-torch expert loop (fp32 on CUDA, say): it
    reads expert boundaries on the host, which CUDA-graph capture forbids."""
    for layer in model.moe_layers():
        e = layer.experts
        x_1D = e.w_in_EDI.new_empty(1, e.d_model)
        if resolve_expert_backend(e.backends.experts, x_1D, e.w_in_EDI,
                                  e.w_out_EFD) is expert_mlp_reference:
            return False
    return True


def count_experts(routing, valid_T: torch.Tensor, offsets_L: torch.Tensor,
                  total_experts: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """Assignments per expert over all MoE layers, flattened [Σ E], counting only rows where
    valid_T is 1 (padding rows of a captured batch are 0). Few kernels, no host sync.
    `into`: an int64 [Σ E] tensor the counts are added to (returned), else a new one."""
    counts = (torch.zeros(total_experts, dtype=torch.int64, device=valid_T.device)
              if into is None else into)
    if not routing:
        return counts
    if len({r.ids_TK.shape for r in routing}) == 1:
        ids_LTK = torch.stack([r.ids_TK for r in routing]) + offsets_L[:, None, None]
        w_LTK = valid_T[None, :, None].expand_as(ids_LTK)
        return counts.scatter_add_(0, ids_LTK.reshape(-1), w_LTK.reshape(-1))
    for r, offset in zip(routing, offsets_L):
        ids = (r.ids_TK + offset).reshape(-1)
        counts.scatter_add_(0, ids, valid_T[:, None].expand_as(r.ids_TK).reshape(-1))
    return counts


class Engine:
    """`channel`: set on every rank of a multi-rank engine (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, config: EngineConfig = EngineConfig(),
                 channel: StepChannel | None = None) -> None:
        mc = model.config
        if channel is not None and config.offload is not None:
            raise ValueError("offload: expert offloading runs on one process; with several "
                             "ranks the experts are spread over them instead")
        self.config = config
        self.vocab_size = mc.vocab_size
        self.max_seq_len = config.max_seq_len or mc.max_seq_len
        if self.max_seq_len > mc.max_seq_len:
            raise ValueError(f"max_seq_len={self.max_seq_len}: exceeds the model's "
                             f"max_seq_len {mc.max_seq_len}")
        cache_tokens = config.cache_tokens or config.max_batch_size * self.max_seq_len
        num_slots = min(config.max_batch_size, cache_tokens // self.max_seq_len)
        if num_slots < 1:
            raise ValueError(f"cache_tokens={config.cache_tokens}: holds no sequence of "
                             f"max_seq_len {self.max_seq_len}")
        if config.batching == "expert-aware" and model.lookahead is None:
            raise ValueError("batching='expert-aware': the model has no lookahead router to "
                             "predict requests' experts (moeflow train --lookahead)")
        # Every refusal above: offload_experts below rewrites the model's MoE layers.
        self.model = model
        self.offload: ExpertOffload | None = None
        if config.offload is not None:
            kv_bytes = SlotKVCache.bytes_per_token(model) * num_slots * self.max_seq_len
            self.offload = offload_experts(model, config.offload, kv_bytes, self.max_seq_len,
                                           num_slots)
        self.device = next(model.parameters()).device
        self.expert_groups = mc.router.expert_groups
        self._group_tokens = [0] * len(self.expert_groups)
        self.cache = SlotKVCache.for_model(model, num_slots, self.max_seq_len)
        lookahead = model.lookahead
        # tokens before each row's input that a lookahead model's forwards take (None: none)
        self._history = None if lookahead is None else lookahead.history
        if self._history is not None and channel is not None:
            raise ValueError("lookahead router: a lookahead model runs on one rank for now "
                             "(the multi-rank step broadcast carries no token history)")
        self.scheduler = Scheduler(num_slots, config.batching, config.batching_window,
                                   config.batching_max_wait)
        sizes = [layer.experts.num_experts for layer in model.moe_layers()]
        self._expert_sizes = sizes
        self._expert_offsets = torch.tensor([0, *itertools.accumulate(sizes)][:len(sizes)],
                                            dtype=torch.int64, device=self.device)
        self._expert_counts = torch.zeros(sum(sizes), dtype=torch.int64, device=self.device)
        # One counter per row, one more across rows (the token ring's).
        self._argmax_tickets = torch.zeros(num_slots + 1, dtype=torch.int32,
                                           device=self.device)
        # A captured decode step counts its experts on this stream, beside the LM head.
        self._count_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if channel is not None and self.expert_groups:
            raise ValueError("expert groups: a grouped model runs on one rank for now (the "
                             "multi-rank step broadcast carries no group ids)")
        self.channel = channel
        self._moves: list[tuple[int, int, int]] = []  # not yet sent to the other ranks
        # Decode steps' greedy tokens come to the host through the token ring where the
        # Triton argmax writes them (moeflow.infer.next_tokens).
        self.next_tokens = NextTokens(num_slots, self.device, ring=kernels_on(self.device))
        # Pipelined decode (module docstring) where no forward needs its tokens on the host.
        self._pipelined = (config.pipelined_decode and channel is None and self._history is None
                           and self.offload is None and not self.expert_groups)
        self._in_flight: SampledTokens | None = None  # a launched decode's unread tokens
        self._prefiller: GraphPrefiller | None = None
        # A replayed decode step's sampled rows are drawn by replayed graphs too.
        self._sampler_graphs: SamplerGraphs | None = None
        if (self.device.type == "cuda" and config.cuda_graphs and self.offload is None
                and channel is None and not self.expert_groups and graph_capturable(model)):
            self._decoder = self._graph_decoder()
            self._sampler_graphs = SamplerGraphs(self.device)
            if config.prefill_graphs:
                self._prefiller = GraphPrefiller(
                    self._prefill_forward, min(config.prefill_graph_tokens, self.max_seq_len),
                    self.device)
        else:
            self._decoder = EagerDecoder(self._decode_forward, self.next_tokens.ids)
        self._pending: list[TokenEvent] = []
        self._next_id = itertools.count()
        # Ids whose last event (finished or aborted) step() has not returned yet: not reusable.
        self._live_ids: set[str] = set()
        self._tokens_generated = 0
        # Optional observer of every sampled row's logits (request_id, logits_V); tests use it.
        # Pipelined, a request that finished while batch-mates ran on may show one more row
        # (sampled, then dropped).
        self.logits_hook: Callable[[str, torch.Tensor], None] | None = None

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, groups: int | list[int] | None = None
                    ) -> str:
        """Queue a prompt; `groups` (models with expert groups): one group id for the request,
        or one per prompt token."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        prompt = _token_ids(prompt_ids)
        if not prompt:
            raise ValueError("prompt_ids: the prompt is empty")
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_ids: token id {bad} outside [0, {self.vocab_size})")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt_ids: {len(prompt)} tokens leave no room to generate in "
                             f"max_seq_len {self.max_seq_len}")
        if len(prompt) + params.max_new_tokens > self.max_seq_len:
            raise ValueError(f"max_new_tokens: prompt of {len(prompt)} tokens + "
                             f"max_new_tokens {params.max_new_tokens} exceeds max_seq_len "
                             f"{self.max_seq_len}")
        if request_id is None:
            request_id = next(f"req-{i}" for i in self._next_id if f"req-{i}" not in
                              self._live_ids)
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id={request_id!r}: must be a non-empty string")
        elif request_id in self._live_ids:
            raise ValueError(f"request_id={request_id!r}: already in use (until step() has "
                             f"returned its last event)")
        prompt_groups = self._check_groups(groups, len(prompt))
        seed = secrets.randbits(63) if params.seed is None else params.seed
        self.scheduler.add(Request(request_id, prompt, params, seed, prompt_groups))
        self._live_ids.add(request_id)
        return request_id

    def _check_groups(self, groups: int | list[int] | None, length: int) -> list[int] | None:
        names = tuple(name for name, _ in self.expert_groups)
        if not names:
            if groups is not None:
                raise ValueError("groups: this model has no expert groups")
            return None
        if groups is None:
            raise ValueError(f"groups: the model routes inside expert groups ({', '.join(names)}); "
                             f"give the request one group id or one per prompt token")
        if isinstance(groups, torch.Tensor):
            groups = groups.tolist()
        if isinstance(groups, (list, tuple)):
            ids = list(groups)
        else:
            ids = [groups] * length
        if len(ids) != length or not all(type(g) is int for g in ids):
            got = (f"{len(ids)} ids" if isinstance(groups, (list, tuple)) else repr(groups))
            raise ValueError(f"groups: give one group id (an int) or a list of {length} (one per "
                             f"prompt token), got {got}")
        bad = next((g for g in ids if not 0 <= g < len(names)), None)
        if bad is not None:
            raise ValueError(f"groups: group id {bad} outside [0, {len(names)}) "
                             f"({', '.join(names)})")
        return ids

    def abort(self, request_id: str) -> None:
        """Drop a request now (its cache slot is freed); the next step reports an "abort" event.
        Unknown or finished ids are ignored."""
        request = self.scheduler.drop_waiting(request_id)
        if request is None:
            request = self.scheduler.find_running(request_id)
            if request is None:
                return
            request.finish_reason = "abort"  # a decode in flight drops its row
            self._release(request)
        self._pending.append(TokenEvent(request_id, None, True, "abort"))

    def has_work(self) -> bool:
        s = self.scheduler
        return bool(s.waiting or s.running or self._pending or self._in_flight)

    def stats(self) -> EngineStats:
        flat = self._expert_counts.tolist()
        per_layer, start = [], 0
        for size in self._expert_sizes:
            per_layer.append(tuple(flat[start:start + size]))
            start += size
        running = self.scheduler.running
        return EngineStats(
            running=len(running), waiting=len(self.scheduler.waiting),
            cache_used=sum(r.cached for r in running),
            cache_capacity=self.cache.num_slots * self.max_seq_len,
            tokens_generated=self._tokens_generated, expert_counts=tuple(per_layer),
            offload=None if self.offload is None else self.offload.stats(),
            expert_groups=self.expert_groups, group_tokens=tuple(self._group_tokens))

    # -- stepping ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Launch one decode token for every running request, return the events of the decode
        launched before (pipelined; this one's when not pipelined), then admit and prefill
        waiting requests (their first tokens' events included)."""
        events, self._pending = self._pending, []
        in_flight, self._in_flight = self._in_flight, None
        running = list(self.scheduler.running)
        launched = self._launch_decode(running) if self._needs_step(running, in_flight) else None
        if in_flight is not None:
            self._emit(in_flight, events)
        if launched is not None:
            if self._pipelined:
                self._in_flight = launched
            else:
                self._emit(launched, events)
        for _, request in self.scheduler.admit(self._predicted_experts):
            # Its slot now, not at admission: a request admitted before it may have finished on
            # its first token and moved the last running one (possibly this) into its slot.
            slot = self.scheduler.running.index(request)
            self._broadcast("prefill", request.prompt_ids, slot=slot)
            logits_1V = self._prefill(slot, request.prompt_ids, request.prompt_groups)
            request.cached = len(request.prompt_ids)
            self._emit(self._sample([request], logits_1V, None, slot), events)
        self._live_ids.difference_update(e.request_id for e in events if e.finished)
        return events

    @staticmethod
    def _needs_step(running: list[Request], in_flight: SampledTokens | None) -> bool:
        """Whether a running request may still want a token after the one in flight."""
        pending = set(in_flight.requests) if in_flight is not None else set()
        return any(len(r.output_ids) + (r in pending) < r.params.max_new_tokens
                   for r in running)

    def _launch_decode(self, running: list[Request]) -> SampledTokens:
        lengths = [r.cached for r in running]
        groups = None
        if self.expert_groups:
            groups = [r.decode_group for r in running]
            for g in groups:
                self._group_tokens[g] += 1
        if self.channel is not None:  # not pipelined: the last tokens are the host's
            self._broadcast("decode", [r.last_token for r in running], lengths)
        history = (None if self._history is None
                   else [r.history(self._history) for r in running])
        out = self._decoder(None, lengths, groups, history)  # tokens: self.next_tokens
        ring = self.next_tokens.ring
        published = ring.issued() if ring is not None else None
        for request in running:
            request.cached += 1
        return self._sample(running, out.logits_BV, out.greedy_B, 0, published,
                            self._sampler_graphs)

    def follow(self) -> None:
        """On a rank other than 0 of a multi-rank engine: run the forwards rank 0 announces
        (cache moves, prefills, decode steps) until it closes."""
        if self.channel is None:
            raise RuntimeError("follow() needs an engine built with a channel")
        with torch.no_grad():
            while True:
                op = self.channel.recv()
                for move in op.moves:
                    self.cache.move(*move)
                if op.kind == "stop":
                    return
                if op.kind == "decode":
                    self._decoder(list(op.a), list(op.b))
                else:
                    self._prefill(op.slot, list(op.a))

    def close(self) -> None:
        """On rank 0 of a multi-rank engine: release the other ranks from `follow`."""
        if self.channel is not None:
            self._broadcast("stop", ())

    def _broadcast(self, kind: str, a, b=(), slot: int = 0) -> None:
        if self.channel is not None:
            self.channel.send(StepOp(kind, tuple(self._moves), tuple(a), tuple(b), slot))
            self._moves = []

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 groups: list[int | list[int]] | None = None) -> list[list[int]]:
        """Run `prompts` to completion (the engine must be idle); returns their new tokens.
        `groups`: each prompt's groups, as add_request takes them."""
        if self.has_work():
            raise RuntimeError("generate() needs an idle engine; drive step() instead")
        groups = [None] * len(prompts) if groups is None else groups
        if len(groups) != len(prompts):
            raise ValueError(f"groups: {len(groups)} entries for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, group in zip(prompts, groups):
                ids.append(self.add_request(prompt, params, groups=group))
        except Exception:
            for request_id in ids:  # none has run: take them back, the engine idle again
                self.scheduler.drop_waiting(request_id)
                self._live_ids.discard(request_id)
            raise
        outputs: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_work():
            for event in self.step():
                if event.token_id is not None:
                    outputs[event.request_id].append(event.token_id)
        return [outputs[i] for i in ids]

    # -- internals --------------------------------------------------------------------------

    def _predicted_experts(self, requests: list[Request]) -> list[frozenset[tuple[int, int]]]:
        """Each request's next token's (MoE layer, expert) set from the lookahead router: a
        running request's next input is its last token; a waiting one's is predicted by its
        last prompt token (the first token it decodes is not known yet)."""
        ids_N1 = torch.tensor([[r.last_token] for r in requests], device=self.device)
        hist_NH = torch.tensor([r.history(self._history) for r in requests],
                               dtype=torch.int64, device=self.device).view(len(requests), -1)
        ids = self.model.lookahead_routing(ids_N1, hist_NH)
        L = len(ids)
        flat = torch.stack(ids).tolist() if L else []  # [L][N][K], one host sync
        return [frozenset((layer, e) for layer in range(L) for e in flat[layer][n])
                for n in range(len(requests))]

    def _decode_forward(self, tokens_B1: torch.Tensor, lengths_B: torch.Tensor,
                        valid_B: torch.Tensor, kv_len: int, groups_B1: torch.Tensor | None = None,
                        history_BH: torch.Tensor | None = None) -> StepOutput:
        if self.offload is not None and history_BH is not None:
            self.offload.before_decode(self.model, tokens_B1, history_BH)
        extra = {} if history_BH is None else {"history": history_BH}
        out = self.model(tokens_B1, cache=DecodeView(self.cache, lengths_B, kv_len),
                         inference=True, groups=groups_B1, hidden_only=True, **extra)
        # The step keeps its own books, so that nothing runs between two replayed steps of a
        # steady batch but the tokens' copy to the host: the expert counts are added to the
        # engine's running totals and each real row's length grows by one (captured: on a side
        # stream beside the LM head, off the step's critical path; joined before the step
        # ends), and the greedy tokens are written where the next step reads its input (rows
        # decoding a sampled token get theirs on the host's side).
        side = (self._count_stream if self._count_stream is not None
                and torch.cuda.is_current_stream_capturing() else None)
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            count_experts(out.routing, valid_B, self._expert_offsets, self._expert_counts.numel(),
                          into=self._expert_counts)
            lengths_B.add_(valid_B)
        logits_BV = self.model.head(out.hidden)[:, 0]
        greedy_B = greedy_tokens(logits_BV, self._argmax_tickets, out=tokens_B1[:, 0],
                                 ring=self.next_tokens.ring)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        return StepOutput(logits_BV, greedy_B)

    def _graph_decoder(self, capture: bool = True) -> GraphDecoder:
        """The decode step bucketed, and on CUDA captured (capture=False: padded and bucketed
        only, as CPU tests run it); the step's in-place state (the next-token buffer, the expert
        counts) declared so that capture's warm-up runs leave it as it was."""
        return GraphDecoder(self._decode_forward, self.next_tokens.ids, self.max_seq_len,
                            capture=capture, history=self._history, state=(self._expert_counts,),
                            ring=self.next_tokens.ring)

    def _prefill_forward(self, ids_1T: torch.Tensor, last_11: torch.Tensor,
                         valid_T: torch.Tensor, slot_1: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded prompt into the slot `slot_1` holds (what GraphPrefiller captures)."""
        out = self.model(ids_1T, cache=SlotPrefillView(self.cache, slot_1), logits_at=last_11,
                         inference=True, **self._prompt_history())
        counts = count_experts(out.routing, valid_T, self._expert_offsets,
                               self._expert_counts.numel())
        return out.logits[:, 0], counts

    def _prefill(self, slot: int, prompt_ids: list[int],
                 prompt_groups: list[int] | None = None) -> torch.Tensor:
        T = len(prompt_ids)
        if self._prefiller is not None and self._prefiller.fits(T):  # never a grouped model
            logits_1V, counts = self._prefiller(slot, prompt_ids)
            self._expert_counts += counts
            return logits_1V
        ids_1T = torch.tensor([prompt_ids], dtype=torch.int64, device=self.device)
        last = torch.full((1, 1), T - 1, dtype=torch.int64, device=self.device)
        groups_1T = None
        if prompt_groups is not None:
            groups_1T = torch.tensor([prompt_groups], dtype=torch.int64, device=self.device)
            for g in prompt_groups:
                self._group_tokens[g] += 1
        out = self.model(ids_1T, cache=PrefillView(self.cache, slot, 0), logits_at=last,
                         inference=True, groups=groups_1T, **self._prompt_history())
        count_experts(out.routing, torch.ones(T, dtype=torch.int64, device=self.device),
                      self._expert_offsets, self._expert_counts.numel(), into=self._expert_counts)
        return out.logits[:, 0]

    def _prompt_history(self) -> dict[str, torch.Tensor]:
        """A prompt starts its sequence: no tokens before it (lookahead models)."""
        if self._history is None:
            return {}
        return {"history": torch.full((1, self._history), -1, dtype=torch.int64,
                                      device=self.device)}

    def _sample(self, requests: list[Request], logits_BV: torch.Tensor,
                greedy_B: torch.Tensor | None, first_slot: int,
                published: int | None = None, graphs: SamplerGraphs | None = None
                ) -> SampledTokens:
        """Each row's next token, on the device, recorded as the next input of the requests'
        slots (first_slot onwards): greedy rows take their argmax (`greedy_B`, or computed
        here), sampled rows are drawn together, each for its position in its sequence (the
        tokens its cache holds: a new token's index) under its seed (`graphs`: a decode
        step's draw, replayed from CUDA graphs once its shape repeats). No host sync.
        `published`: a decode step's seq in the token ring (TokenRing.issued), where the host
        then reads the step's tokens if they are all its greedy ones."""
        if self.logits_hook is not None:
            for request, row_V in zip(requests, logits_BV):
                self.logits_hook(request.request_id, row_V)
        tokens_B = sample_tokens(logits_BV, [r.params for r in requests],
                                 [r.seed for r in requests], [r.cached for r in requests],
                                 greedy_B, self._argmax_tickets, graphs)
        return self.next_tokens.record(first_slot, tokens_B, requests, published)

    def _emit(self, sampled: SampledTokens, events: list[TokenEvent]) -> None:
        for request, token in zip(sampled.requests, sampled.read()):
            if request.finish_reason is not None:  # finished (or aborted) while it ran
                continue
            reason = request.append(token)
            self._tokens_generated += 1
            events.append(TokenEvent(request.request_id, token, reason is not None, reason))
            if reason is not None:
                self._release(request)

    def _release(self, request: Request) -> None:
        move = self.scheduler.release(request)
        if move is not None:
            self.cache.move(*move)
            self.next_tokens.move(*move[:2])
            if self.channel is not None:
                self._moves.append(move)
