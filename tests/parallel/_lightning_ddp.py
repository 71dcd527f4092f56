"""Lightning DDP run (2 CPU processes, gloo) of a tiny model whose MoE layer is expert-parallel.

Run as ``python -m tests.parallel._lightning_ddp OUT_DIR`` from the repository root (Lightning's ``ddp``
strategy relaunches this command for rank 1). Each rank trains ``STEPS`` SGD steps, then replays them
single-process on the unsharded model (mean of the ranks' losses, on the batches each rank saw) and writes the differences to
``OUT_DIR/rank{r}.pt``.
"""
from __future__ import annotations

import copy
import os
import sys

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moemix.layers import SparseMoE
from moemix.losses import collect_aux_loss
from moemix.parallel import distribute_experts, named_expert_parameters
from tests.parallel._workers import full_name

D, BATCH, STEPS, WORLD_SIZE, LR = 8, 4, 3, 2, 0.5


class TinyMoEModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.seen = []
        self.net = nn.Sequential(nn.Linear(D, D), SparseMoE(D, 16, num_experts=4, k=2), nn.Linear(D, 1))

    def configure_model(self):
        distribute_experts(self)  # runs after the process group exists, before the DDP wrap

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x.detach().clone(), y.detach().clone()))
        return F.mse_loss(self.net(x), y) + collect_aux_loss(self)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD_SIZE * BATCH * STEPS, D, generator=gen)
    return x, x[:, :1].sin()


def _replay(net: nn.Module, batches) -> nn.Module:
    """The same steps single-process: ``batches[rank][step]`` as each rank saw it, mean of the ranks' losses."""
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for step in range(STEPS):
        loss = 0.0
        for rank_batches in batches:
            x, y = rank_batches[step]
            loss = loss + F.mse_loss(net(x), y) + collect_aux_loss(net)
        opt.zero_grad()
        (loss / len(batches)).backward()
        opt.step()
    return net


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = TinyMoEModel()
    initial = copy.deepcopy(model.net)
    x, y = _data()
    trainer = L.Trainer(accelerator="cpu", devices=WORLD_SIZE, strategy="ddp", max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False))
    batches = [None] * WORLD_SIZE  # the sampler shuffles: replay exactly what each rank saw
    torch.distributed.all_gather_object(batches, model.seen)
    expected = dict(_replay(copy.deepcopy(initial), batches).named_parameters())
    start = dict(initial.named_parameters())
    moe = model.net[1]
    local = slice(moe.experts.local_expert_range.start, moe.experts.local_expert_range.stop)
    expert_names = {name for name, _ in named_expert_parameters(model.net)}
    result = {"ignored": sorted(model._ddp_params_and_buffers_to_ignore), "replicated": {}, "experts": {},
              "moved": 0.0, "type": type(moe).__name__, "experts_type": type(moe.experts).__name__}
    for name, param in model.net.named_parameters():
        ref, init = expected[full_name(name)].detach(), start[full_name(name)].detach()
        if name in expert_names:
            ref, init = ref[local], init[local]
            result["experts"][name] = param.detach().clone()
        else:
            result["replicated"][name] = param.detach().clone()
        result.setdefault("max_diff", 0.0)
        result["max_diff"] = max(result["max_diff"], (param.detach() - ref).abs().max().item())
        result["moved"] = max(result["moved"], (param.detach() - init).abs().max().item())
    result["rank0_checkpoint_load"] = _load_rank0_checkpoint(trainer, out_dir)
    torch.save(result, os.path.join(out_dir, f"rank{trainer.global_rank}.pt"))


def _load_rank0_checkpoint(trainer: L.Trainer, out_dir: str) -> str:
    """Lightning's checkpoint (written by rank 0 only) loaded into a fresh sharded model on every rank."""
    path = os.path.join(out_dir, "lightning.ckpt")
    trainer.save_checkpoint(path)  # rank 0 writes, every rank waits
    fresh = TinyMoEModel()
    fresh.configure_model()
    try:
        fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    except RuntimeError as err:
        return f"RuntimeError: {err}"
    return "no error"


if __name__ == "__main__":
    main(sys.argv[1])
