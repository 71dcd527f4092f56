"""``--ckpt_path last`` / ``best``: the checkpoint files of the newest run of a recipe."""
from __future__ import annotations

import glob
import os
from typing import List, Optional, Tuple

import torch

from moemix._checks import ConfigError

__all__ = ["checkpoint_folders", "resolve_checkpoint"]

NAMED = ("last", "best")


def checkpoint_folders(logger, default_root_dir: Optional[str], dirpath: Optional[str]) -> Tuple[List[str], str]:
    """Folders holding a ``last.ckpt`` of a run of this configuration (``--checkpoint.dirpath``, the logger's
    ``<save_dir>/<name>/version_*/checkpoints``, ``<default_root_dir>/checkpoints`` without a logger) and
    where they were looked for, in words."""
    root = default_root_dir or os.getcwd()
    init = getattr(logger, "init_args", None) if logger not in (None, False, True) else None
    if init is not None:
        runs = os.path.join(str(getattr(init, "save_dir", None) or root), str(getattr(init, "name", None) or ""))
    else:
        runs = os.path.join(root, "lightning_logs")
    folders = ([dirpath] if dirpath else []) + glob.glob(os.path.join(runs, "*", "checkpoints"))
    folders.append(os.path.join(root, "checkpoints"))
    where = f"under {runs}" + (f" or in {dirpath}" if dirpath else "")
    return [f for f in folders if os.path.isfile(os.path.join(f, "last.ckpt"))], where


def _best_in(last: str) -> Optional[str]:
    """The best checkpoint a run's ``ModelCheckpoint`` recorded in its ``last.ckpt``, if it still exists."""
    states = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
    for key, state in states.items():
        best = state.get("best_model_path") if key.startswith("ModelCheckpoint") else None
        if best:
            path = os.path.join(os.path.dirname(last), os.path.basename(best))
            if os.path.isfile(path):
                return path
    return None


def resolve_checkpoint(ckpt_path: Optional[str], subcommand: str, folders: List[str], where: str) -> Optional[str]:
    """The file ``--ckpt_path`` names: a path as given; ``last`` / ``best`` from the run (in ``folders``) whose
    ``last.ckpt`` is newest. ``validate``, ``test`` and ``predict`` refuse to run without one (they would
    evaluate untrained weights); ``where`` says in the message where runs are looked for."""
    if ckpt_path is None:
        if subcommand == "fit":
            return None
        raise ConfigError(f"--ckpt_path is required for {subcommand} (without it the model's untrained weights "
                          f"would be evaluated): pass a checkpoint file, or 'last' / 'best' for the newest run {where}")
    if ckpt_path not in NAMED:
        if not os.path.isfile(ckpt_path):
            raise ConfigError(f"--ckpt_path={ckpt_path!r} is not a file (or pass 'last' / 'best' for the newest "
                              f"run {where})")
        return ckpt_path
    if not folders:
        raise ConfigError(f"--ckpt_path={ckpt_path}: no run with a last.ckpt found {where}")
    last = max((os.path.join(f, "last.ckpt") for f in folders), key=os.path.getmtime)
    path = last if ckpt_path == "last" else _best_in(last)
    if path is None:
        raise ConfigError(f"--ckpt_path=best: the newest run ({os.path.dirname(last)}) recorded no best checkpoint "
                          "(it had no validation metric to monitor); pass 'last' or a file")
    print(f"--ckpt_path={ckpt_path}: using {path}")
    return path
