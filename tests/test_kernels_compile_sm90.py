"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

The CPU tests run the kernels through Triton's interpreter, which executes their Python and so
never meets the compiler's rules: a kernel can pass every interpreter test and still fail to
compile on the GPU. It happened (H200, 2026-12-02): `_load_bits` in moeflow.ops.fp8_quantize_triton
returned an int32 from a constexpr branch and fell through to a second return of int16, which
the compiler types as inconsistent return types while the interpreter takes the first return.
Each case (tests/_compile_sm90.py) compiles kernels with the constexprs their launchers pass,
through ptxas, for sm_90, specialized as a launch with 16-aligned tensors and sizes (the
pipelined variant the GPU runs), and checks that it fits sm_90's shared memory: the kernels
changed since that run, and the one that failed."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _cases() -> list[str]:
    """The case names tests/_compile_sm90.py's CASES holds, read from its source (importing it
    here would import Triton with this process's interpreter setting)."""
    tree = ast.parse((ROOT / "tests" / "_compile_sm90.py").read_text())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "CASES"):
            return [n.id for n in node.value.generators[0].iter.elts]
    raise AssertionError("tests/_compile_sm90.py has no CASES")


CASES = _cases()
NO_PTXAS = 3  # tests/_compile_sm90.py's exit status without ptxas


@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles_for_sm90(case):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "tests._compile_sm90", case], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode == NO_PTXAS:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr[-3000:]
