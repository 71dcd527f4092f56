import glob
import math
import os
import re
import warnings

import pytest
import torch
import yaml

from tests.recipes._run import config_error, run, tiny

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


@pytest.mark.parametrize("recipe", ["vit_transmix", "cnn_patchmix"])
def test_fast_dev_run_has_finite_loss(recipe, tmp_path):
    cli = run(recipe, tmp_path, "fit", "--trainer.fast_dev_run", "2")
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss_step"]))


@pytest.mark.parametrize("recipe", ["vit_transmix", "cnn_patchmix"])
def test_bf16_mixed_precision_and_ema(recipe, tmp_path):
    cli = run(recipe, tmp_path, "fit", "--trainer.fast_dev_run", "2", "--trainer.precision", "bf16-mixed",
              "--model.ema_decay", "0.9")
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss_step"]))
    ema, live = cli.model.ema.module, cli.model.model
    assert cli.model.eval_model() is ema
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), live.parameters()))


def test_moe_aux_loss_is_in_the_logged_loss(tmp_path):
    cli = run("vit_transmix", tmp_path, "fit", "--trainer.fast_dev_run", "1", "--model.moe_every", "2")
    m = cli.trainer.callback_metrics
    assert cli.model.moe_block_names == ["blocks.1.mlp", "blocks.3.mlp"]
    assert float(m["train/loss_aux_step"]) > 0
    assert math.isclose(float(m["train/loss_step"]), float(m["train/loss_cls_step"]) + float(m["train/loss_aux_step"]),
                        rel_tol=1e-5)


def _events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert files, "no TensorBoard event file written"
    acc = EventAccumulator(os.path.dirname(files[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_has_scalars_and_images(tmp_path):
    run("vit_transmix", tmp_path, "fit", "--trainer.max_epochs", "1", "--model.moe_every", "2", *tiny())
    acc = _events(tmp_path)
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    for tag in ("train/loss_step", "train/loss_cls_step", "train/loss_aux_step", "train/lr", "val/acc", "val/loss",
                "routing/model.blocks.1.mlp/max_load"):
        assert tag in scalars, (tag, sorted(scalars))
    assert {"train/mixed_samples", "routing/expert_load"} <= images


def _step_losses(tmp_path):
    return [e.value for e in _events(tmp_path).Scalars("train/loss_step")]


def test_resume_continues_exactly(tmp_path):
    straight, first = tmp_path / "straight", tmp_path / "first"
    run("vit_transmix", straight, "fit", "--trainer.max_epochs", "2", *tiny())
    run("vit_transmix", first, "fit", "--trainer.max_epochs", "2", *tiny(),
        "--trainer.callbacks+=tests.recipes._run.StopAfterFirstEpoch")
    ckpt = glob.glob(str(first / "**" / "last.ckpt"), recursive=True)[0]
    run("vit_transmix", tmp_path / "resumed", "fit", "--trainer.max_epochs", "2", "--ckpt_path", ckpt, *tiny())
    want = _step_losses(straight)
    got = _step_losses(tmp_path / "resumed")
    assert len(want) == 6 and len(got) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want[3:]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe, config", [("vit_transmix", "vit_transmix"), ("vit_transmix", "vit_moe_transmix"),
                                            ("cnn_patchmix", "cnn_patchmix")])
def test_checked_in_config_round_trips(recipe, config, tmp_path, capsys):
    path = os.path.join(CONFIGS, f"{config}.yaml")
    with pytest.raises(SystemExit):
        run(recipe, tmp_path, "fit", "--config", path, "--print_config")
    printed = yaml.safe_load(capsys.readouterr().out)
    with open(path) as f:
        checked_in = yaml.safe_load(f)
    for section in ("model", "data"):
        for key, value in checked_in.get(section, {}).items():
            assert printed[section][key] == value, (section, key)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(printed))
    with pytest.raises(SystemExit):
        run(recipe, tmp_path, "fit", "--config", str(again), "--print_config")
    assert yaml.safe_load(capsys.readouterr().out) == printed


