"""PMOE's SAC estimator: the best primitive by min(Q1, Q2) is back-propagated and is the routing target."""
import pytest
import torch

pytest.importorskip("torchrl")
from tensordict import TensorDict  # noqa: E402
from tensordict.nn import TensorDictModule  # noqa: E402
from torchrl.data import Bounded  # noqa: E402
from torchrl.modules import ProbabilisticActor, ValueOperator  # noqa: E402

from moemix.rl import PMOESACLoss, TanhNormalMixture  # noqa: E402


class FixedPrimitives(torch.nn.Module):
    """K primitives at fixed squashed means (tiny scale) and learnable routing logits."""

    def __init__(self, means):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.atanh(torch.tensor(means)).unsqueeze(-1))  # [K, 1]
        self.logits = torch.nn.Parameter(torch.zeros(len(means)))

    def forward(self, obs):
        batch = obs.shape[:-1]
        return (self.loc.expand(*batch, -1, -1), torch.full((*batch, len(self.logits), 1), 1e-3),
                self.logits.expand(*batch, -1))


class PeakedQ(torch.nn.Module):
    """Q(s, a) = -(a - 0.5)^2: the primitive nearest 0.5 is the best."""

    def forward(self, obs, action):
        return -(action - 0.5) ** 2


def _loss(means=(-0.8, 0.45, 0.9)):
    actor = ProbabilisticActor(TensorDictModule(FixedPrimitives(list(means)), in_keys=["observation"],
                                                out_keys=["loc", "scale", "logits"]),
                               in_keys=["loc", "scale", "logits"], distribution_class=TanhNormalMixture)
    qnet = ValueOperator(PeakedQ(), in_keys=["observation", "action"])
    return PMOESACLoss(actor, qnet, num_qvalue_nets=2, action_spec=Bounded(-1.0, 1.0, shape=(1,))), actor


def _batch(n=16):
    return TensorDict({"observation": torch.randn(n, 3), "action": torch.rand(n, 1) * 1.8 - 0.9,
                       "next": {"observation": torch.randn(n, 3), "reward": torch.randn(n, 1),
                                "done": torch.zeros(n, 1, dtype=torch.bool),
                                "terminated": torch.zeros(n, 1, dtype=torch.bool)}}, batch_size=[n])


def test_the_best_primitive_is_chosen_and_is_the_one_hot_routing_target():
    torch.manual_seed(0)
    loss, actor = _loss()
    out = loss(_batch())
    assert torch.equal(out["best_primitive_share"], torch.tensor([0.0, 1.0, 0.0]))
    # uniform routing weights (1/3 each) against one-hot(1): MSE = ((1/3)^2 * 2 + (2/3)^2) / 3
    torch.testing.assert_close(out["routing_loss"], torch.tensor(2 / 9))
    out["loss_actor"].backward()
    grad = actor.module[0].module.loc.grad.squeeze(-1)
    assert grad[1] != 0 and grad[0] == 0 and grad[2] == 0  # only the chosen primitive is back-propagated
    logits_grad = actor.module[0].module.logits.grad
    assert logits_grad[1] < 0 < logits_grad[0]  # the routing moves toward the best primitive


def test_a_training_step_is_finite():
    torch.manual_seed(0)
    loss, _ = _loss()
    out = loss(_batch())
    total = out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]
    assert torch.isfinite(total)


def test_a_non_mixture_actor_is_refused():
    from tensordict.nn import NormalParamExtractor
    from torchrl.modules import TanhNormal

    net = TensorDictModule(torch.nn.Sequential(torch.nn.Linear(3, 2), NormalParamExtractor()),
                           in_keys=["observation"], out_keys=["loc", "scale"])
    actor = ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=TanhNormal)
    qnet = ValueOperator(PeakedQ(), in_keys=["observation", "action"])
    loss = PMOESACLoss(actor, qnet, action_spec=Bounded(-1.0, 1.0, shape=(1,)))
    with pytest.raises(TypeError, match="must produce a TanhNormalMixture"):
        loss(_batch())
