"""The adapt recipe: a pretrained vit_transmix checkpoint transferred five ways; what each trains; its errors."""
import glob

import pytest

from moemix.adapters import EMoE, LoRALinear, MixLoRA
from tests.recipes._run import config_error, run, tiny


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrain")
    run("vit_transmix", folder, "fit", "--trainer.max_epochs", "1", *tiny())
    return glob.glob(str(folder / "**" / "last.ckpt"), recursive=True)[0]


@pytest.mark.parametrize("method", ["full", "linear", "lora", "mixlora", "emoe"])
def test_each_method_trains_what_it_should(method, checkpoint, tmp_path):
    cli = run("adapt", tmp_path, "fit", "--model.checkpoint", checkpoint, "--model.method", method,
              "--trainer.max_epochs", "1", *tiny())
    model = cli.model.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    if method == "full":
        assert trainable == {n for n, _ in model.named_parameters()}
    elif method == "linear":
        assert trainable == {"head.weight", "head.bias"}
    elif method == "lora":
        assert all(".lora_" in n or n.startswith("head.") for n in trainable)
        assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4
    elif method == "mixlora":
        assert all(".lora_" in n or ".router." in n or n.startswith("head.") for n in trainable)
        assert sum(isinstance(m, MixLoRA) for m in model.modules()) == 4
        assert float(cli.trainer.callback_metrics["train/loss_aux_step"]) > 0
    else:
        assert [type(b.mlp) is EMoE for b in model.blocks] == [False, True, False, True]
        assert not model.blocks[1].mlp.router.weight.requires_grad  # the frozen average gate
    assert cli.model.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_without_a_checkpoint_the_recipe_says_how_to_make_one(tmp_path, capsys):
    line = config_error("adapt", tmp_path, capsys, "fit")
    assert "--model.checkpoint is required: pretrain one with `python -m moemix.recipes.vit_transmix fit " \
           "--data.dataset mnist`" in line


def test_a_checkpoint_of_another_recipe_or_size_is_refused(checkpoint, tmp_path, capsys):
    run("cnn_patchmix", tmp_path / "cnn", "fit", "--trainer.max_epochs", "1", *tiny())
    cnn = glob.glob(str(tmp_path / "cnn" / "**" / "last.ckpt"), recursive=True)[0]
    line = config_error("adapt", tmp_path, capsys, "fit", "--model.checkpoint", cnn)
    assert "is not a checkpoint of the vit_transmix recipe" in line
    line = config_error("adapt", tmp_path, capsys, "fit", "--model.checkpoint", checkpoint, "--data.img_size", "16")
    assert "--data.img_size=16 must equal the checkpoint's image size 32" in line
