"""ReturnWeightedSampler and SkillItSampler follow their formulas."""
import pytest
import torch

from moemix.mix import ReturnWeightedSampler, SkillItSampler
from moemix.mix.samplers import trajectory_scores


def test_return_weighted_probabilities_equal_softmax_formula():
    returns = torch.tensor([1.0, 5.0, 3.0])
    ep = torch.tensor([0, 0, 1, 2, 2, 2])
    s = ReturnWeightedSampler(returns, ep, alpha=0.1)
    g_hat = (returns - 1) / 4
    w = torch.exp(g_hat[ep] / 0.1)
    assert torch.allclose(s.probabilities, (w / w.sum()).float())


def test_advantage_variant_subtracts_linear_value_of_initial_state():
    s0 = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    residual = torch.tensor([1.0, -1.0, -1.0, 1.0])  # orthogonal to [s0, 1]: what regression cannot explain
    returns = 2 * s0.squeeze(1) + 5 + residual
    scores = trajectory_scores(returns, variant="advantage", initial_states=s0)
    assert torch.allclose(scores, ((residual + 1) / 2).double(), atol=1e-9)


def test_return_weighted_sampler_draws_good_trajectories_more_and_is_deterministic():
    s = ReturnWeightedSampler.from_rewards(torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0, 1, 0, 1]),
                                           generator=torch.Generator().manual_seed(0))
    idx = torch.tensor(list(s))
    assert len(idx) == 4
    draws = s.sample(2000)
    assert (draws >= 2).float().mean() > 0.95
    a = ReturnWeightedSampler(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), generator=torch.Generator().manual_seed(3))
    b = ReturnWeightedSampler(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), generator=torch.Generator().manual_seed(3))
    assert list(a) == list(b)


def test_skill_it_weights_follow_formula_and_move_toward_lagging_group():
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    a = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    s = SkillItSampler(groups, skills_graph=a, eta=0.5, window=2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s.proportions, torch.full((3,), 1 / 3))
    s.update([1.0, 1.0, 1.0])
    p = s.update([1.0, 3.0, 1.0])  # group 1 lags
    total = torch.tensor([2.0, 4.0, 2.0], dtype=torch.float64)
    w = torch.exp(0.5 * (a.double() @ total))
    assert torch.allclose(p, (w / w.sum()).float())
    assert p[1] > p[2] and p[0] > p[2]  # group 0 gains through its link to group 1
    draws = s.sample(3000)
    share = torch.bincount(groups[draws], minlength=3).float() / 3000
    assert torch.allclose(share, p, atol=0.04)


def test_skill_it_window_forgets_old_losses():
    s = SkillItSampler(torch.tensor([0, 1]), window=1)
    s.update([10.0, 0.0])
    p = s.update([0.0, 0.0])
    assert torch.allclose(p, torch.tensor([0.5, 0.5]))


def test_return_weighted_sampler_drives_a_torchrl_replay_buffer():
    import pytest

    rb_mod = pytest.importorskip("torchrl.data")
    from tensordict import TensorDict

    rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    dones = torch.tensor([0, 1, 0, 1, 0, 1])
    s = ReturnWeightedSampler.from_rewards(rewards, dones, generator=torch.Generator().manual_seed(0))
    buffer = rb_mod.ReplayBuffer(storage=rb_mod.LazyTensorStorage(6), sampler=s.as_torchrl_sampler(), batch_size=500)
    buffer.extend(TensorDict({"obs": torch.arange(6.0), "reward": rewards}, batch_size=[6]))
    batch = buffer.sample()
    assert batch.batch_size == torch.Size([500])
    assert torch.isin(batch["obs"], torch.tensor([2.0, 3.0])).float().mean() > 0.9  # the rewarded episode
    state = buffer.sampler.state_dict()
    assert torch.equal(state["probabilities"], s.probabilities)


def test_an_exact_value_fit_leaves_uniform_scores_not_rounding_noise():
    torch.manual_seed(0)
    returns, states = torch.randn(50), torch.randn(50, 60)  # E <= S + 1: least squares fits every return
    scores = trajectory_scores(returns, variant="advantage", initial_states=states)
    assert torch.equal(scores, torch.zeros(50, dtype=scores.dtype))


def test_return_weighted_sampler_names_bad_arguments():
    with pytest.raises(ValueError, match="returns must be finite"):
        ReturnWeightedSampler(torch.tensor([1.0, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_samples must be a positive whole number"):
        ReturnWeightedSampler(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), num_samples=-3)
    with pytest.raises(ValueError, match="num_samples=5 exceeds the 2 transitions"):
        ReturnWeightedSampler(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), num_samples=5, replacement=False)


def test_skill_it_state_round_trip_resumes_the_same_mixture_and_bad_values_raise():
    sampler = SkillItSampler(torch.tensor([0, 1, 2, 0, 1, 2]), eta=0.5, window=2)
    for losses in ([1.0, 2.0, 0.5], [1.5, 1.0, 0.2], [0.3, 2.5, 1.0]):
        sampler.update(losses)
    resumed = SkillItSampler(torch.tensor([0, 1, 2, 0, 1, 2]), eta=0.5, window=2)
    resumed.load_state_dict(sampler.state_dict())
    assert torch.equal(resumed.proportions, sampler.proportions)
    assert torch.equal(resumed.update([1.0, 1.0, 1.0]), sampler.update([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="val_losses must be finite"):
        sampler.update([1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="eta must be a finite number"):
        SkillItSampler(torch.tensor([0, 1]), eta=float("inf"))
    with pytest.raises(ValueError, match="window must be an integer"):
        SkillItSampler(torch.tensor([0, 1]), window=1.5)
    with pytest.raises(ValueError, match="window=2, this sampler 3"):
        SkillItSampler(torch.tensor([0, 1, 2])).load_state_dict(sampler.state_dict())


def test_plain_return_scores_keep_small_spreads():
    scores = trajectory_scores(torch.tensor([1e6, 1e6 + 1e-4], dtype=torch.float64))
    assert scores.tolist() == [0.0, 1.0]
