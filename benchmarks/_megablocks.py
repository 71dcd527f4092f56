"""megablocks ``dMoE`` as a peer of ``benchmarks/moe_layer.py`` (CUDA, bfloat16).

megablocks (Gale et al. 2022, databricks/megablocks) runs its dropless MoE with grouped GEMMs from the
``grouped_gemm`` package (``mlp_impl="grouped"``), which take bfloat16 only; its block-sparse path
(``mlp_impl="sparse"``) refuses triton >= 3.2. So the peer exists for ``--device cuda --dtype
bfloat16`` alone, configured as the benchmark's layer: SwiGLU experts without bias, softmax router,
top-k weights renormalised to sum 1 (``moe_normalize_expert_weights=1``), no auxiliary loss kept
(``moe_loss_weight=0``, so nothing accumulates in megablocks' module-level loss list between steps).

It gets moemix's weights, laid out as megablocks stores them (:func:`megablocks_weights`): the router
``[E, D]``, and ``w1`` (gate), ``v1`` (up) and ``w2`` as ``[E * H, D]`` blocks, expert ``e`` in rows
``e*H:(e+1)*H``; the expert computes ``(act(x @ w1_e.T) * (x @ v1_e.T)) @ w2_e``.
:func:`check_megablocks` verifies that mapping on the device before anything is timed.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moemix.layers import SparseMoE

__all__ = ["megablocks_import_error", "megablocks_weights", "reference_forward", "make_megablocks",
           "check_megablocks", "megablocks_problem", "MEGABLOCKS_DTYPE", "MEGABLOCKS_TOLERANCE"]

MEGABLOCKS_DTYPE = torch.bfloat16  # grouped_gemm's only dtype
# Limits of check_megablocks' measures (the others it returns are for information). The whole layer's is
# wider: megablocks' combine weights come from a bfloat16 softmax (2% off moemix's at skewed routing);
# a wrong top-k renormalisation would be off by tens of percent.
MEGABLOCKS_TOLERANCE = {"router_logits_rel": 1e-5, "experts_rel": 3e-2, "layer_rel": 0.1}


def megablocks_import_error() -> Optional[str]:
    """None if megablocks' dMoE imports, else why not (its CUDA extensions are the usual reason)."""
    try:
        import megablocks.layers.dmoe  # noqa: F401
        return None
    except Exception as exc:  # noqa: BLE001 - any import problem means "not usable"
        return f"not importable: {type(exc).__name__}: {exc}"


def megablocks_weights(moe: SparseMoE) -> Dict[str, torch.Tensor]:
    """moemix's SwiGLU layer in megablocks' layout: ``router [E, D]``, ``w1``/``v1``/``w2 [E*H, D]``."""
    w1, w2 = moe.experts.w1.detach(), moe.experts.w2.detach()  # [E, D, 2H] (gate | up), [E, H, D]
    E, D, two_h = w1.shape
    H = two_h // 2
    return {"router": moe.router.weight.detach(),
            "w1": w1[:, :, :H].transpose(1, 2).reshape(E * H, D),
            "v1": w1[:, :, H:].transpose(1, 2).reshape(E * H, D),
            "w2": w2.reshape(E * H, D)}


