"""Compute kernels, one op per file, each beside its plain-torch reference.

`backend.py` is the one place that chooses which implementation runs.
"""
