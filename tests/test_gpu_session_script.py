"""benchmarks/gpu_session.sh, the runbook for the next GPU session, stays runnable: bash parses
it, every test file and benchmark script it names exists, and each benchmark's flags it passes
are ones that script's parser accepts (a renamed test or flag would otherwise only show on
the device, in a call that costs device time)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_parses_it():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_files_it_names_exist():
    text = SCRIPT.read_text()
    named = set(re.findall(r"(?:tests|benchmarks)/[\w/]+\.py", text))
    assert any(p.startswith("tests/") for p in named) and any(
        p.startswith("benchmarks/") for p in named)
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, missing


def test_the_benchmark_flags_it_passes_are_accepted():
    """Each `python benchmarks/X.py --flag ...` in the script: every --flag appears in X.py's
    add_argument calls (or in the shared kernel-benchmark parser's, where X.py uses it)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = re.findall(r"python (benchmarks/\w+\.py)([^>\n]*)", text)
    assert calls
    for path, args in calls:
        source = (REPO / path).read_text()
        if "kernel_bench_parser(" in source:
            source += (REPO / "benchmarks" / "machine.py").read_text()
        for flag in re.findall(r"(?<![\w-])--[\w-]+", args):
            assert f'"{flag}"' in source, (path, flag)