def reference_forward(weights: Dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """megablocks' dMoE forward (``LearnedRouter`` + ``GroupedGLU`` + ``binned_scatter``) in plain torch.

    Written from megablocks 0.10's source, for checking :func:`megablocks_weights` where megablocks
    cannot run (it needs CUDA).
    """
    E, D = weights["router"].shape
    H = weights["w1"].shape[0] // E
    scores = (x @ weights["router"].t()).softmax(dim=-1)
    top_w, top_e = scores.topk(k, dim=-1)
    top_w = top_w / top_w.norm(p=1, dim=-1, keepdim=True)
    w1, v1, w2 = (weights[n].view(E, H, D) for n in ("w1", "v1", "w2"))
    out = torch.zeros_like(x)
    for e in range(E):
        token, slot = (top_e == e).nonzero(as_tuple=True)
        rows = x[token]
        y = (F.silu(rows @ w1[e].t()) * (rows @ v1[e].t())) @ w2[e]
        out.index_add_(0, token, y * top_w[token, slot, None])
    return out


class _TokensFirst(nn.Module):
    """``[T, D] -> [T, D]`` around megablocks' ``[S, B, D]`` layer."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        out = self.layer(x.unsqueeze(1))
        return (out[0] if isinstance(out, tuple) else out).squeeze(1)


def make_megablocks(moe: SparseMoE, device) -> nn.Module:
    """megablocks ``dMoE`` in bfloat16 on ``device`` computing ``moe``'s function (softmax, top-k, SwiGLU)."""
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    E, D, two_h = moe.experts.w1.shape
    margs = Arguments(hidden_size=D, ffn_hidden_size=two_h // 2, moe_num_experts=E, moe_top_k=moe.k,
                      mlp_type="glu", mlp_impl="grouped", activation_fn=F.silu, bias=False, return_bias=False,
                      moe_normalize_expert_weights=1, moe_loss_weight=0.0, fp16=False, bf16=True,
                      device=torch.device(device))
    layer = dMoE(margs)
    weights = megablocks_weights(moe)
    with torch.no_grad():
        layer.router.layer.weight.copy_(weights["router"])
        for name in ("w1", "v1", "w2"):
            getattr(layer.experts.mlp, name).copy_(weights[name])
    return _TokensFirst(layer)


def check_megablocks(module: nn.Module, moe: SparseMoE, x: torch.Tensor) -> Dict[str, float]:
    """How far megablocks is from ``moe`` (both bfloat16, on the same device).

    megablocks rounds its router logits to bfloat16 (moemix keeps them in float32), so tokens whose
    k-th and (k+1)-th scores are close may pick other experts, and large logits move the softmax by
    more than the weights' mapping could. So the parts are compared where they are comparable:

    - ``router_logits_rel``: megablocks' router weight applied in float32 against moemix's logits,
      relative to their largest magnitude (the weight mapping);
    - ``experts_rel``: megablocks' experts fed moemix's routing decision, against moemix's output;
    - ``layer_rel``: the whole megablocks layer (its own top-k and renormalisation) against moemix's
      output on the tokens where both routers chose the same experts; ``topk_agreement`` is their
      share (information only).

    The ``_rel`` differences are relative to the largest magnitude of moemix's output.
    """
    layer = module.layer
    with torch.no_grad():
        decision = moe.router(x)
        ref = moe(x).float()
        scale = ref.abs().max()
        mb_logits = F.linear(x.float(), layer.router.layer.weight.float())
        mb_scores = layer.router.layer(x).softmax(dim=-1)
        out = layer.experts(x.unsqueeze(1), mb_scores, decision.weights.to(x.dtype), decision.indices)
        out = (out[0] if isinstance(out, tuple) else out).squeeze(1).float()
        whole = module(x).float()
        same = (mb_scores.topk(moe.k, dim=-1).indices.sort(dim=-1).values
                == decision.indices.sort(dim=-1).values).all(dim=-1)
    return {"router_logits_rel": ((mb_logits - decision.logits).abs().max() / decision.logits.abs().max()).item(),
            "experts_rel": ((out - ref).abs().max() / scale).item(),
            "layer_rel": ((whole - ref)[same].abs().max() / scale).item() if same.any() else 0.0,
            "topk_agreement": same.float().mean().item()}


def megablocks_problem(module: nn.Module, moe: SparseMoE, x: torch.Tensor, diffs: Dict[str, float]) -> Optional[str]:
    """Check megablocks against moemix (adding to ``diffs``); why it cannot be timed, or None."""
    try:
        found = check_megablocks(module, moe, x)
    except Exception as exc:  # noqa: BLE001 - an optional peer; the run goes on without it
        return f"check failed: {type(exc).__name__}: {exc}"[:300]
    diffs.update({f"megablocks {part}": v for part, v in found.items()})
    bad = {part: found[part] for part, limit in MEGABLOCKS_TOLERANCE.items() if not found[part] <= limit}
    return f"differs from moemix beyond {MEGABLOCKS_TOLERANCE}: {bad}" if bad else None
