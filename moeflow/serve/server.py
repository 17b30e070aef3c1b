"""Running the server: load the model, build the engine and app, serve with uvicorn, drain.

Example:
  moeflow serve --model runs/train --port 8000 --max-batch 16 --max-queue 64
  curl localhost:8000/v1/completions -d '{"model": "train", "prompt": "def ", "max_tokens": 32}'

Shutdown: the first SIGTERM (or Ctrl-C) starts a drain instead of uvicorn's immediate stop.
New requests get 503 while everything admitted runs to completion; after --drain-timeout
seconds whatever is left is aborted (clients see finish_reason "abort"), then uvicorn closes
the sockets and the process exits 0. A second signal skips the wait. uvicorn re-raises the
signals it caught once it has stopped, which would turn a clean drain into death by SIGTERM;
`DrainingServer` does not record them, so a drained server exits normally.

The port is bound before anything else (the model load can take minutes) and the socket handed
to uvicorn, so a port in use is one line, `moeflow: error: ... already in use`, exit status 2,
before the server announces an address it cannot serve on.

Several ranks (`torchrun --nproc-per-node N -m moeflow serve --model DIR --tp T --ep E`): every
rank loads its shard (moeflow.serve.loader.load_shard_for_serving); rank 0 binds the port, runs
HTTP, tokenizer and scheduler, and its engine broadcasts every forward to the others, which
follow (moeflow.infer.engine). Collectives wait at most --timeout-s: a rank that dies or stalls
fails rank 0's next step, its engine thread stops, requests get 500/503, /health turns 503 and
the server exits with status 1; the other ranks' waits fail the same way. A clean stop releases
the followers (`Engine.close`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from pathlib import Path

import torch
import uvicorn

from moeflow.infer.engine import Engine, EngineConfig
from moeflow.data.groups import rule_group_ids
from moeflow.serve.app import ServerState, create_app
from moeflow.serve.config import ServeConfig
from moeflow.infer.device import resolve_device
from moeflow.serve.loader import LoadedShard, load_for_serving, load_shard_for_serving
from moeflow.serve.protocol import Limits
from moeflow.serve.worker import EngineWorker

log = logging.getLogger("moeflow.serve")
ABORT_GRACE_S = 5.0   # after aborting at the drain timeout, time for responses to finish


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._drain: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed = False  # the engine died for good (a multi-rank engine lost a rank)

    async def on_tick(self, counter: int) -> bool:
        if self.state.worker.died and self.state.worker.fatal:
            if not self.failed:
                print("moeflow serve: the engine failed (a rank died or stalled); exiting",
                      flush=True)
            self.failed = True
            return True
        return await super().on_tick(counter)

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Runs in the main thread between bytecodes: only schedule work on the loop.
        if self._loop is None or self._drain is not None:
            self.state.worker.abort_all()
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_task(self.drain())

    async def drain(self) -> None:
        state = self.state
        state.draining = True
        timeout = state.config.drain_timeout
        print(f"moeflow serve: draining {state.inflight} request(s), up to {timeout:g} s",
              flush=True)
        deadline = time.monotonic() + timeout
        while self._busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._busy():
            print(f"moeflow serve: drain timeout, aborting {state.worker.outstanding} "
                  f"sequence(s)", flush=True)
            state.worker.abort_all()
            deadline = time.monotonic() + ABORT_GRACE_S
            while self._busy() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        self.should_exit = True

    def _busy(self) -> bool:
        return self.state.inflight > 0 or self.state.worker.outstanding > 0


def engine_config(config: ServeConfig) -> EngineConfig:
    return EngineConfig(max_batch_size=config.max_batch, max_seq_len=config.max_seq_len,
                        cache_tokens=config.cache_tokens, offload=config.offload,
                        batching=config.batching)


def build_state(config: ServeConfig, shard: LoadedShard | None = None) -> ServerState:
    """The server's state: the model loaded here, or rank 0's `shard` with its channel."""
    if shard is None:
        # With --gpu-memory the engine places the model (experts to host memory): load on CPU.
        device = "cpu" if config.offload is not None else config.device
        mapped = config.offload is not None and config.offload.expert_store == "mmap"
        loaded = load_for_serving(config.model, device=device, dtype=config.dtype,
                                  map_experts=mapped)
        engine = Engine(loaded.model, engine_config(config))
    else:
        loaded = shard.loaded
        engine = Engine(shard.model, engine_config(config), shard.channel)
    names = tuple(name for name, _ in engine.expert_groups)
    _check_group_defaults(config, names)
    limits = Limits(vocab_size=engine.vocab_size, max_seq_len=engine.max_seq_len,
                    capacity=config.capacity, default_max_tokens=config.default_max_tokens,
                    expert_groups=names, group_rule=config.group_rule,
                    default_group=config.default_group)
    name = config.served_model_name or Path(config.model).resolve().name
    return ServerState(config=config, loaded=loaded, worker=EngineWorker(engine, config.capacity),
                       model_name=name, limits=limits)


def _check_group_defaults(config: ServeConfig, names: tuple[str, ...]) -> None:
    """--group-rule / --default-group must fit the model's expert groups."""
    if not names and (config.group_rule or config.default_group):
        flag = "--group-rule" if config.group_rule else "--default-group"
        raise ValueError(f"{flag}: the model has no expert groups")
    if config.default_group is not None and config.default_group not in names:
        raise ValueError(f"default_group={config.default_group!r}: not one of the model's "
                         f"expert groups ({', '.join(names)})")
    if config.group_rule is not None:
        rule_group_ids(config.group_rule, names)


