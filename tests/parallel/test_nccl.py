"""Sharded experts (ExpertParallelMoE, MoELayers with their own parts) over NCCL, one GPU per rank, against the
single-process layer.

Runs on every visible GPU up to 2 ranks (skipped without CUDA/NCCL). With one GPU the group has a
single rank: the NCCL count exchange, all-to-all and gradient scaling still run on the device.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.parallel._dist import run_distributed
from tests.parallel._workers import CASES, nccl_worker

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                                reason="needs CUDA and NCCL")
TOL = 1e-4  # float32 on the GPU


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    world_size = min(torch.cuda.device_count(), 2)
    out_dir = tmp_path_factory.mktemp("nccl")
    run_distributed(nccl_worker, world_size, str(out_dir), timeout=240, backend="nccl")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_nccl_matches_single_process(results, case):
    for per_rank in results:
        res = per_rank[case]
        assert res["shape_ok"]
        for key in ("output", "input_grad", "aux_loss", "replicated_grad", "expert_grad"):
            assert res[key] < TOL, (key, res[key])
        assert res["tokens_per_expert"] == res["tokens_per_expert_ref"]
