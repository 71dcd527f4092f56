"""EMoE (Qiu et al. 2023, "Emergent Mixture-of-Experts: Can Dense Pre-trained Transformers Benefit from
Emergent Modular Structures?"; reference code qiuzh20/EMoE): experts carved out of a pretrained dense FFN.

The rows of the first projection ``W1 [H, D]`` are L2-normalised and clustered into ``N`` groups of exactly
``H / N`` hidden units (balanced k-means); each group's ``W1`` rows and bias and the matching ``W2`` columns
form one expert. The gate of expert ``e`` is the mean of its (un-normalised) ``W1`` rows, frozen; a token goes
to the top-``k`` experts by ``x @ gate^T``, and the selected experts are summed with weight 1 (the paper's
"one-score" gate). ``W2``'s bias is added once. With ``k = N`` the layer is the dense FFN. ``gate="learn"``
(EMoE-learn) uses a learned cosine gate with the usual renormalised top-k weights and the importance + load
loss instead.

Simplifications: the balanced assignment of each k-means step is greedy (closest proposals first, until every
cluster holds ``H / N``) instead of the reference's min-cost flow (``k-means-constrained``); routing is
dropless (the reference ran tutel with a capacity factor).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from moemix._checks import check_choice, check_positive_int
from moemix.adapters.ffn import ffn_parts
from moemix.adapters.inject import replace_module
from moemix.layers.experts import GroupedExperts
from moemix.layers.moe_layer import MoELayer
from moemix.layers.router import RoutingDecision, TopKRouter
from moemix.layers.replace import _select_targets

__all__ = ["balanced_kmeans", "OneScoreRouter", "EMoE", "emoe_from_mlp", "moefy", "GATES"]

GATES = ("avg", "learn")


def _kmeans_pp(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    centres = [x[torch.randint(len(x), (1,), generator=generator)].squeeze(0)]
    for _ in range(1, n):
        d2 = torch.cdist(x, torch.stack(centres)).min(dim=1).values.pow(2)
        centres.append(x[torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2), 1,
                                           generator=generator)].squeeze(0))
    return torch.stack(centres)


def _balanced_assignment(dist: torch.Tensor, size: int) -> torch.Tensor:
    """Labels ``[N]`` giving each of the ``C`` clusters exactly ``size`` points: in rounds, every unassigned point
    proposes its nearest cluster with room, and each cluster accepts its closest proposals up to its room."""
    n, c = dist.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((c,), size, dtype=torch.long)
    while bool((labels < 0).any()):
        open_dist = dist.masked_fill((room == 0).unsqueeze(0), float("inf"))
        free = torch.nonzero(labels < 0).squeeze(1)
        choice = open_dist[free].argmin(dim=1)
        for cluster in torch.unique(choice).tolist():
            proposers = free[choice == cluster]
            accepted = proposers[dist[proposers, cluster].argsort()[: int(room[cluster])]]
            labels[accepted] = cluster
            room[cluster] -= len(accepted)
    return labels


def balanced_kmeans(x: torch.Tensor, num_clusters: int, *, iters: int = 100, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of ``x [N, D]`` into ``num_clusters`` groups of exactly ``N / num_clusters`` rows
    (k-means++ seeding from ``seed``, Lloyd steps with a balanced assignment until the labels stop changing
    or ``iters``). Returns labels ``[N]`` (int64)."""
    check_positive_int("num_clusters", num_clusters)
    if x.dim() != 2 or x.shape[0] % num_clusters:
        raise ValueError(f"num_clusters={num_clusters} must divide the {x.shape[0] if x.dim() == 2 else '?'} rows "
                         f"of x (shape {tuple(x.shape)})")
    x = x.detach().double().cpu()
    generator = torch.Generator().manual_seed(seed)
    centres, size, labels = _kmeans_pp(x, num_clusters, generator), x.shape[0] // num_clusters, None
    for _ in range(iters):
        new = _balanced_assignment(torch.cdist(x, centres), size)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centres = torch.zeros_like(centres).index_add_(0, labels, x) / size
    return labels


class OneScoreRouter(TopKRouter):
    """A :class:`~moemix.layers.TopKRouter` whose selected experts all weigh 1 (EMoE's "one-score" gate): the
    scores choose the experts, the outputs are summed. Dropped assignments (a capacity) weigh 0."""

    def forward(self, x: torch.Tensor) -> RoutingDecision:
        decision = super().forward(x)
        ones = torch.ones_like(decision.weights)
        decision.weights = ones if decision.kept is None else ones * decision.kept
        return decision


class EMoE(MoELayer):
    """An :class:`~moemix.layers.MoELayer` plus an output bias added once (the dense ``W2`` bias)."""

    def __init__(self, router: TopKRouter, experts: GroupedExperts, bias: Optional[torch.Tensor], **kwargs):
        super().__init__(router, experts, **kwargs)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + self.bias if self.bias is not None else y


