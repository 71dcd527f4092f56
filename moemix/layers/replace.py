"""Swap dense feed-forward blocks of an existing model for :class:`SparseMoE` layers."""
from __future__ import annotations

import re
import warnings
from typing import List, Optional, Sequence, Union

from torch import nn

from moemix.layers._validate import check_bool, is_integer
from moemix.layers.sparse_moe import SparseMoE

__all__ = ["replace_mlp_with_moe"]


def _dense_parts(mlp: nn.Module):
    """Return (fc1, fc1_up or None, fc2, act module, (dropout p after act, after fc2)) of a timm-style MLP."""
    norm = getattr(mlp, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f"{type(mlp).__name__} has a hidden norm layer, which SparseMoE experts do not support")
    drop = tuple(getattr(getattr(mlp, name, None), "p", 0.0) for name in ("drop1", "drop2"))
    if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("fc1_g", "fc1_x", "fc2")):  # timm SwiGLU
        return mlp.fc1_g, mlp.fc1_x, mlp.fc2, mlp.act, drop
    if isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear):
        if mlp.fc2.in_features != mlp.fc1.out_features:
            raise ValueError(f"{type(mlp).__name__} looks gated (fc1 out {mlp.fc1.out_features} != fc2 in "
                             f"{mlp.fc2.in_features}); only Mlp-style and SwiGLU-style FFNs can be converted")
        return mlp.fc1, None, mlp.fc2, mlp.act, drop
    raise ValueError(f"{type(mlp).__name__} is not an Mlp-style FFN (needs nn.Linear fc1/fc2, or fc1_g/fc1_x/fc2)")


def _matches(name: str, pattern: Union[str, Sequence[str]]) -> Optional[str]:
    """peft rule: a string is a full regex match, a list matches by exact name or dotted suffix."""
    if isinstance(pattern, str):
        return pattern if re.fullmatch(pattern, name) else None
    for p in pattern:
        if name == p or name.endswith("." + p):
            return p
    return None


# SparseMoE keywords each replaced FFN determines (its widths, device and dtype), and those that must match it for
# its weights to be copied into the experts (another activation or form would silently change the function).
_FROM_DENSE = frozenset({"in_features", "hidden_features", "out_features", "device", "dtype"})
_COPIED = frozenset({"act_layer", "glu", "bias"})


def _select_targets(model: nn.Module, pattern, blocks: Optional[Sequence[int]], every: Optional[int]) -> List[str]:
    if pattern is not None and (blocks is not None or every is not None):
        raise ValueError("pass either pattern or blocks/every, not both: pattern chooses modules by name, "
                         "blocks/every choose blocks of a timm ViT")
    if blocks is not None and every is not None:
        raise ValueError("pass either blocks (block indices) or every (MoE in every n-th block), not both")
    if pattern is not None:
        if not isinstance(pattern, str) and not (isinstance(pattern, (list, tuple))
                                                 and all(isinstance(p, str) for p in pattern)):
            raise ValueError(f"pattern must be a regex string or a list of module names, got {pattern!r}")
        names = [n for n, _ in model.named_modules() if n and _matches(n, pattern)]
        for p in ([pattern] if isinstance(pattern, str) else pattern):
            if not any(_matches(n, p if isinstance(pattern, str) else [p]) for n in names):
                warnings.warn(f"replace_mlp_with_moe: pattern {p!r} matched no module", stacklevel=3)
        nested = [(outer, inner) for outer in names for inner in names if inner.startswith(outer + ".")]
        if nested:
            outer, inner = nested[0]
            raise ValueError(f"pattern matched both {outer!r} and its submodule {inner!r}; "
                             "make it match the FFN modules only")
        return names
    stack = getattr(model, "blocks", None)
    if not isinstance(stack, (nn.Sequential, nn.ModuleList)):
        raise ValueError("model has no `blocks` sequence (timm ViT layout); pass pattern= to choose modules")
    depth = len(stack)
    if blocks is None:
        every = 2 if every is None else every
        if not (is_integer(every) and every >= 1):
            raise ValueError(f"every must be a positive integer, got {every!r}")
        blocks = [i for i in range(depth) if i % every == every - 1]  # V-MoE "every other layer": 1, 3, 5, ...
    for i in blocks:
        if not is_integer(i):
            raise ValueError(f"blocks must hold integer block indices, got {i!r}")
        if not -depth <= i < depth:
            raise ValueError(f"blocks contains {i}, but the model has {depth} blocks")
    return [f"blocks.{i % depth}.mlp" for i in sorted({int(i) % depth for i in blocks})]


