"""Kernel benchmarks' --smoke mode: on a machine without CUDA, Triton's kernels run through its
interpreter. The flag is read when a kernel is decorated, so a benchmark imports this module
before anything that imports moeflow's Triton kernels (tests/_triton_cpu.py does the same for
the tests)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
