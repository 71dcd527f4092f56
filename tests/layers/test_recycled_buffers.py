"""Recycled buffers (weight gradients, saved activations): reused only when nothing else can see them."""
import copy
import pickle

import pytest
import torch

from moemix.layers import SparseMoE
from moemix.layers.recycled_buffers import RecycledBuffer, RecycledPool


def test_take_reuses_only_released_storage():
    buf, like = RecycledBuffer(), torch.empty(4, 8)
    first = buf.take(like)
    second = buf.take(like)  # `first` is alive: a fresh buffer, which the cache now tracks
    assert second.data_ptr() != first.data_ptr()
    view = second[1:]
    del second
    third = buf.take(like)  # a view keeps `second`'s memory alive: fresh again
    assert third.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()
    assert third.shape == like.shape and third.is_contiguous()
    ptr = third.data_ptr()
    del view, third
    assert buf.take(like).data_ptr() == ptr  # nobody holds `third` any more: reused


def test_take_allocates_for_another_size():
    buf = RecycledBuffer()
    buf.take(torch.empty(3, 3))  # released at once: free, but too small for the next request
    bigger = buf.take(torch.empty(4, 4))
    assert bigger.shape == (4, 4) and bigger.untyped_storage().nbytes() == 4 * 16


def test_take_shape_reuses_a_larger_free_buffer_and_leaves_headroom():
    buf = RecycledBuffer()
    first = buf.take_shape((10,), torch.float32, "cpu", headroom=1.5)
    assert first.untyped_storage().nbytes() == 60
    ptr = first.data_ptr()
    del first
    smaller = buf.take_shape((3, 4), torch.float32, "cpu")
    assert smaller.data_ptr() == ptr and smaller.shape == (3, 4)
    del smaller
    assert buf.take_shape((16,), torch.float32, "cpu").data_ptr() != ptr  # too small now: a new one


def test_fused_loop_reuses_its_saved_activation_memory_and_never_while_a_backward_is_pending():
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=4, k=2, dispatch_layout="loop").double()
    x = torch.randn(64, 16, dtype=torch.float64)
    _step(moe, x)
    workspace = moe.experts._workspace
    ptr = workspace._storage.data_ptr()
    _step(moe, x)
    assert workspace._storage.data_ptr() == ptr  # the last backward let it go: reused
    moe.zero_grad()
    ref = torch.autograd.grad(moe(x).square().sum() + moe(2 * x).square().sum(), moe.experts.w1)[0]
    moe.zero_grad()
    first = moe(x).square().sum()
    held = workspace._storage.data_ptr()
    second = moe(2 * x).square().sum()  # the first forward still holds its activations: a fresh buffer
    assert workspace._storage.data_ptr() != held
    grad = torch.autograd.grad(first, moe.experts.w1)[0] + torch.autograd.grad(second, moe.experts.w1)[0]
    torch.testing.assert_close(grad, ref)


def _step(moe, x):
    moe(x).square().sum().backward()


@pytest.mark.parametrize("layout", ["loop", "sorted"])
def test_layer_reuses_gradient_memory_after_zero_grad(layout):
    torch.manual_seed(0)
    moe = SparseMoE(16, 32, num_experts=4, k=2, dispatch_layout=layout, aux_loss_coef=0.0, z_loss_coef=0.0)
    x = torch.randn(40, 16)
    _step(moe, x)
    ptr, expected = moe.experts.w1.grad.data_ptr(), moe.experts.w1.grad.clone()
    moe.zero_grad(set_to_none=True)
    _step(moe, x)
    assert moe.experts.w1.grad.data_ptr() == ptr
    torch.testing.assert_close(moe.experts.w1.grad, expected)


@pytest.mark.parametrize("layout", ["loop", "sorted"])
def test_live_gradients_are_never_overwritten(layout):
    torch.manual_seed(0)
    moe = SparseMoE(16, 32, num_experts=4, k=2, dispatch_layout=layout, aux_loss_coef=0.0, z_loss_coef=0.0)
    x1, x2 = torch.randn(40, 16), torch.randn(40, 16)
    (g1,) = torch.autograd.grad(moe(x1).square().sum(), moe.experts.w1)
    kept = g1.clone()
    (g2,) = torch.autograd.grad(moe(x2).square().sum(), moe.experts.w1)
    torch.testing.assert_close(g1, kept)  # the caller still holds g1: g2 must live elsewhere
    assert g2.data_ptr() != g1.data_ptr()
    # accumulation into an existing .grad (zero_grad(set_to_none=False) / gradient accumulation)
    _step(moe, x1)
    _step(moe, x1)
    torch.testing.assert_close(moe.experts.w1.grad, 2 * kept)


