"""Bad input gets a clear ValueError naming the argument."""
import pytest
import torch

from moemix.mix import CutMix, MixUp, MixUpCutMix
from moemix.mix import functional as MF


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"num_classes=3"):
        MixUp(num_classes=3)(torch.rand(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\[0, num_classes"):
        MixUp(num_classes=3)(torch.rand(2, 4), torch.tensor([-1, 0]))


def test_missing_num_classes_with_index_labels():
    with pytest.raises(ValueError, match="num_classes is required"):
        MixUp()(torch.rand(2, 4), torch.tensor([0, 1]))


def test_soft_labels_need_no_num_classes_but_must_match_it():
    MixUp()(torch.rand(2, 4), torch.eye(2))
    with pytest.raises(ValueError, match="num_classes"):
        MixUp(num_classes=3)(torch.rand(2, 4), torch.eye(2))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_non_float_input(dtype):
    with pytest.raises(ValueError, match="floating point"):
        MixUp(num_classes=2)(torch.zeros(2, 3, 4, 4, dtype=dtype), torch.tensor([0, 1]))


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_alpha_not_positive(alpha):
    with pytest.raises(ValueError, match="alpha"):
        MixUp(alpha)
    with pytest.raises(ValueError, match="alpha"):
        CutMix(alpha)
    with pytest.raises(ValueError, match="alpha"):
        MF.sample_lambda(alpha)


def test_both_alphas_zero():
    with pytest.raises(ValueError, match="mixup_alpha and cutmix_alpha"):
        MixUpCutMix(0.0, 0.0)


@pytest.mark.parametrize("kwargs,name", [({"prob": 1.5}, "prob"), ({"switch_prob": -0.1}, "switch_prob"),
                                         ({"mode": "row"}, "mode"), ({"cutmix_minmax": (0.9, 0.1)}, "cutmix_minmax"),
                                         ({"label_smoothing": 1.0}, "label_smoothing"),
                                         ({"pairing": "roll", "mode": "pair"}, "pairing")])
def test_bad_configuration_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MixUpCutMix(**kwargs)


def test_label_batch_mismatch():
    with pytest.raises(ValueError, match="one label per sample"):
        MixUp(num_classes=2)(torch.rand(3, 4), torch.tensor([0, 1]))
