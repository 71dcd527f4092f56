"""Code run inside the spawned gloo processes; each rank saves a dict of measured errors.

The reference is the single-process ``SparseMoE`` applied to every rank's tokens, with the loss summed
over ranks. With DDP semantics (replicated gradients averaged over ``W`` ranks) the expert-parallel
gradients must equal: input grads = reference; replicated grads = reference / W; local expert grads =
``expert_grad_scale`` * reference slice.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moemix.layers import (GroupedExperts, MoELayer, RoutedExperts, SparseMoE, TopKRouter, grouped_matmul,
                           plan_dispatch)
from moemix.losses import collect_aux_loss
from moemix.parallel import (ExpertParallelMoE, ShardedExperts, all_to_all, distribute_experts,
                             named_expert_parameters, shard_experts)

D, H = 8, 16


class TanhRouter(TopKRouter):
    """A router that scores experts its own way (the gate on tanh of the tokens)."""

    def gate_logits(self, x):
        return super().gate_logits(torch.tanh(x))


class ScaledLinearExperts(RoutedExperts):
    """One ``[D, D']`` matrix per expert and a per-expert output scale held as a buffer."""

    def __init__(self, num_experts, in_features, out_features):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.randn(num_experts, in_features, out_features) / in_features ** 0.5)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, num_experts))

    def forward(self, rows, plan):
        return grouped_matmul(rows, self.weight, plan) * self.scale[plan.row_expert(), None]


class LoopLinearExperts(ScaledLinearExperts):
    """The same experts run by a loop of their own: forward_routed only, no forward on an expert buffer. Experts
    without rows are skipped, so for no rows at all the output has no gradient path."""

    forward = RoutedExperts.forward

    def plan_routing(self, x, decision, layout="auto"):
        return plan_dispatch(decision.indices, self.num_experts, decision.kept, "sorted")

    def forward_routed(self, x, weights, plan):
        y, start = x.new_zeros(x.shape[0], self.out_features), 0
        row_weight = torch.zeros(plan.num_rows + 1, dtype=weights.dtype, device=x.device).index_put(
            (plan.slot.reshape(-1),), weights.reshape(-1))  # dropped assignments land one past the rows
        for e, count in enumerate(plan.counts):
            if count == 0:
                continue
            token = plan.row_token[start:start + count]
            out = x[token] @ self.weight[e] * self.scale[e]
            y = y.index_add(0, token, out * row_weight[start:start + count, None].to(out.dtype))
            start += count
        return y


def own_parts_layer(num_experts=4, out_features=6, capacity_factor=None):
    """An MoELayer from one's own router and experts, with a gated shared expert."""
    return MoELayer(TanhRouter(D, num_experts, k=2, capacity_factor=capacity_factor),
                    ScaledLinearExperts(num_experts, D, out_features), shared_expert=nn.Linear(D, out_features),
                    shared_gate=nn.Linear(D, 1), aux_loss="importance")


def full_name(name: str) -> str:
    """The single-process name of a sharded layer's parameter."""
    return name.replace("experts.local.", "experts.")

# shapes: per-rank leading shape of the input tokens.
CASES = {
    "uneven_tokens": dict(kwargs=dict(num_experts=4, k=2), shapes=((7,), (3,))),
    "one_local_expert": dict(kwargs=dict(num_experts=2, k=1), shapes=((5,), (6,))),
    "many_local_experts": dict(kwargs=dict(num_experts=8, k=3, act_layer="silu", out_features=5),
                               shapes=((10,), (7,))),
    "skewed_routing": dict(kwargs=dict(num_experts=4, k=2), shapes=((6,), (6,)), skew=True),
    "idle_rank": dict(kwargs=dict(num_experts=4, k=2), shapes=((4,), (5,)), skew="all"),
    "empty_rank": dict(kwargs=dict(num_experts=4, k=2), shapes=((5,), (0,))),
    "glu_shared_capacity": dict(kwargs=dict(num_experts=4, k=2, glu=True, shared_expert="gated",
                                            capacity_factor=0.5, aux_loss="importance"), shapes=((9,), (4,))),
    "batched_input": dict(kwargs=dict(num_experts=4, k=2, shared_expert="averaged"), shapes=((2, 3), (1, 4))),
    "sum_grad_scale": dict(kwargs=dict(num_experts=4, k=2), shapes=((6,), (5,)), expert_grad_scale=1.0),
    "grouped_mm_experts": dict(kwargs=dict(num_experts=4, k=2, glu=True, act_layer="silu", bias=(True, False),
                                           dispatch_layout="grouped_mm"), shapes=((7,), (5,))),
    # layers that are not SparseMoE, sharded in place by shard_experts
    "own_router_and_experts": dict(build=own_parts_layer, shapes=((9,), (6,))),
    "own_parts_capacity": dict(build=lambda: own_parts_layer(capacity_factor=0.75), shapes=((8,), (5,))),
    "forward_routed_only_experts": dict(
        build=lambda: MoELayer(TanhRouter(D, 4, k=2, capacity_factor=0.75), LoopLinearExperts(4, D, 6)),
        shapes=((8,), (5,))),
    # rank 1's experts receive no rows and return an output without a gradient path: its backward must
    # still join the exchanges (through the received rows, or through the expert parameters)
    "idle_rank_own_loop": dict(build=lambda: MoELayer(TopKRouter(D, 4, k=2), LoopLinearExperts(4, D, 6)),
                               shapes=((5,), (4,)), skew="all"),
    "idle_rank_own_loop_input_without_grad": dict(
        build=lambda: MoELayer(TopKRouter(D, 4, k=2), LoopLinearExperts(4, D, 6)), shapes=((5,), (4,)), skew="all",
        input_requires_grad=False),
    # the local experts run the received rows in the layout the layer asks for
    "sorted_layout": dict(kwargs=dict(num_experts=4, k=2, glu=True, act_layer="silu", dispatch_layout="sorted"),
                          shapes=((9,), (6,))),
    "padded_layout": dict(kwargs=dict(num_experts=8, k=2, dispatch_layout="padded"), shapes=((6,), (9,))),
    "moe_layer_grouped_experts": dict(
        build=lambda: MoELayer(TopKRouter(D, 8, k=2), GroupedExperts(8, D, H, act_layer="silu", glu=True)),
        shapes=((5, 2), (3,))),
}


