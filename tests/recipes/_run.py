"""Run a recipe CLI in-process with logs under a temporary folder."""
import lightning as L

from moemix.recipes import adapt, cnn_patchmix, vit_transmix

RECIPES = {"vit_transmix": vit_transmix.cli_main, "cnn_patchmix": cnn_patchmix.cli_main, "adapt": adapt.cli_main}


def run(recipe, tmp_path, *args):
    base = ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]
    subcommand, rest = args[0], list(args[1:])
    return RECIPES[recipe]([subcommand, *base, *rest] if subcommand in ("fit", "validate", "test", "predict")
                           else list(args))


def tiny(*extra):
    """A short fit: 3 training and 2 validation batches per epoch, one scalar per step."""
    return ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
            "--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0", *extra]


class StopAfterFirstEpoch(L.Callback):
    """Ends fit after the first epoch, as an interruption would (its checkpoint is already written)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def config_error(recipe, tmp_path, capsys, *args):
    """Run a recipe that must refuse its configuration: returns the one ``error:`` line it printed on stderr."""
    import pytest

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(recipe, tmp_path, *args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]  # (pytest may print warnings there too)
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]
