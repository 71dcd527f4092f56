"""Bad input gets a clear ValueError naming the argument."""
import pytest
import torch

from moemix.mix import CutMix, MixUp, MixUpCutMix, PatchMix
from moemix.mix import functional as MF
from moemix.mix.audio import BeatSyncMixup


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


@pytest.mark.parametrize("build, name", [
    (lambda: PatchMix((2, 2), num_classes=2.5), "num_classes"),
    (lambda: PatchMix((2, 2), num_classes=0), "num_classes"),
    (lambda: BeatSyncMixup(0), "sample_rate"),
    (lambda: BeatSyncMixup(8000, num_classes=2.5), "num_classes"),
    (lambda: BeatSyncMixup(8000, label_smoothing=2.0), "label_smoothing"),
])
def test_patch_and_beat_mixes_name_bad_arguments(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_beat_sync_targets_are_float32_for_half_waveforms():
    wave = torch.randn(2, 8000).half()
    _, y = BeatSyncMixup(8000, num_classes=3)(wave, torch.tensor([0, 2]), bpm=[120.0, 121.0],
                                               downbeats=[torch.tensor([0.1]), torch.tensor([0.2])])
    assert y.dtype == torch.float32


def test_sample_beta_at_tiny_concentrations_keeps_the_mean():
    """Both gamma draws underflow for many samples; the limit puts mass alpha / (alpha + beta) at 1."""
    for a, b in ((1e-3, 1e-3), (1e-3, 3e-3)):
        lam = MF.sample_beta(a, b, 200000, generator=torch.Generator().manual_seed(0))
        assert abs(lam.mean().item() - a / (a + b)) < 0.006  # about 5 standard errors


def test_whole_numbers_of_any_type_are_accepted_for_counts():
    np = pytest.importorskip("numpy")
    from moemix.mix import ReturnWeightedSampler
    assert BeatSyncMixup(22050.0).sample_rate == 22050
    assert BeatSyncMixup(np.int64(16000)).sample_rate == 16000
    assert BeatSyncMixup(torch.tensor(8000)).sample_rate == 8000
    assert len(ReturnWeightedSampler(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), num_samples=1e2)) == 100
    with pytest.raises(ValueError, match="sample_rate must be a positive whole number"):
        BeatSyncMixup(22050.5)


def test_numpy_and_zero_dim_tensor_numbers_are_accepted_and_stored_as_floats():
    """The mixing transforms share the layers' scalar checks (moemix._checks): NumPy and 0-d tensor numbers pass,
    non-finite ones and bools do not."""
    np = pytest.importorskip("numpy")
    pm = PatchMix(grid=(2, 2), ratio=np.float32(0.25), prob=torch.tensor(0.5), num_classes=3)
    assert type(pm.ratio) is float and type(pm.prob) is float and pm.prob == 0.5
    assert MixUp(alpha=np.float64(0.4)).mixup_alpha == pytest.approx(0.4)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        MixUp(alpha=float("nan"))
    with pytest.raises(ValueError, match=r"prob must be in \[0, 1\]"):
        PatchMix(prob=True, num_classes=3)
