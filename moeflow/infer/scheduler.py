"""Which requests run this step: a waiting queue and the running set, bound to cache slots.

Continuous batching: every step decodes one token for each running request, then admits waiting
requests into the slots freed by the ones that finished, and prefills them in the same step, so
a request joins the batch as soon as a slot is free and leaves it the moment it stops. The
running list is kept dense: request i of `running` owns cache slot i, and when a request leaves,
the last one moves into its slot (`release` returns the move for the cache).

Admission order (`batching`):
  * "fifo" (default): oldest first.
  * "expert-aware": for an offloading engine, whose decode step costs roughly the distinct
    experts it needs per layer, admit the waiting request whose predicted experts overlap most
    with the running batch's. The caller predicts them (`experts_of`: for a model with a
    lookahead router, each request's next token's experts in every layer, known from token ids
    alone, moeflow.model.lookahead); only the oldest `window` waiting requests are considered
    (bounded work per step), ties go to the older one, and a request that has waited `max_wait`
    admission rounds or more is admitted before any other (oldest first), so none starves.

This file holds only bookkeeping (no tensors), so the policy can be read and tested alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable

from moeflow.infer.sampling import SamplingParams


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # its draws' (moeflow.infer.sampling.draw_key)
    # Expert groups: the prompt tokens' group ids (None: the model has no groups); generated
    # tokens continue in the last prompt token's group (`decode_group`).
    prompt_groups: list[int] | None = None
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys/values are in the cache
    finish_reason: str | None = None
    queued_at: int = 0  # the scheduler's admission round when the request was queued

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def history(self, n: int) -> list[int]:
        """The n tokens before `last_token` in the request's sequence, -1 where there are none
        (a lookahead router's window, moeflow.model.lookahead)."""
        before = (self.prompt_ids + self.output_ids)[-n - 1:-1] if n else []
        return [-1] * (n - len(before)) + before

    @property
    def decode_group(self) -> int | None:
        return None if self.prompt_groups is None else self.prompt_groups[-1]

    def append(self, token: int) -> str | None:
        """Record a generated token; returns the finish reason if the request is now done."""
        self.output_ids.append(token)
        p = self.params
        if token in p.stop_token_ids or any(
                self.output_ids[-len(s):] == list(s) for s in p.stop_sequences):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= p.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason


BATCHING = ("fifo", "expert-aware")

# requests -> each one's predicted experts, e.g. {(MoE layer, expert), ...}
ExpertsOf = Callable[[list[Request]], list[frozenset[Hashable]]]


class Scheduler:
    def __init__(self, num_slots: int, batching: str = "fifo", window: int = 16,
                 max_wait: int = 8) -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching={batching!r}: must be one of {', '.join(BATCHING)}")
        self.num_slots = num_slots
        self.batching, self.window, self.max_wait = batching, window, max_wait
        self.rounds = 0  # admission rounds so far (one per engine step)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i] owns slot i

    def add(self, request: Request) -> None:
        request.queued_at = self.rounds
        self.waiting.append(request)

    def admit(self, experts_of: ExpertsOf | None = None) -> list[tuple[int, Request]]:
        """Move waiting requests into free slots in the order `batching` chooses; returns
        (slot, request). `experts_of` is needed for "expert-aware" (called only when there is
        a choice to make)."""
        self.rounds += 1
        free = self.num_slots - len(self.running)
        if self.batching == "expert-aware" and 1 < len(self.waiting) and free > 0:
            if experts_of is None:
                raise ValueError("batching='expert-aware' needs the requests' predicted experts")
            self._reorder(experts_of, free)
        admitted = []
        while self.waiting and len(self.running) < self.num_slots:
            request = self.waiting.popleft()
            admitted.append((len(self.running), request))
            self.running.append(request)
        return admitted

    def _reorder(self, experts_of: ExpertsOf, free: int) -> None:
        """Put the `free` requests to admit at the head of the queue (see the module docstring:
        starved ones first, then the largest overlap with the batch as it grows)."""
        starved = [r for r in self.waiting if self.rounds - r.queued_at > self.max_wait]
        chosen = starved[:free]
        if len(chosen) < free:
            candidates = [r for r in list(self.waiting)[:self.window] if r not in chosen]
            sets = experts_of(self.running + chosen + candidates)
            batch = set().union(*sets[:len(self.running) + len(chosen)])
            pool = list(zip(candidates, sets[len(self.running) + len(chosen):]))
            while pool and len(chosen) < free:
                best = max(range(len(pool)), key=lambda i: (len(pool[i][1] & batch), -i))
                request, experts = pool.pop(best)
                chosen.append(request)
                batch |= experts
        for request in chosen:
            self.waiting.remove(request)
        self.waiting.extendleft(reversed(chosen))

    def release(self, request: Request) -> tuple[int, int, int] | None:
        """Remove a running request; returns (src slot, dst slot, length) when the last running
        request must move into the freed slot, else None."""
        slot = self.running.index(request)
        last = self.running.pop()
        if last is request:
            return None
        self.running[slot] = last
        return len(self.running), slot, last.cached

    def drop_waiting(self, request_id: str) -> Request | None:
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return request
        return None

    def find_running(self, request_id: str) -> Request | None:
        return next((r for r in self.running if r.request_id == request_id), None)
