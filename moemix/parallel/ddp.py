"""Keep DDP away from sharded expert parameters.

``DistributedDataParallel`` all-reduces (averages) every gradient it manages and broadcasts rank 0's
parameters at construction. Expert-parallel experts are *different* tensors on each rank, of the same
shape, so DDP would silently average expert ``e`` of rank 0 with expert ``e + L`` of rank 1. Their
gradients are already complete after backward (the all-to-all brings every rank's contribution home), so
DDP must skip them: it ignores the fully qualified names listed in ``module._ddp_params_and_buffers_to_ignore``.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

from torch import nn

from moemix.parallel.sharded_experts import ShardedExperts

__all__ = ["named_expert_parameters", "exclude_expert_params_from_ddp"]


def _expert_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, ShardedExperts):
            yield (f"{name}.local." if name else "local."), module.local


def named_expert_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every rank-local expert parameter in ``model`` (names relative to ``model``)."""
    for prefix, experts in _expert_modules(model):
        for name, param in experts.named_parameters():
            yield prefix + name, param


def exclude_expert_params_from_ddp(model: nn.Module) -> List[str]:
    """Mark the rank-local expert parameters of ``model`` (and their buffers) as ignored by DDP.

    Call it on the module that DDP will wrap (for Lightning, the LightningModule, from ``configure_model``)
    before wrapping. Names already on the ignore list are kept. Returns the expert names.
    """
    names = [name for name, _ in named_expert_parameters(model)]
    names += [prefix + name for prefix, experts in _expert_modules(model) for name, _ in experts.named_buffers()]
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = existing + [n for n in names if n not in existing]
    return names
