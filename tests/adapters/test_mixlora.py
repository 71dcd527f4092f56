"""MixLoRA: the base FFN until trained, the same function as the `mixlora` package's layer, the routed layouts
agree, only adapters and the router train."""
import pytest
import torch
from torch import nn

from moemix.adapters import MixLoRA
from moemix.losses import collect_aux_loss
from tests.adapters._models import LlamaMLP

timm = pytest.importorskip("timm")


def _randomise_adapters(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("ffn", [lambda: timm.layers.Mlp(16, 40), lambda: LlamaMLP(),
                                 lambda: timm.layers.SwiGLU(16, 40)])
def test_a_fresh_layer_is_the_base_ffn(ffn):
    torch.manual_seed(0)
    base = ffn().eval()
    layer = MixLoRA(base, num_experts=4, k=2).eval()
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layout", ["sorted", "padded"])
def test_shared_projections_equal_the_per_row_experts(layout):
    torch.manual_seed(0)
    layer = MixLoRA(LlamaMLP(), num_experts=4, k=2).eval()
    _randomise_adapters(layer)
    layer.dispatch_layout = layout
    x = torch.randn(30, 16)
    decision = layer.router(x)
    plan = layer.experts.plan_routing(x, decision, layout)
    from moemix.layers import combine_tokens, dispatch_tokens
    per_row = combine_tokens(layer.experts(dispatch_tokens(x, plan), plan), decision.weights, plan)
    torch.testing.assert_close(layer(x), per_row, atol=1e-5, rtol=1e-5)


def test_only_adapters_and_router_get_gradients():
    torch.manual_seed(0)
    base = timm.layers.Mlp(16, 40)
    layer = MixLoRA(base, num_experts=4, k=2)
    _randomise_adapters(layer)
    (layer(torch.randn(20, 16)).sum() + collect_aux_loss(layer)).backward()
    for name, p in layer.named_parameters():
        assert (p.grad is not None) == p.requires_grad == (not name.startswith("experts.ffn.")), name
    assert layer.experts.lora_B_gate.grad.abs().sum() > 0 and layer.router.weight.grad.abs().sum() > 0
    assert float(layer.aux_loss) > 0  # Switch load balance, coefficient 0.01


def test_defaults_follow_the_paper():
    layer = MixLoRA(timm.layers.Mlp(16, 40))
    assert (layer.num_experts, layer.k, layer.experts.r, layer.experts.alpha) == (8, 2, 8, 16.0)
    assert layer.experts.lora_dropout.p == 0.05 and layer.aux_loss_coef == 0.01
    assert abs(float(layer.router.weight.std()) - 0.02) < 0.01


@pytest.mark.parametrize("kind", ["plain", "gated"])
def test_equals_the_mixlora_package_layer(kind):
    pytest.importorskip("transformers")
    pytest.importorskip("mixlora", reason="the mixlora 0.2.3 package (dev extra) is not installed")
    from mixlora.config import LoraConfig, MixLoraConfig
    from mixlora.lora_linear import LoraLinear
    from mixlora.model import MixLoraSparseMoe

    torch.manual_seed(0)
    base = (timm.layers.Mlp(16, 40) if kind == "plain" else LlamaMLP()).eval()
    ours = MixLoRA(base, num_experts=4, k=2).eval()
    _randomise_adapters(ours)
    config = MixLoraConfig(dtype_=torch.float32, model_type_="phi" if kind == "plain" else "llama",
                           num_experts_=4, top_k_=2, jitter_noise_=0.0, act_fn_=ours.experts.parts.act)
    theirs = MixLoraSparseMoe(base, config).eval()
    theirs.gate_ = ours.router.weight.detach().clone()
    lora = LoraConfig(dtype_=torch.float32, lora_r_=8, lora_alpha_=16, lora_dropout_=0.05)
    names = {"gate": "fc1", "down": "fc2"} if kind == "plain" else {"gate": "gate_proj", "up": "up_proj",
                                                                     "down": "down_proj"}
    for e in range(4):
        for ours_name, their_name in names.items():
            a = getattr(ours.experts, f"lora_A_{ours_name}")[e].detach().t().clone()
            b = getattr(ours.experts, f"lora_B_{ours_name}")[e].detach().t().clone()
            theirs.experts_[f"experts.{e}.{their_name}"] = LoraLinear(getattr(base, their_name), lora, (a, b)).eval()
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(ours(x), theirs(x.clone()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(num_experts=0), "num_experts must be a positive integer"),
    (dict(k=3, num_experts=2), "k"),
    (dict(dropout=1.5), r"dropout must be in \[0, 1\]"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixLoRA(timm.layers.Mlp(16, 40), **kwargs)


def test_an_unknown_ffn_is_refused_naming_what_is_expected():
    with pytest.raises(ValueError, match="is not a known FFN"):
        MixLoRA(nn.Linear(4, 4))


def test_layouts_give_the_same_gradients():
    torch.manual_seed(0)
    layer = MixLoRA(LlamaMLP(), num_experts=4, k=2, dropout=0.0)
    _randomise_adapters(layer)
    x = torch.randn(30, 16, dtype=torch.float64)
    layer.double()
    grads = {}
    for layout in ("sorted", "padded"):
        layer.dispatch_layout = layout
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        (layer(xi) ** 2).sum().backward()
        grads[layout] = [xi.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b)
