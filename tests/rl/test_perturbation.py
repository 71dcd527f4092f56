"""MENTOR's perturbation and DrM's dormant ratio: hand computations."""
import pytest
import torch
from torch import nn

from moemix.rl.perturbation import TaskOrientedPerturbation, dormant_ratio, perturbation_factor


def test_dormant_ratio_matches_a_hand_computation():
    layer = nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.001, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[2.0, -4.0], [-2.0, 4.0]])
    # scores |h| averaged over the batch: [2, 4, 0.002, 0]; mean 1.5005; tau * mean = 0.0375: two are dormant
    assert dormant_ratio(layer, x) == 0.5
    net = nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 4))
    with torch.no_grad():
        net[2].weight.fill_(1.0)
        net[2].bias.zero_()
    assert dormant_ratio(net, x) == 2 / 8  # the second layer's four neurons all score alike


def test_perturbation_moves_weights_to_the_snapshot_mean_by_the_clipped_factor_and_resets_the_optimiser():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Conv1d(1, 2, 3))
    keeper = TaskOrientedPerturbation(top_k=2)
    saved = {k: v.detach().clone() for k, v in keeper._weights(net).items()}
    assert keeper.offer(net, 10.0) and keeper.offer(net, 5.0)  # identical snapshots: std 0, phi = mean
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    opt = torch.optim.Adam(net.parameters())
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state
    before = {k: v.detach().clone() for k, v in keeper._weights(net).items()}
    bias_before = net[0].bias.detach().clone()
    a = keeper.perturb(net, ratio=0.3, optimizer=opt)
    assert a == pytest.approx(0.4) and not opt.state
    for k, w in keeper._weights(net).items():
        torch.testing.assert_close(w, 0.4 * before[k] + 0.6 * saved[k])
    assert torch.equal(net[0].bias, bias_before)  # biases are not perturbed


def test_snapshots_keep_the_best_episodes():
    net = nn.Linear(2, 2)
    keeper = TaskOrientedPerturbation(top_k=2)
    assert keeper.offer(net, 1.0) and keeper.offer(net, 3.0)
    assert not keeper.offer(net, 0.5)
    assert keeper.offer(net, 2.0)
    assert sorted(r for r, _ in keeper.snapshots) == [2.0, 3.0]


def test_factor_is_clipped():
    assert perturbation_factor(0.0) == 0.95 and perturbation_factor(0.9) == 0.2
    assert perturbation_factor(0.25) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="min_perturb=0.9 must be at most max_perturb=0.5"):
        TaskOrientedPerturbation(max_perturb=0.5, min_perturb=0.9)
