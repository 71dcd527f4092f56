"""The LightningCLI every vision recipe runs: data, trainer defaults, linked arguments, final metrics."""
from __future__ import annotations

import os
from typing import Optional, Type

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from moemix.callbacks import RoutingTelemetry
from moemix.data import ImageDataModule

__all__ = ["RecipeCLI", "ProbabilitiesWriter", "run_cli", "trainer_defaults"]


def trainer_defaults(name: str) -> dict:
    """TensorBoard logs under ``runs/<name>``; Lightning's progress bar on."""
    return {
        "max_epochs": 30,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": "runs", "name": name}},
        "log_every_n_steps": 10,
        "enable_progress_bar": True,
    }


class ProbabilitiesWriter(BasePredictionWriter):
    """``predict`` output: the class probabilities ``[N, K]`` of the predicted samples in data order, saved
    with ``torch.save`` to ``<log_dir>/predictions.pt`` (``predictions_rank<r>.pt`` per process under DDP)."""

    def __init__(self):
        super().__init__(write_interval="epoch")
        self.path = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        probs = torch.cat([p.float().cpu() for p in predictions]) if predictions else torch.empty(0)
        name = "predictions.pt" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.pt"
        folder = trainer.log_dir or trainer.default_root_dir
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, name)
        torch.save(probs, self.path)
        print(f"class probabilities of {probs.shape[0]} samples written to {self.path}")


class RecipeCLI(LightningCLI):
    """Adds a checkpoint every epoch (plus ``last.ckpt``; none with ``--trainer.enable_checkpointing false``)
    and routing telemetry; links the data module's image size and class count into the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": -1,
                             "checkpoint.every_n_epochs": 1, "checkpoint.filename": "{epoch:03d}"})
        parser.add_lightning_class_args(RoutingTelemetry, "routing_telemetry")
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("data", "model.num_classes", compute_fn=lambda data: data.num_classes,
                              apply_on="instantiate")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if config.get("enable_checkpointing") is False:  # --trainer.enable_checkpointing false: no checkpoints
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        if self.subcommand == "predict":
            callbacks = [*callbacks, ProbabilitiesWriter()]
        return super()._instantiate_trainer(config, callbacks)


def run_cli(model_class: Type[L.LightningModule], name: Optional[str] = None, args=None) -> RecipeCLI:
    """Run the recipe CLI; after ``fit`` print the final validation accuracy."""
    name = name or model_class.__name__.lower()
    cli = RecipeCLI(model_class, ImageDataModule, trainer_defaults=trainer_defaults(name), seed_everything_default=0,
                    save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args)
    if cli.subcommand == "fit":
        acc = cli.trainer.callback_metrics.get("val/acc")
        if acc is not None:
            print(f"final validation accuracy: {float(acc):.4f}")
    return cli
