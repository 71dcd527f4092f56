"""First-order-only backward for moemix's custom autograd functions."""
from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["first_order_backward"]


def first_order_backward(backward: Callable) -> Callable:
    """Decorate a custom ``autograd.Function.backward`` written without autograd of its own.

    The backward runs as usual when nothing differentiates it. Under ``create_graph=True`` (double
    backward, gradient penalties, Hessian-vector products) it raises. ``once_differentiable`` would
    instead hand back a gradient that is silently missing the second-order terms whenever
    ``torch.autograd.grad`` is asked for specific inputs.
    """
    name = backward.__qualname__.rsplit(".", 1)[0].lstrip("_")

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(f"moemix's {name} has first-order gradients only: differentiating its backward "
                               "(create_graph=True: double backward, gradient penalties, Hessian-vector products) "
                               "is not supported")
        return backward(ctx, *grads)

    return wrapper
