"""ShardedExperts: the experts of any MoELayer sharded across a ``torch.distributed`` group.

Each of the ``W`` ranks holds ``L = E / W`` consecutive experts (rank ``r`` owns experts
``r * L ... (r + 1) * L - 1``) as ``local``, any :class:`~moemix.layers.RoutedExperts`. Routing stays with the
layer (replicated); a forward pass of the routed tokens:

    x [T, D] --plan_dispatch, dispatch_tokens--> rows sorted by global expert [N, D]
      --exchange_counts--> rows each rank will send me, per local expert   (one host sync)
      --all_to_all--> received rows [M, D], ordered (source rank, local expert)
      --local.plan_routing, local.forward_routed--> [M, D']   (each row a token routed to one local expert
                                                               with weight 1; the local plan's host sync)
      --all_to_all back--> [N, D'] --combine_tokens--> y [T, D']

References: Lepikhin et al. 2020 (GShard, all-to-all expert parallelism); Gale et al. 2022 (megablocks:
counts first, then a variable-size ``all_to_all_single``, dropless).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from moemix.layers._validate import check_positive
from moemix.layers.dispatch import DispatchPlan, combine_tokens, dispatch_tokens, plan_dispatch
from moemix.layers.moe_layer import MoELayer
from moemix.layers.routed_experts import RoutedExperts
from moemix.layers.router import RoutingDecision
from moemix.parallel._grad import scale_grad, tie_to_graph
from moemix.parallel.all_to_all import all_to_all, exchange_counts

__all__ = ["ShardedExperts", "shard_experts", "group_rank_and_size", "check_expert_grad_scale"]


def _check_unsharded(name: str, experts: nn.Module) -> None:
    if isinstance(experts, ShardedExperts):
        raise ValueError(f"{name} are sharded already")
    if not isinstance(experts, RoutedExperts):
        raise ValueError(f"{name} must be a RoutedExperts subclass (it has select_experts and forward_routed), "
                         f"got {type(experts).__name__}")


@dataclasses.dataclass
class ShardedPlan(DispatchPlan):
    """The sorted plan over all experts, and the layout the local experts plan the received rows in."""

    local_layout: str = "auto"


def _received_rows_decision(recv_counts: torch.Tensor, num_local: int, rows: int) -> RoutingDecision:
    """The received rows as tokens routed to one local expert each, with weight 1.

    ``recv_counts [W * L]`` holds at ``r * L + l`` the rows rank ``r`` sent for local expert ``l``; the
    ``rows`` received rows arrive in that order. Returns a decision with ``k = 1``: ``indices [rows, 1]``
    the local expert of each row, ``weights`` ones, ``probs`` one-hot and ``logits`` their log.
    """
    world = recv_counts.numel() // num_local
    expert_of_block = torch.arange(num_local, device=recv_counts.device).repeat(world)
    indices = torch.repeat_interleave(expert_of_block, recv_counts, output_size=rows).unsqueeze(1)
    probs = torch.zeros(rows, num_local, device=recv_counts.device).scatter_(1, indices, 1.0)
    return RoutingDecision(logits=probs.log(), probs=probs, weights=probs.new_ones(rows, 1), indices=indices)


def check_expert_grad_scale(value: float) -> float:
    """``value`` as a float if it is a finite number > 0 (None at construction: 1 / world size), else
    ``ValueError``."""
    check_positive("expert_grad_scale", value)
    return float(value)


def group_rank_and_size(group: Optional[dist.ProcessGroup], num_experts: int) -> Tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group``, checking that ``num_experts`` splits evenly."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process group; call "
                           "dist.init_process_group first (in Lightning, shard in configure_model)")
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("group does not contain this process")
    if num_experts % world_size:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the group's world size ({world_size})")
    return rank, world_size


class ShardedExperts(RoutedExperts):
    """This rank's share of a layer's experts, and the all-to-all that brings every rank's tokens to them.

    Built on every rank of ``group`` from the same full experts (same seed) by :meth:`from_experts` or
    :func:`shard_experts`; it plans and combines over all ``num_experts`` experts, so any
    :class:`~moemix.layers.MoELayer` (``SparseMoE``, or one with its own router or experts) holding it
    computes on each rank exactly what it computed on that rank's tokens with the full experts, and so do
    the gradients, see ``expert_grad_scale``.

    Args:
        local: this rank's experts, a :class:`~moemix.layers.RoutedExperts` with ``num_experts / W`` experts
            (``full.select_experts(r * L, (r + 1) * L)``). Every parameter in it is rank-local: excluded from
            DDP by :func:`~moemix.parallel.exclude_expert_params_from_ddp`.
        num_experts: ``E``, the experts over all ranks (the router's).
        group: process group the experts are sharded over. Defaults to the default (world) group.
        expert_grad_scale: factor applied to the gradients of the local expert parameters. They receive the
            *sum* over ranks of the gradients of each rank's loss, while DDP *averages* the replicated
            gradients over ranks; the default ``1 / W`` makes both the gradient of the mean of the ranks'
            losses (Megatron-core scales expert gradients the same way). Use 1.0 when the replicated
            gradients are summed instead. Input and router gradients are never scaled.

    Attributes (after each forward):
        local_tokens_per_expert: ``[E / W]`` rows this rank's experts processed, from all ranks.

    The tokens travel between ranks sorted by expert whatever the layer's ``dispatch_layout`` says. The
    received rows are tokens routed to one local expert each with weight 1 (a :class:`RoutingDecision` with
    ``k = 1``, one-hot ``probs``): ``local.plan_routing`` plans them in the layer's ``dispatch_layout`` and
    ``local.forward_routed`` runs them, so the local experts take the same paths as in a single process
    (``GroupedExperts``: its ``"auto"`` rule, padded batches, ``F.grouped_mm``), and experts
    that implement only ``forward_routed`` shard as well. A rank whose experts receive no rows still joins
    both exchanges in the backward, whatever its experts return for no rows.

    Raises:
        ValueError: ``num_experts`` not divisible by the group's world size, ``local`` not holding
            ``num_experts / W`` experts, or ``expert_grad_scale`` not a finite number > 0.
        RuntimeError: ``torch.distributed`` is not initialised.
    """

    def __init__(self, local: nn.Module, num_experts: int, group: Optional[dist.ProcessGroup] = None,
                 expert_grad_scale: Optional[float] = None):
        super().__init__()
        rank, world_size = group_rank_and_size(group, num_experts)
        _check_unsharded("local", local)
        if local.num_experts * world_size != num_experts:
            raise ValueError(f"local must hold num_experts / world size = {num_experts // world_size} experts, "
                             f"got {local.num_experts}")
        self.local = local
        self.num_experts = num_experts
        self.in_features, self.out_features = local.in_features, local.out_features
        self.group = group
        self.rank, self.world_size = rank, world_size
        self.expert_grad_scale = 1.0 / world_size if expert_grad_scale is None else expert_grad_scale
        self.local_tokens_per_expert: Optional[torch.Tensor] = None

    @classmethod
    def from_experts(cls, experts: RoutedExperts, group: Optional[dist.ProcessGroup] = None, *,
                     expert_grad_scale: Optional[float] = None) -> "ShardedExperts":
        """This rank's shard of the full ``experts`` (its slice copied by ``experts.select_experts``)."""
        _check_unsharded("experts", experts)
        rank, world_size = group_rank_and_size(group, experts.num_experts)
        count = experts.num_experts // world_size
        return cls(experts.select_experts(rank * count, (rank + 1) * count), experts.num_experts, group,
                   expert_grad_scale)

    @property
    def expert_grad_scale(self) -> float:
        return self._expert_grad_scale

    @expert_grad_scale.setter
    def expert_grad_scale(self, value: float) -> None:
        self._expert_grad_scale = check_expert_grad_scale(value)

    @property
    def num_local_experts(self) -> int:
        return self.local.num_experts

    @property
    def local_expert_range(self) -> range:
        """Global ids of the experts held by this rank."""
        return range(self.rank * self.num_local_experts, (self.rank + 1) * self.num_local_experts)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, local_experts={self.local_expert_range.start}.."
                f"{self.local_expert_range.stop - 1}, world_size={self.world_size}, "
                f"expert_grad_scale={self.expert_grad_scale:g}")

    def select_experts(self, start: int, stop: int) -> RoutedExperts:
        raise ValueError("these experts are sharded already; select from the full experts")

    def plan_routing(self, x: torch.Tensor, decision: RoutingDecision, layout: str = "auto") -> ShardedPlan:
        """The sorted plan over all ``E`` experts (each destination rank's rows one contiguous block), and
        ``layout``, which the local experts plan the received rows in."""
        plan = plan_dispatch(decision.indices, self.num_experts, decision.kept, layout="sorted")
        return ShardedPlan(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}, local_layout=layout)

    def forward_routed(self, x: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``y[t] = sum_j weights[t, j] * expert_{e(t, j)}(x[t])``, the experts wherever they live."""
        y_sorted = self._remote_experts(dispatch_tokens(x, plan), plan.tokens_per_expert, plan.counts,
                                        getattr(plan, "local_layout", "auto"))
        return combine_tokens(y_sorted, weights, plan)

    def _remote_experts(self, x: torch.Tensor, send_counts: torch.Tensor, send_host: List[int],
                        layout: str) -> torch.Tensor:
        """Rows ``[N, D]`` sorted by global expert -> their expert outputs ``[N, D']``, same order."""
        world, local = self.world_size, self.num_local_experts
        recv_counts = exchange_counts(send_counts, self.group)
        recv_host = recv_counts.tolist()  # host sync: split sizes
        input_splits = [sum(send_host[r * local:(r + 1) * local]) for r in range(world)]
        output_splits = [sum(recv_host[r * local:(r + 1) * local]) for r in range(world)]
        x_recv = all_to_all(x, output_splits, input_splits, self.group)
        # The received rows, ordered (source rank, local expert), are tokens routed to one local expert each
        # with weight 1: the local experts plan and run them like a single-process layer's tokens.
        decision = _received_rows_decision(recv_counts, local, x_recv.shape[0])
        plan = self.local.plan_routing(x_recv, decision, layout)
        self.local_tokens_per_expert = plan.tokens_per_expert.detach()
        # Scale the expert parameter gradients only: the inner scale_grad undoes the outer one for the
        # gradient flowing back to the tokens.
        s = self.expert_grad_scale
        x_in = scale_grad(x_recv, 1.0 / s)
        y_recv = self.local.check_output_rows(self.local.forward_routed(x_in, decision.weights, plan), x_recv,
                                              "forward_routed")
        if x_recv.shape[0] == 0:  # whatever the experts did with no rows, the backward joins the exchanges
            y_recv = tie_to_graph(y_recv, [x_in, *self.local.parameters()])
        y_recv = scale_grad(y_recv, s)
        return all_to_all(y_recv, input_splits, output_splits, self.group)

    def get_extra_state(self) -> torch.Tensor:
        """Which experts this shard holds, ``int64 [num_experts, world_size, first, end]``, saved with it so that
        it cannot load into another rank's shard (:meth:`_load_from_state_dict` checks it)."""
        first, end = self.local_expert_range.start, self.local_expert_range.stop
        return torch.tensor([self.num_experts, self.world_size, first, end], dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        pass  # checked, before anything of this shard loads, in _load_from_state_dict

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Per-rank checkpoints of expert-parallel layers saved before the experts moved under ``local.``.
        local_names = [name for name, _ in self.local.named_parameters()] + [n for n, _ in self.local.named_buffers()]
        for name in local_names:
            if prefix + name in state_dict and prefix + "local." + name not in state_dict:
                state_dict[prefix + "local." + name] = state_dict.pop(prefix + name)
        # Checkpoints without the shard's record (older ones, single-process ones sliced by hand) are trusted.
        record = state_dict.get(prefix + "_extra_state")
        if record is not None and not self._holds(record):
            error_msgs.append(
                f"{prefix}_extra_state: the checkpoint's shard holds {self._describe(record)}, this rank's shard "
                f"{self._describe(self.get_extra_state())}; its experts were not loaded. Load each rank's own "
                "checkpoint (one written by rank 0 only, Lightning's default, lacks the other ranks' experts)")
            for key in [k for k in state_dict if k.startswith(prefix + "local.")]:
                del state_dict[key]  # reported missing (strict) instead of loading another rank's experts
        state_dict[prefix + "_extra_state"] = self.get_extra_state()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _holds(self, record) -> bool:
        """Whether ``record`` (:meth:`get_extra_state` of the saving shard) describes this shard."""
        return isinstance(record, torch.Tensor) and record.tolist() == self.get_extra_state().tolist()

    @staticmethod
    def _describe(record) -> str:
        if not (isinstance(record, torch.Tensor) and record.numel() == 4):
            return f"an unreadable record {record!r}"
        num_experts, world_size, first, end = record.tolist()
        return f"experts {first}..{end - 1} of {num_experts} sharded over {world_size} ranks"

    def forward(self, rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        raise RuntimeError("ShardedExperts run through forward_routed (their experts live on several ranks); "
                           "call local(...) for this rank's experts")


def shard_experts(layer: MoELayer, group: Optional[dist.ProcessGroup] = None, *,
                  expert_grad_scale: Optional[float] = None) -> MoELayer:
    """Shard the experts of ``layer`` over ``group``, in place: ``layer.experts`` becomes its
    :class:`ShardedExperts` (this rank's slice, copied; the full experts are let go). Returns ``layer``.

    Call it on every rank with identical layers (same seed). The layer keeps its class, router, shared
    expert and forward; its expert parameters are now named ``experts.local.*``.
    """
    if not isinstance(layer, MoELayer):
        raise ValueError(f"layer must be a MoELayer, got {type(layer).__name__}")
    if isinstance(layer.experts, ShardedExperts):
        raise ValueError("layer's experts are sharded already")
    layer.experts = ShardedExperts.from_experts(layer.experts, group, expert_grad_scale=expert_grad_scale)
    return layer
