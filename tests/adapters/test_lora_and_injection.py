"""LoRA merge round trip, MixLoRA injection into a timm ViT and an HF-style decoder, adapter-only checkpoints."""
import pytest
import torch
from torch import nn

from moemix.adapters import LoRALinear, MixLoRA, load_adapters, merge_lora, save_adapters, unmerge_lora
from moemix.layers import inject_mixlora
from moemix.losses import collect_aux_loss
from tests.adapters._models import LlamaMLP

timm = pytest.importorskip("timm")


def _vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_classes=5)


class TinyDecoder(nn.Module):
    """The module names of an HF LLaMA decoder: model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}."""

    def __init__(self, d=16, h=32, layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.self_attn = nn.Module()
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(block.self_attn, p, nn.Linear(d, d, bias=False))
            block.mlp = LlamaMLP(d, h)
            self.model.layers.append(block)

    def forward(self, x):
        for block in self.model.layers:
            a = block.self_attn
            x = x + a.o_proj(a.q_proj(x) * torch.sigmoid(a.k_proj(x)) + a.v_proj(x))
            x = x + block.mlp(x)
        return x


def test_lora_merge_and_unmerge_round_trip():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 36), enable=(True, False, True)).eval()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 12)
    before, weight = layer(x), layer.base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer(x)[:, 12:24], nn.functional.linear(x, weight, layer.base.bias)[:, 12:24])  # k untouched
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-6)


def test_inject_into_a_timm_vit_trains_only_adapters_routers_and_named_modules():
    vit = _vit()
    x = torch.randn(2, 3, 16, 16)
    vit.eval()
    before = vit(x)
    report = inject_mixlora(vit, num_experts=4, k=2, trainable=["head"])
    assert report.ffn == ["blocks.0.mlp", "blocks.1.mlp"]
    assert report.attention == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert isinstance(vit.blocks[0].mlp, MixLoRA) and vit.blocks[0].attn.qkv.enable == (True, False, True)
    torch.testing.assert_close(vit.eval()(x), before, atol=1e-5, rtol=1e-5)  # B = 0
    assert str(report).startswith(f"trainable params: {report.trainable_params:,} || all params: ")
    vit.train()
    (vit(x).sum() + collect_aux_loss(vit)).backward()
    trained = {n for n, p in vit.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in vit.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".router." in n or n.startswith("head.") for n in trained), sorted(trained)
    assert any(n.startswith("head.") for n in trained) and not any("patch_embed" in n for n in trained)
    assert report.trainable_params == sum(p.numel() for p in vit.parameters() if p.requires_grad)


def test_inject_into_an_hf_style_decoder_adapts_q_and_v():
    model = TinyDecoder()
    report = inject_mixlora(model, num_experts=4, k=2)
    assert report.ffn == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert report.attention == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert model(torch.randn(3, 16)).shape == (3, 16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ffn_pattern=r"blocks\.\d+\.ffn"), r"ffn_pattern='blocks\\\\.\\\\d\+\\\\.ffn' matched no"),
    (dict(attn_pattern=["q_proj"]), r"attn_pattern='q_proj' matched no Linear module"),
    (dict(r=0), "r must be a positive integer"),
    (dict(trainable=["classifier"]), "trainable='classifier' matched no"),
])
def test_bad_injection_names_the_argument(kwargs, match):
    vit = _vit()
    with pytest.raises(ValueError, match=match):
        inject_mixlora(vit, **kwargs)
    assert not any(isinstance(m, (MixLoRA, LoRALinear)) for m in vit.modules())  # nothing replaced


def test_an_unknown_model_needs_a_pattern():
    with pytest.raises(ValueError, match="ffn_pattern: Sequential is neither a timm ViT"):
        inject_mixlora(nn.Sequential(nn.Linear(4, 4)))


def test_merge_lora_folds_the_attention_adapters():
    vit = _vit()
    inject_mixlora(vit, num_experts=4, k=2)
    for m in vit.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.1)
    x = torch.randn(2, 3, 16, 16)
    vit.eval()
    before = vit(x)
    assert merge_lora(vit) == 2
    torch.testing.assert_close(vit(x), before, atol=1e-4, rtol=1e-4)
    assert unmerge_lora(vit) == 2


def test_adapters_saved_and_loaded_into_a_fresh_base_give_identical_outputs(tmp_path):
    vit = _vit()
    base_state = {k: v.clone() for k, v in vit.state_dict().items()}
    report = inject_mixlora(vit, num_experts=4, k=2, trainable=["head"])
    with torch.no_grad():
        for p in vit.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    path = str(tmp_path / "adapters.safetensors")
    saved = save_adapters(vit, path, report)
    assert set(saved) == {n for n, p in vit.named_parameters() if p.requires_grad}
    fresh = _vit(seed=1)
    fresh.load_state_dict(base_state)
    loaded = load_adapters(fresh, path)
    assert loaded.ffn == report.ffn and loaded.trainable_params == report.trainable_params
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh.eval()(x), vit.eval()(x))


def test_adapters_of_another_architecture_are_refused_naming_the_tensor(tmp_path):
    vit = _vit()
    path = str(tmp_path / "adapters.safetensors")
    save_adapters(vit, path, inject_mixlora(vit, num_experts=4, k=2))
    wider = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=2,
                              num_classes=5)
    with pytest.raises(ValueError, match=r"saved from another architecture: blocks\.0\..* has shape"):
        load_adapters(wider, path)
    with pytest.raises(ValueError, match="saved from another architecture: ffn_pattern='blocks.1.mlp' matched no"):
        load_adapters(timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1,
                                        num_heads=2, num_classes=5), path)
