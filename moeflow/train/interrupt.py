"""Stop at a step boundary on SIGINT/SIGTERM, leaving a checkpoint that `--resume` continues.

The first signal only sets a flag; the training loop reads it after each step, saves a
checkpoint (atomically, as `--stop-at` does) and returns, so Ctrl-C or a scheduler's SIGTERM
costs at most the step in flight. A second signal raises KeyboardInterrupt at once, for a user
who will not wait for the step to end (the last complete checkpoint is still intact then).
Handlers exist only while the loop runs and only in the main thread (where Python delivers
signals); the previous handlers come back on exit.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
