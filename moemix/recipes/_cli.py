"""The LightningCLI every vision recipe runs: data, trainer defaults, linked arguments, checkpoints, final
metrics, and configuration errors on one line."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import List, Optional, Type

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from moemix._checks import ConfigError
from moemix.callbacks import RoutingTelemetry
from moemix.data import ImageDataModule
from moemix.recipes._checkpoints import checkpoint_folders, resolve_checkpoint

__all__ = ["RecipeCLI", "ProbabilitiesWriter", "run_cli", "trainer_defaults", "DEBUG_ENV"]

DEBUG_ENV = "MOEMIX_DEBUG"  # set to 1 (or pass --debug) for the traceback of a configuration error


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
    with ``torch.save`` to ``output`` if given, else ``predictions.pt`` in the logger's run folder, else next
    to the checkpoint (``predictions_rank<r>.pt`` per process under DDP)."""

    def __init__(self, output: Optional[str] = None, checkpoint: Optional[str] = None):
        super().__init__(write_interval="epoch")
        self.output, self.checkpoint = output, checkpoint
        self.path = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        probs = torch.cat([p.float().cpu() for p in predictions]) if predictions else torch.empty(0)
        if self.output is not None:
            base, ext = os.path.splitext(self.output)
            path = self.output if trainer.world_size == 1 else f"{base}_rank{trainer.global_rank}{ext or '.pt'}"
        else:
            name = "predictions.pt" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.pt"
            folder = trainer.log_dir if trainer.logger is not None else None
            folder = folder or (os.path.dirname(os.path.abspath(self.checkpoint)) if self.checkpoint
                                else trainer.default_root_dir)
            path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        torch.save(probs, self.path)
        print(f"class probabilities of {probs.shape[0]} samples written to {self.path}")


class RecipeCLI(LightningCLI):
    """Keeps ``last.ckpt`` and the best checkpoint by validation accuracy (``--checkpoint.save_top_k``,
    ``--checkpoint.monitor``; none with ``--trainer.enable_checkpointing false``); resolves ``--ckpt_path
    last`` / ``best`` to the newest run's files and refuses to evaluate without a checkpoint; adds routing
    telemetry and ``--predict_output``; links the data module's image size and class count into the model.
    Errors in the configured values are raised as :class:`~moemix._checks.ConfigError`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1, "checkpoint.monitor": "val/acc",
                             "checkpoint.mode": "max", "checkpoint.every_n_epochs": 1,
                             "checkpoint.filename": "best-{epoch:03d}"})
        parser.add_lightning_class_args(RoutingTelemetry, "routing_telemetry")
        parser.add_argument("--predict_output", type=Optional[str], default=None,
                            help="predict: file for the class probabilities (default: predictions.pt in the run's "
                                 "log folder, or next to the checkpoint without a logger)")
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("data", "model.num_classes", compute_fn=lambda data: data.num_classes,
                              apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if sub is None:
            return
        config = self.config[sub]
        trainer = config.trainer
        folders, where = checkpoint_folders(trainer.logger, trainer.default_root_dir, config.checkpoint.dirpath)
        config.ckpt_path = resolve_checkpoint(config.get("ckpt_path"), sub, folders, where)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:  # a constructor refused a configured value
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(str(err)) from err

    def after_instantiate_classes(self) -> None:
        seed = self._get(self.config, "seed_everything")
        if seed is not False:  # Lightning's own line is held back until the configuration is known to work
            rank_zero_info(f"Seed set to {seed}")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if config.get("enable_checkpointing") is False:  # --trainer.enable_checkpointing false: no checkpoints
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        if self.subcommand == "predict":
            sub = self.config["predict"]
            callbacks = [*callbacks, ProbabilitiesWriter(sub.get("predict_output"), sub.get("ckpt_path"))]
        return super()._instantiate_trainer(config, callbacks)


def _option_names(message: str) -> str:
    """``model.lr must be ...`` -> ``--model.lr must be ...``: options as they are typed."""
    return re.sub(r"(?<![\w.\-/])((?:model|data|trainer|checkpoint)\.[A-Za-z_]\w*)", r"--\1", message)


def _debug_requested(args: Optional[List[str]]):
    """``(args without --debug, whether a traceback is wanted)``; from the command line when ``args`` is None."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if args is None:
        if "--debug" in sys.argv[1:]:
            sys.argv = [a for a in sys.argv if a != "--debug"]
            debug = True
        return None, debug
    return [a for a in args if a != "--debug"], debug or "--debug" in args


@contextlib.contextmanager
def _seed_log_held_back():
    logger = logging.getLogger("lightning.fabric.utilities.seed")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_cli(model_class: Type[L.LightningModule], name: Optional[str] = None, args=None) -> RecipeCLI:
    """Run the recipe CLI; after ``fit`` print the final validation accuracy. A configuration error prints
    ``error: <message>`` on one line and exits with status 2 (``--debug`` or ``MOEMIX_DEBUG=1``: the traceback)."""
    name = name or model_class.__name__.lower()
    args, debug = _debug_requested(args)
    try:
        with _seed_log_held_back():
            cli = RecipeCLI(model_class, ImageDataModule, trainer_defaults=trainer_defaults(name),
                            seed_everything_default=0, save_config_kwargs={"overwrite": True},
                            auto_configure_optimizers=False, args=args)
    except ConfigError as err:
        if debug:
            raise
        print(f"error: {_option_names(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    if cli.subcommand == "fit":
        acc = cli.trainer.callback_metrics.get("val/acc")
        if acc is not None:
            print(f"final validation accuracy: {float(acc):.4f}")
    return cli
