"""TransMix: the hooked CLS row equals the full attention of an unfused timm ViT, and the paper's formula."""
import pytest
import torch

timm = pytest.importorskip("timm")

from moemix.mix import TransMix, attach_transmix, transmix_lambda  # noqa: E402

K = 10


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=K, depth=2)


def _full_attention(model, x):
    """Class attention from the materialised attention matrix of an unfused last block."""
    attn = model.blocks[-1].attn
    fused, attn.fused_attn = attn.fused_attn, False
    store = {}
    h = attn.attn_drop.register_forward_hook(lambda m, i, o: store.__setitem__("a", i[0].detach()))
    try:
        model(x)
    finally:
        h.remove()
        attn.fused_attn = fused
    return store["a"][:, :, 0, 1:].mean(1)  # [B, N], CLS row over patches, mean over heads


def test_hook_cls_attention_equals_full_attention_matrix(vit):
    vit.train()
    hook = attach_transmix(vit)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        vit(x)
    ours = hook.cls_attention
    ref = _full_attention(vit, x)
    hook.remove()
    assert ours.shape == (4, 16) and torch.allclose(ours, ref, atol=1e-6)


def test_relabel_equals_paper_formula_from_full_attention(vit):
    vit.train()
    hook = attach_transmix(vit)
    tm = TransMix(num_classes=K, switch_prob=1.0, generator=torch.Generator().manual_seed(3))
    tm.use_hook(hook)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, K, (6,))
    xm, y_area, rec = tm(x, y)
    assert rec.use_box.all()
    with torch.no_grad():
        vit(xm)
    target = tm.relabel(rec, hook.cls_attention)
    hook.remove()
    a = _full_attention(vit, xm)
    yl, yh, xl, xh = rec.boxes[0].tolist()
    mask = torch.zeros(32, 32)
    mask[yl:yh, xl:xh] = 1
    m = torch.nn.functional.interpolate(mask[None, None], size=(4, 4), mode="nearest").flatten(1)
    w1, w2 = ((1 - m) * a).sum(1), (m * a).sum(1)
    lam = ((yh - yl) * (xh - xl) / (32 * 32) + w2 / (w1 + w2)) / 2
    y1 = rec.targets
    y2 = y1.flip(0)
    expected = y1 * (1 - lam)[:, None] + y2 * lam[:, None]
    assert torch.allclose(target, expected, atol=1e-5)
    assert torch.allclose(target.sum(1), torch.ones(6), atol=1e-5)


def test_relabel_refuses_the_attention_of_another_forward(vit):
    vit.train()
    hook = attach_transmix(vit)
    tm = TransMix(num_classes=K, switch_prob=1.0, generator=torch.Generator().manual_seed(1))
    tm.use_hook(hook)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, K, (4,))
    with torch.no_grad():
        vit(torch.rand(4, 3, 32, 32))  # an earlier batch of the same size
        xm, _, rec = tm(x, y)
        with pytest.raises(ValueError, match="has not run on this batch since it was mixed"):
            tm.relabel(rec, hook.cls_attention)
        vit(xm)
        first = tm.relabel(rec, hook.cls_attention)
        vit(torch.rand(4, 3, 32, 32))
        with pytest.raises(ValueError, match="ran 2 training forwards since this batch was mixed"):
            tm.relabel(rec, hook.cls_attention)
    hook.remove()
    assert torch.allclose(first.sum(1), torch.ones(4), atol=1e-5)


def test_mixup_branch_keeps_area_target(vit):
    tm = TransMix(num_classes=K, switch_prob=0.0, generator=torch.Generator().manual_seed(0))
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, K, (4,))
    _, y_area, rec = tm(x, y)
    assert torch.equal(tm.relabel(rec, None), y_area)


def test_transmix_lambda_uniform_attention_is_area():
    paste = torch.zeros(8, 8, dtype=torch.bool)
    paste[:4, :4] = True
    lam = transmix_lambda(torch.full((2, 4), 0.25), paste)
    assert torch.allclose(lam, torch.full((2,), 0.25))


def test_hook_is_idle_in_eval_and_does_not_change_outputs(vit):
    x = torch.rand(2, 3, 32, 32)
    vit.eval()
    with torch.no_grad():
        before = vit(x)
    hook = attach_transmix(vit)
    with torch.no_grad():
        after = vit(x)
    hook.remove()
    assert hook.cls_attention is None and torch.equal(before, after)


def test_transmix_rejects_per_sample_modes():
    with pytest.raises(ValueError, match="mode"):
        TransMix(num_classes=K, mode="elem")


@pytest.mark.parametrize("rope, qkv_bias, fused, match", [(True, False, True, "rotary position embeddings"),
                                                          (False, True, True, "separate q/v biases"),
                                                          (False, False, False, "has no 'qkv'")])
def test_attach_transmix_refuses_eva_attention_it_cannot_follow(rope, qkv_bias, fused, match):
    from timm.models.eva import Eva
    model = Eva(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, qkv_bias=qkv_bias,
                use_rot_pos_emb=rope, qkv_fused=fused, num_classes=3)
    with pytest.raises(ValueError, match=match):
        attach_transmix(model)
