"""TanhNormalMixture: the exact mixture density, K = 1 is torchrl's TanhNormal, reparameterised gradients reach
the chosen component only, and torchrl's SAC and PPO losses run with it."""
import math

import pytest
import torch

pytest.importorskip("torchrl")
from torchrl.modules import TanhNormal  # noqa: E402

from moemix.rl import GMMPolicyHead, TanhNormalMixture, routing_target  # noqa: E402


def _params(batch=(3,), k=4, a=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, k, a, generator=g, dtype=torch.float64),
            torch.rand(*batch, k, a, generator=g, dtype=torch.float64) + 0.3,
            torch.randn(*batch, k, generator=g, dtype=torch.float64))


def test_log_prob_is_the_mixture_density_with_the_tanh_correction():
    loc, scale, logits = _params()
    dist = TanhNormalMixture(loc, scale, logits)
    y = torch.rand(3, 2, dtype=torch.float64) * 1.8 - 0.9
    u = torch.atanh(y)[:, None, :]  # the pre-tanh value, per component
    normal = torch.exp(-0.5 * ((u - loc) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))
    density = (torch.softmax(logits, -1) * (normal / (1 - y[:, None, :] ** 2)).prod(-1)).sum(-1)
    torch.testing.assert_close(dist.log_prob(y), density.log())


def test_one_component_is_torchrls_tanh_normal():
    loc, scale, logits = _params(k=1)
    ours = TanhNormalMixture(loc, scale, logits, low=-2.0, high=2.0)
    theirs = TanhNormal(loc[:, 0], scale[:, 0], low=-2.0, high=2.0)
    y = torch.rand(5, 3, 2, dtype=torch.float64) * 3.6 - 1.8
    torch.testing.assert_close(ours.log_prob(y), theirs.log_prob(y))
    torch.testing.assert_close(ours.deterministic_sample, theirs.deterministic_sample)
    assert ours.rsample((4,)).shape == theirs.rsample((4,)).shape == (4, 3, 2)


def test_rsample_gradients_reach_only_the_chosen_components_mean():
    loc, scale, logits = _params(batch=(), k=3, a=2)
    loc.requires_grad_()
    logits = torch.tensor([-30.0, 30.0, -30.0], dtype=torch.float64)  # always component 1
    action = TanhNormalMixture(loc, scale, logits).rsample()
    action.sum().backward()
    assert loc.grad[1].abs().sum() > 0 and loc.grad[[0, 2]].abs().sum() == 0
    assert action.shape == (2,) and bool((action.abs() < 1).all())


def test_shapes_sampling_and_entropy():
    loc, scale, logits = _params(batch=(6,), k=4, a=3)
    dist = TanhNormalMixture(loc, scale, logits)
    assert dist.batch_shape == (6,) and dist.event_shape == (3,)
    assert dist.sample((7,)).shape == (7, 6, 3) and dist.log_prob(dist.sample((7,))).shape == (7, 6)
    entropy = dist.entropy(num_samples=4000)
    reference = -dist.log_prob(dist.sample((4000,))).mean(0)
    torch.testing.assert_close(entropy, reference, atol=0.15, rtol=0)
    assert dist.deterministic_sample.shape == (6, 3)


def test_bad_shapes_are_refused():
    loc, scale, logits = _params()
    with pytest.raises(ValueError, match=r"logits \[\.\.\., K\]"):
        TanhNormalMixture(loc, scale, logits[..., :2])


def test_policy_head_routes_on_detached_features():
    head = GMMPolicyHead(8, action_dim=2, num_components=4)
    features = torch.randn(5, 8, requires_grad=True)
    loc, scale, logits = head(features)
    assert loc.shape == scale.shape == (5, 4, 2) and logits.shape == (5, 4) and bool((scale > 0).all())
    logits.sum().backward()
    assert features.grad is None and head.routing.weight.grad is not None
    assert torch.equal(routing_target(torch.tensor([[1.0, 3.0, 2.0]])), torch.tensor([[0.0, 1.0, 0.0]]))


def _actor(obs_dim=3, action_dim=2, k=3):
    from tensordict.nn import TensorDictModule
    from torchrl.modules import ProbabilisticActor

    net = torch.nn.Sequential(torch.nn.Linear(obs_dim, 16), torch.nn.Tanh(), GMMPolicyHead(16, action_dim, k))
    module = TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale", "logits"])
    return ProbabilisticActor(module, in_keys=["loc", "scale", "logits"], distribution_class=TanhNormalMixture,
                              return_log_prob=True)


def _batch(n=8, obs_dim=3, action_dim=2):
    from tensordict import TensorDict

    return TensorDict({"observation": torch.randn(n, obs_dim), "action": torch.rand(n, action_dim) * 1.8 - 0.9,
                       "next": {"observation": torch.randn(n, obs_dim), "reward": torch.randn(n, 1),
                                "done": torch.zeros(n, 1, dtype=torch.bool),
                                "terminated": torch.zeros(n, 1, dtype=torch.bool)}}, batch_size=[n])


def test_torchrl_sac_loss_runs_with_the_mixture_actor():
    from torchrl.modules import MLP, ValueOperator
    from torchrl.objectives import SACLoss

    actor = _actor()
    qnet = ValueOperator(MLP(in_features=5, out_features=1, num_cells=[16]), in_keys=["observation", "action"])
    from torchrl.data import Bounded

    loss = SACLoss(actor, qnet, num_qvalue_nets=2, action_spec=Bounded(-1.0, 1.0, shape=(2,)))
    out = loss(_batch())
    total = out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]
    total.backward()
    assert torch.isfinite(total) and any(p.grad is not None for p in actor.parameters())


def test_torchrl_clip_ppo_loss_runs_with_the_mixture_actor():
    from torchrl.modules import ValueOperator
    from torchrl.objectives import ClipPPOLoss

    actor = _actor()
    critic = ValueOperator(torch.nn.Linear(3, 1), in_keys=["observation"])
    batch = _batch()
    with torch.no_grad():
        dist = actor.get_dist(batch)
        batch["action_log_prob"] = dist.log_prob(batch["action"])
    batch["advantage"], batch["value_target"] = torch.randn(8, 1), torch.randn(8, 1)
    out = ClipPPOLoss(actor, critic, entropy_coeff=0.01)(batch)
    total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(out["entropy"])


def test_inside_scoring_sampled_primitive_the_draw_is_scored_by_its_primitive():
    from moemix.rl import scoring_sampled_primitive

    loc = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)  # two primitives, one action dimension
    dist = TanhNormalMixture(loc, torch.full((2, 1), 0.1, dtype=torch.float64),
                             torch.tensor([30.0, -30.0], dtype=torch.float64))  # always primitive 0
    action, mixture_lp = dist.rsample_and_log_prob()
    torch.testing.assert_close(mixture_lp, dist.log_prob(action))
    with scoring_sampled_primitive():
        action, primitive_lp = dist.rsample_and_log_prob()
    torch.testing.assert_close(primitive_lp, dist.component_log_prob(action.expand(2, 1))[0])
