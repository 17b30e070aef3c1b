"""Which requests run this step: a FIFO waiting queue and the running set, bound to cache slots.

Continuous batching: every step decodes one token for each running request, then admits waiting
requests (oldest first) into the slots freed by the ones that finished, and prefills them in the
same step, so a request joins the batch as soon as a slot is free and leaves it the moment it
stops. The running list is kept dense: request i of `running` owns cache slot i, and when a
request leaves, the last one moves into its slot (`release` returns the move for the cache).

This file holds only bookkeeping (no tensors), so the policy can be read and tested alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from moeflow.infer.sampling import SamplingParams


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    # Expert groups: the prompt tokens' group ids (None: the model has no groups); generated
    # tokens continue in the last prompt token's group (`decode_group`).
    prompt_groups: list[int] | None = None
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys/values are in the cache
    finish_reason: str | None = None

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

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


class Scheduler:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i] owns slot i

    def __contains__(self, request_id: str) -> bool:
        return any(r.request_id == request_id for r in (*self.waiting, *self.running))

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def admit(self) -> list[tuple[int, Request]]:
        """Move waiting requests into free slots, oldest first; returns (slot, request)."""
        admitted = []
        while self.waiting and len(self.running) < self.num_slots:
            request = self.waiting.popleft()
            admitted.append((len(self.running), request))
            self.running.append(request)
        return admitted

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
