"""EMoE: equal clusters, k = N reproduces the dense FFN, the one-score gate, moefy on a timm ViT."""
import pytest
import torch
from torch import nn

from moemix.adapters import EMoE, balanced_kmeans, emoe_from_mlp
from moemix.layers import moefy
from tests.adapters._models import LlamaMLP

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("n, clusters", [(96, 8), (60, 6), (24, 24)])
def test_clusters_have_exactly_equal_sizes(n, clusters):
    labels = balanced_kmeans(torch.randn(n, 10), clusters, seed=3)
    assert torch.equal(torch.bincount(labels, minlength=clusters), torch.full((clusters,), n // clusters))


def test_kmeans_groups_rows_that_belong_together():
    centres = torch.eye(4) * 10
    x = torch.cat([centres[i] + 0.1 * torch.randn(5, 4) for i in torch.randperm(4)])
    labels = balanced_kmeans(x, 4)
    for group in labels.view(4, 5):  # consecutive blocks of 5 rows share a centre
        assert len(set(group.tolist())) == 1


@pytest.mark.parametrize("make", [lambda: timm.layers.Mlp(16, 48), lambda: LlamaMLP(16, 48),
                                  lambda: nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16))])
def test_all_experts_reproduce_the_dense_ffn_exactly(make):
    torch.manual_seed(0)
    dense = make().double().eval()
    layer = emoe_from_mlp(dense, num_experts=6, k=6).eval()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=0)
    assert torch.allclose(layer(x), dense(x), atol=1e-12)


def test_avg_gate_is_frozen_mean_of_expert_rows_and_weights_are_one():
    torch.manual_seed(0)
    dense = timm.layers.Mlp(16, 48)
    layer = emoe_from_mlp(dense, num_experts=6, k=2)
    units = layer.experts.w1.detach().transpose(1, 2)  # [N, H/N, D]: the W1 rows of each expert
    torch.testing.assert_close(layer.router.weight, units.mean(dim=1))
    assert not layer.router.weight.requires_grad and layer.aux_loss_type is None
    decision = layer.router(torch.randn(5, 16))
    assert torch.equal(decision.weights, torch.ones(5, 2))
    rows = {tuple(r) for r in dense.fc1.weight.detach().tolist()}
    assert {tuple(r) for r in units.reshape(-1, 16).tolist()} == rows  # a partition of the hidden units


def test_learned_gate_is_a_trainable_cosine_router_with_importance_loss():
    layer = emoe_from_mlp(timm.layers.Mlp(16, 48), num_experts=6, k=2, gate="learn")
    assert layer.router.score == "cosine" and layer.aux_loss_type == "importance"
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.router.weight.grad is not None or any(p.grad is not None for p in layer.router.parameters())


def test_moefy_converts_every_second_block_of_a_vit():
    def vit():
        return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=48, depth=4,
                                 num_heads=2, num_classes=5).eval()

    torch.manual_seed(0)
    model, dense = vit(), vit()
    dense.load_state_dict(model.state_dict())
    names = moefy(model, num_experts=12, k=12)
    assert names == ["blocks.1.mlp", "blocks.3.mlp"] and isinstance(model.blocks[1].mlp, EMoE)
    assert not isinstance(model.blocks[0].mlp, EMoE)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)  # k = N: the dense model


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=5), "num_experts=5 must divide the hidden width 48"),
    (dict(num_experts=6, k=7), "k=7 must be at most num_experts=6"),
    (dict(num_experts=0), "num_experts must be a positive integer"),
    (dict(num_experts=6, gate="random"), "gate must be one of"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        emoe_from_mlp(timm.layers.Mlp(16, 48), **kwargs)
