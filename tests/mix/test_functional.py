"""The functional core: lambda sampling, pairing, boxes, patch masks, mixing and targets."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moemix.mix import functional as MF


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 5.0])
def test_beta_samples_in_unit_interval_with_right_mean_and_variance(alpha):
    lam = MF.sample_beta(alpha, size=20000, generator=gen())
    assert lam.min() >= 0 and lam.max() <= 1
    var = 1 / (4 * (2 * alpha + 1))
    assert abs(lam.mean().item() - 0.5) < 0.02
    assert abs(lam.var().item() - var) < 0.1 * var + 2e-3


def test_asymmetric_beta_mean():
    lam = MF.sample_beta(2.0, 5.0, size=20000, generator=gen())
    assert abs(lam.mean().item() - 2 / 7) < 0.01


def test_sample_lambda_per_batch_and_per_sample_shapes():
    assert MF.sample_lambda(1.0, generator=gen()).dim() == 0
    assert MF.sample_lambda(1.0, 7, generator=gen()).shape == (7,)


def test_same_generator_seed_gives_same_lambdas():
    assert torch.equal(MF.sample_lambda(0.4, 9, generator=gen(3)), MF.sample_lambda(0.4, 9, generator=gen(3)))


@pytest.mark.parametrize("how", MF.PAIRINGS)
@pytest.mark.parametrize("b", [1, 2, 5, 8])
def test_pairings_are_permutations(how, b):
    perm = MF.pair_indices(b, how, generator=gen())
    assert sorted(perm.tolist()) == list(range(b))


def test_flip_and_roll_match_timm_and_torchvision():
    assert MF.pair_indices(4, "flip").tolist() == [3, 2, 1, 0]
    assert MF.pair_indices(4, "roll").tolist() == [3, 0, 1, 2]


@pytest.mark.parametrize("b", [4, 7])
def test_random_pairs_is_an_involution(b):
    assert MF.is_involution(MF.pair_indices(b, "random_pairs", generator=gen()))


@settings(max_examples=40, deadline=None)
@given(lam=st.floats(0.0, 1.0), h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 1000))
def test_boxes_stay_inside_and_fraction_matches_mask(lam, h, w, seed):
    boxes = MF.rand_boxes((h, w), torch.tensor([lam, lam]), generator=gen(seed))
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] <= h).all() and (boxes[:, 2] >= 0).all() and (boxes[:, 3] <= w).all()
    frac = MF.box_fraction(boxes, (h, w))
    mask = MF.boxes_to_mask(boxes, (h, w))
    assert torch.allclose(frac, mask.flatten(1).float().mean(1))


def test_unclipped_box_has_timm_side_lengths():
    boxes = MF.rand_boxes((100, 100), torch.full((200,), 0.75), generator=gen())
    sides = torch.stack([boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]], 1)
    assert sides.max() == 50  # int(100 * sqrt(0.25)); smaller only where clipped


def test_minmax_boxes_within_ratio_and_inside():
    boxes = MF.rand_boxes_minmax((50, 80), (0.2, 0.8), 300, generator=gen())
    hs, ws = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    assert hs.min() >= 10 and hs.max() < 40 and ws.min() >= 16 and ws.max() < 64
    assert (boxes[:, 1] <= 50).all() and (boxes[:, 3] <= 80).all()


def test_one_dimensional_box_for_sequences_has_length_fraction():
    boxes = MF.rand_boxes((1000,), torch.tensor([0.7]), generator=gen())
    assert boxes.shape == (1, 2) and boxes[0, 1] - boxes[0, 0] <= 300


def test_patch_masks_have_exact_cell_counts():
    m = MF.patch_masks((7, 7), torch.tensor([0.0, 0.5, 1.0]), generator=gen())
    assert m.flatten(1).sum(1).tolist() == [0, round(0.5 * 49), 49]


def test_mix_interpolates_per_sample_and_leaves_input_alone():
    x = torch.randn(3, 4)
    x0 = x.clone()
    perm = torch.tensor([2, 0, 1])
    lam = torch.tensor([0.2, 0.5, 1.0])
    out = MF.mix(x, lam, perm)
    assert torch.allclose(out, lam[:, None] * x + (1 - lam[:, None]) * x[perm])
    assert torch.equal(x, x0)


def test_mix_with_mask_pastes_partner():
    x = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    mask = torch.tensor([[True, False], [False, False]])
    out = MF.mix(x, None, torch.tensor([1, 0]), mask)
    assert out[0, 0, 0, 0] == x[1, 0, 0, 0] and out[0, 0, 1, 1] == x[0, 0, 1, 1]


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (4, 3, 2, 8, 8), (4, 6, 5), (4, 50)])
def test_mix_boxes_equals_mask_paste_on_every_modality(shape):
    x = torch.randn(shape)
    dims = MF.default_mixed_dims(x)
    sizes = [x.shape[d] for d in dims]
    boxes = MF.rand_boxes(sizes, torch.full((4,), 0.6), generator=gen())
    perm = MF.pair_indices(4, "roll")
    out = MF.mix_boxes(x, perm, boxes)
    ref = MF.mix(x, None, perm, MF.boxes_to_mask(boxes, sizes))
    assert torch.equal(out, ref)


def test_mix_vectorised_path_equals_row_loop(monkeypatch):
    from moemix.mix.functional import mixing
    x, perm, lam = torch.randn(5, 2, 6, 6), MF.pair_indices(5, "random", generator=gen()), torch.rand(5)
    boxes = MF.rand_boxes((6, 6), lam, generator=gen())
    use = torch.tensor([True, False, True, False, False])
    rows = (MF.mix(x, lam, perm), MF.mix_per_sample(x, perm, lam, boxes, use))
    monkeypatch.setattr(mixing, "_row_loop", lambda x: False)
    vec = (MF.mix(x, lam, perm), MF.mix_per_sample(x, perm, lam, boxes, use))
    for a, b in zip(rows, vec):
        assert torch.allclose(a, b, atol=1e-6)


def test_attention_masks_are_ored_for_interpolated_sequences():
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert MF.mix_attention_mask(m, torch.tensor([1, 0])).tolist() == [[True, True, True, False]] * 2


def test_soft_targets_formula_with_smoothing():
    t = MF.soft_targets(torch.tensor([1, 0]), 4, label_smoothing=0.2)
    assert torch.allclose(t[0], torch.tensor([0.05, 0.85, 0.05, 0.05]))
    assert torch.allclose(t.sum(1), torch.ones(2))


def test_soft_labels_pass_through_for_chaining():
    y = torch.softmax(torch.randn(3, 5), 1)
    assert torch.equal(MF.soft_targets(y, 5, label_smoothing=0.1), y)


def test_mix_targets_hand_formula():
    y = torch.eye(3)
    out = MF.mix_targets(y, torch.tensor([0.7, 0.5, 1.0]), torch.tensor([1, 0, 2]))
    assert torch.allclose(out[0], torch.tensor([0.7, 0.3, 0.0]))
    assert torch.allclose(out[2], torch.tensor([0.0, 0.0, 1.0]))