def _max_diff(a, b) -> float:
    if a is None and b is None:
        return 0.0
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    return (a - b).abs().max().item() if a.numel() else 0.0


def _make_data(shapes, out_features, skew):
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(*shape, D, generator=gen) for shape in shapes]
    grads = [torch.randn(*shape, out_features, generator=gen) for shape in shapes]
    for r in range(len(xs) if skew == "all" else 1 if skew else 0):
        # these tokens point at experts 0 and 1 only: nothing goes to rank 1's experts
        xs[r] = 0.01 * xs[r]
        xs[r][:, :2] = 1.0 + xs[r][:, :2].abs()
    return xs, grads


def run_case(rank: int, world_size: int, case: dict, device: str = "cpu") -> dict:
    """One case on ``world_size`` ranks (the first ``world_size`` of its per-rank shapes)."""
    scale = case.get("expert_grad_scale")
    torch.manual_seed(0)
    ref = case["build"]() if "build" in case else SparseMoE(D, H, **case["kwargs"])
    if case.get("skew"):
        with torch.no_grad():
            ref.router.weight.copy_(5 * torch.eye(ref.num_experts, D))
    ref.to(device)
    if isinstance(ref, SparseMoE):
        ep = ExpertParallelMoE.from_sparse_moe(ref, expert_grad_scale=scale)
    else:
        ep = shard_experts(copy.deepcopy(ref), expert_grad_scale=scale)
    local_layouts = []  # the layouts the local experts planned the received rows in
    plan_received = ep.experts.local.plan_routing

    def recording_plan(*args):
        plan = plan_received(*args)
        local_layouts.append(plan.layout)
        return plan

    ep.experts.local.plan_routing = recording_plan
    xs, grads = _make_data(case["shapes"][:world_size], ref.out_features, case.get("skew"))
    xs, grads = [t.to(device) for t in xs], [t.to(device) for t in grads]

    x = xs[rank].clone().requires_grad_(case.get("input_requires_grad", True))
    y = ep(x)
    ((y * grads[rank]).sum() + ep.aux_loss).backward()
    expert_names = {name for name, _ in named_expert_parameters(ep)}
    for name, param in ep.named_parameters():  # what DDP does to replicated gradients
        if name not in expert_names and param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world_size

    x_refs = [xr.clone().requires_grad_(x.requires_grad) for xr in xs]
    total = 0.0
    for r, (xr, g) in enumerate(zip(x_refs, grads)):
        yr = ref(xr)
        total = total + (yr * g).sum() + ref.aux_loss
        if r == rank:
            y_ref, aux_ref = yr.detach(), ref.aux_loss.detach()
            tpe_ref, dropped_ref = ref.tokens_per_expert.clone(), ref.dropped_tokens
    total.backward()

    scale = 1.0 / world_size if scale is None else scale
    ref_params = dict(ref.named_parameters())
    local = ep.experts.local_expert_range
    expert_err = max(_max_diff(p.grad, scale * ref_params[full_name(n)].grad[local.start:local.stop])
                     for n, p in ep.named_parameters() if n in expert_names)
    # like the single-process layer's experts without tokens, idle local experts get zero gradients, not None
    expert_grad_is_none = [n for n, p in ep.named_parameters() if n in expert_names and p.grad is None]
    replicated_err = max(_max_diff(p.grad, None if ref_params[n].grad is None else ref_params[n].grad / world_size)
                         for n, p in ep.named_parameters() if n not in expert_names)
    buffers = {full_name(n): b for n, b in ep.named_buffers()}
    buffer_err = max([_max_diff(b, ref.get_buffer(n)[local.start:local.stop]) for n, b in buffers.items()],
                     default=0.0)
    return {
        "output": _max_diff(y.detach(), y_ref), "shape_ok": y.shape == xs[rank].shape[:-1] + (ref.out_features,),
        "input_grad": _max_diff(x.grad, x_refs[rank].grad), "aux_loss": _max_diff(ep.aux_loss.detach(), aux_ref),
        "replicated_grad": replicated_err, "expert_grad": expert_err,
        "tokens_per_expert": ep.tokens_per_expert.tolist(), "tokens_per_expert_ref": tpe_ref.tolist(),
        "dropped": (ep.dropped_tokens, dropped_ref), "expert_grad_is_none": expert_grad_is_none, "buffers": buffer_err, "type": type(ep).__name__,
        "local_tokens_per_expert": ep.experts.local_tokens_per_expert.tolist(), "local_layouts": local_layouts,
        "expert_grad_norm": sum(p.grad.abs().sum().item() for n, p in ep.named_parameters() if n in expert_names),
    }


