"""TransMix: relabel CutMix targets by the ViT's class attention (Chen et al., "TransMix: Attend to Mix for
Vision Transformers", CVPR 2022; reference code Beckschen/TransMix).

For a CutMix batch with box mask ``M`` (the pasted region, resized nearest to the ``gh x gw`` patch grid,
flattened to ``[N]``) and the last block's class attention ``a`` ``[B, N]`` (softmax row of the CLS query over
all tokens, before dropout, detached, CLS-to-patch columns, mean over heads)::

    lam_area = box_area / (H * W)                      # share of the pasted image in the input
    lam_attn = sum_n M_n a_bn / sum_n a_bn             # share of attention on the pasted image
    lam      = (lam_area + lam_attn) / 2               # the paper's 0.5, hard-coded in its code
    target   = (1 - lam) * y_own + lam * y_pasted

MixUp batches keep their area target. Modern timm ViTs use fused attention (no attention matrix exists), so
:class:`CLSAttentionHook` captures the ``qkv`` projection the block computes anyway and recomputes only the
CLS row ``softmax(q_cls k^T / sqrt(d))``: ``O(B N D)`` extra work, no second forward, no ``[B, h, N, N]`` tensor.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional.boxes import boxes_to_mask
from .functional.targets import mix_targets
from .mixup_cutmix import MixUpCutMix
from .record import MixRecord

__all__ = ["cls_attention_from_qk", "transmix_lambda", "CLSAttentionHook", "attach_transmix", "TransMix"]


def cls_attention_from_qk(q_cls: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                          num_prefix_tokens: int = 1) -> torch.Tensor:
    """Class attention over patch tokens, mean over heads.

    Args:
        q_cls: ``[B, h, d]`` query of the CLS token (or ``[B, h, N, d]``; token 0 is used).
        k: ``[B, h, N, d]`` keys of all tokens.
        scale: logit scale. Defaults to ``d ** -0.5``.
        num_prefix_tokens: CLS + register tokens dropped from the columns. Defaults to 1.

    Returns:
        ``[B, N - num_prefix_tokens]`` float32 attention of the CLS query on each patch (rows sum to <= 1).
    """
    if q_cls.dim() == 4:
        q_cls = q_cls[:, :, 0]
    scale = q_cls.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhd,bhnd->bhn", q_cls.float(), k.float()) * scale
    return logits.softmax(dim=-1)[:, :, num_prefix_tokens:].mean(dim=1)


def transmix_lambda(cls_attention: torch.Tensor, paste_mask: torch.Tensor,
                    grid_size: Sequence[int] | None = None) -> torch.Tensor:
    """TransMix lambda (share of the pasted image's label) per sample.

    Args:
        cls_attention: ``[B, N]`` class attention on the N patches.
        paste_mask: ``[B, H, W]`` or ``[H, W]`` bool, True where the partner was pasted (pixels).
        grid_size: ``(gh, gw)`` with ``gh * gw = N``. Defaults to the grid with N cells closest to the
            image's aspect ratio (``sqrt(N) x sqrt(N)`` for square images, as the paper).

    Returns:
        ``[B]`` float32 ``(lam_area + lam_attn) / 2``.
    """
    b, n = cls_attention.shape
    if paste_mask.dim() == 2:
        paste_mask = paste_mask.unsqueeze(0).expand(b, *paste_mask.shape)
    grid = tuple(grid_size) if grid_size is not None else _grid_for(n, paste_mask.shape[-2:])
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid_size {grid} does not have N={n} cells")
    paste = paste_mask.to(cls_attention.device).float()
    lam_area = paste.flatten(1).mean(dim=1)
    m = F.interpolate(paste.unsqueeze(1), size=grid, mode="nearest").flatten(1)  # as nn.Upsample in the paper's code
    a = cls_attention.float()
    lam_attn = (m * a).sum(dim=1) / a.sum(dim=1).clamp_min(torch.finfo(a.dtype).tiny)
    return (lam_area + lam_attn) / 2


def _grid_for(n: int, hw: Sequence[int]) -> tuple[int, int]:
    """Patch grid with N cells and the image's aspect ratio (square when H == W)."""
    h, w = hw
    gh = max(1, int(round((n * h / w) ** 0.5)))
    while gh > 1 and n % gh:
        gh -= 1
    return gh, n // gh


class CLSAttentionHook:
    """Forward hook that keeps the last block's class attention ``[B, N_patches]`` in ``.cls_attention``.

    For a timm ``Attention`` (``qkv``, ``num_heads``, ``head_dim``, ``q_norm``, ``k_norm``, ``scale``) it hooks
    ``attn.qkv`` and reuses its output. For other models pass ``qk_fn(module, inputs, output) -> (q, k)`` with
    ``q``, ``k`` ``[B, h, N, d]`` and the module whose forward exposes them.

    Args:
        module: the timm ``Attention`` of the last block, or the module ``qk_fn`` reads.
        qk_fn: optional q/k extractor for non-timm modules.
        num_prefix_tokens: CLS + register tokens. Defaults to 1.
        grid_size: the ``(gh, gw)`` patch grid; inferred as square-ish when None.
        only_training: skip the work when the module is in eval mode. Defaults to True.

    ``captures`` counts the forwards whose attention was kept, so that :meth:`TransMix.relabel` can check
    that the attention it is given came from the forward of the batch it relabels.
    """

    def __init__(self, module: nn.Module, *, qk_fn: Callable | None = None, num_prefix_tokens: int = 1,
                 grid_size: Sequence[int] | None = None, only_training: bool = True) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.only_training = only_training
        self.cls_attention: torch.Tensor | None = None
        self.captures = 0
        self._module = module
        if qk_fn is None:
            for attr in ("qkv", "num_heads", "head_dim"):
                if getattr(module, attr, None) is None:
                    raise ValueError(f"module {type(module).__name__} has no {attr!r}: pass qk_fn=(module, inputs, "
                                     "output) -> (q, k) for non-timm attention")
            if getattr(module, "q_bias", None) is not None:  # timm's EvaAttention: F.linear on qkv.weight
                raise ValueError(f"module {type(module).__name__} adds separate q/v biases outside its qkv layer, "
                                 "which the hook would not see: pass qk_fn=(module, inputs, output) -> (q, k)")
            self._handle = module.qkv.register_forward_hook(self._from_qkv)
        else:
            self._qk_fn = qk_fn
            self._handle = module.register_forward_hook(self._from_fn)

    @torch.no_grad()
    def _from_qkv(self, _linear, _inputs, out: torch.Tensor) -> None:
        attn = self._module
        if self.only_training and not attn.training:
            return
        b, n, _ = out.shape
        h, d = attn.num_heads, attn.head_dim
        qkv = out.detach().view(b, n, 3, h, d)
        q_cls = attn.q_norm(qkv[:, :1, 0].transpose(1, 2))  # [B, h, 1, d]; only the CLS query
        k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # [B, h, N, d]
        scale = getattr(attn, "scale", d ** -0.5)
        self._keep(cls_attention_from_qk(q_cls, k, scale=scale, num_prefix_tokens=self.num_prefix_tokens))

    @torch.no_grad()
    def _from_fn(self, module, inputs, output) -> None:
        if self.only_training and not module.training:
            return
        q, k = self._qk_fn(module, inputs, output)
        self._keep(cls_attention_from_qk(q.detach(), k.detach(), num_prefix_tokens=self.num_prefix_tokens))

    def _keep(self, cls_attention: torch.Tensor) -> None:
        self.cls_attention = cls_attention
        self.captures += 1

    def remove(self) -> None:
        """Detach the hook from the model."""
        self._handle.remove()


def attach_transmix(model: nn.Module, *, block: int = -1, only_training: bool = True) -> CLSAttentionHook:
    """Attach a :class:`CLSAttentionHook` to a timm VisionTransformer's last block (or ``block``).

    Raises:
        ValueError: when the model has no ``blocks[block].attn``, no class token, or an attention the qkv hook
            cannot follow (rotary embeddings or separate q/v biases, as timm's EVA models).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(blocks[block], "attn"):
        raise ValueError(f"model {type(model).__name__} has no blocks[{block}].attn; use CLSAttentionHook(module, "
                         "qk_fn=...) for other architectures")
    if getattr(model, "cls_token", None) is None:
        raise ValueError("TransMix needs a class token (model.cls_token is None)")
    if getattr(model, "rope", None) is not None:
        raise ValueError(f"model {type(model).__name__} applies rotary position embeddings inside its attention "
                         "forward, which the qkv hook cannot see; use CLSAttentionHook(module, qk_fn=...)")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return CLSAttentionHook(blocks[block].attn, num_prefix_tokens=getattr(model, "num_prefix_tokens", 1),
                            grid_size=grid, only_training=only_training)


class TransMix(MixUpCutMix):
    """MixUp/CutMix with TransMix relabelling of the CutMix batches (Chen et al., CVPR 2022). Batch mode.

    Call it like :class:`MixUpCutMix` (it returns the record by default), run the model, then
    :meth:`relabel` with the hooked class attention::

        mixer, hook = TransMix(num_classes=1000), attach_transmix(vit)
        x, y_area, record = mixer(x, y)
        logits = vit(x)
        y = mixer.relabel(record, hook.cls_attention)

    With the hook registered by :meth:`use_hook`, the record remembers the hook's capture count and
    :meth:`relabel` refuses the hook's attention unless exactly one hooked forward ran after the mix (the
    attention would otherwise belong to another batch of the same size).

    Defaults follow the paper's DeiT recipe: mixup_alpha 0.8, cutmix_alpha 1.0, switch_prob 0.8 (as the
    reference code's config), label_smoothing 0.1. Shapes: ``x`` ``[B, C, H, W]``, ``y`` ``[B]`` or ``[B, K]``.
    """

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 cutmix_minmax: Sequence[float] | None = None, prob: float = 1.0, switch_prob: float = 0.8,
                 mode: str = "batch", correct_lam: bool = True, label_smoothing: float = 0.1,
                 num_classes: int | None = None, *, return_info: bool = True, **kwargs) -> None:
        if mode != "batch":
            raise ValueError(f"TransMix relabels whole batches: mode must be 'batch', got {mode!r}")
        super().__init__(mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam,
                         label_smoothing, num_classes, return_info=return_info, **kwargs)
        self._grid_hint: tuple[int, int] | None = None
        self._hook: CLSAttentionHook | None = None

    def use_hook(self, hook: CLSAttentionHook) -> CLSAttentionHook:
        """Remember the hook (its patch grid and capture count) for :meth:`relabel`; returns the hook."""
        self._grid_hint = hook.grid_size
        self._hook = hook
        return hook

    def __call__(self, x: torch.Tensor, y: torch.Tensor, **kwargs):
        out = super().__call__(x, y, **kwargs)
        if self._hook is not None and len(out) == 3:
            out[2].extra["transmix_captures"] = self._hook.captures
        return out

    def _check_attention_is_of(self, record: MixRecord, cls_attention: torch.Tensor) -> None:
        mixed_at = record.extra.get("transmix_captures")
        if self._hook is None or mixed_at is None or cls_attention is not self._hook.cls_attention:
            return
        forwards = self._hook.captures - mixed_at
        if forwards == 0:
            raise ValueError("cls_attention: the hooked model has not run on this batch since it was mixed; call "
                             "relabel after the model's forward of the mixed batch")
        if forwards > 1:
            raise ValueError(f"cls_attention: the hooked model ran {forwards} training forwards since this batch was "
                             "mixed, so the hook holds the attention of a later batch; call relabel right after the "
                             "forward of the mixed batch")

    def relabel(self, record: MixRecord, cls_attention: torch.Tensor | None,
                grid_size: Sequence[int] | None = None) -> torch.Tensor:
        """Targets ``[B, K]``: TransMix lambda for CutMix batches, the record's area target otherwise.

        Args:
            record: the record returned with the mixed batch.
            cls_attention: ``[B, N]`` class attention from :class:`CLSAttentionHook` for this batch.
            grid_size: ``(gh, gw)`` patch grid. Defaults to the hook's grid if set via :meth:`use_hook`,
                else the grid with N cells closest to the image's aspect ratio.
        """
        y = record.targets
        if not record.applied or record.boxes is None or not bool(record.use_box.any()):
            return mix_targets(y, record.label_lam, record.perm) if record.applied else y
        if cls_attention is None:
            raise ValueError("cls_attention is None: run the hooked model forward on the mixed batch first")
        self._check_attention_is_of(record, cls_attention)
        b, n = cls_attention.shape
        if b != y.shape[0]:
            raise ValueError(f"cls_attention has batch {b}, the record has {y.shape[0]}")
        paste = boxes_to_mask(record.boxes[:1], record.sizes, device=cls_attention.device)[0]
        lam_pasted = transmix_lambda(cls_attention, paste, grid_size or self._grid_hint)
        own = (1.0 - lam_pasted).to(y.dtype).to(y.device)
        alone = record.perm.to(y.device) == torch.arange(b, device=y.device)
        own = torch.where(alone, torch.ones_like(own), own)
        return mix_targets(y, own, record.perm)