@pytest.mark.parametrize("args, option", [
    (["--model.model_name", "no_such_model"], "--model.model_name"),
    (["--data.root", "/does/not/exist"], "--data.root"),
    (["--model.patch_size", "5"], "--model.patch_size"),
])
def test_bad_config_names_the_option(args, option, tmp_path, capsys):
    line = config_error("vit_transmix", tmp_path, capsys, "fit", "--trainer.fast_dev_run", "1", *args)
    assert line.startswith("error: ") and option in line, line


def test_resume_with_a_longer_schedule_warns(tmp_path):
    run("cnn_patchmix", tmp_path / "first", "fit", "--trainer.max_epochs", "1", *tiny())
    ckpt = glob.glob(str(tmp_path / "first" / "**" / "last.ckpt"), recursive=True)[0]
    assert torch.load(ckpt, weights_only=False)["lr_schedule"] == {"total_steps": 3, "warmup_steps": 2}
    with pytest.warns(UserWarning, match=r"schedule had 3 steps \(2 warmup\), this run's has 6 \(3 warmup\)"):
        run("cnn_patchmix", tmp_path / "longer", "fit", "--trainer.max_epochs", "2", "--ckpt_path", ckpt, *tiny())
    with warnings.catch_warnings(record=True) as caught:  # the same schedule: no warning
        warnings.simplefilter("always")
        run("cnn_patchmix", tmp_path / "same", "fit", "--trainer.max_epochs", "1", "--ckpt_path", ckpt, *tiny())
    assert not [w for w in caught if "learning-rate schedule" in str(w.message)]


@pytest.mark.parametrize("args, message", [
    (["--model.moe_every", "-1"], r"--model\.moe_every must be an int >= 1"),
    (["--model.moe_every", "2", "--model.num_experts", "2", "--model.moe_k", "3"],
     r"--model\.moe_k must be an int in \[1, --model\.num_experts=2\]"),
    (["--model.moe_every", "40"], r"--model\.moe_every=40.*matched no module"),
    (["--model.warmup_epochs", "-1"], r"--model\.warmup_epochs must be an int >= 0"),
    (["--model.weight_decay", "-1"], r"--model\.weight_decay must be a finite number >= 0"),
])
def test_bad_optimiser_and_moe_values_name_the_option(args, message, tmp_path, capsys):
    line = config_error("vit_transmix", tmp_path, capsys, "fit", "--trainer.fast_dev_run", "1", *args)
    assert re.search(message, line), line


@pytest.mark.parametrize("name", ["lr", "weight_decay", "moe_aux_loss_coef"])
def test_infinite_coefficients_from_python_name_the_option(name):
    from moemix.recipes._classifier import _check_hyperparameters
    values = dict(lr=1e-3, weight_decay=0.05, warmup_epochs=0, min_lr_factor=0.0, moe_every=2, num_experts=4, moe_k=2,
                  moe_aux_loss_coef=0.01)  # (the command line's float parser refuses "inf" itself)
    _check_hyperparameters(**values, with_moe=True)
    with pytest.raises(ValueError, match=f"model\\.{name} must be a finite number"):
        _check_hyperparameters(**{**values, name: float("inf")}, with_moe=True)


def test_moe_options_are_checked_only_with_moe_blocks():
    from moemix.recipes.vit_transmix import ViTTransMix

    ViTTransMix(num_experts=1)  # no MoE blocks: the default moe_k=2 is not used
    with pytest.raises(ValueError, match=r"model\.moe_k must be an int in \[1, model\.num_experts=1\]"):
        ViTTransMix(num_experts=1, moe_every=2)


