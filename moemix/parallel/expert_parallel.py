"""ExpertParallelMoE: a SparseMoE whose experts are sharded across a ``torch.distributed`` group.

The sharding itself is :class:`~moemix.parallel.ShardedExperts`, which works for any
:class:`~moemix.layers.MoELayer`; this class is ``SparseMoE`` built directly in sharded form.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Tuple, Type, Union

import torch
import torch.distributed as dist
from torch import nn

from moemix.layers.sparse_moe import SparseMoE
from moemix.parallel.sharded_experts import ShardedExperts, check_expert_grad_scale, group_rank_and_size

__all__ = ["ExpertParallelMoE"]


class ExpertParallelMoE(SparseMoE):
    """:class:`~moemix.layers.SparseMoE` with its experts sharded over the ranks of a process group.

    Constructed on every rank of ``group`` with the same arguments (and the same random seed, or wrapped in
    DDP, which broadcasts rank 0's replicated parameters). It builds the full layer, keeps this rank's
    ``E / W`` experts and frees the rest, so with equal seeds the shards together are exactly the
    single-process ``SparseMoE``. The output on each rank equals ``SparseMoE(x_rank)`` (routing, capacity
    and auxiliary losses are computed on the rank's own tokens), and so do the gradients, see
    ``expert_grad_scale``.

    After each forward the module holds, like SparseMoE, ``aux_loss``, ``aux_losses``, ``tokens_per_expert``
    (``[E]``, this rank's assignments to every global expert) and ``dropped_tokens``; in addition
    ``local_tokens_per_expert`` (``[E / W]``, rows this rank's experts processed, from all ranks).

    Args:
        in_features ... shared_hidden_features: as :class:`~moemix.layers.SparseMoE` (all its keywords
            are accepted). Tokens travel between ranks sorted by expert whatever ``dispatch_layout`` says;
            the local experts run the rows they receive in ``dispatch_layout`` (``"auto"``: the layout
            :class:`~moemix.layers.SparseMoE` would take for them).
        group: process group the experts are sharded over. Defaults to the default (world) group.
        expert_grad_scale: factor applied to the gradients of the local expert parameters. The local
            experts receive the *sum* over ranks of the gradients of each rank's loss, while DDP *averages*
            the replicated gradients over ranks; the default ``1 / W`` makes both the gradient of the mean
            of the ranks' losses (Megatron-core scales expert gradients the same way). Use 1.0 when the
            replicated gradients are summed instead. Input and router gradients are never scaled.
        device, dtype: factory keywords.

    Shapes:
        ``[..., in_features] -> [..., out_features]``; ranks may hold different token counts, including 0.

    Raises:
        ValueError: ``num_experts`` not divisible by the group's world size, or ``expert_grad_scale`` not a
            finite number > 0 (checked before the full layer is allocated).
        RuntimeError: ``torch.distributed`` is not initialised.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Union[str, Type[nn.Module], Callable[[], nn.Module], nn.Module] = nn.GELU,
        norm_layer: Optional[Type[nn.Module]] = None,
        bias: Union[bool, Tuple[bool, bool]] = True,
        drop: Union[float, Tuple[float, float]] = 0.0,
        use_conv: bool = False,
        *,
        num_experts: int = 8,
        group: Optional[dist.ProcessGroup] = None,
        expert_grad_scale: Optional[float] = None,
        **kwargs,
    ):
        group_rank_and_size(group, num_experts)  # fail before allocating the full layer
        if expert_grad_scale is not None:
            check_expert_grad_scale(expert_grad_scale)
        super().__init__(in_features, hidden_features, out_features, act_layer, norm_layer, bias, drop, use_conv,
                         num_experts=num_experts, **kwargs)
        self.experts = ShardedExperts.from_experts(self.experts, group, expert_grad_scale=expert_grad_scale)

    @classmethod
    def from_sparse_moe(cls, moe: SparseMoE, group: Optional[dist.ProcessGroup] = None, *,
                        expert_grad_scale: Optional[float] = None) -> "ExpertParallelMoE":
        """This rank's shard of a full ``SparseMoE`` (weights copied; ``moe`` is left unchanged).

        Every rank of ``group`` must pass an identical ``moe`` for the shards to form that layer.
        """
        if not isinstance(moe, SparseMoE) or isinstance(moe, ExpertParallelMoE):
            raise ValueError(f"moe must be a SparseMoE that is not already expert-parallel, got {type(moe).__name__}")
        memo = {id(moe.experts): ShardedExperts.from_experts(moe.experts, group, expert_grad_scale=expert_grad_scale)}
        # Per-forward state (aux_loss may carry a graph) is not copied.
        memo.update({id(v): None for v in vars(moe).values() if isinstance(v, torch.Tensor)})
        clone = copy.deepcopy(moe, memo)
        ep = cls.__new__(cls)
        ep.__dict__.update(clone.__dict__)
        return ep

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        return self.experts.group

    @property
    def rank(self) -> int:
        return self.experts.rank

    @property
    def world_size(self) -> int:
        return self.experts.world_size

    @property
    def expert_grad_scale(self) -> float:
        return self.experts.expert_grad_scale

    @expert_grad_scale.setter
    def expert_grad_scale(self, value: float) -> None:
        self.experts.expert_grad_scale = value

    @property
    def local_tokens_per_expert(self) -> Optional[torch.Tensor]:
        """``[E / W]`` rows this rank's experts processed in the last forward, from all ranks."""
        return self.experts.local_tokens_per_expert

    @property
    def num_local_experts(self) -> int:
        return self.experts.num_local_experts

    @property
    def local_expert_range(self) -> range:
        """Global ids of the experts held by this rank."""
        return self.experts.local_expert_range
