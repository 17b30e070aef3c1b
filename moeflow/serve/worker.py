"""The engine thread: drives `Engine.step()` and hands tokens to the asyncio side.

The engine is single-threaded by contract, so exactly one thread touches it. The event loop
talks to that thread through a command queue (add / abort / abort-all) and hears back through
`loop.call_soon_threadsafe`, one batch of token events per step, so neither side ever blocks
the other: HTTP handlers keep answering (429s, /health, /metrics) while a step runs.

Bookkeeping that decides admission (`outstanding`, the number of sequences admitted and not yet
finished) is only read and written on the loop thread; the engine thread publishes an immutable
`EngineStats` snapshot after every step and after every command, which /metrics and /health read.

Cancellation: `abort` removes a sequence from the engine (freeing its KV cache at once, per the
engine contract) and delivers a synthetic finished event with reason "abort", so the waiting
handler and the admission count see the same end whether the engine or the client stopped it.
An exception from `step()` fails every active sequence with an `EngineFailure` (the handlers
answer 500) and the loop goes on with a clean engine: one bad step does not take the server down.
Except on several ranks (an engine with a channel, moeflow.infer.ranks): a failed step there
means a rank died, stalled past the process-group timeout or fell out of step, and nothing can
resynchronise the ranks, so the thread fails everything and stops (`fatal`); the server sees
the dead worker, answers 503 and exits non-zero (moeflow.serve.server).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import traceback
from dataclasses import dataclass, field

import torch

from moeflow.infer.engine import Engine, TokenEvent
from moeflow.infer.sampling import SamplingParams

log = logging.getLogger("moeflow.serve")


@dataclass(frozen=True)
class EngineFailure:
    message: str


DISCONNECTED = object()   # put on a handle's queue by the HTTP side when its client goes away


@dataclass(eq=False)
class JobHandle:
    """One HTTP request's sequences; events arrive on `events` as (index, TokenEvent|failure)."""
    request_ids: tuple[str, ...]
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.finished = [False] * len(self.request_ids)

    @property
    def done(self) -> bool:
        return all(self.finished)


class EngineWorker:
    def __init__(self, engine: Engine, capacity: int) -> None:
        self.engine = engine
        self.capacity = capacity
        self.outstanding = 0                          # loop thread only
        self.stats = engine.stats()                   # replaced by the engine thread
        self.alive = False
        self.fatal = engine.channel is not None  # a failed step ends the worker (see above)
        self.died = False  # the engine thread ended on an error
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="moeflow-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- event-loop side -------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.alive = True
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._commands.put(("stop",))
        self._thread.join(timeout)

    def try_admit(self, count: int) -> bool:
        if not self.alive or self.outstanding + count > self.capacity:
            return False
        self.outstanding += count
        return True

    async def submit(self, prompts: list[tuple[int, ...]], params: list[SamplingParams],
                     prefix: str, groups: list[tuple[int, ...]] | None = None) -> JobHandle:
        """Add admitted sequences to the engine; ValueError if the engine refuses one.
        `groups`: each sequence's prompt token groups (models with expert groups)."""
        handle = JobHandle(tuple(f"{prefix}-{next(self._ids)}" for _ in prompts))
        ack = self._loop.create_future()
        groups = [None] * len(prompts) if groups is None else groups
        self._commands.put(("add", handle, prompts, params, groups, ack))
        try:
            await ack
        except BaseException:
            self.outstanding -= len(prompts)
            raise
        return handle

    def abort(self, handle: JobHandle, indices: list[int] | None = None) -> None:
        todo = [i for i in (range(len(handle.request_ids)) if indices is None else indices)
                if not handle.finished[i]]
        if todo:
            self._commands.put(("abort", handle, todo))

    def abort_all(self) -> None:
        self._commands.put(("abort_all",))

    def _deliver(self, batch: list[tuple[JobHandle, int, object]]) -> None:
        for handle, i, event in batch:
            if handle.finished[i]:
                continue
            if isinstance(event, EngineFailure) or event.finished:
                handle.finished[i] = True
                self.outstanding -= 1
            handle.events.put_nowait((i, event))

    def _resolve(self, fut: asyncio.Future, error: Exception | None) -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    # ---- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        active: dict[str, tuple[JobHandle, int]] = {}
        try:
            with torch.no_grad():
                while self._serve_once(active):
                    pass
        except BaseException:  # noqa: BLE001 - report, then mark the worker dead
            log.error("engine thread died:\n%s", traceback.format_exc())
            self.died = True
            self._fail(active, "engine thread died")
        finally:
            self.alive = False

    def _serve_once(self, active: dict) -> bool:
        commands = []
        try:
            if not self.engine.has_work():
                commands.append(self._commands.get(timeout=1.0))
            while True:
                commands.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        out: list[tuple[JobHandle, int, object]] = []
        for cmd in commands:
            if cmd[0] == "stop":
                self._fail(active, "server shutting down")
                return False
            try:
                self._command(cmd, active, out)
            except Exception as e:  # noqa: BLE001 - e.g. abort failed: reset, keep serving
                log.error("engine command %s failed:\n%s", cmd[0], traceback.format_exc())
                self._fail(active, f"engine {cmd[0]} failed: {type(e).__name__}: {e}")
        if self.engine.has_work():
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                if self.fatal:
                    raise
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail(active, f"engine step failed: {type(e).__name__}: {e}")
                events = []
            for ev in events:
                owner = active.get(ev.request_id)
                if owner is None:
                    continue
                if ev.finished:
                    del active[ev.request_id]
                out.append((*owner, ev))
        self.stats = self.engine.stats()
        if out:
            self._loop.call_soon_threadsafe(self._deliver, out)
        return True

    def _command(self, cmd: tuple, active: dict, out: list) -> None:
        kind = cmd[0]
        if kind == "add":
            _, handle, prompts, params, groups, ack = cmd
            added = []
            try:
                for rid, prompt, p, g in zip(handle.request_ids, prompts, params, groups):
                    self.engine.add_request(list(prompt), p, request_id=rid,
                                            groups=None if g is None else list(g))
                    added.append(rid)
            except Exception as e:  # noqa: BLE001 - ValueError is the client's, others ours
                if not isinstance(e, ValueError):
                    log.error("add_request failed:\n%s", traceback.format_exc())
                    e = RuntimeError(f"the engine could not add the request: {e}")
                for rid in added:
                    self.engine.abort(rid)
                self._loop.call_soon_threadsafe(self._resolve, ack, e)
                return
            for i, rid in enumerate(handle.request_ids):
                active[rid] = (handle, i)
            self._loop.call_soon_threadsafe(self._resolve, ack, None)
        elif kind == "abort":
            _, handle, indices = cmd
            for i in indices:
                self._abort_one(handle.request_ids[i], active, out)
        elif kind == "abort_all":
            for rid in list(active):
                self._abort_one(rid, active, out)

    def _abort_one(self, rid: str, active: dict, out: list) -> None:
        owner = active.pop(rid, None)
        if owner is None:
            return
        self.engine.abort(rid)
        out.append((*owner, TokenEvent(request_id=rid, token_id=None, finished=True,
                                       finish_reason="abort")))

    def _fail(self, active: dict, message: str) -> None:
        out = []
        for rid, owner in list(active.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - the engine is already in trouble
                pass
            out.append((*owner, EngineFailure(message)))
        active.clear()
        if out and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, out)
