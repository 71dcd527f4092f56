import math

import pytest
import torch

from moemix.layers import SparseMoE
from moemix.losses import (cv_squared, importance_load_loss, load_balance_from_counts, load_balance_loss, router_entropy,
                           router_z_loss)


def test_load_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    indices = torch.tensor([[0, 1], [0, 1], [2, 0], [0, 1]])
    # f = counts / (T*k) = [4, 3, 1] / 8 ; P = column means = [0.475, 0.25, 0.275]
    expected = 3 * (4 / 8 * 0.475 + 3 / 8 * 0.25 + 1 / 8 * 0.275)
    assert math.isclose(load_balance_loss(probs, indices).item(), expected, rel_tol=1e-6)
    # Switch: first choice only: f = [3, 0, 1] / 4
    expected_top1 = 3 * (3 / 4 * 0.475 + 1 / 4 * 0.275)
    assert math.isclose(load_balance_loss(probs, indices, top1_only=True).item(), expected_top1, rel_tol=1e-6)


def test_load_balance_loss_is_one_when_uniform():
    probs = torch.full((4, 4), 0.25)
    indices = torch.arange(4).view(4, 1)
    assert math.isclose(load_balance_loss(probs, indices).item(), 1.0, rel_tol=1e-6)


def test_z_loss_formula():
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    expected = (math.log(math.e + math.e ** 2) ** 2 + math.log(2) ** 2) / 2
    assert math.isclose(router_z_loss(logits).item(), expected, rel_tol=1e-6)


def test_importance_load_loss_is_sum_of_cv_squared():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    indices = torch.tensor([[0], [0], [1]])
    importance = probs.sum(0)
    load = torch.tensor([2.0, 1.0])
    expected = importance.var(unbiased=False) / importance.mean() ** 2 + load.var(unbiased=False) / load.mean() ** 2
    assert math.isclose(importance_load_loss(probs, indices).item(), expected.item(), rel_tol=1e-5)
    assert cv_squared(torch.ones(5)).item() == 0.0


def test_entropy_of_uniform_router_is_log_e():
    assert math.isclose(router_entropy(torch.full((3, 8), 1 / 8)).item(), math.log(8), rel_tol=1e-6)


def test_collect_aux_loss_counts_a_compiled_layer_once():
    import torch
    from moemix.layers import SparseMoE
    from moemix.losses import collect_aux_loss

    moe = SparseMoE(8, 16, num_experts=4)
    compiled = torch.compile(moe, backend="eager")
    compiled(torch.randn(6, 8))
    torch.testing.assert_close(collect_aux_loss(compiled), moe.aux_loss)


@pytest.mark.parametrize("loss", [load_balance_loss, importance_load_loss])
def test_routing_losses_check_shapes_and_expert_ids(loss):
    probs = torch.rand(4, 3)
    with pytest.raises(ValueError, match="expert ids in \\[0, 3\\).*got id 5"):
        loss(probs, torch.tensor([[5], [0], [1], [2]]))
    with pytest.raises(ValueError, match="expert ids in \\[0, 3\\)"):
        loss(probs, torch.tensor([[-1], [0], [1], [2]]))
    with pytest.raises(ValueError, match="same T"):
        loss(probs, torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="same T"):
        loss(probs, torch.tensor([0, 1, 2, 0]))


def test_score_losses_want_t_by_e_and_a_positive_assignment_count():
    for loss, name in ((router_z_loss, "logits"), (router_entropy, "probs")):
        for bad in (torch.rand(3), torch.tensor(1.0)):
            with pytest.raises(ValueError, match=f"{name} must be \\[T, E\\]"):
                loss(bad)
        batched = torch.rand(2, 5, 3)  # [..., E] is taken as its rows
        torch.testing.assert_close(loss(batched), loss(batched.reshape(10, 3)))
    probs = torch.rand(4, 3)
    with pytest.raises(ValueError, match="num_assignments must be a positive integer"):
        load_balance_from_counts(probs, torch.tensor([1, 2, 1]), 0)
    with pytest.raises(ValueError, match="probs must be \\[T, E\\]"):
        load_balance_from_counts(torch.rand(3), torch.tensor([1, 2, 1]), 4)


def test_load_balance_from_counts_equals_the_loss_from_indices():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(10, 5), -1)
    indices = torch.topk(probs, 2, -1).indices
    counts = torch.bincount(indices.reshape(-1), minlength=5)
    torch.testing.assert_close(load_balance_from_counts(probs, counts, indices.numel()),
                               load_balance_loss(probs, indices))
    with pytest.raises(ValueError, match=r"counts must have shape \(5,\)"):
        load_balance_from_counts(probs, counts[:4], indices.numel())


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_sparse_moe_balance_loss_counts_the_routers_assignments(capacity_factor):
    """The layer reuses its plan's counts when nothing can be dropped; with drops it counts every choice."""
    torch.manual_seed(0)
    moe = SparseMoE(8, 16, num_experts=4, k=2, capacity_factor=capacity_factor).eval()
    x = torch.randn(30, 8)
    moe(x)
    decision = moe.router(x)
    if capacity_factor is not None:
        assert moe.dropped_tokens > 0
    want = load_balance_loss(decision.probs, decision.indices)
    torch.testing.assert_close(moe.aux_losses["loss_balance"], want)
    torch.testing.assert_close(moe.aux_loss, 1e-2 * want + 1e-3 * router_z_loss(decision.logits))
