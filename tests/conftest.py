"""Fixtures shared by the training tests (see tests/_train_small.py); a test file may define its
own fixture of the same name (tests/test_parallel.py's corpus does)."""

import pytest

from _train_small import write_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A copy of the standard library's json package: a small real-code corpus."""
    return write_corpus(tmp_path_factory.mktemp("data") / "json_src")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The micro PR-MoE's model config file."""
    return write_config(tmp_path_factory.mktemp("cfg") / "micro.json")
