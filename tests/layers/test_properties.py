import pytest
import torch
from hypothesis import given, settings, strategies as st

from moemix.layers import MoELayer, SparseMoE, TopKRouter, plan_dispatch
from tests.layers._reference import reference_moe


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(0, 40), experts=st.integers(1, 9), data=st.data(),
       lead=st.sampled_from([(), (2,), (1, 3)]), glu=st.booleans())
def test_sparse_moe_matches_reference_for_any_shape(tokens, experts, data, lead, glu):
    k = data.draw(st.integers(1, experts))
    layout = data.draw(st.sampled_from(["sorted", "padded", "auto"]))
    capacity_factor = None if layout == "padded" else data.draw(st.sampled_from([None, 0.5, 1.0, 2.0]))
    torch.manual_seed(tokens * 131 + experts)
    moe = SparseMoE(6, 5, 4, num_experts=experts, k=k, glu=glu, dispatch_layout=layout,
                    capacity_factor=capacity_factor).double()
    x = torch.randn(*lead, tokens, 6, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    assert y.shape == (*lead, tokens, 4)
    assert int(moe.tokens_per_expert.sum()) + moe.dropped_tokens == x[..., 0].numel() * k
    if capacity_factor is None:
        assert moe.dropped_tokens == 0
    ref = reference_moe(moe, x)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    for got, want in zip(_grads(y, x, moe), _grads(ref, x, moe)):  # None: took no part in the output
        if got is None or want is None:
            assert (got is None or not got.any()) and (want is None or not want.any())
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _grads(out, x, moe):
    """Gradients of ``sum(out^2)`` for ``x`` and every parameter (all None when nothing reaches ``out``:
    no tokens, or every assignment dropped)."""
    inputs = [x, *moe.parameters()]
    if not out.requires_grad:
        return [None] * len(inputs)
    return torch.autograd.grad(out.square().sum(), inputs, allow_unused=True)


@settings(max_examples=50, deadline=None)
@given(tokens=st.integers(0, 30), experts=st.integers(1, 8), data=st.data(),
       layout=st.sampled_from(["sorted", "padded", "grouped_mm", "auto"]))
def test_plan_puts_every_assignment_in_its_experts_rows(tokens, experts, data, layout):
    k = data.draw(st.integers(1, experts))
    indices = (torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)]) if tokens
               else torch.zeros(0, k, dtype=torch.long))
    plan = plan_dispatch(indices, experts, layout=layout)
    assert plan.slot.shape == indices.shape
    slot = plan.slot.reshape(-1)
    flat = indices.reshape(-1)
    counts = torch.bincount(flat, minlength=experts)
    assert plan.counts == counts.tolist()
    assert len(set(slot.tolist())) == flat.numel()  # distinct rows
    if plan.layout == "padded":
        assert plan.num_rows == experts * max(plan.counts, default=0)
        owner = slot // max(plan.capacity, 1)
    else:
        assert plan.num_rows == flat.numel()
        starts = torch.cumsum(counts, 0) - counts
        owner = torch.searchsorted(starts + counts, slot, right=True)
        for start, n in zip(starts.tolist(), counts.tolist()):  # stable: each expert's tokens in order
            assert torch.all(torch.diff(plan.row_token[start:start + n]) >= 0)
    assert torch.equal(owner, flat)
    assert torch.equal(plan.row_expert()[slot], flat)
    assert torch.equal(plan.row_token[slot], torch.arange(flat.numel()) // k)
    if plan.layout == "grouped_mm":
        assert plan.offsets.tolist() == torch.cumsum(counts, 0).tolist()
    else:
        assert plan.offsets is None


@pytest.mark.filterwarnings("ignore:capacity_factor=.* gives every expert a capacity of 0")  # drawn on purpose
@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(0, 40), experts=st.integers(1, 9), data=st.data())
def test_moe_layer_with_own_experts_matches_reference_for_any_shape(tokens, experts, data):
    from tests.layers.test_moe_layer import LinearExperts

    k = data.draw(st.integers(1, experts))
    layout = data.draw(st.sampled_from(["sorted", "padded", "auto"]))
    capacity_factor = None if layout == "padded" else data.draw(st.sampled_from([None, 0.5, 1.0]))
    torch.manual_seed(tokens * 131 + experts)
    layer = MoELayer(TopKRouter(6, experts, k, capacity_factor=capacity_factor), LinearExperts(experts, 6, 4),
                     dispatch_layout=layout).double()
    x = torch.randn(tokens, 6, dtype=torch.float64)
    y = layer(x)
    decision = layer.router(x)
    ref = x.new_zeros(tokens, 4)
    for j in range(k):  # the router zeroes the weights of dropped assignments
        chosen = layer.experts.weight[decision.indices[:, j]]  # [T, D, D']
        ref = ref + decision.weights[:, j, None] * torch.einsum("td,tdo->to", x, chosen)
    torch.testing.assert_close(y, ref, atol=1e-9, rtol=1e-9)
    assert int(layer.tokens_per_expert.sum()) + layer.dropped_tokens == tokens * k
