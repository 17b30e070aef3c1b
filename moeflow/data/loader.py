"""Packing a token stream into fixed-length windows and serving them as global batches.

Packing: documents (each ended by end-of-text) are one long stream; window i is
tokens[i·L : i·L + L + 1] (inputs are its first L tokens, targets its last L), so no token is
padding and a window may span documents, as in GPT pre-training.

Order: epoch e visits all windows in a permutation drawn from a generator seeded by (seed, e).
The loader's whole position is one integer, the number of windows consumed, so its state is
trivially checkpointed and a resumed run sees exactly the windows it would have seen.

Batch sizes are global: one optimizer step consumes `global_batch` windows whatever the number
of ranks. `micro_batches` cuts a global batch [G, L+1] into rank r's gradient-accumulation
micro-batches: viewed as [accum, world, micro, L+1], rank r takes [:, r]. Every rank builds the
same global batch from the same state, so no rank needs to talk to another to get its slice.

Expert groups: a stream may carry a group id per token (moeflow.data.groups); the group ids
are cut into exactly the token windows (`next_windows`, `group_windows`), so shuffling, sharding
and resumption are the tokens' own.

Legend: G windows per global batch, L sequence length.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


class PackedTokens:
    """A token stream cut into windows of seq_len + 1 tokens (overlapping by one)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str = "train",
                 digest: str | None = None, groups: np.ndarray | None = None) -> None:
        """`digest` identifies the tokens when the caller knows it (a prepared dataset), so the
        fingerprint need not hash them again at every checkpoint; `groups`: each token's expert
        group id (as long as `tokens`), or None."""
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        self.groups = None
        if groups is not None:
            if len(groups) != len(tokens):
                raise ValueError(f"{len(groups)} group ids for {len(tokens)} tokens")
            self.groups = torch.from_numpy(np.ascontiguousarray(groups, dtype=np.int64))
        self.seq_len = seq_len
        self.digest, self.split = digest, split
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"corpus too small: the {split} split has {len(tokens)} tokens, "
                             f"fewer than one sequence of seq_len + 1 = {seq_len + 1}")

    def windows(self, idx: torch.Tensor) -> torch.Tensor:
        """[len(idx), L+1] int64."""
        return self._gather(self.tokens, idx)

    def group_windows(self, idx: torch.Tensor) -> torch.Tensor | None:
        """[len(idx), L+1] int64 group ids of `windows(idx)`, or None without groups."""
        return None if self.groups is None else self._gather(self.groups, idx)

    def _gather(self, stream: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # index_select, not stream[positions]: advanced indexing took 3-7 ms per 32 windows of
        # 1025 tokens (the trainer's host time on an H200 host; moe-S is host-bound), this 0.03.
        positions = idx[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        return stream.index_select(0, positions.flatten()).view(positions.shape)

    def fingerprint(self) -> str:
        """Identifies the stream and the windowing, to refuse resuming on other data."""
        if self.digest is not None:
            h = hashlib.sha256(f"{self.digest}:{self.split}".encode())
        else:
            h = hashlib.sha256(self.tokens.numpy().tobytes())
        if self.groups is not None:
            h.update(self.groups.numpy().tobytes())
        h.update(str(self.seq_len).encode())
        return h.hexdigest()[:16]


class BatchLoader:
    """Global batches of windows in a seeded per-epoch order; position = windows consumed."""

    def __init__(self, data: PackedTokens, global_batch: int, seed: int) -> None:
        if global_batch < 1:
            raise ValueError(f"global batch {global_batch}: must be >= 1")
        self.data, self.global_batch, self.seed = data, global_batch, seed
        self.consumed = 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.data.num_windows, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def next_windows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next global batch [G, L+1] and its group ids (None without groups); advances
        the position."""
        n = self.data.num_windows
        picks = []
        for k in range(self.consumed, self.consumed + self.global_batch):
            picks.append(self._permutation(k // n)[k % n])
        self.consumed += self.global_batch
        idx = torch.stack(picks)
        return self.data.windows(idx), self.data.group_windows(idx)

    def next_batch(self) -> torch.Tensor:
        """The next global batch's tokens [G, L+1]; advances the position."""
        return self.next_windows()[0]

    @property
    def epoch(self) -> float:
        return self.consumed / self.data.num_windows

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "global_batch": self.global_batch, "seed": self.seed,
                "fingerprint": self.data.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("fingerprint", "global_batch", "seed"):
            if state.get(key) != mine[key]:
                what = "training data" if key == "fingerprint" else key
                raise ValueError(f"cannot resume: the checkpoint's {what} ({state.get(key)}) "
                                 f"differs from this run's ({mine[key]})")
        self.consumed = int(state["consumed"])


def micro_batches(batch_GL: torch.Tensor, rank: int, world: int, micro_batch: int
                  ) -> list[torch.Tensor]:
    """Rank `rank`'s gradient-accumulation micro-batches of a global batch, in order."""
    G = batch_GL.shape[0]
    if G % (world * micro_batch):
        raise ValueError(f"global batch {G} is not a multiple of world {world} × micro batch "
                         f"{micro_batch}")
    accum = G // (world * micro_batch)
    view = batch_GL.view(accum, world, micro_batch, batch_GL.shape[-1])
    return [view[a, rank] for a in range(accum)]


def validation_indices(data: PackedTokens, count: int) -> torch.Tensor:
    """Indices of `count` windows spread evenly over the validation stream (all if fewer)."""
    count = min(count, data.num_windows)
    return torch.linspace(0, data.num_windows - 1, count).round().long().unique()


def validation_windows(data: PackedTokens, count: int) -> torch.Tensor:
    """The windows of `validation_indices`."""
    return data.windows(validation_indices(data, count))
