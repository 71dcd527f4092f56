"""MixUp / CutMix / MixUpCutMix: the transform contract and timm parity."""
import pytest
import torch

from moemix.mix import CutMix, MixUp, MixUpCutMix, PatchMix
from moemix.mix import functional as MF

K = 10


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def batch(b=6, shape=(3, 16, 16), seed=0):
    g = gen(seed)
    return torch.rand((b, *shape), generator=g), torch.randint(0, K, (b,), generator=g)


MIXERS = {
    "mixup": lambda **kw: MixUp(0.4, num_classes=K, **kw),
    "cutmix": lambda **kw: CutMix(1.0, num_classes=K, **kw),
    "cutmix_minmax": lambda **kw: CutMix(minmax=(0.2, 0.8), num_classes=K, **kw),
    "switch": lambda **kw: MixUpCutMix(0.8, 1.0, num_classes=K, **kw),
}


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("b", [1, 5, 6])
def test_targets_sum_to_one_and_lam_in_unit_interval(name, mode, b):
    x, y = batch(b)
    xm, ym, rec = MIXERS[name](mode=mode, return_info=True, generator=gen())(x, y)
    assert xm.shape == x.shape and ym.shape == (b, K)
    assert torch.allclose(ym.sum(1), torch.ones(b), atol=1e-6)
    assert ((rec.lam >= 0) & (rec.lam <= 1)).all()


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_input_is_never_modified(name, mode):
    x, y = batch(5)
    x0, y0 = x.clone(), y.clone()
    MIXERS[name](mode=mode, generator=gen())(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_targets_equal_hand_formula_from_record(mode):
    x, y = batch(7)
    m = MixUpCutMix(0.8, 1.0, num_classes=K, mode=mode, label_smoothing=0.1, return_info=True, generator=gen())
    xm, ym, rec = m(x, y)
    y1 = MF.soft_targets(y, K, label_smoothing=0.1)
    lam = rec.lam[:, None]
    assert torch.allclose(ym, lam * y1 + (1 - lam) * y1[rec.perm], atol=1e-6)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_correct_lam_equals_one_minus_box_fraction(mode):
    x, y = batch(6, (3, 20, 20))
    m = CutMix(1.0, num_classes=K, mode=mode, return_info=True, generator=gen(2))
    for _ in range(5):
        xm, ym, rec = m(x, y)
        frac = rec.paste_mask().flatten(1).float().mean(1)
        assert torch.allclose(rec.lam, 1 - frac)
        # and the pixels really are the partner's inside the box
        paste = rec.paste_mask()[:, None].expand_as(x)
        assert torch.equal(xm[paste], x[rec.perm][paste]) and torch.equal(xm[~paste], x[~paste])


def test_elem_mode_equals_a_per_sample_loop():
    x, y = batch(6)
    m = MixUpCutMix(0.8, 1.0, num_classes=K, mode="elem", return_info=True, generator=gen(4))
    xm, ym, rec = m(x, y)
    assert rec.use_box.any() and (~rec.use_box).any()
    for i in range(6):
        j = int(rec.perm[i])
        if rec.use_box[i]:
            yl, yh, xl, xh = rec.boxes[i].tolist()
            ref = x[i].clone()
            ref[:, yl:yh, xl:xh] = x[j][:, yl:yh, xl:xh]
        else:
            ref = rec.lam[i] * x[i] + (1 - rec.lam[i]) * x[j]
        assert torch.allclose(xm[i], ref, atol=1e-6)


def test_elem_mode_draws_per_sample_lambdas_and_boxes():
    x, y = batch(8)
    _, _, rec = CutMix(1.0, num_classes=K, mode="elem", return_info=True, generator=gen())(x, y)
    assert rec.lam.unique().numel() > 1 and rec.boxes.shape == (8, 4)


def test_pair_mode_mixes_both_members_of_a_pair_the_same_way():
    x, y = batch(6)
    _, _, rec = MixUpCutMix(0.8, 1.0, num_classes=K, mode="pair", return_info=True, generator=gen())(x, y)
    assert torch.equal(rec.lam, rec.lam[rec.perm])
    assert torch.equal(rec.use_box, rec.use_box[rec.perm])


def test_odd_batch_middle_sample_is_unmixed_under_flip():
    x, y = batch(5)
    xm, ym, rec = MixUp(1.0, num_classes=K, return_info=True, generator=gen())(x, y)
    assert torch.equal(xm[2], x[2]) and rec.lam[2] == 1 and ym[2, y[2]] == 1


def test_same_generator_seed_is_deterministic():
    x, y = batch(6)
    a = MixUpCutMix(0.8, 1.0, num_classes=K, mode="elem", generator=gen(7))(x, y)
    b = MixUpCutMix(0.8, 1.0, num_classes=K, mode="elem", generator=gen(7))(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_prob_is_applied_once_per_batch():
    x, y = batch(4)
    m = MixUpCutMix(0.8, 1.0, prob=0.5, num_classes=K, return_info=True, generator=gen())
    applied = [m(x, y)[2].applied for _ in range(400)]
    assert 0.42 < sum(applied) / 400 < 0.58  # p applied twice would give 0.25


def test_prob_zero_passes_batch_through_with_plain_targets():
    x, y = batch(4)
    xm, ym = MixUp(1.0, prob=0.0, num_classes=K)(x, y)
    assert torch.equal(xm, x) and torch.equal(ym, MF.soft_targets(y, K))


def test_soft_labels_chain_mixup_then_cutmix():
    x, y = batch(6)
    x1, y1 = MixUp(1.0, num_classes=K, generator=gen())(x, y)
    x2, y2 = CutMix(1.0, num_classes=K, pairing="roll", generator=gen())(x1, y1)
    assert torch.allclose(y2.sum(1), torch.ones(6))


def test_decoupled_label_lambda():
    x, y = batch(4)
    m = MixUp(1.0, num_classes=K, label_smoothing=0.0, label_lam_fn=lambda lam: torch.full_like(lam, 0.9),
              return_info=True, generator=gen())
    _, ym, rec = m(x, y)
    assert torch.allclose(ym.max(1).values, torch.full((4,), 0.9)) and not torch.allclose(rec.lam, rec.label_lam)


def test_early_stopped_mixup_turns_off_at_off_epoch():
    x, y = batch(4)
    m = MixUp(1.0, num_classes=K, off_epoch=3)
    m.set_epoch(2)
    assert not torch.equal(m(x, y)[0], x)
    m.set_epoch(3)
    assert torch.equal(m(x, y)[0], x)


@pytest.mark.parametrize("shape", [(3, 4, 16, 16), (3, 2, 8, 8), (12, 16), (1600,)])
def test_every_modality(shape):
    x, y = batch(5, shape)
    for mode in ("batch", "elem"):
        xm, ym = MixUpCutMix(0.8, 1.0, num_classes=K, mode=mode, generator=gen())(x, y)
        assert xm.shape == x.shape and torch.allclose(ym.sum(1), torch.ones(5))


def test_sequence_attention_masks_are_mixed_with_the_batch():
    x, y = torch.randn(4, 6, 8), torch.tensor([0, 1, 2, 3])
    am = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 2 + [0] * 4, [1] * 6], dtype=torch.bool)
    _, _, rec = MixUp(1.0, num_classes=K, return_info=True, generator=gen())(x, y, attention_mask=am)
    assert torch.equal(rec.attention_mask, am | am[rec.perm])


