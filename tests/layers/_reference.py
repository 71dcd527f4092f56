"""Straightforward reference implementations the fast layers are checked against."""
import torch


def reference_moe(moe, x):
    """Loop over experts with per-expert weight slices: y = sum_j w_j * expert_{i_j}(x)."""
    tokens = x.reshape(-1, moe.in_features)
    decision = moe.router(tokens)
    experts = moe.experts
    out = tokens.new_zeros(tokens.shape[0], moe.out_features)
    for e in range(moe.num_experts):
        rows, slot = torch.where(decision.indices == e)
        if decision.kept is not None:
            keep = decision.kept[rows, slot]
            rows, slot = rows[keep], slot[keep]
        if rows.numel() == 0:
            continue
        h = tokens[rows] @ experts.w1[e]
        if experts.b1 is not None:
            h = h + experts.b1[e]
        if experts.glu:
            hidden = h.shape[-1] // 2
            gate, up = h[:, :hidden], h[:, hidden:]
            h = experts.act(gate) * up
        else:
            h = experts.act(h)
        y = h @ experts.w2[e]
        if experts.b2 is not None:
            y = y + experts.b2[e]
        out = out.index_add(0, rows, y * decision.weights[rows, slot, None])
    return out.reshape(*x.shape[:-1], moe.out_features)


def output_and_grads(module, x, fn):
    """Output, input gradient and parameter gradients of ``fn(x)`` against a fixed random target."""
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * target).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_matches_reference(moe, x, tol=1e-5):
    """``moe``'s output and gradients equal :func:`reference_moe`'s on ``x``."""
    out, gx, gp = output_and_grads(moe, x, moe)
    ref_out, ref_gx, ref_gp = output_and_grads(moe, x, lambda t: reference_moe(moe, t))
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(gx, ref_gx, atol=tol, rtol=tol)
    for name, g in ref_gp.items():
        torch.testing.assert_close(gp[name], g, atol=tol, rtol=tol, msg=name)
