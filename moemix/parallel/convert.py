"""Shard the experts of every MoE layer of a model, in place."""
from __future__ import annotations

import warnings
from typing import Optional

import torch.distributed as dist
from torch import nn

from moemix.layers.moe_layer import MoELayer
from moemix.parallel.ddp import exclude_expert_params_from_ddp
from moemix.parallel.sharded_experts import ShardedExperts, shard_experts

__all__ = ["distribute_experts"]


def distribute_experts(model: nn.Module, group: Optional[dist.ProcessGroup] = None, *,
                       expert_grad_scale: Optional[float] = None, exclude_from_ddp: bool = True) -> int:
    """Shard the experts of every :class:`~moemix.layers.MoELayer` in ``model`` (``SparseMoE`` and layers
    built from one's own router or experts, ``model`` itself included) over ``group``, in place
    (:func:`~moemix.parallel.shard_experts`: each layer keeps its class, its experts become a
    :class:`~moemix.parallel.ShardedExperts`).

    Call it on every rank of ``group`` after ``dist.init_process_group`` and before wrapping the model in
    DDP or building the optimizer (in Lightning: inside ``LightningModule.configure_model``). The model
    must be identical on every rank (same seed). Layers whose experts are sharded already are left alone, so
    calling it twice is harmless.

    Args:
        model: module whose MoE layers are sharded.
        group: process group to shard over. Defaults to the world group.
        expert_grad_scale: see :class:`ShardedExperts`. Defaults to ``1 / world_size``.
        exclude_from_ddp: also call :func:`exclude_expert_params_from_ddp` on ``model``. Defaults to True.

    Returns:
        The number of layers sharded by this call (a warning is issued when the model has no MoE layer).
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    targets = [layer for layer in layers if not isinstance(layer.experts, ShardedExperts)]
    for layer in targets:
        shard_experts(layer, group, expert_grad_scale=expert_grad_scale)
    if not layers:
        warnings.warn("distribute_experts found no MoE layer (MoELayer, SparseMoE) in the model", stacklevel=2)
    if exclude_from_ddp:
        exclude_expert_params_from_ddp(model)
    return len(targets)
