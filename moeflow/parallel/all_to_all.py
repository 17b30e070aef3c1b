"""Token exchange between the ranks of an expert-parallel group, differentiable.

Every rank sends a buffer of rows ordered by destination and receives one ordered by source.
Two variants:

* flat: one `all_to_all_single` over the EP group. Split sizes are exchanged first (a tiny
  fixed-size all-to-all of counts), so a rank or expert with zero tokens still takes part in
  every collective with the right sizes: nobody waits for a message that never comes (the
  DeepSpeed #5794 hang came from ranks skipping collectives when they had no tokens).
* hierarchical: rows first cross the fast intra-node links to the local rank whose index matches
  the destination's, are regrouped by destination node (a layout transform, one gather), and then
  cross nodes in a single exchange per local index, so each inter-node message is L times larger
  (L ranks per node) and there are L times fewer of them. The received order is the same as the
  flat exchange's (by source rank), so callers cannot tell the two apart except by speed.

The backward of an exchange is the reverse exchange with send and receive sizes swapped.

Legend: N rows, D row width, P ranks in the EP group, L ranks per node, El experts per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _group_size(group) -> int:
    return dist.get_world_size(group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x_ND.new_empty((sum(recv_splits),) + tuple(x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.send_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.send_splits, ctx.recv_splits,
                               group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], group
               ) -> torch.Tensor:
    """Send send_splits[r] consecutive rows to rank r of `group`; receive recv_splits[r] from r."""
    if _group_size(group) == 1:
        return x_ND
    return _AllToAll.apply(x_ND, list(send_splits), list(recv_splits), group)


def exchange_counts(send_counts_PX: torch.Tensor, group) -> torch.Tensor:
    """Row i goes to rank i; returns row j = what rank j sent here. Always runs, even for zeros."""
    if _group_size(group) == 1:
        return send_counts_PX
    recv = torch.empty_like(send_counts_PX)
    dist.all_to_all_single(recv, send_counts_PX.contiguous(), group=group)
    return recv


def gather_counts(send_counts_PX: torch.Tensor, group) -> torch.Tensor:
    """Every rank's send counts: [P src, P dst, X]."""
    if _group_size(group) == 1:
        return send_counts_PX[None]
    parts = [torch.empty_like(send_counts_PX) for _ in range(_group_size(group))]
    dist.all_gather(parts, send_counts_PX.contiguous(), group=group)
    return torch.stack(parts)


def chunk_index(starts_C: torch.Tensor, sizes_C: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(start, start + size) over the chunks, on the tensors' device."""
    total = int(sizes_C.sum())
    out_starts = torch.cumsum(sizes_C, 0) - sizes_C
    within = torch.arange(total, device=sizes_C.device) - torch.repeat_interleave(
        out_starts, sizes_C, output_size=total)
    return torch.repeat_interleave(starts_C, sizes_C, output_size=total) + within


def transpose_chunks(sizes_AB: torch.Tensor) -> torch.Tensor:
    """Row index that reorders a buffer of chunks laid out (a, b) row-major into (b, a) order.

    sizes_AB[a, b] is the length of chunk (a, b); buf[index] holds chunks (0,0), (1,0), ..., (0,1).
    """
    sizes = sizes_AB.reshape(-1)
    starts_AB = (torch.cumsum(sizes, 0) - sizes).view_as(sizes_AB)
    return chunk_index(starts_AB.t().reshape(-1), sizes_AB.t().reshape(-1))


def hierarchical_all_to_all(x_ND: torch.Tensor, counts_PP: torch.Tensor, position: int,
                            intra_group, inter_group, ranks_per_node: int) -> torch.Tensor:
    """Same result as the flat exchange over P ranks, in two steps (intra-node, inter-node).

    counts_PP[src, dst]: rows each position of the EP group sends to each other (every rank
    knows the whole matrix, see `gather_counts`). Positions are node-major: p = node·L + local.
    """
    L = ranks_per_node
    P = counts_PP.shape[0]
    nodes = P // L
    node, local = divmod(position, L)
    c = counts_PP.view(nodes, L, nodes, L)  # [src node, src local, dst node, dst local]

    # 1) to the local rank with the destination's local index: my rows (b, j) → (j, b)
    mine_BJ = c[node, local]
    x = x_ND[transpose_chunks(mine_BJ)]
    send1 = mine_BJ.sum(0).tolist()
    recv_IB = c[node, :, :, local]  # from each local peer i: rows for (b, my local), b-major
    x = all_to_all(x, send1, recv_IB.sum(1).tolist(), intra_group)

    # 2) layout transform: (i, b) → (b, i), then across nodes to node b
    x = x[transpose_chunks(recv_IB)]
    send2 = recv_IB.sum(0).tolist()
    recv2 = c[:, :, node, local].sum(1).tolist()  # from each node a: rows of all its locals
    return all_to_all(x, send2, recv2, inter_group)
