"""Shared set-up for the Triton parity tests: on a machine without CUDA, run the kernels through
Triton's interpreter. Must run before anything imports triton's kernels (the flag is read when a
kernel is decorated), so each test module imports this first."""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Realistic sizes on the GPU, tiny ones under the (slow) interpreter.
ON_GPU = DEVICE == "cuda"
TRITON = importlib.util.find_spec("triton") is not None
