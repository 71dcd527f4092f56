"""Turn the SparseMoE layers of a model into expert-parallel ones, in place."""
from __future__ import annotations

import warnings
from typing import Optional

import torch.distributed as dist
from torch import nn

from moemix.layers.sparse_moe import SparseMoE
from moemix.parallel.ddp import exclude_expert_params_from_ddp
from moemix.parallel.expert_parallel import ExpertParallelMoE

__all__ = ["distribute_experts"]


def distribute_experts(model: nn.Module, group: Optional[dist.ProcessGroup] = None, *,
                       expert_grad_scale: Optional[float] = None, exclude_from_ddp: bool = True) -> int:
    """Replace every ``SparseMoE`` submodule of ``model`` by its :class:`ExpertParallelMoE` shard.

    Call it on every rank of ``group`` after ``dist.init_process_group`` and before wrapping the model in
    DDP or building the optimizer (in Lightning: inside ``LightningModule.configure_model``). The model
    must be identical on every rank (same seed). Layers that are already expert-parallel are left alone,
    so calling it twice is harmless.

    Args:
        model: module whose ``SparseMoE`` children (exactly that type; subclasses may change ``forward``
            and are skipped) are replaced. It must not itself be a ``SparseMoE``.
        group: process group to shard over. Defaults to the world group.
        expert_grad_scale: see :class:`ExpertParallelMoE`. Defaults to ``1 / world_size``.
        exclude_from_ddp: also call :func:`exclude_expert_params_from_ddp` on ``model``. Defaults to True.

    Returns:
        The number of layers replaced (a warning is issued when there were none).
    """
    if isinstance(model, SparseMoE):
        raise ValueError("model must contain SparseMoE layers, not be one; use ExpertParallelMoE.from_sparse_moe")
    targets = [(name, module) for name, module in model.named_modules() if type(module) is SparseMoE]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, ExpertParallelMoE.from_sparse_moe(module, group, expert_grad_scale=expert_grad_scale))
    if not targets and not any(isinstance(m, ExpertParallelMoE) for m in model.modules()):
        warnings.warn("distribute_experts found no SparseMoE layer in the model", stacklevel=2)
    if exclude_from_ddp:
        exclude_expert_params_from_ddp(model)
    return len(targets)