def _tiny_model(num_experts=4):
    return nn.Sequential(nn.Linear(D, D), SparseMoE(D, H, num_experts=num_experts, k=2),
                         own_parts_layer(num_experts, out_features=D), nn.Linear(D, 3))


def ddp_training(rank: int, world_size: int, steps: int = 2) -> dict:
    """Two SGD steps under torch DDP equal two steps of the single-process model on the mean loss."""
    torch.manual_seed(0)
    model = _tiny_model()
    ref = copy.deepcopy(model)
    replaced = distribute_experts(model)
    ddp = DistributedDataParallel(model)
    opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        xs = [torch.randn(6, D, generator=gen) for _ in range(world_size)]
        ts = [torch.randn(6, 3, generator=gen) for _ in range(world_size)]
        opt.zero_grad()
        (F.mse_loss(ddp(xs[rank]), ts[rank]) + collect_aux_loss(model)).backward()
        opt.step()
        opt_ref.zero_grad()
        loss_ref = sum(F.mse_loss(ref(x), t) + collect_aux_loss(ref) for x, t in zip(xs, ts)) / world_size
        loss_ref.backward()
        opt_ref.step()
    local = model[1].experts.local_expert_range  # both MoE layers have 4 experts
    ref_params = dict(ref.named_parameters())
    expert_names = {name for name, _ in named_expert_parameters(model)}
    err = {"replaced": replaced, "ignored": sorted(model._ddp_params_and_buffers_to_ignore),
           "types": [type(m).__name__ for m in model]}
    err["replicated"] = max(_max_diff(p.detach(), ref_params[n].detach())
                            for n, p in model.named_parameters() if n not in expert_names)
    err["experts"] = max(_max_diff(p.detach(), ref_params[full_name(n)].detach()[local.start:local.stop])
                         for n, p in model.named_parameters() if n in expert_names)
    err["again"] = distribute_experts(model)  # idempotent
    return err


def constructor(rank: int, world_size: int) -> dict:
    """Same seed: ExpertParallelMoE(...) is this rank's slice of SparseMoE(...) and uses the RNG alike."""
    kwargs = dict(num_experts=4, k=2, glu=True, shared_expert="gated")
    torch.manual_seed(3)
    ref = SparseMoE(D, H, **kwargs)
    after_ref = torch.rand(3)
    torch.manual_seed(3)
    ep = ExpertParallelMoE(D, H, **kwargs)
    after_ep = torch.rand(3)
    local = ep.local_expert_range
    ref_params = dict(ref.named_parameters())
    expert_names = {name for name, _ in named_expert_parameters(ep)}
    diff = max(_max_diff(p.detach(), ref_params[full_name(n)].detach()[local.start:local.stop] if n in expert_names
                         else ref_params[n].detach()) for n, p in ep.named_parameters())
    return {"param_diff": diff, "rng_diff": _max_diff(after_ep, after_ref), "local": list(local),
            "w1_shape": tuple(ep.experts.local.w1.shape), "num_experts": ep.num_experts,
            "expert_names": sorted(expert_names)}


