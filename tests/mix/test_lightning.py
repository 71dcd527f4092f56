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