def test_record_apply_mixes_segmentation_maps_with_boxes():
    x, y = batch(4, (3, 12, 12))
    seg = torch.randint(0, 5, (4, 12, 12))
    _, _, rec = CutMix(1.0, num_classes=K, return_info=True, generator=gen())(x, y)
    out = rec.apply(seg)
    paste = rec.paste_mask()
    assert torch.equal(out[paste], seg[rec.perm][paste]) and torch.equal(out[~paste], seg[~paste])


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_dims_in_any_order_paste_the_box_the_label_describes(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.arange(5, dtype=torch.float64).view(5, 1, 1, 1).expand(5, 3, 9, 13).clone()
    y = torch.arange(5)
    for dims in [(-1, -2), (3, 2)]:
        xm, ym, record = CutMix(1.0, num_classes=7, mode=mode, dims=dims, return_info=True, generator=g)(x, y)
        own_share = (xm == x).double().mean(dim=(1, 2, 3))  # samples differ, so a pasted pixel is never "own"
        mixed = record.perm != torch.arange(5)
        torch.testing.assert_close(own_share[mixed], ym[mixed, y[mixed]])


@pytest.mark.parametrize("dims", [(5,), (-5,), (0,), (2, 2)])
def test_dims_outside_the_input_or_repeated_raise(dims):
    with pytest.raises(ValueError, match="dims must"):
        CutMix(1.0, num_classes=3, dims=dims)(torch.rand(4, 3, 8, 8), torch.arange(4) % 3)


def test_label_lam_fn_leaves_unmixed_samples_their_own_label():
    mixer = MixUp(1.0, mode="elem", prob=0.5, num_classes=5, label_lam_fn=lambda lam: torch.full_like(lam, 0.5),
                  return_info=True, generator=torch.Generator().manual_seed(3))
    x, y = torch.rand(8, 4), torch.arange(8) % 5
    _, y_soft, record = mixer(x, y)
    unmixed = record.lam == 1
    assert unmixed.any() and (~unmixed).any()
    assert torch.equal(y_soft[unmixed].argmax(1), y[unmixed]) and (y_soft[unmixed].max(1).values == 1).all()
    assert torch.allclose(record.label_lam[~unmixed], torch.tensor(0.5))


def test_attention_mask_needs_the_record_and_its_shape_is_checked():
    h, y = torch.rand(4, 6, 8), torch.arange(4) % 5
    with pytest.raises(ValueError, match="return_info=True"):
        MixUp(1.0, num_classes=5)(h, y, attention_mask=torch.ones(4, 6))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\] = \(4, 6\)"):
        MixUp(1.0, num_classes=5, return_info=True)(h, y, attention_mask=torch.ones(4, 7))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[:, 4:] = 0
    _, _, record = CutMix(1.0, num_classes=5, return_info=True)(h, y, attention_mask=mask)
    assert record.attention_mask.dtype == torch.long


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_targets_stay_float32_for_low_precision_inputs(dtype):
    x, y = torch.rand(4, 3, 8, 8, dtype=dtype), torch.arange(4)
    _, y_soft = MixUpCutMix(0.8, 1.0, num_classes=1000, label_smoothing=0.1)(x, y)
    assert y_soft.dtype == torch.float32
    torch.testing.assert_close(y_soft.sum(1), torch.ones(4))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -1.0])
