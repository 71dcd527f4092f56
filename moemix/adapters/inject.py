"""Put MixLoRA on a pretrained model: FFNs become :class:`MixLoRA` layers, attention projections get
:class:`LoRALinear`, and only adapters, routers (and modules named in ``trainable``) keep training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from moemix.adapters.lora import LoRALinear
from moemix.adapters.mixlora import MixLoRA
from moemix.layers.replace import _matches  # peft's rule: a full regex match, or names matched as dotted suffixes

__all__ = ["AdapterReport", "inject_mixlora", "merge_lora", "unmerge_lora", "matching_modules"]

Pattern = Union[str, Sequence[str]]


@dataclass
class AdapterReport:
    """What :func:`inject_mixlora` changed: module names and parameter counts (``str()`` is peft's one-line
    ``print_trainable_parameters`` summary)."""

    ffn: List[str]
    attention: List[str]
    trainable_params: int
    total_params: int
    config: Dict = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} || "
                f"trainable%: {share:.4f}")


def matching_modules(model: nn.Module, pattern: Pattern, what: str,
                     types: Tuple[type, ...] = (nn.Module,)) -> List[str]:
    """Names of ``model``'s modules of ``types`` that ``pattern`` matches; each part of a list pattern (or the
    regex) that matches nothing is a ``ValueError`` naming ``what``."""
    if not isinstance(pattern, str) and not (isinstance(pattern, (list, tuple))
                                             and all(isinstance(p, str) for p in pattern)):
        raise ValueError(f"{what} must be a regex string or a list of module names, got {pattern!r}")
    names = [n for n, m in model.named_modules() if n and isinstance(m, types) and _matches(n, pattern)]
    for part in ([pattern] if isinstance(pattern, str) else pattern):
        if not any(_matches(n, part if isinstance(pattern, str) else [part]) for n in names):
            kinds = "/".join(t.__name__ for t in types)
            raise ValueError(f"{what}={part!r} matched no {kinds} module of {type(model).__name__}")
    return names


def _default_patterns(model: nn.Module) -> Tuple[Optional[Pattern], Optional[Pattern]]:
    """``(ffn, attention)`` patterns of a timm ViT (``blocks``) or an HF-style decoder, else ``(None, None)``."""
    if isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
        return r"blocks\.\d+\.mlp", r"blocks\.\d+\.attn\.qkv"
    if any(n.endswith(".mlp") and hasattr(m, "gate_proj") for n, m in model.named_modules()):
        return r".*\.mlp", ["q_proj", "v_proj"]
    return None, None


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model``."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _attention_enable(name: str, layer: nn.Linear) -> Optional[Tuple[bool, ...]]:
    """q and v of a fused ``qkv`` projection (``3 * D`` outputs); a whole layer otherwise."""
    if name.rsplit(".", 1)[-1] == "qkv" and layer.out_features == 3 * layer.in_features:
        return (True, False, True)
    return None


def inject_mixlora(model: nn.Module, *, ffn_pattern: Optional[Pattern] = None, attn_pattern: Optional[Pattern] = None,
                   num_experts: int = 8, k: int = 2, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
                   attn_r: Optional[int] = None, attn_alpha: Optional[float] = None, router_init_std: float = 0.02,
                   aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0, router_jitter: float = 0.0,
                   trainable: Pattern = ()) -> AdapterReport:
    """Turn ``model``'s FFNs into :class:`MixLoRA` layers and add :class:`LoRALinear` to its attention
    projections, in place; freeze everything else.

    Args:
        model: a timm ViT, an HF-style decoder or any model whose modules the patterns name.
        ffn_pattern: FFN modules (peft's rule: a regex fully matching the module name, or a list of names
            matched exactly or as a dotted suffix). Defaults to every ``blocks.N.mlp`` (timm ViT) or every
            ``*.mlp`` (HF decoders); ``()`` for none (plain LoRA on the attention only).
        attn_pattern: ``nn.Linear`` attention projections for plain LoRA; ``()`` for none. Defaults to q and v:
            the q and v slices of timm's fused ``blocks.N.attn.qkv``, or HF's ``q_proj`` and ``v_proj``; none for
            other models.
        num_experts, k, r, alpha, dropout, router_init_std, aux_loss_coef, z_loss_coef, router_jitter:
            :class:`MixLoRA`'s (paper defaults: 8 experts, top-2, r=8, alpha=16, dropout 0.05, 0.02, 0.01).
        attn_r, attn_alpha: rank and alpha of the attention adapters. Default to ``r`` and ``alpha``.
        trainable: modules that keep training besides the adapters (a new classification head, say).

    Returns:
        An :class:`AdapterReport`. A pattern that matches nothing, or an FFN of an unknown form, raises
        ``ValueError`` before any module is replaced.
    """
    default_ffn, default_attn = _default_patterns(model)
    if ffn_pattern is None and default_ffn is None:
        raise ValueError(f"ffn_pattern: {type(model).__name__} is neither a timm ViT (`blocks`) nor an HF-style "
                         "decoder (`*.mlp` with gate_proj); name its FFN modules")
    ffn_pattern = default_ffn if ffn_pattern is None else ffn_pattern
    attn_pattern = (default_attn or ()) if attn_pattern is None else attn_pattern
    ffn_names = matching_modules(model, ffn_pattern, "ffn_pattern") if len(ffn_pattern) else []
    attn_names = matching_modules(model, attn_pattern, "attn_pattern", (nn.Linear,)) if len(attn_pattern) else []
    keep = matching_modules(model, trainable, "trainable") if len(trainable) else []
    if not ffn_names and not attn_names:
        raise ValueError("ffn_pattern and attn_pattern are both empty: nothing to adapt")
    overlap = [a for a in attn_names for f in ffn_names if a.startswith(f + ".")]
    if overlap:
        raise ValueError(f"attn_pattern matched {overlap[0]!r} inside an FFN that ffn_pattern matched")
    moe_kwargs = dict(num_experts=num_experts, k=k, r=r, alpha=alpha, dropout=dropout, router_init_std=router_init_std,
                      aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, router_jitter=router_jitter)
    attn_kwargs = dict(r=attn_r or r, alpha=attn_alpha or alpha, dropout=dropout)
    new = [(name, MixLoRA(model.get_submodule(name), **moe_kwargs)) for name in ffn_names]  # all built first
    new += [(name, LoRALinear(model.get_submodule(name), enable=_attention_enable(name, model.get_submodule(name)),
                              **attn_kwargs)) for name in attn_names]
    model.requires_grad_(False)
    for name, module in new:
        replace_module(model, name, module)
        for param_name, param in module.named_parameters():
            param.requires_grad_(not param_name.startswith(("experts.ffn.", "base.")))
    for name in keep:
        model.get_submodule(name).requires_grad_(True)
    config = dict(ffn=ffn_names, attention=attn_names, trainable=keep, mixlora=moe_kwargs, lora=attn_kwargs)
    return AdapterReport(ffn_names, attn_names, sum(p.numel() for p in model.parameters() if p.requires_grad),
                         sum(p.numel() for p in model.parameters()), config)


def merge_lora(model: nn.Module) -> int:
    """Fold every :class:`LoRALinear` update of ``model`` into its base weight; returns how many. (MixLoRA's
    experts cannot be merged: each token takes its own experts.)"""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora`; returns how many layers were unmerged."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and m.merged]
    for layer in layers:
        layer.unmerge()
    return len(layers)
