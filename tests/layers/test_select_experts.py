"""RoutedExperts.select_experts: a subset of the experts as experts of their own (what expert parallelism shards)."""
import pytest
import torch
from torch import nn

from moemix.layers import GroupedExperts, RoutedExperts, grouped_matmul, plan_dispatch


class ScaledLinear(RoutedExperts):
    """A ``[D, D']`` matrix and an output scale (a buffer) per expert; ``extra`` is an optional extra tensor."""

    def __init__(self, num_experts=4, in_features=6, out_features=3, extra=None):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.randn(num_experts, in_features, out_features))
        self.register_buffer("scale", torch.arange(1.0, num_experts + 1))
        if extra is not None:
            self.register_buffer("extra", extra)

    def forward(self, rows, plan):
        return grouped_matmul(rows, self.weight, plan) * self.scale[plan.row_expert(), None]


def test_grouped_experts_subset_holds_copies_of_the_slices():
    torch.manual_seed(0)
    full = GroupedExperts(6, 8, 16, glu=True, bias=(True, False), act_layer="silu")
    part = full.select_experts(2, 5)
    assert part.num_experts == 3 and part.b2 is None and part.glu
    for name in ("w1", "b1", "w2"):
        mine, theirs = getattr(part, name), getattr(full, name)
        assert isinstance(mine, nn.Parameter) and mine.requires_grad
        assert torch.equal(mine, theirs[2:5])
        assert mine.untyped_storage().data_ptr() != theirs.untyped_storage().data_ptr()  # a copy, not a view
    assert full.num_experts == 6 and full.w1.shape[0] == 6  # the full experts are unchanged


def test_grouped_experts_subset_computes_the_selected_experts():
    torch.manual_seed(0)
    full = GroupedExperts(5, 8, 16, act_layer="gelu")
    part = full.select_experts(1, 4)
    ids = torch.tensor([[1], [1], [1], [3], [3]])  # experts 1 and 3 of the full set: 0 and 2 of the part
    rows = torch.randn(5, 8)
    torch.testing.assert_close(part(rows, plan_dispatch(ids - 1, 3, layout="sorted")),
                               full(rows, plan_dispatch(ids, 5, layout="sorted")), rtol=0, atol=0)


def test_stacked_buffers_are_sliced_frozen_parameters_stay_frozen():
    experts = ScaledLinear()
    experts.weight.requires_grad_(False)
    part = experts.select_experts(1, 3)
    assert part.scale.tolist() == [2.0, 3.0] and not isinstance(part.scale, nn.Parameter)
    assert not part.weight.requires_grad
    rows = torch.randn(5, 6)
    expected = torch.cat([rows[:2] @ experts.weight[1] * 2.0, rows[2:] @ experts.weight[2] * 3.0])
    plan = plan_dispatch(torch.tensor([[0], [0], [1], [1], [1]]), 2, layout="sorted")
    torch.testing.assert_close(part(rows, plan), expected)


def test_selection_draws_no_random_numbers():
    experts = GroupedExperts(4, 8, 16)
    state = torch.get_rng_state()
    experts.select_experts(0, 2)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("start, stop", [(2, 2), (-1, 2), (0, 5), (3, 1), (0.0, 2)])
def test_bad_range_raises(start, stop):
    with pytest.raises(ValueError, match=r"0 <= start < stop <= num_experts=4"):
        ScaledLinear().select_experts(start, stop)


def test_tensor_not_stacked_by_expert_raises_naming_it():
    with pytest.raises(ValueError, match=r"extra has shape \(3,\); override select_experts in ScaledLinear"):
        ScaledLinear(extra=torch.zeros(3)).select_experts(0, 2)


def test_submodule_with_parameters_raises_naming_it():
    experts = GroupedExperts(4, 8, 16, act_layer=nn.PReLU)  # one PReLU weight shared by all experts
    with pytest.raises(ValueError, match=r"cannot split the parameter act.weight"):
        experts.select_experts(0, 2)


def test_submodule_with_buffers_raises_naming_it():
    experts = ScaledLinear()
    experts.norm = nn.BatchNorm1d(3, affine=False)  # running statistics: a buffer of a submodule
    with pytest.raises(ValueError, match=r"cannot split the buffer norm.running_mean"):
        experts.select_experts(0, 2)