def test_non_finite_alphas_raise_at_construction(alpha):
    with pytest.raises(ValueError, match="mixup_alpha must be a finite number >= 0"):
        MixUpCutMix(mixup_alpha=alpha, cutmix_alpha=1.0, num_classes=3)


def test_bad_labels_and_empty_batches_say_what_is_expected():
    mixer = MixUp(1.0, num_classes=3)
    with pytest.raises(ValueError, match="y must be a torch.Tensor"):
        mixer(torch.rand(2, 4), [0, 1])
    with pytest.raises(ValueError, match=r"index labels y must have shape \[B\]"):
        mixer(torch.rand(2, 4), torch.tensor(1))
    with pytest.raises(ValueError, match="x must hold at least one sample"):
        mixer(torch.rand(0, 4), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("length, width", [(6, 5), (5, 5)])
def test_record_applies_a_sequence_mix_along_the_mixed_dim(length, width):
    torch.manual_seed(0)
    h, y = torch.randn(4, length, width), torch.tensor([0, 1, 2, 0])
    hm, _, rec = CutMix(1.0, num_classes=3, return_info=True)(h, y)
    assert rec.dims == (1,)
    assert torch.equal(rec.apply(h), hm)  # the record's own dim, also when T == D
    mask = torch.arange(length).expand(4, length) < torch.tensor([[length], [length - 1], [2], [length]])
    spliced = rec.apply(mask)  # a [B, T] attention mask follows the same spans
    paste = rec.paste_mask()
    assert torch.equal(spliced, torch.where(paste, mask[rec.perm], mask))


@pytest.mark.parametrize("make", [lambda g: MixUp(1.0, num_classes=3, generator=g),
                                  lambda g: MixUp(1.0, num_classes=3, mode="elem", generator=g),
                                  lambda g: CutMix(1.0, num_classes=3, generator=g),
                                  lambda g: PatchMix((4, 4), ratio=0.5, num_classes=3, generator=g)])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_channels_last_batches_stay_channels_last_with_the_same_values(make, requires_grad):
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    plain, _ = make(torch.Generator().manual_seed(0))(x, y)
    x_last = x.contiguous(memory_format=torch.channels_last).requires_grad_(requires_grad)
    last, _ = make(torch.Generator().manual_seed(0))(x_last, y)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(last.detach(), plain)
    if requires_grad:  # feature maps carrying gradients mix too
        last.sum().backward()
        assert x_last.grad is not None and x_last.grad.shape == x.shape
