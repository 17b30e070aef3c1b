"""The device an inference component runs on, from a user's "auto" | "cuda" | "cpu"."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """"auto" → CUDA when available, else CPU; "cuda" without a CUDA device → ValueError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA device is available")
    return torch.device(device)