def test_checkpointing_can_be_turned_off_and_predict_writes_probabilities(tmp_path):
    run("cnn_patchmix", tmp_path, "fit", "--trainer.max_epochs", "1", "--trainer.enable_checkpointing", "false",
        *tiny())
    assert not glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    run("cnn_patchmix", tmp_path / "ck", "fit", "--trainer.max_epochs", "1", *tiny())
    ckpt = glob.glob(str(tmp_path / "ck" / "**" / "last.ckpt"), recursive=True)[0]
    cli = run("cnn_patchmix", tmp_path / "pred", "predict", "--ckpt_path", ckpt)
    from moemix.recipes._cli import ProbabilitiesWriter

    (writer,) = [c for c in cli.trainer.callbacks if isinstance(c, ProbabilitiesWriter)]
    probs = torch.load(writer.path)
    assert probs.shape == (len(cli.datamodule.datasets["test"]), 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(probs.shape[0]))


def test_routing_telemetry_counts_only_layers_that_trained(tmp_path):
    from moemix.callbacks import RoutingTelemetry

    cli = run("vit_transmix", tmp_path, "fit", "--trainer.max_epochs", "2", "--model.moe_every", "2",
              "--model.ema_decay", "0.9", *tiny())
    (telemetry,) = [c for c in cli.trainer.callbacks if isinstance(c, RoutingTelemetry)]
    assert telemetry.layer_names == ["model.blocks.1.mlp", "model.blocks.3.mlp"]  # not the EMA copy's


def test_digits_evaluation_batches_hold_every_class():
    from moemix.data.images import load_digits_tensors

    splits = load_digits_tensors(8)
    for name in ("val", "test"):
        y = splits[name][1]
        assert len(set(y[:64].tolist())) == 10, name
    assert torch.equal(load_digits_tensors(8)["test"][1], splits["test"][1])  # a fixed order


def test_data_root_with_wrong_layout(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    line = config_error("cnn_patchmix", tmp_path, capsys, "fit", "--trainer.fast_dev_run", "1", "--data.root",
                        str(tmp_path / "images"))
    assert "--data.root" in line


def test_imagefolder_root_trains(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            folder = tmp_path / "images" / split / c
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 36), (200 if c == "cat" else 20, 10 * i, 0)).save(folder / f"{i}.png")
    cli = run("cnn_patchmix", tmp_path, "fit", "--trainer.fast_dev_run", "1", "--data.root", str(tmp_path / "images"),
              "--data.batch_size", "4")
    assert cli.model.hparams.num_classes == 2


def test_cifar10_python_folder_trains(tmp_path):
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 12), ("data_batch_2", 12), ("test_batch", 8)):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    cli = run("cnn_patchmix", tmp_path, "fit", "--trainer.fast_dev_run", "1", "--data.root", str(tmp_path),
              "--data.batch_size", "8")
    assert len(cli.datamodule.datasets["train"]) == 24 and len(cli.datamodule.datasets["val"]) == 8
    assert cli.datamodule.datasets["train"][0][0].shape == (3, 32, 32)


def test_cnn_test_reports_occlusion_curve(tmp_path):
    cli = run("cnn_patchmix", tmp_path, "fit", "--trainer.max_epochs", "1", *tiny())
    ckpt = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)[0]
    cli = run("cnn_patchmix", tmp_path, "test", "--ckpt_path", ckpt, "--trainer.limit_test_batches", "2")
    acc = cli.model.occlusion_accuracy
    assert set(acc) == {f"{m}_{f:.1f}" for m in ("patches", "noise") for f in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)}
    assert math.isclose(acc["noise_0.0"], float(cli.trainer.callback_metrics["test/acc"]), rel_tol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["vit_transmix", "cnn_patchmix"])
def test_default_fit_beats_chance_widely(recipe, tmp_path):
    cli = run(recipe, tmp_path, "fit")
    assert float(cli.trainer.callback_metrics["val/acc"]) > 0.7  # chance is 0.1


def test_short_cnn_fit_beats_chance_widely(tmp_path):
    cli = run("cnn_patchmix", tmp_path, "fit", "--trainer.max_epochs", "4", "--model.mixing", "none")
    assert float(cli.trainer.callback_metrics["val/acc"]) > 0.6  # chance is 0.1
