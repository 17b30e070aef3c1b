"""One-line errors for checkpoint files that cannot be read.

Any file of a checkpoint that cannot be read or parsed (missing, truncated, corrupt, not what it
should be) raises `CheckpointError`, a ValueError naming the file in one line, so the CLI reports
it as `moeflow: error: ...` with exit status 2. Loading never deletes or rewrites anything.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupt; the message names the file."""


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn any failure to read or parse `path` into a one-line CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # noqa: BLE001 - torch, safetensors, json and tokenizers differ
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = lines[0].split(". ")[0].rstrip(".") if lines else ""
        raise CheckpointError(f"checkpoint file {path} is damaged or truncated "
                              f"({type(e).__name__}: {reason})") from None
