"""ExpertParallelMoE: a SparseMoE whose experts are sharded across a ``torch.distributed`` group.

Each of the ``W`` ranks holds ``L = E / W`` consecutive experts (rank ``r`` owns experts
``r * L ... (r + 1) * L - 1``) and a replica of everything else (router, shared expert). A forward pass:

    x [T, D] --router, plan_dispatch, dispatch_tokens--> rows sorted by global expert [N, D]
      --exchange_counts--> rows each rank will send me, per local expert   (one host sync)
      --all_to_all--> received rows [M, D], ordered (source rank, local expert)
      --regroup (gather)--> ordered (local expert, source rank) --GroupedExperts--> [M, D']
      --inverse gather, all_to_all back--> [N, D'] --combine_tokens--> y [T, D']

References: Lepikhin et al. 2020 (GShard, all-to-all expert parallelism); Gale et al. 2022 (megablocks:
counts first, then a variable-size ``all_to_all_single``, dropless).
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional, Tuple, Type, Union

import torch
import torch.distributed as dist
from torch import nn

from moemix.layers.dispatch import combine_tokens, dispatch_tokens, plan_dispatch
from moemix.layers.experts import GroupedExperts
from moemix.layers.router import RoutingDecision
from moemix.layers.sparse_moe import SparseMoE
from moemix.parallel._grad import permute_rows, regroup_permutation, scale_grad
from moemix.parallel.all_to_all import all_to_all, exchange_counts

__all__ = ["ExpertParallelMoE"]


def _group_info(group: Optional[dist.ProcessGroup], num_experts: int) -> Tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ExpertParallelMoE needs an initialised torch.distributed process group; call "
                           "dist.init_process_group first (in Lightning, build the layer in configure_model)")
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("group does not contain this process")
    if num_experts % world_size:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the group's world size ({world_size})")
    return rank, world_size


def _slice_experts(experts: GroupedExperts, start: int, stop: int) -> GroupedExperts:
    """Copy of ``experts`` (activation, dropout, flags) keeping only experts ``start:stop``.

    The stacked parameters are swapped for copies of their slices through the deepcopy memo, so the full
    stack is never duplicated and the random number generators are not touched.
    """
    memo = {id(p): nn.Parameter(p.detach()[start:stop].clone(), requires_grad=p.requires_grad)
            for p in experts.parameters(recurse=False)}
    local = copy.deepcopy(experts, memo)
    local.num_experts = stop - start
    return local


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
            are accepted). Tokens travel in the sorted layout whatever ``dispatch_layout`` says; the local
            experts run it through ``F.grouped_mm`` with ``"grouped_mm"``, or with ``"auto"`` where
            :class:`~moemix.layers.SparseMoE` would (CUDA, bfloat16), else one GEMM per expert slice.
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
        ValueError: ``num_experts`` not divisible by the group's world size, or ``expert_grad_scale <= 0``.
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
        _group_info(group, num_experts)  # fail before allocating the full layer
        super().__init__(in_features, hidden_features, out_features, act_layer, norm_layer, bias, drop, use_conv,
                         num_experts=num_experts, **kwargs)
        self._setup_parallel(group, expert_grad_scale)

    @classmethod
    def from_sparse_moe(cls, moe: SparseMoE, group: Optional[dist.ProcessGroup] = None, *,
                        expert_grad_scale: Optional[float] = None) -> "ExpertParallelMoE":
        """This rank's shard of a full ``SparseMoE`` (weights copied; ``moe`` is left unchanged).

        Every rank of ``group`` must pass an identical ``moe`` for the shards to form that layer.
        """
        if not isinstance(moe, SparseMoE) or isinstance(moe, ExpertParallelMoE):
            raise ValueError(f"moe must be a SparseMoE that is not already expert-parallel, got {type(moe).__name__}")
        rank, world_size = _group_info(group, moe.num_experts)
        local_count = moe.num_experts // world_size
        memo = {id(moe.experts): _slice_experts(moe.experts, rank * local_count, (rank + 1) * local_count)}
        # Per-forward state (aux_loss may carry a graph) is not copied.
        memo.update({id(v): None for v in vars(moe).values() if isinstance(v, torch.Tensor)})
        clone = copy.deepcopy(moe, memo)
        ep = cls.__new__(cls)
        ep.__dict__.update(clone.__dict__)
        ep._setup_parallel(group, expert_grad_scale)
        return ep

    def _setup_parallel(self, group: Optional[dist.ProcessGroup], expert_grad_scale: Optional[float]) -> None:
        rank, world_size = _group_info(group, self.num_experts)
        if expert_grad_scale is None:
            expert_grad_scale = 1.0 / world_size
        if not expert_grad_scale > 0:
            raise ValueError(f"expert_grad_scale must be > 0 or None, got {expert_grad_scale!r}")
        self.group = group
        self.rank, self.world_size = rank, world_size
        self.expert_grad_scale = float(expert_grad_scale)
        self.local_tokens_per_expert: Optional[torch.Tensor] = None
        local_count = self.num_experts // world_size
        if self.experts.num_experts != local_count:
            self.experts = _slice_experts(self.experts, rank * local_count, (rank + 1) * local_count)

    @property
    def num_local_experts(self) -> int:
        return self.experts.num_experts

    @property
    def local_expert_range(self) -> range:
        """Global ids of the experts held by this rank."""
        return range(self.rank * self.num_local_experts, (self.rank + 1) * self.num_local_experts)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, local_experts={self.local_expert_range.start}.."
                f"{self.local_expert_range.stop - 1}, world_size={self.world_size}, "
                f"expert_grad_scale={self.expert_grad_scale:g}")

    @torch.compiler.disable
    def _experts_forward(self, tokens: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
        # Sorted layout: each destination rank's rows must be one contiguous, unpadded block.
        plan = plan_dispatch(decision.indices, self.num_experts, decision.kept, layout="sorted")
        self.tokens_per_expert = plan.tokens_per_expert.detach()
        self.dropped_tokens = plan.num_dropped
        x_sorted = dispatch_tokens(tokens, plan)
        routed = x_sorted.shape[0] - plan.num_dropped  # dropped rows trail; they are never sent
        y_routed = self._remote_experts(x_sorted[:routed], plan.tokens_per_expert, plan.counts)
        if plan.num_dropped:
            y_routed = torch.cat([y_routed, y_routed.new_zeros(plan.num_dropped, y_routed.shape[-1])])
        return combine_tokens(y_routed, decision.weights, plan)

    def _remote_experts(self, x: torch.Tensor, send_counts: torch.Tensor, send_host: List[int]) -> torch.Tensor:
        """Rows ``[N, D]`` sorted by global expert -> their expert outputs ``[N, D']``, same order."""
        world, local = self.world_size, self.num_local_experts
        recv_counts_dev = exchange_counts(send_counts, self.group)
        recv_host = recv_counts_dev.tolist()  # host sync: split sizes
        recv_counts = [recv_host[r * local:(r + 1) * local] for r in range(world)]
        input_splits = [sum(send_host[r * local:(r + 1) * local]) for r in range(world)]
        output_splits = [sum(row) for row in recv_counts]
        x_recv = all_to_all(x, output_splits, input_splits, self.group)
        local_counts = [sum(row[l] for row in recv_counts) for l in range(local)]
        self.local_tokens_per_expert = torch.tensor(local_counts, device=x.device)
        regroup = world > 1 and local > 1  # otherwise arrival order is already by local expert
        if regroup:
            index, inverse = regroup_permutation(recv_counts, x.device)
            x_recv = permute_rows(x_recv, index, inverse)
        # Scale the expert parameter gradients only: the inner scale_grad undoes the outer one for the
        # gradient flowing back to the tokens.
        s = self.expert_grad_scale
        offsets = None
        if self.dispatch_layout == "grouped_mm" or (self.dispatch_layout == "auto"
                                                    and self.experts.grouped_mm_pays_off(x_recv)):
            # slice ends of the local experts from the exchanged counts, on the device (SparseMoE's rule)
            offsets = torch.cumsum(recv_counts_dev.view(world, local).sum(0), 0, dtype=torch.int32)
        y_recv = scale_grad(self.experts(scale_grad(x_recv, 1.0 / s), local_counts, offsets=offsets), s)
        if regroup:
            y_recv = permute_rows(y_recv, inverse, index)
        return all_to_all(y_recv, input_splits, output_splits, self.group)
