"""What a new user of the recipes meets first: labels of folder data, odd batch sizes, checkpoint files,
evaluation without a checkpoint, prediction output and one-line configuration errors."""
import glob
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch

from moemix._checks import ConfigError
from moemix.data import ImageDataModule
from tests.recipes._run import config_error, run, tiny


def _image_tree(root, layout):
    """``layout``: split -> class -> number of images."""
    from PIL import Image

    for split, classes in layout.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for c, n in classes.items():
            (root / split / c).mkdir()
            for i in range(n):
                Image.new("RGB", (12, 10), (20 * i, 40, 0)).save(root / split / c / f"{i}.png")
    return str(root)


def test_every_split_uses_the_train_class_indices(tmp_path, caplog):
    root = _image_tree(tmp_path, {"train": {"cat": 2, "dog": 2}, "val": {"dog": 3}})
    data = ImageDataModule(root, img_size=8)
    with caplog.at_level(logging.INFO):
        data.setup()
    assert data.num_classes == 2
    assert [label for _, label in data.datasets["val"].samples] == [1, 1, 1]  # "dog" is class 1 in train/
    assert "no images of the classes ['cat']" in caplog.text


def test_a_class_that_train_lacks_is_an_error_naming_the_folder(tmp_path):
    root = _image_tree(tmp_path, {"train": {"cat": 2}, "val": {"cat": 1, "bird": 1}})
    with pytest.raises(ConfigError, match=r"data\.root=.*val/bird is a class that .*train does not have"):
        ImageDataModule(root)


def test_empty_folders_are_an_error_naming_data_root(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(ConfigError, match=r"data\.root=.*train has no class folders"):
        ImageDataModule(str(tmp_path))
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(ConfigError, match=r"data\.root=.*train holds no image files"):
        ImageDataModule(str(tmp_path)).setup()
    _image_tree(tmp_path, {"train": {"dog": 1}, "val": {"dog": 1}})
    with pytest.raises(ConfigError, match=r"data\.root=.*train/cat holds no image files"):
        ImageDataModule(str(tmp_path)).setup()


def test_a_corrupt_cifar_batch_is_an_error_naming_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": [[0] * 3072], "labels": [0]}, f)
    with pytest.raises(ConfigError, match=r"data\.root=.*data_batch_1 is not a readable CIFAR-10 python batch"):
        ImageDataModule(str(tmp_path)).setup()


def test_a_last_training_batch_of_one_is_dropped_and_evaluation_keeps_all(caplog):
    data = ImageDataModule(batch_size=74)  # the embedded digits: 1259 training samples = 17 * 74 + 1
    with caplog.at_level(logging.INFO):
        train = data.train_dataloader()
    assert train.drop_last and len(train) == 17
    assert "last training batch of each epoch would hold 1 sample" in caplog.text
    assert not ImageDataModule(batch_size=64).train_dataloader().drop_last  # a last batch of 43 trains
    val = data.val_dataloader()
    assert not val.drop_last and sum(len(b[1]) for b in val) == len(data.datasets["val"])


def test_cnn_trains_a_whole_epoch_whose_last_batch_would_hold_one_sample(tmp_path):
    cli = run("cnn_patchmix", tmp_path, "fit", "--trainer.max_epochs", "1", "--data.batch_size", "74",
              "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0")
    assert cli.trainer.global_step == 17


def test_a_run_keeps_the_last_and_the_best_checkpoint(tmp_path):
    cli = run("vit_transmix", tmp_path, "fit", "--trainer.max_epochs", "3", *tiny())
    files = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True))
    best = os.path.basename(cli.trainer.checkpoint_callback.best_model_path)
    assert len(files) == 2 and "last.ckpt" in files and best in files and best.startswith("best-epoch="), files


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_without_a_checkpoint_is_refused(subcommand, tmp_path, capsys):
    line = config_error("cnn_patchmix", tmp_path, capsys, subcommand)
    assert line.startswith(f"error: --ckpt_path is required for {subcommand}") and "'last' / 'best'" in line


def test_ckpt_path_last_and_best_resolve_to_the_newest_run(tmp_path, capsys):
    run("cnn_patchmix", tmp_path, "fit", "--trainer.max_epochs", "2", *tiny())
    newest = run("cnn_patchmix", tmp_path, "fit", "--trainer.max_epochs", "1", *tiny())
    folder = os.path.dirname(newest.trainer.checkpoint_callback.last_model_path)
    for name, want in (("last", os.path.join(folder, "last.ckpt")),
                       ("best", newest.trainer.checkpoint_callback.best_model_path)):
        capsys.readouterr()
        run("cnn_patchmix", tmp_path, "validate", "--ckpt_path", name, "--trainer.limit_val_batches", "1")
        assert f"--ckpt_path={name}: using {want}" in capsys.readouterr().out


def test_predict_without_a_logger_writes_next_to_the_checkpoint_or_to_predict_output(tmp_path, monkeypatch):
    run("cnn_patchmix", tmp_path / "fit", "fit", "--trainer.max_epochs", "1", *tiny())
    ckpt = glob.glob(str(tmp_path / "fit" / "**" / "last.ckpt"), recursive=True)[0]
    monkeypatch.chdir(tmp_path)
    from moemix.recipes._cli import ProbabilitiesWriter

    for extra, want in (([], os.path.join(os.path.dirname(ckpt), "predictions.pt")),
                        (["--predict_output", str(tmp_path / "out" / "probs.pt")], str(tmp_path / "out" / "probs.pt"))):
        cli = run("cnn_patchmix", tmp_path / "pred", "predict", "--ckpt_path", ckpt, "--trainer.logger", "false",
                  "--trainer.limit_predict_batches", "1", *extra)
        (writer,) = [c for c in cli.trainer.callbacks if isinstance(c, ProbabilitiesWriter)]
        assert writer.path == want and torch.load(want).shape[1] == 10
    assert not os.path.exists(tmp_path / "predictions.pt")


def test_a_bad_option_is_one_line_and_exit_status_2_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    res = subprocess.run([sys.executable, "-m", "moemix.recipes.vit_transmix", "fit", "--model.lr", "-1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "MOEMIX_DEBUG"})
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == "error: --model.lr must be a finite number > 0, got -1.0"
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 2  # (+ Lightning's seed line)
    with pytest.raises(ConfigError, match=r"^model\.lr must be"):
        run("vit_transmix", tmp_path, "fit", "--model.lr", "-1", "--debug")
    monkeypatch.setenv("MOEMIX_DEBUG", "1")
    with pytest.raises(ConfigError):
        run("vit_transmix", tmp_path, "fit", "--model.lr", "-1")


def test_vit_recipe_with_a_cnn_says_it_needs_a_vit(tmp_path, capsys):
    line = config_error("vit_transmix", tmp_path, capsys, "fit", "--model.model_name", "resnet18")
    assert "--model.model_name='resnet18' must be a timm ViT with a class token" in line
