"""Experts memory-mapped from the checkpoint (expert_store="mmap") vs the pinned host copy.

The model (random bf16 weights, Mixtral-8x7B shape with --layers decoder layers, default 2:
16 experts, 5.6 GB; ~6.3 GB on disk) is saved once to a directory on local disk (--dir,
default a fresh temp directory under /tmp, deleted at the end unless --keep), fsynced, then
served by two fresh
child processes, one after the other, at the same budget (the share of the experts the real
32-layer Mixtral's cache holds at --budget-full GiB, as benchmarks/offload.py scales it):
  pinned: load_model(DIR) reads every tensor into RAM, the engine copies the experts to pinned
          memory (expert_store="pinned", the default);
  mmap:   load_model(DIR, map_experts=True) reads the non-expert tensors only, the experts stay
          mapped (expert_store="mmap"); a miss pages its expert in through the pinned double
          buffer (moeflow.infer.offload.staged_copy).
Each child first asks the kernel to drop the checkpoint's pages from its page cache
(posix_fadvise DONTNEED on each file, after the parent's fsync: clean pages of a file we own go
without root) and reports how much of the checkpoint was still cached (mincore over a mapping
of each file): the first pass starts as cold as the kernel allowed.
Per child: load time (model + engine), RSS after load (RssAnon: heap/pinned memory, RssFile:
mapped file pages, from /proc/self/status), then two passes of the same request (a 64-token
random prompt, then --steps decode tokens sampled at temperature 1 with a fixed seed, so both
passes route alike): prefill ms, decode tokens/s at batch 1, copy GB per token, hit rate, and
the checkpoint's page-cache residency after the pass. Pass 1 against pass 2 of the mmap child
is the page-cache effect (first touch from disk vs pages already cached); the peak RSS
(VmHWM) closes each child's record.

Run (one H200; ~6.3 GB of disk, written and read back cold twice: under 3 min on a disk of
~200 MB/s or better; --layers 4 doubles everything, still < 30 GiB of disk; each child is
killed after --child-timeout-s; writes offload_mmap.json and offload_mmap.md under --out):
    PYTHONPATH=. python benchmarks/offload_mmap.py --out $OUT
On CPU (the same code, no CUDA; --smoke for toy widths; what results/offload_mmap/ records):
    PYTHONPATH=. python benchmarks/offload_mmap.py --out /tmp/mm --device cpu \
        --widths 2048 8192 --layers 4 --prompt 8 --steps 4 --child-timeout-s 400
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.offload import (GiB, MAX_SEQ, PROMPT, expert_bytes_total, meta_model,
                                model_config, scaled_budget)
from moeflow import Transformer
from moeflow.checkpoint.model_dir import WEIGHTS, load_model, write_weights
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.infer.offload import OffloadConfig

MAX_BATCH = 16  # the engine's max_batch_size, as benchmarks/offload.py's default
_libc = ctypes.CDLL(None, use_errno=True)


def weight_files(directory: Path) -> list[Path]:
    return sorted((directory / WEIGHTS).glob("*.safetensors"))


def drop_page_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(files: list[Path]) -> float:
    """Share of the files' pages in the page cache (mincore over a fresh mapping of each,
    which faults nothing in)."""
    page = mmap.PAGESIZE
    cached = total = 0
    for f in files:
        size = f.stat().st_size
        pages = (size + page - 1) // page
        with open(f, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        head = ctypes.c_char.from_buffer(mm)  # the mapping's address (a writable buffer)
        vec = (ctypes.c_ubyte * pages)()
        rc = _libc.mincore(ctypes.c_void_p(ctypes.addressof(head)), ctypes.c_size_t(size), vec)
        del head
        mm.close()
        if rc != 0:
            return float("nan")
        cached += sum(b & 1 for b in vec)
        total += pages
    return cached / max(total, 1)


def status_bytes() -> dict:
    """RssAnon, RssFile, VmRSS and VmHWM (peak) of this process, in GiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key + "_GiB"] = int(value.split()[0]) * 1024 / GiB
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def one_pass(engine: Engine, vocab: int, steps: int, prompt_len: int, files: list[Path]
             ) -> dict:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    engine.add_request(prompt, SamplingParams(max_new_tokens=steps + 1, temperature=1.0,
                                              seed=7))
    sync()
    t0 = time.perf_counter()
    engine.step()  # admits and prefills: the first token
    sync()
    prefill_s = time.perf_counter() - t0
    before = engine.stats().offload.cache
    times = []
    while engine.has_work():
        t0 = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
    after = engine.stats().offload.cache
    lookups = after.lookups - before.lookups
    return {"prefill_ms": 1e3 * prefill_s, "decode_tokens_per_s": len(times) / sum(times),
            "decode_median_step_ms": 1e3 * statistics.median(times), "steps": len(times),
            "copied_GB_per_token": (after.bytes_copied - before.bytes_copied) / 1e9
            / len(times),
            "hit_rate": (after.hits - before.hits) / max(lookups, 1),
            "page_cache_after": cached_fraction(files), **status_bytes()}


def child(task: dict) -> dict:
    directory, store = Path(task["dir"]), task["store"]
    files = weight_files(directory)
    drop_page_cache(files)
    out: dict = {"store": store, "page_cache_at_start": cached_fraction(files),
                 "before_load": status_bytes()}
    t0 = time.perf_counter()
    model = load_model(directory, dtype=torch.bfloat16, map_experts=store == "mmap")
    out["load_model_s"] = time.perf_counter() - t0
    off = OffloadConfig(gpu_memory=str(task["budget"]), expert_store=store,
                        expert_cache_policy="lfu", device=task["device"])
    engine = Engine(model, EngineConfig(max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ,
                                        offload=off))
    out["load_s"] = time.perf_counter() - t0
    out["after_load"] = status_bytes()
    out["page_cache_after_load"] = cached_fraction(files)
    plan = engine.offload.plan
    out["slots"], out["expert_MB"] = plan.slots, plan.expert / 1e6
    vocab = model.config.vocab_size
    out["passes"] = [one_pass(engine, vocab, task["steps"], task["prompt"], files)
                     for _ in range(2)]
    out["peak"] = status_bytes()
    return out


