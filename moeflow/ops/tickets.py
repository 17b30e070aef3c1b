"""The last program to arrive: a grid reduction inside one launch, for the decode kernels.

Several decode kernels finish with work that needs what every program of a group stored (the
router's choosing and plan over all logits tiles, the attention's merge of its key splits). A
second launch would cost a kernel boundary; instead each program, after its stores, takes a
ticket from a counter in memory, and the program that draws the last one does that work.

`last_to_arrive(counter, arrivals)`: every thread's stores first (a CTA barrier), then one
atomic add with release-acquire semantics at GPU scope, so the program that draws ticket
arrivals - 1 sees the stores of all the programs that drew before it (it must read them
through L2, with .cg or volatile loads, not from its own L1). That program puts the counter
back to 0, so the next launch (or a replayed CUDA graph) finds it as it was captured. The
counters are the callers' (int32 zeros kept across launches), one launch at a time per counter:
the module that launches holds a moeflow.ops.device_counters.DeviceCounters for them (the
router's tickets, the experts' counts), which makes them once per device.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def last_to_arrive(counter_ptr, arrivals):
    """Whether this program is the last of `arrivals` to arrive at the counter (see the module
    docstring); the last one resets it to 0."""
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == arrivals - 1
    tl.store(counter_ptr, 0, mask=last)
    return last

