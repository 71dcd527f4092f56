"""Lightning pieces: MixingMixin mixes training batches only, MixSchedule stops it, MixCollate mixes in the loader."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

from moemix.callbacks import MixSchedule  # noqa: E402
from moemix.mix import AVMix, MixCollate, MixingMixin, MixUp  # noqa: E402

K = 3


class Tiny(MixingMixin, L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, K)
        self.mixer = MixUp(1.0, num_classes=K, return_info=True, generator=torch.Generator().manual_seed(0))
        self.seen = []

    def training_step(self, batch, _):
        x, y = batch
        self.seen.append((self.current_epoch, y.dim(), self.mix_record.applied))
        return torch.sum(-y * self.net(x).log_softmax(-1), -1).mean()

    def validation_step(self, batch, _):
        x, y = batch
        assert y.dim() == 1  # validation labels are left alone

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    return DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, K, (8,))), batch_size=4)


def test_mixin_mixes_training_batches_and_schedule_turns_it_off(tmp_path):
    model = Tiny()
    trainer = L.Trainer(max_epochs=3, callbacks=[MixSchedule(off_epoch=2)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        accelerator="cpu")
    trainer.fit(model, _loader(), _loader())
    by_epoch = {e: a for e, _, a in model.seen}
    assert all(d == 2 for _, d, _ in model.seen)
    assert by_epoch[0] and by_epoch[1] and not by_epoch[2]


def test_schedule_anneals_alpha_and_av_ratio():
    class FakeTrainer:
        current_epoch, max_epochs = 2, 5

    class M:
        pass

    pl = M()
    pl.mixer = MixUp(1.0, num_classes=K)
    MixSchedule(alpha=(1.0, 0.2), anneal_epochs=4).on_train_epoch_start(FakeTrainer(), pl)
    assert pl.mixer.mixup_alpha == pytest.approx(0.6) and pl.mixer.enabled
    pl.mixer = AVMix(0.9, 0.1)
    MixSchedule(anneal_epochs=4).on_train_epoch_start(FakeTrainer(), pl)
    assert pl.mixer.ratio == pytest.approx(0.5)


def test_mix_collate_mixes_in_the_dataloader():
    ds = TensorDataset(torch.randn(6, 4), torch.randint(0, K, (6,)))
    x, y = next(iter(DataLoader(ds, batch_size=5, collate_fn=MixCollate(MixUp(1.0, num_classes=K)))))
    assert x.shape == (5, 4) and y.shape == (5, K) and torch.allclose(y.sum(1), torch.ones(5))


class _Trainer:
    def __init__(self, epoch, max_epochs):
        self.current_epoch, self.max_epochs = epoch, max_epochs


class _Module:
    pass


def test_schedule_switches_off_every_transform_with_an_enabled_switch():
    from moemix.mix import ClasswiseMixup, PatchMix
    from moemix.mix.audio import BeatSyncMixup
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    for mixer in (PatchMix((2, 2), ratio=0.5, num_classes=K), BeatSyncMixup(8000), ClasswiseMixup()):
        pl = _Module()
        pl.mixer = mixer
        MixSchedule(off_epoch=3).on_train_epoch_start(_Trainer(5, 10), pl)
        assert mixer.enabled is False
    patch = pl.mixer = PatchMix((2, 2), ratio=0.5, num_classes=K)
    MixSchedule(off_epoch=3).on_train_epoch_start(_Trainer(5, 10), pl)
    xm, ym = patch(x, y)
    assert torch.equal(xm, x) and torch.equal(ym, torch.nn.functional.one_hot(y, K).float())
    prototypes, embeddings = torch.randn(5, 4), torch.randn(5, 6)
    classwise = ClasswiseMixup()
    classwise.enabled = False
    r, t = classwise(prototypes, embeddings)
    torch.testing.assert_close(r, torch.nn.functional.normalize(prototypes, dim=-1))
    torch.testing.assert_close(t, torch.nn.functional.normalize(embeddings, dim=-1))


def test_schedule_refuses_what_it_cannot_do():
    pl = _Module()
    pl.mixer = AVMix(0.9, 0.1)  # no enabled switch
    with pytest.raises(ValueError, match="AVMix has no `enabled` switch"):
        MixSchedule(off_epoch=3).on_train_epoch_start(_Trainer(0, 10), pl)
    pl.mixer = MixUp(1.0, num_classes=K)
    with pytest.raises(ValueError, match="no max_epochs .* pass anneal_epochs"):
        MixSchedule(alpha=(1.0, 0.2)).on_train_epoch_start(_Trainer(1, None), pl)  # Trainer(max_steps=...)
    MixSchedule(off_epoch=3).on_train_epoch_start(_Trainer(1, -1), pl)  # nothing to anneal: fine
    assert pl.mixer.enabled


@pytest.mark.parametrize("anneal_epochs, end_epoch", [(None, 9), (10, 10)])
def test_schedule_reaches_the_end_value_at_anneal_epochs(anneal_epochs, end_epoch):
    pl = _Module()
    pl.mixer = MixUp(1.0, num_classes=K)
    schedule = MixSchedule(alpha=(1.0, 0.1), anneal_epochs=anneal_epochs)
    schedule.on_train_epoch_start(_Trainer(end_epoch - 1, 10), pl)
    assert pl.mixer.mixup_alpha > 0.1 + 1e-6
    schedule.on_train_epoch_start(_Trainer(end_epoch, 10), pl)
    assert pl.mixer.mixup_alpha == pytest.approx(0.1)


def test_schedule_keeps_the_transforms_own_off_epoch():
    pl = _Module()
    pl.mixer = MixUp(1.0, num_classes=K, off_epoch=2)
    MixSchedule(alpha=(1.0, 0.5), anneal_epochs=4).on_train_epoch_start(_Trainer(3, 10), pl)
    assert pl.mixer.enabled is False
    MixSchedule(alpha=(1.0, 0.5), anneal_epochs=4).on_train_epoch_start(_Trainer(1, 10), pl)
    assert pl.mixer.enabled is True