def torch_threads(config: ServeConfig) -> int | None:
    """Intra-op threads to use (None: leave torch's default), see ServeConfig."""
    if config.threads is not None:
        return config.threads
    if resolve_device(config.device).type == "cpu":
        return max(1, (os.cpu_count() or 2) - 1)
    return None


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening); ValueError if it cannot be."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only, as uvicorn
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is already in use (another server?); "
                             f"choose another --port") from None
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(config: ServeConfig) -> int:
    """Bind, load, serve until signalled, drain; returns the exit status (0 after a clean
    drain)."""
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    if is_multi_rank(config):
        return _serve_ranks(config)
    sock = bind_socket(config.host, config.port)
    try:
        return _serve(config, sock)
    finally:
        sock.close()


def is_multi_rank(config: ServeConfig) -> bool:
    return config.parallel.world > 1 or "WORLD_SIZE" in os.environ


def _serve_ranks(config: ServeConfig) -> int:
    from moeflow.parallel.launch import finish

    main = int(os.environ.get("RANK", "0")) == 0
    sock = bind_socket(config.host, config.port) if main else None
    try:
        shard = load_shard_for_serving(config.model, config.parallel, config.device,
                                       config.dtype)
        if not main:
            Engine(shard.model, engine_config(config), shard.channel).follow()
            finish(shard.env)
            return 0
        status = _serve(config, sock, shard)
        if status == 0:
            finish(shard.env)
        return status
    finally:
        if sock is not None:
            sock.close()


def _serve(config: ServeConfig, sock: socket.socket, shard: LoadedShard | None = None) -> int:
    # A bad model path fails here, before any process-wide change.
    state = build_state(config, shard)
    threads = torch_threads(config)
    if threads is not None:
        torch.set_num_threads(threads)
    app = create_app(state)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port,
                               log_level=config.log_level, access_log=False,
                               timeout_graceful_shutdown=ABORT_GRACE_S, lifespan="on")
    server = DrainingServer(uv_config, state)
    port = sock.getsockname()[1]
    print(f"moeflow serve: {state.model_name} ({state.loaded.kind}, context "
          f"{state.limits.max_seq_len}, vocab {state.limits.vocab_size}, "
          f"{torch.get_num_threads()} torch threads) on http://{config.host}:{port}",
          flush=True)
    server.run(sockets=[sock])
    if not server.started or server.failed:
        return 1
    state.worker.engine.close()  # releases the other ranks (nothing on one process)
    print("moeflow serve: stopped", flush=True)
    return 0


__all__ = ["DrainingServer", "bind_socket", "build_state", "serve"]