def replace_mlp_with_moe(
    model: nn.Module,
    *,
    pattern: Optional[Union[str, Sequence[str]]] = None,
    blocks: Optional[Sequence[int]] = None,
    every: Optional[int] = None,
    copy_weights: bool = False,
    **moe_kwargs,
) -> List[str]:
    """Replace dense FFNs with :class:`SparseMoE` of the same widths, in place.

    Targets are chosen by ``pattern`` (a regex fully matching the module name, or a list of names
    matched exactly or as a dotted suffix, as peft's ``target_modules``), else on a timm ViT-style
    model by ``blocks`` (indices into ``model.blocks``) or ``every`` (MoE in every ``every``-th block,
    the last of each group, V-MoE style; default 2 -> blocks 1, 3, 5, ...).

    Args:
        model: the model to modify in place.
        pattern: module names to replace.
        blocks: block indices (timm layout).
        every: MoE every n-th block (timm layout). Defaults to 2 when neither blocks nor pattern is given.
        copy_weights: copy the dense weights into every expert ("upcycling"; Komatsuzaki et al. 2023).
            The layer then equals the dense FFN as long as each token's ``k`` weights sum to 1 (softmax
            scores renormalised, the default for ``k > 1``), nothing is dropped (no ``capacity_factor``) and
            there is no shared expert; with ``k = 1`` (weight = top probability, Switch) each token's output
            is the dense one times that probability. Defaults to False.
        **moe_kwargs: forwarded to :class:`SparseMoE` (``num_experts``, ``k``, ``aux_loss_coef``, ...); each FFN
            gives ``in_features``, ``hidden_features``, ``out_features``, ``device`` and ``dtype``, and with
            ``copy_weights`` also ``act_layer``, ``glu`` and ``bias``, so those raise a ``ValueError`` here.

    Returns:
        The names of the replaced modules. Each new layer takes its FFN's train/eval mode; if any target
        cannot be converted, a ``ValueError`` names it and the model is left unchanged.
    """
    copy_weights = check_bool("copy_weights", copy_weights)
    reserved = sorted(set(moe_kwargs) & (_FROM_DENSE | (_COPIED if copy_weights else frozenset())))
    if reserved:
        when = " with copy_weights=True" if set(reserved) & _COPIED else ""
        raise ValueError(f"replace_mlp_with_moe takes {reserved} from each dense FFN{when}; leave them out of its "
                         "keywords")
    names = _select_targets(model, pattern, blocks, every)
    if not names:
        raise ValueError("replace_mlp_with_moe matched no module; check pattern/blocks")
    replacements = []  # all built before the model changes, so a target that cannot be converted changes nothing
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacements.append((parent, attr, _moe_for(name, getattr(parent, attr), copy_weights, moe_kwargs)))
    for parent, attr, moe in replacements:
        setattr(parent, attr, moe)
    return names


def _moe_for(name: str, dense: nn.Module, copy_weights: bool, moe_kwargs: dict) -> SparseMoE:
    """The SparseMoE replacing the FFN ``dense`` (module ``name``), in its train/eval mode."""
    try:
        fc1, fc1_up, fc2, act, drop = _dense_parts(dense)
    except ValueError as err:
        raise ValueError(f"cannot convert {name!r}: {err}") from None
    first_bias = any(layer is not None and layer.bias is not None for layer in (fc1, fc1_up))
    kwargs = dict(act_layer=act, bias=(first_bias, fc2.bias is not None), drop=drop, glu=fc1_up is not None)
    moe = SparseMoE(fc1.in_features, fc1.out_features, fc2.out_features, **{**kwargs, **moe_kwargs},
                    device=fc1.weight.device, dtype=fc1.weight.dtype)
    if copy_weights:
        moe.experts.load_dense(fc1, fc2, fc1_up=fc1_up)
    return moe.train(dense.training)
