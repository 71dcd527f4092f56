"""Reusable Mixture-of-Experts building blocks."""
from moemix.layers.activations import get_act_layer
from moemix.layers.dispatch import DispatchPlan, choose_layout, combine_tokens, dispatch_tokens, plan_dispatch
from moemix.layers.experts import GroupedExperts
from moemix.layers.grouped_gemm import grouped_matmul
from moemix.layers.moe_layer import MoELayer
from moemix.layers.replace import replace_mlp_with_moe
from moemix.layers.routed_experts import RoutedExperts
from moemix.layers.router import RoutingDecision, TopKRouter, expert_capacity
from moemix.layers.sparse_moe import SparseMoE



def __getattr__(name: str):  # the adapters (moemix.adapters) are built on this package: loaded on first use
    if name in ("LoRALinear", "MixLoRA", "inject_mixlora", "emoe_from_mlp", "moefy"):
        return getattr(__import__("moemix.adapters", fromlist=[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "TopKRouter", "RoutingDecision", "expert_capacity", "RoutedExperts", "GroupedExperts", "MoELayer", "SparseMoE",
    "replace_mlp_with_moe", "DispatchPlan", "plan_dispatch", "choose_layout", "dispatch_tokens", "combine_tokens",
    "grouped_matmul", "get_act_layer", "LoRALinear", "MixLoRA", "inject_mixlora", "emoe_from_mlp", "moefy",
]
