import torch
from hypothesis import given, settings, strategies as st

from moemix.layers import SparseMoE, plan_dispatch
from tests.layers._reference import reference_moe


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(0, 40), experts=st.integers(1, 9), data=st.data(),
       lead=st.sampled_from([(), (2,), (1, 3)]), glu=st.booleans())
def test_sparse_moe_matches_reference_for_any_shape(tokens, experts, data, lead, glu):
    k = data.draw(st.integers(1, experts))
    torch.manual_seed(tokens * 131 + experts)
    moe = SparseMoE(6, 5, 4, num_experts=experts, k=k, glu=glu).double()
    x = torch.randn(*lead, tokens, 6, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    assert y.shape == (*lead, tokens, 4)
    torch.testing.assert_close(y, reference_moe(moe, x), atol=1e-6, rtol=1e-6)
    assert int(moe.tokens_per_expert.sum()) == x[..., 0].numel() * k
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@settings(max_examples=50, deadline=None)
@given(tokens=st.integers(0, 30), experts=st.integers(1, 8), data=st.data())
def test_plan_is_a_stable_sort_by_expert(tokens, experts, data):
    k = data.draw(st.integers(1, experts))
    indices = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)]) if tokens else torch.zeros(0, k, dtype=torch.long)
    plan = plan_dispatch(indices, experts)
    flat = indices.reshape(-1)
    sorted_ids = flat[plan.order]
    assert torch.all(sorted_ids[1:] >= sorted_ids[:-1])
    assert torch.equal(plan.order[plan.inverse], torch.arange(flat.numel()))
    assert plan.counts == torch.bincount(flat, minlength=experts).tolist()
