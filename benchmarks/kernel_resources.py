"""What ptxas makes of every Triton kernel the compile test builds, on a machine without a GPU:
registers, spilled bytes, shared memory, and how the loads reach the MMAs (cp.async stages of
the software pipeliner, Hopper's wgmma or the older mma.sync). The kernels are compiled as
tests/_compile_sm90.py compiles them: the launchers' constexprs, for sm_90, specialized as a
launch with aligned tensors and sizes. Use it before spending GPU time: a kernel that spills
or does not pipeline its loads shows here.

    PYTHONPATH=. python benchmarks/kernel_resources.py [CASE ...] [--json OUT.json]

CASE: the compile test's cases (default: all). Prints one row per compiled kernel variant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tests._compile_sm90 as cases  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def ptxas_usage(ptx: str) -> dict:
    """Registers and spilled bytes per thread that ptxas reports for the PTX, for sm_90a."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        err = subprocess.run([str(PTXAS), "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err)
    return {"registers": int(re.search(r"Used (\d+) registers", err).group(1)),
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def survey(names: list[str]) -> list[dict]:
    rows: list[dict] = []
    compile_sm90 = cases.compile_sm90

    def recording(fn, signature, constexprs, num_warps=4, num_stages=3):
        kernel = compile_sm90(fn, signature, constexprs, num_warps, num_stages)
        ptx = kernel.asm["ptx"]
        rows.append({"case": case, "kernel": fn.__name__, "num_warps": num_warps,
                     "num_stages": num_stages,
                     "constexprs": {k: v for k, v in constexprs.items()
                                    if isinstance(v, (bool, int, str))},
                     **ptxas_usage(ptx), "shared_bytes": kernel.metadata.shared,
                     "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                     "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync")})
        return kernel

    cases.compile_sm90 = recording
    try:
        for case in names:
            cases.CASES[case]()
    finally:
        cases.compile_sm90 = compile_sm90
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cases", nargs="*", metavar="CASE", help=", ".join(cases.CASES))
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    unknown = sorted(set(args.cases) - set(cases.CASES))
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; known: {', '.join(cases.CASES)}")
    if not PTXAS.exists():
        sys.exit(f"no ptxas at {PTXAS}: this Triton build does not bundle it")
    rows = survey(args.cases or list(cases.CASES))
    print(f"{'case':24} {'kernel':30} {'warps':>5} {'regs':>4} {'spill st/ld':>11} "
          f"{'shared':>7} {'cp.async':>8} {'wgmma':>5} {'mma.sync':>8}  tiles")
    for r in rows:
        tiles = {k: v for k, v in r["constexprs"].items()
                 if k.startswith(("BLOCK", "UP_", "DOWN_"))}
        print(f"{r['case']:24} {r['kernel']:30} {r['num_warps']:5} {r['registers']:4} "
              f"{r['spill_stores']:5}/{r['spill_loads']:<5} {r['shared_bytes']:7} "
              f"{r['cp_async']:8} {r['wgmma']:5} {r['mma_sync']:8}  {tiles}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": " ".join(["python"] + sys.argv), "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "target": "sm_90a (ptxas bundled with Triton)", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