def test_pool_hands_out_the_smallest_free_fit_and_replaces_too_small_buffers():
    pool, f32 = RecycledPool(), torch.float32
    big = pool.take_shape((100,), f32, "cpu")
    small = pool.take_shape((10,), f32, "cpu")  # `big` is alive: a second buffer
    assert len(pool) == 2 and big.data_ptr() != small.data_ptr()
    del big, small
    fit = pool.take_shape((8,), f32, "cpu")  # both free: the smallest that fits
    assert fit.untyped_storage().nbytes() == 40
    assert pool.take_shape((50,), f32, "cpu").untyped_storage().nbytes() == 400
    held = pool.take_shape((200,), f32, "cpu", headroom=2.0)  # only the held 40 bytes and a free 400: too small
    assert len(pool) == 2 and held.untyped_storage().nbytes() == 1600  # the 400 bytes made way
    assert pool.nbytes == 40 + 1600
    other = pool.take_shape((1,), f32, "cpu")  # everything is held: a third buffer
    assert len(pool) == 3 and len({fit.data_ptr(), held.data_ptr(), other.data_ptr()}) == 3


def _pool_pointers(moe):
    return sorted(s.data_ptr() for s in moe.experts._row_pool._storages)


@pytest.mark.parametrize("layout", ["padded", "sorted"])
@pytest.mark.parametrize("glu", [False, True])
def test_expert_buffer_rows_are_recycled_and_results_unchanged(layout, glu):
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=4, k=2, glu=glu, act_layer="silu", dispatch_layout=layout).double()
    fresh = copy.deepcopy(moe)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    for _ in range(2):  # the pool settles in the first steps (buffers grow where best fits change)
        moe.zero_grad(set_to_none=True)
        _step(moe, x)
    kept = _pool_pointers(moe)
    assert len(kept) >= 3
    for inputs in (x, x, 3 * x.flip(1)):  # the same routing twice, then other sizes
        moe.zero_grad(set_to_none=True)
        _step(moe, inputs)
        if inputs is x:  # the same sizes: the same buffers, none added
            assert _pool_pointers(moe) == kept
        fresh.zero_grad(set_to_none=True)
        fresh.experts.release_buffers()  # the same step with freshly allocated rows
        _step(fresh, inputs)
        for p, q in zip(moe.parameters(), fresh.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["padded", "sorted"])
def test_expert_buffer_rows_of_a_pending_backward_are_never_reused(layout):
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=4, k=2, glu=True, act_layer="silu", dispatch_layout=layout,
                    aux_loss_coef=0.0, z_loss_coef=0.0).double()
    x1, x2 = torch.randn(30, 16, dtype=torch.float64), torch.randn(30, 16, dtype=torch.float64)
    _step(moe, x1)  # the buffers now exist and are free
    params = list(moe.parameters())
    ref = [a + b for a, b in zip(torch.autograd.grad(moe(x1).square().sum(), params),
                                 torch.autograd.grad(moe(x2).square().sum(), params))]
    y1, y2 = moe(x1), moe(x2)  # two graphs alive at once: the second forward must not take the first's rows
    kept = y1.detach().clone()
    grads = [a + b for a, b in zip(torch.autograd.grad(y2.square().sum(), params),
                                   torch.autograd.grad(y1.square().sum(), params))]
    torch.testing.assert_close(y1, kept)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


def test_copies_start_without_a_buffer():
    moe = SparseMoE(16, 32, num_experts=4, k=2, dispatch_layout="loop")
    _step(moe, torch.randn(8, 16))
    moe.zero_grad(set_to_none=True)
    for clone in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        assert all(b._storage is None for b in clone.experts._grad_buffers)
        assert clone.experts._workspace._storage is None
        assert len(clone.experts._row_pool) == 0
        _step(clone, torch.randn(8, 16))
        assert clone.experts.w1.grad is not None


def test_release_buffers_gives_the_memory_back():
    moe = SparseMoE(16, 32, num_experts=4, k=2, dispatch_layout="loop")
    _step(moe, torch.randn(8, 16))
    moe.zero_grad(set_to_none=True)
    moe.experts.release_buffers()
    assert all(b._storage is None for b in moe.experts._grad_buffers)
    assert moe.experts._workspace._storage is None
    assert len(moe.experts._row_pool) == 0
    _step(moe, torch.randn(8, 16))  # the next backward allocates and keeps a buffer again
    assert all(b._storage is not None for b in moe.experts._grad_buffers)
    assert torch.isfinite(moe.experts.w1.grad).all()
