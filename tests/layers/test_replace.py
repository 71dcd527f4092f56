import pytest
import timm
import torch
from timm.layers import Mlp
from torch import nn

from moemix.layers import SparseMoE, replace_mlp_with_moe
from moemix.losses import collect_aux_loss


def _vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                             depth=4, **kw)


def test_every_second_block_like_vmoe():
    model = _vit()
    names = replace_mlp_with_moe(model, num_experts=4, k=2)
    assert names == ["blocks.1.mlp", "blocks.3.mlp"]
    assert isinstance(model.blocks[1].mlp, SparseMoE) and not isinstance(model.blocks[0].mlp, SparseMoE)


def test_copy_weights_keeps_the_dense_function():
    torch.manual_seed(0)
    model = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    dense_out = model(x)
    replace_mlp_with_moe(model, blocks=[0, 2, 3], num_experts=4, k=2, copy_weights=True)
    torch.testing.assert_close(model(x), dense_out, atol=1e-4, rtol=1e-4)


def test_swiglu_mlp_is_converted_as_glu_experts():
    from timm.layers import SwiGLU
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), SwiGLU(8, 16))
    x = torch.randn(5, 8)
    before = model(x)
    replace_mlp_with_moe(model, pattern=["1"], num_experts=3, copy_weights=True)
    assert model[1].experts.glu
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_swiglu_with_a_bias_on_the_up_projection_only_keeps_it():
    from timm.layers import SwiGLU
    torch.manual_seed(0)
    model = nn.Sequential(SwiGLU(8, 16))
    model[0].fc1_g.bias = None
    x = torch.randn(5, 8)
    before = model(x)
    replace_mlp_with_moe(model, pattern=["0"], num_experts=3, copy_weights=True)
    assert model[0].experts.b1 is not None
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("moe_kwargs, equal", [(dict(k=2), True), (dict(k=1), False),
                                               (dict(k=2, capacity_factor=0.5), False)])
def test_copied_weights_equal_the_dense_ffn_only_when_the_weights_sum_to_one_and_nothing_drops(moe_kwargs, equal):
    torch.manual_seed(0)
    model = nn.Sequential(Mlp(8, 16))
    x = torch.randn(12, 8)
    before = model(x)
    replace_mlp_with_moe(model, pattern=["0"], num_experts=4, copy_weights=True, **moe_kwargs)
    assert torch.allclose(model(x), before, atol=1e-5) == equal


def test_pattern_list_matches_suffix_and_warns_on_unmatched():
    model = _vit()
    with pytest.warns(UserWarning, match="nothing_here"):
        names = replace_mlp_with_moe(model, pattern=["blocks.2.mlp", "nothing_here"], num_experts=2, k=1)
    assert names == ["blocks.2.mlp"]


def test_regex_pattern_is_full_match():
    model = _vit()
    names = replace_mlp_with_moe(model, pattern=r"blocks\.[01]\.mlp", num_experts=2, k=1)
    assert names == ["blocks.0.mlp", "blocks.1.mlp"]


def test_bad_targets_raise():
    with pytest.raises(ValueError, match="blocks"):
        replace_mlp_with_moe(_vit(), blocks=[9])
    with pytest.raises(ValueError, match="matched no module"):
        with pytest.warns(UserWarning):
            replace_mlp_with_moe(_vit(), pattern=r"nothing")
    with pytest.raises(ValueError, match="pattern"):
        replace_mlp_with_moe(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(every=2.5), "every must be a positive integer"),
    (dict(every=True), "every must be a positive integer"),
    (dict(every=0), "every must be a positive integer"),
    (dict(blocks=[1.0]), "blocks must hold integer block indices"),
    (dict(pattern=3), "pattern must be a regex string or a list of module names"),
    (dict(copy_weights="yes"), "copy_weights must be True or False"),
    (dict(hidden_features=4), r"takes \['hidden_features'\] from each dense FFN"),
    (dict(dtype=torch.float64), r"takes \['dtype'\] from each dense FFN"),
    (dict(copy_weights=True, act_layer="relu", glu=True), r"takes \['act_layer', 'glu'\] from each dense FFN with "
                                                          r"copy_weights=True"),
    (dict(copy_weights=True, bias=False), r"takes \['bias'\] from each dense FFN with copy_weights=True"),
])
def test_bad_selectors_and_keywords_raise_naming_the_argument(kwargs, match):
    model = _vit()
    before = [type(block.mlp) for block in model.blocks]
    with pytest.raises(ValueError, match=match):
        replace_mlp_with_moe(model, **kwargs)
    assert [type(block.mlp) for block in model.blocks] == before


def test_numpy_block_indices_and_other_experts_without_copied_weights():
    np = pytest.importorskip("numpy")
    model = _vit()
    names = replace_mlp_with_moe(model, blocks=np.arange(0, 2), every=None, num_experts=2, act_layer="relu")
    assert names == ["blocks.0.mlp", "blocks.1.mlp"]
    assert isinstance(model.blocks[0].mlp.experts.act, nn.ReLU)  # without copy_weights the experts may differ
    assert replace_mlp_with_moe(_vit(), every=np.int64(2), num_experts=2) == ["blocks.1.mlp", "blocks.3.mlp"]


def test_vit_with_moe_trains_and_loss_falls():
    torch.manual_seed(0)
    model = _vit(drop_rate=0.0)
    replace_mlp_with_moe(model, num_experts=4, k=2)
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        total = loss + collect_aux_loss(model)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.blocks[1].mlp.router.weight.grad.abs().sum() > 0


def test_conflicting_selectors_raise():
    with pytest.raises(ValueError, match="either pattern or blocks/every"):
        replace_mlp_with_moe(_vit(), pattern=r"blocks\.0\.mlp", blocks=[0])
    with pytest.raises(ValueError, match="either blocks .* or every"):
        replace_mlp_with_moe(_vit(), blocks=[0], every=2)


def test_a_target_that_cannot_be_converted_leaves_the_model_unchanged():
    model = _vit()
    with pytest.raises(ValueError, match="cannot convert 'blocks.1.attn'"):
        replace_mlp_with_moe(model, pattern=r"blocks\.(0\.mlp|1\.attn)", num_experts=2, k=1)
    assert not any(isinstance(m, SparseMoE) for m in model.modules())


def test_a_pattern_matching_an_ffn_and_its_layers_raises():
    with pytest.raises(ValueError, match="'blocks.0.mlp' and its submodule 'blocks.0.mlp.fc1'"):
        replace_mlp_with_moe(_vit(), pattern=r"blocks\.0\.mlp.*", num_experts=2, k=1)


@pytest.mark.parametrize("training", [True, False])
def test_new_layers_take_the_mode_of_the_ffn_they_replace(training):
    model = _vit().train(training)
    replace_mlp_with_moe(model, blocks=[0], num_experts=2, k=1, noise="jitter")
    assert model.blocks[0].mlp.training is training
    assert all(m.training is training for m in model.blocks[0].mlp.modules())