def run_child(task: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        task_path, out_path = Path(tmp, "task.json"), Path(tmp, "out.json")
        task_path.write_text(json.dumps(task))
        try:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                            str(task_path), str(out_path)], timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"killed after {timeout:.0f} s"}
        if not out_path.exists():
            return {"error": "child wrote no result"}
        return json.loads(out_path.read_text())


def child_main(task_path: str, out_path: str) -> None:
    task = json.loads(Path(task_path).read_text())
    try:
        result = child(task)
    except Exception as err:  # noqa: BLE001 - reported in the JSON, not fatal to the parent
        result = {"error": f"{type(err).__name__}: {err}"[:400],
                  "traceback": traceback.format_exc()}
    Path(out_path).write_text(json.dumps(result))


def config(args):
    cfg = model_config("mixtral", args.layers, args.smoke)
    if args.widths:
        cfg = dataclasses.replace(cfg, d_model=args.widths[0], expert_d_ff=args.widths[1],
                                  d_ff=args.widths[1])
    return cfg


def budget(args) -> int:
    """benchmarks/offload.py's scaled budget, or with --widths the same cache fraction of
    this model's experts."""
    if not args.widths:
        return scaled_budget("mixtral", args.layers, args.budget_full, args.smoke, MAX_BATCH)
    from benchmarks.offload import cache_fraction, fixed_bytes

    model = meta_model(config(args))
    device = torch.device("cpu" if args.device == "cpu" else "cuda")
    return int(fixed_bytes(model, device, MAX_BATCH)
               + cache_fraction("mixtral", args.budget_full, MAX_BATCH) * expert_bytes_total(model))


def build_and_save(args, directory: Path) -> dict:
    cfg = config(args)
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Transformer(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    experts = expert_bytes_total(model)
    t0 = time.perf_counter()
    write_weights(directory, model)
    del model
    for f in weight_files(directory):
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    disk = sum(f.stat().st_size for f in weight_files(directory))
    return {"expert_GB": experts / 1e9, "disk_GB": disk / 1e9,
            "save_s": time.perf_counter() - t0,
            "budget": budget(args)}


def table(r: dict) -> str:
    lines = [f"experts {r['expert_GB']:.2f} GB, checkpoint {r['disk_GB']:.2f} GB on disk, "
             f"saved in {r['save_s']:.0f} s; RSS growth = VmRSS after load - before, as a share "
             f"of the expert bytes", "",
             "| store | load s | RSS growth | RssAnon after load GiB | RssFile after load GiB | "
             "pass | page cache before | prefill ms | decode tok/s | GB/token | hit | "
             "peak RSS GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for store in ("pinned", "mmap"):
        c = r.get(store, {})
        if "error" in c:
            lines.append(f"| {store} | error: {c['error']} |")
            continue
        before = c["page_cache_after_load"]
        growth = ((c["after_load"]["VmRSS_GiB"] - c["before_load"]["VmRSS_GiB"]) * GiB
                  / (r["expert_GB"] * 1e9))
        for i, p in enumerate(c["passes"]):
            lines.append(
                f"| {store} | {c['load_s']:.1f} | {growth:.2f} | "
                f"{c['after_load']['RssAnon_GiB']:.2f} | "
                f"{c['after_load']['RssFile_GiB']:.2f} | {i + 1} | {before:.2f} | "
                f"{p['prefill_ms']:.0f} | {p['decode_tokens_per_s']:.2f} | "
                f"{p['copied_GB_per_token']:.2f} | {p['hit_rate']:.2f} | "
                f"{c['peak']['VmHWM_GiB']:.2f} |")
            before = p["page_cache_after"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out")
    p.add_argument("--dir", default=None, help="where to save the model (default: a temp dir "
                   "under /tmp, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the saved model")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--budget-full", type=float, default=24,
                   help="GiB, for the 32-layer model (scaled as benchmarks/offload.py does)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--smoke", action="store_true", help="toy widths, to check the script")
    p.add_argument("--widths", type=int, nargs=2, metavar=("D", "F"),
                   help="d_model and expert width instead of Mixtral's (CPU runs)")
    p.add_argument("--prompt", type=int, default=PROMPT, help="prompt tokens")
    p.add_argument("--child-timeout-s", type=float, default=100)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(*args.child)
        return
    if not args.out:
        p.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="moeflow-mmap-", dir="/tmp"))
    directory.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": datetime.date.today().isoformat(), "argv": sys.argv[1:],
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "torch": torch.__version__, "host_RAM_GiB": os.sysconf("SC_PHYS_PAGES")
                     * os.sysconf("SC_PAGE_SIZE") / GiB}
    try:
        results.update(build_and_save(args, directory))
        print(json.dumps({k: v for k, v in results.items()}), flush=True)
        task = {"dir": str(directory), "budget": results["budget"], "steps": args.steps,
                "prompt": args.prompt, "device": args.device}
        for store in ("pinned", "mmap"):
            results[store] = run_child({**task, "store": store}, args.child_timeout_s)
            print(store, json.dumps(results[store]), flush=True)
            (out / "offload_mmap.json").write_text(json.dumps(results, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    (out / "offload_mmap.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