def _message(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def errors(rank: int, world_size: int) -> dict:
    ep = ExpertParallelMoE(D, H, num_experts=4)
    return {
        "indivisible": _message(lambda: ExpertParallelMoE(D, H, num_experts=3)),
        "bad_grad_scale": _message(lambda: ExpertParallelMoE(D, H, num_experts=4, expert_grad_scale=0.0)),
        "already_parallel": _message(lambda: ExpertParallelMoE.from_sparse_moe(ep)),
        "bad_splits": _message(lambda: all_to_all(torch.zeros(3, 2), [1, 2, 0], [3])),
        "bad_rows": _message(lambda: all_to_all(torch.zeros(3, 2), [1, 2], [1, 1])),
        "wrong_last_dim": _message(lambda: ep(torch.zeros(2, D + 1))),
        "shard_twice": _message(lambda: shard_experts(ep)),
        "shard_not_a_layer": _message(lambda: shard_experts(nn.Linear(D, D))),
        "select_sharded": _message(lambda: ep.experts.select_experts(0, 1)),
        "sharded_forward": _message(lambda: ep.experts(torch.zeros(2, D), [1, 1])),
        "local_count": _message(lambda: ShardedExperts(GroupedExperts(4, D, H), 4)),
        "shared_activation_weight": _message(
            lambda: shard_experts(SparseMoE(D, H, num_experts=4, act_layer=nn.PReLU))),
    }


def api(rank: int, world_size: int) -> dict:
    """distribute_experts's all-or-nothing and include, old checkpoint names, the grad-scale setter."""
    torch.manual_seed(0)
    mixed = nn.Sequential(SparseMoE(D, H, num_experts=4), SparseMoE(D, H, num_experts=3))
    partial = _message(lambda: distribute_experts(mixed))
    picked = nn.Sequential(SparseMoE(D, H, num_experts=4), own_parts_layer(3, out_features=D))
    count = distribute_experts(picked, include=lambda name, layer: name == "0")

    torch.manual_seed(1)
    source = ExpertParallelMoE(D, H, num_experts=4, glu=True)
    # keys before experts.local, and no record of the shard's experts
    old_names = {full_name(k): v for k, v in source.state_dict().items() if not k.endswith("_extra_state")}
    torch.manual_seed(2)
    target = ExpertParallelMoE(D, H, num_experts=4, glu=True)
    load = target.load_state_dict(old_names)
    restored = max(_max_diff(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    target.expert_grad_scale = 0.25
    rank0_state = [source.state_dict() if rank == 0 else None]  # what Lightning's rank-0 checkpoint holds
    dist.broadcast_object_list(rank0_state, src=0)
    before = copy.deepcopy(target.state_dict())
    rank0_load = _message(lambda: target.load_state_dict(rank0_state[0]))
    rank0_load_loose = _message(lambda: target.load_state_dict(rank0_state[0], strict=False))
    rank0_kept = max(_max_diff(v, before[k]) for k, v in target.state_dict().items()
                     if k.startswith("experts.local.")) if rank else None

    torch.manual_seed(3)
    ref = SparseMoE(D, H, num_experts=4, glu=True, act_layer="silu")
    bf16 = ExpertParallelMoE.from_sparse_moe(ref)
    x = torch.randn(5 + rank, D, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bfloat16 rows through gloo's all-to-all
        y, y_ref = bf16(x), ref(x)
    y.float().sum().backward()
    return {
        "bf16_dtype": str(y.dtype), "bf16_diff": _max_diff(y.float(), y_ref.float()),
        "bf16_grad_finite": bool(x.grad is not None and torch.isfinite(x.grad).all()),
        "partial": partial, "partial_untouched": [type(m.experts).__name__ for m in mixed],
        "include_count": count, "include_types": [type(m.experts).__name__ for m in picked],
        "old_names_missing": list(load.missing_keys), "old_names_unexpected": list(load.unexpected_keys),
        "old_names_restored": restored, "set_scale": target.experts.expert_grad_scale,
        "bad_scale": _message(lambda: setattr(target, "expert_grad_scale", 0.0)),
        "inf_scale": _message(lambda: setattr(target, "expert_grad_scale", float("inf"))),
        "rank0_load": rank0_load, "rank0_load_loose": rank0_load_loose, "rank0_kept": rank0_kept,
    }


def nccl_worker(rank: int, world_size: int, out_dir: str) -> None:
    """Every equivalence case with rank ``r`` on ``cuda:r`` over NCCL."""
    results = {name: run_case(rank, world_size, case, device=f"cuda:{rank}") for name, case in CASES.items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def equivalence_worker(rank: int, world_size: int, out_dir: str) -> None:
    results = {name: run_case(rank, world_size, case) for name, case in CASES.items()}
    results["ddp_training"] = ddp_training(rank, world_size)
    results["constructor"] = constructor(rank, world_size)
    results["errors"] = errors(rank, world_size)
    results["api"] = api(rank, world_size)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