@torch.no_grad()
def emoe_from_mlp(mlp: nn.Module, num_experts: int = 24, k: int = 4, *, gate: str = "avg", seed: int = 0,
                  aux_loss_coef: float = 0.01, name: str = "mlp") -> EMoE:
    """Split the dense FFN ``mlp`` into ``num_experts`` experts of ``H / num_experts`` hidden units each.

    Args:
        mlp: timm ``Mlp`` or ``SwiGLU``, a LLaMA-style MLP or ``nn.Sequential(Linear, act, Linear)`` (gated FFNs
            are clustered on their gate projection, the up projection follows).
        num_experts: ``N``; must divide the hidden width. Defaults to 24 (the paper's ViT-S setting).
        k: experts per token. Defaults to 4.
        gate: ``"avg"`` (frozen mean of each expert's ``W1`` rows, one-score weights) or ``"learn"`` (a learned
            cosine gate, renormalised softmax weights, importance + load loss with ``aux_loss_coef``).
        seed: k-means seed (the reference's ``random_state=0``).
        name: the module's name, for errors.

    Returns:
        An :class:`EMoE` on ``mlp``'s device and dtype, in its train/eval mode; ``mlp`` is left as it was.
    """
    check_positive_int("num_experts", num_experts)
    check_positive_int("k", k)
    check_choice("gate", gate, GATES)
    parts = ffn_parts(mlp, name)
    hidden = parts.hidden_features
    if hidden % num_experts:
        raise ValueError(f"num_experts={num_experts} must divide the hidden width {hidden} of {name}")
    if k > num_experts:
        raise ValueError(f"k={k} must be at most num_experts={num_experts}")
    w1, b1 = parts.gate.weight, parts.gate.bias  # [H, D], [H]
    labels = balanced_kmeans(nn.functional.normalize(w1.double(), dim=1), num_experts, seed=seed).to(w1.device)
    units = torch.argsort(labels, stable=True).view(num_experts, hidden // num_experts)  # expert -> hidden units
    glu = parts.up is not None
    experts = GroupedExperts(num_experts, parts.in_features, hidden // num_experts, parts.out_features,
                             act_layer=parts.act, glu=glu, bias=(b1 is not None, False),
                             drop=(getattr(parts.drop1, "p", 0.0), getattr(parts.drop2, "p", 0.0)),
                             device=w1.device, dtype=w1.dtype)
    first = [w1[units]] + ([parts.up.weight[units]] if glu else [])  # each [N, H/N, D]
    experts.w1.copy_(torch.cat([w.transpose(1, 2) for w in first], dim=-1))
    experts.w2.copy_(parts.down.weight.t()[units])
    if experts.b1 is not None:
        biases = [b1[units]] + ([parts.up.bias[units] if parts.up.bias is not None else torch.zeros_like(b1[units])]
                                if glu else [])
        experts.b1.copy_(torch.cat(biases, dim=-1))
    dd = {"device": w1.device, "dtype": w1.dtype}
    if gate == "avg":
        router = OneScoreRouter(parts.in_features, num_experts, k, renormalize=False, **dd)
        router.weight.copy_(w1[units].mean(dim=1))
        router.requires_grad_(False)
        layer = EMoE(router, experts, parts.down.bias, aux_loss=None, z_loss_coef=0.0)
    else:
        router = TopKRouter(parts.in_features, num_experts, k, score="cosine", **dd)
        layer = EMoE(router, experts, parts.down.bias, aux_loss="importance", aux_loss_coef=aux_loss_coef,
                     z_loss_coef=0.0)
    return layer.train(mlp.training)


def moefy(model: nn.Module, *, every: Optional[int] = 2, blocks: Optional[Sequence[int]] = None,
          pattern: Optional[Union[str, Sequence[str]]] = None, num_experts: int = 24, k: int = 4, gate: str = "avg",
          seed: int = 0, aux_loss_coef: float = 0.01) -> List[str]:
    """Turn FFNs of a pretrained model into :class:`EMoE` layers in place (the paper: every 2nd block of a ViT).

    Targets as :func:`~moemix.layers.replace_mlp_with_moe`: ``pattern`` (module names), else ``blocks`` or
    ``every`` on a timm ViT (``every=2``: blocks 1, 3, 5, ...). Returns the names of the replaced modules;
    every target is converted before any is replaced.
    """
    names = _select_targets(model, pattern, blocks, None if (pattern is not None or blocks is not None) else every)
    if not names:
        raise ValueError("moefy matched no module; check pattern/blocks/every")
    layers = [(name, emoe_from_mlp(model.get_submodule(name), num_experts, k, gate=gate, seed=seed,
                                   aux_loss_coef=aux_loss_coef, name=name)) for name in names]
    for name, layer in layers:
        replace_module(model, name, layer)
    return names
