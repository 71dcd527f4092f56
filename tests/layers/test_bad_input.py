"""Bad input to the experts and the dispatch raises a ValueError that names what was expected."""
import pytest
import torch
from torch import nn

from moemix.layers import GroupedExperts, plan_dispatch


def test_grouped_experts_wrong_last_dimension_reports_expected_and_got():
    experts = GroupedExperts(2, 8, 16)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\].*got last dimension 7"):
        experts(torch.randn(5, 7), plan_dispatch(torch.tensor([[0], [0], [1], [1], [1]]), 2))


@pytest.mark.parametrize("experts, rows, match", [
    (3, 5, "plan must route to num_experts=2 experts, it has 3"),
    (2, 6, "x must have the plan's 5 rows, got 6"),
])
def test_grouped_experts_rows_must_be_the_plans_buffer(experts, rows, match):
    plan = plan_dispatch(torch.tensor([[0], [0], [1], [1], [1]]), experts, layout="sorted")
    with pytest.raises(ValueError, match=match):
        GroupedExperts(2, 8, 16)(torch.randn(rows, 8), plan)


@pytest.mark.parametrize("bad", [4, 5, -1])
def test_plan_dispatch_rejects_expert_ids_out_of_range(bad):
    indices = torch.tensor([[0, 1], [2, bad], [3, 0]])
    with pytest.raises(ValueError, match=r"num_experts=4"):
        plan_dispatch(indices, 4)
    with pytest.raises(ValueError, match=r"num_experts=4"):  # a kept id == E would pass for a dropped one
        plan_dispatch(indices, 4, kept=torch.ones_like(indices, dtype=torch.bool))


def test_load_dense_names_the_layer_that_does_not_fit():
    experts = GroupedExperts(2, 8, 16)
    with pytest.raises(ValueError, match=r"fc2\.weight must have shape \(8, 16\)"):
        experts.load_dense(nn.Linear(8, 16), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="fc1_up is only for GLU"):
        experts.load_dense(nn.Linear(8, 16), nn.Linear(16, 8), fc1_up=nn.Linear(8, 16))
    glu = GroupedExperts(2, 8, 16, glu=True)
    with pytest.raises(ValueError, match="GLU experts need fc1_up"):
        glu.load_dense(nn.Linear(8, 16), nn.Linear(16, 8))


def test_load_dense_refuses_a_bias_the_experts_cannot_hold():
    experts = GroupedExperts(2, 8, 16, bias=(True, False))
    with pytest.raises(ValueError, match="fc2 has a bias"):
        experts.load_dense(nn.Linear(8, 16), nn.Linear(16, 8))
    experts.load_dense(nn.Linear(8, 16), nn.Linear(16, 8, bias=False))  # fits


def test_load_dense_glu_with_one_biased_projection_fills_zeros():
    experts = GroupedExperts(2, 8, 16, glu=True)
    gate, up, down = nn.Linear(8, 16, bias=False), nn.Linear(8, 16), nn.Linear(16, 8)
    experts.load_dense(gate, down, fc1_up=up)
    assert torch.equal(experts.b1[1], torch.cat([torch.zeros(16), up.bias.detach()]))


def test_a_bad_drop_pair_names_its_element():
    with pytest.raises(ValueError, match=r"drop\[1\]"):
        GroupedExperts(2, 8, 16, drop=(0.1, 2.0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(glu="no"), "glu must be True or False"),
    (dict(bias=1), "bias must be True or False"),
    (dict(bias=(True, None)), r"bias\[1\] must be True or False"),
    (dict(drop=float("nan")), r"drop must be in \[0, 1\]"),
])
def test_grouped_experts_flags_must_be_booleans(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupedExperts(2, 8, 16, **kwargs)


def test_numpy_booleans_and_zero_dim_tensor_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    from moemix.layers import SparseMoE
    experts = GroupedExperts(2, 8, 16, glu=np.bool_(True), bias=(np.bool_(True), False))
    assert experts.glu is True and experts.b1 is not None and experts.b2 is None
    moe = SparseMoE(8, 16, num_experts=2, aux_loss_coef=torch.tensor(0.5), drop=np.float32(0.0))
    moe(torch.randn(3, 8))
    torch.testing.assert_close(moe.aux_loss, 0.5 * moe.aux_losses["loss_balance"] + 1e-3 * moe.aux_losses["loss_z"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(aux_loss_coef=float("inf")), "aux_loss_coef must be a finite number >= 0"),
    (dict(z_loss_coef=float("nan")), "z_loss_coef must be a finite number >= 0"),
    (dict(capacity_factor=float("inf")), "capacity_factor must be a finite number > 0"),
])
def test_sparse_moe_refuses_infinite_and_nan_coefficients(kwargs, match):
    from moemix.layers import SparseMoE
    with pytest.raises(ValueError, match=match):
        SparseMoE(8, 16, **kwargs)


def test_sparse_moe_refuses_arguments_without_effect_and_integer_input():
    from moemix.layers import SparseMoE
    with pytest.raises(ValueError, match="shared_hidden_features applies only with a shared_expert"):
        SparseMoE(8, 16, shared_hidden_features=4)
    with pytest.raises(ValueError, match="router_init_std must be a finite number >= 0"):
        SparseMoE(8, 16, router_init_std=-1.0)
    with pytest.raises(ValueError, match="SparseMoE expected a floating-point input, got dtype torch.int64"):
        SparseMoE(8, 16)(torch.ones(3, 8, dtype=torch.long))


def test_an_input_of_another_dtype_is_refused_at_the_layer_as_nn_linear_does():
    from moemix.layers import SparseMoE
    moe = SparseMoE(8, 16, num_experts=4, k=2)
    with pytest.raises(ValueError, match=r"SparseMoE expected input of dtype torch\.float32 \(its parameters'\), "
                                         r"got torch\.float16"):
        moe(torch.randn(3, 8).half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts, as for nn.Linear
        assert moe(torch.randn(3, 8)).dtype == torch.bfloat16


def test_meta_input_gives_the_output_shape_as_nn_linear_does():
    from moemix.layers import SparseMoE
    moe = SparseMoE(8, 16, num_experts=4, k=2, device="meta")
    y = moe(torch.empty(2, 5, 8, device="meta"))
    assert y.shape == (2, 5, 8) and y.device.type == "meta"
    assert moe.aux_loss.device.type == "meta"
