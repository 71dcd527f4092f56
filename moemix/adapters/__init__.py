"""Adapters for pretrained models: LoRA, MixLoRA (LoRA experts on a frozen FFN) and EMoE (experts carved out of a
dense FFN), all on the routers and dispatch of :mod:`moemix.layers`. The main names are also in
:mod:`moemix.layers`."""
from moemix.adapters.checkpoint import load_adapters, save_adapters
from moemix.adapters.emoe import EMoE, OneScoreRouter, balanced_kmeans, emoe_from_mlp, moefy
from moemix.adapters.ffn import FFNParts, ffn_parts
from moemix.adapters.inject import AdapterReport, inject_mixlora, merge_lora, unmerge_lora
from moemix.adapters.lora import LoRALinear
from moemix.adapters.mixlora import MixLoRA, MixLoRAExperts

__all__ = ["LoRALinear", "MixLoRA", "MixLoRAExperts", "inject_mixlora", "AdapterReport", "merge_lora", "unmerge_lora",
           "save_adapters", "load_adapters", "EMoE", "OneScoreRouter", "emoe_from_mlp", "moefy", "balanced_kmeans",
           "FFNParts", "ffn_parts"]
