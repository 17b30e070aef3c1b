"""The launchers' host-side integer helpers (moeflow.ops.grid) give Triton's own values."""

import pytest

from moeflow.ops.grid import cdiv, next_power_of_2

triton = pytest.importorskip("triton")


def test_next_power_of_2_and_cdiv_match_tritons():
    for n in range(-3, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in range(0, 300):
        for b in (1, 2, 3, 7, 16, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert next_power_of_2(2**40 + 1) == 2**41
