"""Expert parallelism on CPU: 8 experts sharded over the ranks, trained under DDP.

    torchrun --nproc_per_node 2 examples/expert_parallel.py

Each rank holds 8 / world_size experts; tokens travel to their experts by all-to-all (gloo on CPU, NCCL
on GPU). The router and the dense layers are replicated and averaged by DDP; the expert parameters are
excluded from DDP (``distribute_experts`` does both). At the end each rank checks a fresh shard against
the single-process ``SparseMoE`` it came from.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moemix.layers import SparseMoE
from moemix.losses import collect_aux_loss
from moemix.parallel import ExpertParallelMoE, distribute_experts


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same replicated init on every rank (DDP would broadcast rank 0's anyway)
    model = nn.Sequential(nn.Linear(32, 64), SparseMoE(64, 128, num_experts=8, k=2), nn.Linear(64, 1)).to(device)
    single_process = copy.deepcopy(model[1])
    distribute_experts(model)  # model[1].experts: this rank's experts; expert params hidden from DDP
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    gen = torch.Generator().manual_seed(100 + rank)  # each rank draws its own batches
    for step in range(50):
        x = torch.randn(64, 32, generator=gen).to(device)
        y = (x[:, :4].sin().sum(-1, keepdim=True)).to(device)
        loss = F.mse_loss(ddp(x), y) + collect_aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == 49:
            load = model[1].experts.local_tokens_per_expert.tolist()
            print(f"rank {rank} step {step:2d} loss {loss.item():.4f} rows per local expert {load}", flush=True)

    # The shard reproduces the unsharded layer it was cut from (checked on fresh weights).
    check = ExpertParallelMoE.from_sparse_moe(single_process)
    x = torch.randn(16, 64, generator=gen).to(device)
    err = (check(x) - single_process(x)).abs().max().item()
    print(f"rank {rank}: |expert-parallel - single-process| = {err:.2e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
