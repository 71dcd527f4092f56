"""PatchMix: replaced patch fraction equals the label weight."""
import pytest
import torch

from moemix.mix import PatchMix

K = 5


@pytest.mark.parametrize("size,grid", [(28, (7, 7)), (30, (7, 7)), (16, (16, 16))])
def test_patch_fraction_equals_label_weight(size, grid):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 3, size, size, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])
    pm = PatchMix(grid, num_classes=K, return_info=True, generator=g)
    xm, ym, rec = pm(x, y)
    paste = rec.paste_mask()
    frac = paste.flatten(1).float().mean(1)
    own = ym[torch.arange(6), y]
    for i in range(6):
        if rec.perm[i] != i and y[rec.perm[i]] != y[i]:
            assert torch.allclose(own[i], 1 - frac[i])
    p = paste[:, None].expand_as(x)
    assert torch.equal(xm[p], x[rec.perm][p]) and torch.equal(xm[~p], x[~p])


def test_divisible_grid_fraction_is_cell_fraction():
    pm = PatchMix((4, 4), ratio=0.5, num_classes=K, return_info=True)
    _, _, rec = pm(torch.rand(2, 1, 16, 16), torch.tensor([0, 1]))
    assert rec.mask.flatten(1).sum(1).tolist() == [8, 8]
    assert torch.allclose(rec.lam, torch.full((2,), 0.5))


def test_patchmix_leaves_input_alone_and_is_deterministic():
    x, y = torch.rand(3, 3, 14, 14), torch.tensor([0, 1, 2])
    x0 = x.clone()
    a = PatchMix((7, 7), num_classes=K, generator=torch.Generator().manual_seed(1))(x, y)
    b = PatchMix((7, 7), num_classes=K, generator=torch.Generator().manual_seed(1))(x, y)
    assert torch.equal(x, x0) and torch.equal(a[0], b[0])


def test_image_smaller_than_grid_raises():
    with pytest.raises(ValueError, match="smaller than the patch grid"):
        PatchMix((14, 14), num_classes=K)(torch.rand(2, 3, 10, 10), torch.tensor([0, 1]))


def test_an_int_grid_is_square():
    assert PatchMix(grid=8, num_classes=2).grid == (8, 8)
    with pytest.raises(ValueError, match=r"grid must be an int or \(gh, gw\)"):
        PatchMix(grid=(2, 2, 2))
