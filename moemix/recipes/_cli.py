"""The LightningCLI every vision recipe runs: data, trainer defaults, linked arguments, final metrics."""
from __future__ import annotations

from typing import Optional, Type

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from moemix.callbacks import RoutingTelemetry
from moemix.data import ImageDataModule

__all__ = ["RecipeCLI", "run_cli", "trainer_defaults"]


def trainer_defaults(name: str) -> dict:
    """TensorBoard logs under ``runs/<name>``; Lightning's progress bar on."""
    return {
        "max_epochs": 30,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": "runs", "name": name}},
        "log_every_n_steps": 10,
        "enable_progress_bar": True,
    }


class RecipeCLI(LightningCLI):
    """Adds a checkpoint every epoch (plus ``last.ckpt``) and routing telemetry; links the data module's
    image size and class count into the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": -1,
                             "checkpoint.every_n_epochs": 1, "checkpoint.filename": "{epoch:03d}"})
        parser.add_lightning_class_args(RoutingTelemetry, "routing_telemetry")
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("data", "model.num_classes", compute_fn=lambda data: data.num_classes,
                              apply_on="instantiate")


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
