"""Shard the experts of every MoE layer of a model, in place."""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch.distributed as dist
from torch import nn

from moemix.layers.moe_layer import MoELayer
from moemix.parallel.ddp import exclude_expert_params_from_ddp
from moemix.parallel.sharded_experts import ShardedExperts

__all__ = ["distribute_experts"]


def distribute_experts(model: nn.Module, group: Optional[dist.ProcessGroup] = None, *,
                       expert_grad_scale: Optional[float] = None, exclude_from_ddp: bool = True,
                       include: Optional[Callable[[str, MoELayer], bool]] = None) -> int:
    """Shard the experts of every :class:`~moemix.layers.MoELayer` in ``model`` (``SparseMoE`` and layers
    built from one's own router or experts, ``model`` itself included) over ``group``, in place
    (:func:`~moemix.parallel.shard_experts`: each layer keeps its class, its experts become a
    :class:`~moemix.parallel.ShardedExperts`).

    Call it on every rank of ``group`` after ``dist.init_process_group`` and before wrapping the model in
    DDP or building the optimizer (in Lightning: inside ``LightningModule.configure_model``). The model
    must be identical on every rank (same seed). Layers whose experts are sharded already are left alone, so
    calling it twice is harmless. Every shard is built before any layer changes: if one layer cannot be
    sharded, the ``ValueError`` names it and the model is left as it was.

    Args:
        model: module whose MoE layers are sharded.
        group: process group to shard over. Defaults to the world group.
        expert_grad_scale: see :class:`ShardedExperts`. Defaults to ``1 / world_size``.
        exclude_from_ddp: also call :func:`exclude_expert_params_from_ddp` on ``model``. Defaults to True.
        include: ``include(name, layer) -> bool`` picks the layers to shard (names as in
            ``model.named_modules()``); the others stay whole, replicated like any other module. Defaults to all.

    Returns:
        The number of layers sharded by this call (a warning is issued when the model has no MoE layer).
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    targets = [(name, layer) for name, layer in layers
               if not isinstance(layer.experts, ShardedExperts) and (include is None or include(name, layer))]
    shards = []
    for name, layer in targets:
        try:
            shards.append(ShardedExperts.from_experts(layer.experts, group, expert_grad_scale=expert_grad_scale))
        except ValueError as exc:
            raise ValueError(f"cannot shard the experts of {name or 'the model'} ({type(layer).__name__}): {exc}"
                             ) from exc
    for (_, layer), shard in zip(targets, shards):
        layer.experts = shard
    if not layers:
        warnings.warn("distribute_experts found no MoE layer (MoELayer, SparseMoE) in the model", stacklevel=2)
    if exclude_from_ddp:
        exclude_expert_params_from_ddp(model)
    return len(targets)
