"""Differentiable variable-size all-to-all over a ``torch.distributed`` process group.

Expert parallelism moves tokens in two steps (megablocks, Gale et al. 2022; GShard, Lepikhin et al.
2020): an all-to-all of the per-expert *counts* (fixed size, so every rank learns how many rows it will
receive), then an all-to-all of the *rows* themselves with those counts as split sizes.

Backend notes (torch 2.14): gloo implements ``all_to_all_single`` with uneven splits for CPU tensors
(checked with two processes, including zero-row splits); it has no all-to-all for CUDA tensors, so those
are staged through host memory here. NCCL runs it natively on GPU tensors.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["all_to_all", "exchange_counts"]


def _all_to_all_single(output: torch.Tensor, x: torch.Tensor, output_splits: List[int], input_splits: List[int],
                       group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if x.device.type != "cpu" and dist.get_backend(group) == dist.Backend.GLOO:
        # gloo has no all-to-all for accelerator tensors: exchange through host memory.
        host_out = torch.empty(output.shape, dtype=output.dtype)
        dist.all_to_all_single(host_out, x.cpu(), output_splits, input_splits, group=group)
        return output.copy_(host_out)
    dist.all_to_all_single(output, x, output_splits, input_splits, group=group)
    return output


class _AllToAll(torch.autograd.Function):
    """Rows ``[sum(input_splits), ...]`` -> ``[sum(output_splits), ...]``; backward swaps the splits."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        return _all_to_all_single(out, x.contiguous(), output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        # The rows a rank received are the rows whose gradients it sends back, and vice versa.
        grad_x = _AllToAll.apply(grad.contiguous(), ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_x, None, None, None


def _check_splits(name: str, splits: List[int], world_size: int) -> List[int]:
    splits = [int(s) for s in splits]
    if len(splits) != world_size or any(s < 0 for s in splits):
        raise ValueError(f"{name} must be {world_size} non-negative ints (one per rank), got {splits}")
    return splits


def all_to_all(x: torch.Tensor, output_splits: List[int], input_splits: List[int],
               group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Send ``input_splits[r]`` consecutive rows of ``x`` to rank ``r``; receive ``output_splits[r]`` from it.

    A collective: every rank of ``group`` must call it, with ``output_splits`` on rank ``a`` at index ``b``
    equal to ``input_splits`` on rank ``b`` at index ``a``. Differentiable: the gradient travels back by
    the same exchange with the split sizes swapped.

    Args:
        x: ``[sum(input_splits), ...]`` rows, grouped by destination rank.
        output_splits: rows to receive from each rank (host ints, length ``world_size``).
        input_splits: rows to send to each rank (host ints, length ``world_size``).
        group: process group. Defaults to the default (world) group.

    Returns:
        ``[sum(output_splits), ...]`` rows, grouped by source rank.
    """
    world_size = dist.get_world_size(group)
    output_splits = _check_splits("output_splits", output_splits, world_size)
    input_splits = _check_splits("input_splits", input_splits, world_size)
    if x.dim() < 1 or x.shape[0] != sum(input_splits):
        raise ValueError(f"x must have sum(input_splits)={sum(input_splits)} rows, got shape {tuple(x.shape)}")
    return _AllToAll.apply(x, output_splits, input_splits, group)


def exchange_counts(send_counts: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Equal-split all-to-all of per-expert row counts (no gradient).

    With ``W`` ranks each holding ``L`` consecutive experts, ``send_counts [W * L]`` holds the rows this
    rank sends to each global expert. The result ``[W * L]`` holds, at ``r * L + l``, the rows rank ``r``
    sends to this rank's local expert ``l``.
    """
    world_size = dist.get_world_size(group)
    if send_counts.dim() != 1 or send_counts.numel() % world_size:
        raise ValueError(f"send_counts must be 1-d with a multiple of world_size={world_size} entries, "
                         f"got shape {tuple(send_counts.shape)}")
    send_counts = send_counts.contiguous()
    recv_counts = torch.empty_like(send_counts)
    return _all_to_all_single(recv_counts, send_counts, None, None, group)
