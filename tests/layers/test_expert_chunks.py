"""The fused loop runs experts with adjacent rows as one chunk (one gather, activation and scatter):
chunking follows row adjacency and the element budget, and every chunking gives the reference result."""
import pytest
import torch

from moemix.layers import SparseMoE
from moemix.layers import expert_loop
from moemix.layers.expert_loop import expert_chunks
from tests.layers._reference import assert_matches_reference


def _starts(counts):
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return starts


def test_adjacent_experts_share_a_chunk_within_the_budget(monkeypatch):
    monkeypatch.setattr(expert_loop, "CHUNK_MAX_ELEMENTS", 100)
    starts = _starts([3, 4, 0, 2, 5, 30])
    # width 10: 3+4+0+2 rows = 90 elements fit, adding expert 4's 5 rows would make 140
    assert expert_chunks([0, 1, 3, 4, 5], starts, 10) == [[0, 1, 3], [4], [5]]
    assert expert_chunks([0, 1, 3, 4, 5], starts, 1) == [[0, 1, 3, 4, 5]]
    # expert 5 alone is over the budget: it still runs, alone
    assert expert_chunks([5], starts, 10) == [[5]]


def test_experts_of_a_worker_group_that_are_not_adjacent_run_apart():
    starts = _starts([3, 4, 0, 2, 5])
    assert expert_chunks([0, 3, 4], starts, 1) == [[0], [3, 4]]   # expert 1's rows lie between 0 and 3
    assert expert_chunks([1, 3], starts, 1) == [[1, 3]]           # only the empty expert 2 between them


@pytest.mark.parametrize("budget", [1, 200, 1 << 30])  # every expert alone, a few per chunk, all in one
@pytest.mark.parametrize("kw", [
    dict(),
    dict(glu=True, act_layer="silu", bias=False),
    dict(glu=True, act_layer="gelu", bias=(True, False)),
    dict(act_layer="relu", bias=(False, True)),
    dict(capacity_factor=0.5),
])
def test_every_chunking_equals_the_reference(monkeypatch, budget, kw):
    monkeypatch.setattr(expert_loop, "CHUNK_MAX_ELEMENTS", budget)
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=6, k=2, dispatch_layout="loop", **kw).double()
    assert_matches_reference(moe, torch.randn(40, 16, dtype=torch.float64))


def test_inference_chunks_equal_training_forward(monkeypatch):
    monkeypatch.setattr(expert_loop, "CHUNK_MAX_ELEMENTS", 200)
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=6, k=2, dispatch_layout="loop", glu=True).double()
    x = torch.randn(40, 16, dtype=torch.float64)
    with torch.no_grad():
        no_grad = moe(x)
    torch.testing.assert_close(no_grad, moe(x).detach())
