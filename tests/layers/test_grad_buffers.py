"""Recycled weight-gradient buffers: reused only when nothing else can see them."""
import copy
import pickle

import pytest
import torch

from moemix.layers import SparseMoE
from moemix.layers.grad_buffers import GradBuffer


def test_take_reuses_only_released_storage():
    buf, like = GradBuffer(), torch.empty(4, 8)
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
    buf = GradBuffer()
    buf.take(torch.empty(3, 3))  # released at once: free, but too small for the next request
    bigger = buf.take(torch.empty(4, 4))
    assert bigger.shape == (4, 4) and bigger.untyped_storage().nbytes() == 4 * 16


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


def test_copies_start_without_a_buffer():
    moe = SparseMoE(16, 32, num_experts=4, k=2, dispatch_layout="loop")
    _step(moe, torch.randn(8, 16))
    moe.zero_grad(set_to_none=True)
    for clone in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        assert all(b._storage is None for b in clone.experts._grad_buffers)
        _step(clone, torch.randn(8, 16))
        assert clone.experts.w1.grad is not None


def test_release_grad_buffers_gives_the_memory_back():
    moe = SparseMoE(16, 32, num_experts=4, k=2, dispatch_layout="loop")
    _step(moe, torch.randn(8, 16))
    moe.zero_grad(set_to_none=True)
    moe.experts.release_grad_buffers()
    assert all(b._storage is None for b in moe.experts._grad_buffers)
    _step(moe, torch.randn(8, 16))  # the next backward allocates and keeps a buffer again
    assert all(b._storage is not None for b in moe.experts._grad_buffers)
    assert torch.isfinite(moe.experts.w1.grad).all()
