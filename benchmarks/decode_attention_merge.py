"""Decode attention at short and mid contexts: where should the splits be merged?

moeflow.ops.decode_attention_triton splits each (sequence, kv head)'s keys over P programs and
merges their partial softmaxes either in a second launch (the merge kernel) or in the split
kernel itself, by the last split to finish (an atomic ticket per sequence and kv head; the
engine's SlotKVCache passes the tickets). One split (P = 1) needs no merge at all but runs the
keys in one program. Per (batch B, bucket S, lengths ~S/2 or S-1), Qwen3-30B-A3B attention (32
query heads, 4 kv heads, head dim 128, bf16, q/k already prepared): µs per layer of a CUDA graph
of 48 layers, each on its own cache, for
- the default splits merged by the merge kernel (no tickets),
- the default splits merged by the last split (tickets),
- one split, and four splits with tickets;
and each variant's max |difference| to the first on layer 0.

    PYTHONPATH=. python benchmarks/decode_attention_merge.py    # one H200: ~40 s
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_attention import QWEN3, lengths_for, make_cache, time_per_call  # noqa: E402

from moeflow.ops.decode_attention_triton import decode_attention_triton  # noqa: E402


def main() -> None:
    sh, dev = QWEN3, torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for B in (1, 16):
        for S, fill in ((256, "half"), (256, "full"), (1024, "half"), (2048, "half")):
            cache = make_cache(sh, B, S, "triton", dev)
            lengths = lengths_for(B, S, fill, dev)
            torch.manual_seed(2)
            q = torch.randn(B, sh.H, sh.HD, device=dev, dtype=sh.dtype)
            k = torch.randn(B, sh.G, sh.HD, device=dev, dtype=sh.dtype)
            v = torch.randn(B, sh.G, sh.HD, device=dev, dtype=sh.dtype)
            tickets = torch.zeros(B * sh.G, dtype=torch.int32, device=dev)
            res, first = {}, None
            for name, splits, t in (("default_kernel_merge", None, None),
                                    ("default_ticket_merge", None, tickets),
                                    ("P1", 1, None), ("P4_ticket", 4, tickets)):
                def step(splits=splits, t=t, cache=cache):
                    for layer in range(sh.layers):
                        decode_attention_triton(q, k, v, cache.k_LNGMd[layer],
                                                cache.v_LNGMd[layer], lengths, S, splits=splits,
                                                tickets=t)
                res[name] = round(time_per_call(step, sh.layers, dev), 2)
                y = decode_attention_triton(q, k, v, cache.k_LNGMd[0], cache.v_LNGMd[0],
                                            lengths, S, splits=splits, tickets=t).float()
                first = y if first is None else first
                res[f"err {name}"] = (y - first).abs().max().item()
            print(f"B {B} S {S} {fill} mean len {lengths.float().mean().item():.0f}: {res}",
                  flush=True)
            del cache


if __name__ == "__main__":
    main()
