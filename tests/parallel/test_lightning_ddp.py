"""Sharded experts inside Lightning's ``ddp`` strategy (2 CPU processes, gloo)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.parallel._dist import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("lightning_ddp")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV and not k.startswith("PL_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tests.parallel._lightning_ddp", str(out_dir)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


def test_configure_model_shards_the_moe_and_hides_experts_from_ddp(ranks):
    for res in ranks:
        assert (res["type"], res["experts_type"]) == ("SparseMoE", "ShardedExperts")  # sharded in place
        assert res["ignored"] == ["net.1.experts.local.b1", "net.1.experts.local.b2", "net.1.experts.local.w1",
                                  "net.1.experts.local.w2"]


def test_training_matches_single_process_replay_of_the_same_batches(ranks):
    for res in ranks:
        assert res["moved"] > 1e-2  # the steps changed the weights
        assert res["max_diff"] < 1e-5


def test_replicated_weights_stay_equal_and_expert_shards_differ_across_ranks(ranks):
    first, second = ranks
    for name, value in first["replicated"].items():
        assert torch.equal(value, second["replicated"][name]), name
    for name, value in first["experts"].items():
        assert not torch.allclose(value, second["experts"][name]), name


def test_lightnings_rank0_checkpoint_loads_on_rank_0_and_is_refused_on_rank_1(ranks):
    first, second = ranks
    assert first["rank0_checkpoint_load"] == "no error"
    assert "net.1.experts._extra_state: the checkpoint's shard holds experts 0..1 of 4 sharded over 2 ranks, " \
           "this rank's shard experts 2..3" in second["rank0_checkpoint_load"]
