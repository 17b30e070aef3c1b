"""Integer helpers for launch grids and tile sizes, computed on the host in plain Python.

Why not Triton's own: in Triton 3.6 `triton.cdiv` and `triton.next_power_of_2` are constexpr
functions, and a call from host code goes through their wrapper (unwrapping each argument):
~2-3 µs per call on the CI-class CPU against ~0.1 µs for the arithmetic, and a small-T MoE
layer call made about twenty of them (benchmarks/results/host_ops/). Inside @triton.jit code
use tl.cdiv / triton.next_power_of_2 as before; these are for the launchers.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n, and 0 for n ≤ 0: triton.next_power_of_2's values."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
