import multiprocessing
import threading
import weakref

import pytest
import torch
from torch import nn

from moemix.layers import SparseMoE
from moemix.layers import expert_workers as workers
from moemix.layers.expert_loop import fused_expert_mlp
from moemix.layers.expert_workers import expert_groups, plan_expert_groups, run_expert_groups, set_expert_workers
from tests.layers._reference import reference_moe

CPU = torch.device("cpu")
ROWS = workers.WORKERS_MIN_MEAN_ROWS
MACS = 16 * 48  # in_features x first-layer width of the small test layers


@pytest.fixture(autouse=True)
def few_experts_allowed(monkeypatch):
    """These tests use a handful of experts; the default rule keeps so few experts serial."""
    monkeypatch.setattr(workers, "WORKERS_MIN_EXPERTS", 2)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def serial():
    set_expert_workers(False)
    yield
    set_expert_workers(True)


def test_groups_balance_rows_and_cover_every_hit_expert_once():
    counts = [5, 0, 3, 3, 1, 9, 0, 2]
    groups = expert_groups(counts, 2)
    assert sorted(e for g in groups for e in g) == [0, 2, 3, 4, 5, 7]
    assert all(g == sorted(g) for g in groups)
    assert sorted(sum(counts[e] for e in g) for g in groups) == [11, 12]
    assert expert_groups(counts, 2) == groups  # depends on counts only


def test_groups_never_exceed_hit_experts_or_requested_number():
    assert expert_groups([0, 4, 0], 8) == [[1]]
    assert expert_groups([0, 0], 2) == []
    assert len(expert_groups([1] * 10, 3)) == 3
    assert expert_groups([7, 7, 7], 1) == [[0, 1, 2]]


def test_plan_uses_workers_only_where_measured_to_help(two_threads):
    assert len(plan_expert_groups(CPU, [ROWS] * 4, MACS)) == 2
    assert plan_expert_groups(torch.device("cuda"), [ROWS] * 4, MACS) == [[0, 1, 2, 3]]
    assert plan_expert_groups(CPU, [ROWS - 1] * 4, MACS) == [[0, 1, 2, 3]]  # too few rows per expert
    assert plan_expert_groups(CPU, [4 * ROWS, 0, 0], MACS) == [[0]]  # one hit expert
    assert plan_expert_groups(CPU, [6 * ROWS, ROWS, ROWS], MACS) == [[0, 1, 2]]  # one hot expert: groups unbalanced
    big = int(workers.WORKERS_MAX_EXPERT_MACS / ROWS) + 1
    assert plan_expert_groups(CPU, [ROWS] * 4, big) == [[0, 1, 2, 3]]  # GEMMs big enough for all threads
    torch.set_num_threads(1)
    assert plan_expert_groups(CPU, [ROWS] * 4, MACS) == [[0, 1, 2, 3]]


def test_few_experts_run_serially_under_the_default_rule(two_threads, monkeypatch):
    monkeypatch.setattr(workers, "WORKERS_MIN_EXPERTS", 32)
    assert plan_expert_groups(CPU, [ROWS] * 31, MACS) == [list(range(31))]
    assert len(plan_expert_groups(CPU, [ROWS] * 32, MACS)) == 2
    assert len(plan_expert_groups(CPU, [ROWS] * 32 + [0] * 8, MACS)) == 2  # hit experts count, not E


def test_workers_can_be_turned_off(two_threads, serial):
    assert not workers.expert_workers_enabled()
    assert plan_expert_groups(CPU, [ROWS] * 4, MACS) == [[0, 1, 2, 3]]
    names = run_expert_groups(lambda g: threading.current_thread().name, [[0], [1]])
    assert names == [threading.current_thread().name] * 2


def test_no_workers_under_the_profiler(two_threads):
    with torch.profiler.profile():
        assert plan_expert_groups(CPU, [ROWS] * 4, MACS) == [[0, 1, 2, 3]]
    assert len(plan_expert_groups(CPU, [ROWS] * 4, MACS)) == 2


def test_workers_run_single_threaded_without_grad_and_leave_thread_counts_alone(two_threads):
    seen = run_expert_groups(lambda g: (g, torch.get_num_threads(), torch.is_grad_enabled(),
                                        threading.current_thread().name), [[0], [1, 2]])
    assert [s[0] for s in seen] == [[0], [1, 2]]
    assert all(s[1] == 1 and not s[2] and s[3].startswith("moemix-expert") for s in seen)
    assert torch.get_num_threads() == 2
    assert workers._count_in_new_thread() == 2  # threads started afterwards still get the process-wide count


def test_every_group_finishes_before_an_error_is_raised(two_threads):
    finished = []

    def work(group):
        if group == [0]:
            raise ValueError("group 0 failed")
        threading.Event().wait(0.2)
        finished.append(group)

    with pytest.raises(ValueError, match="group 0 failed"):
        run_expert_groups(work, [[0], [1]])
    assert finished == [[1]]
    assert run_expert_groups(lambda g: g, [[0], [1]]) == [[0], [1]]  # the pool still works


def test_a_pool_that_cannot_be_set_up_is_not_used(two_threads, monkeypatch):
    monkeypatch.setattr(workers, "_pools", {})
    real = torch.set_num_threads

    def refuse_in_workers(n):
        if threading.current_thread().name.startswith("moemix-expert"):
            raise RuntimeError("cannot set the number of threads here")
        real(n)

    monkeypatch.setattr(torch, "set_num_threads", refuse_in_workers)
    assert plan_expert_groups(CPU, [ROWS] * 4, MACS) == [[0, 1, 2, 3]]
    assert workers._pools == {2: None}
    assert torch.get_num_threads() == 2
    names = run_expert_groups(lambda g: threading.current_thread().name, [[0], [1]])
    assert names == [threading.current_thread().name] * 2


def _grads(module, x, fn=None, x_grad=True):
    module.zero_grad()
    x = x.detach().clone().requires_grad_(x_grad)
    out = (fn or module)(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * target).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() if p.grad is not None else None for p in module.parameters()]


def _assert_all_close(got, want, tol):
    for a, b in zip(got, want, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)


class _ViewOfInput(nn.Identity):
    """Identity: the activation output is the saved pre-activation itself."""


@pytest.mark.parametrize("kw", [
    dict(k=2),
    dict(k=3, glu=True, bias=False, act_layer="silu"),
    dict(k=1, glu=True, act_layer="gelu"),
    dict(k=2, act_layer=lambda: nn.ReLU(inplace=True)),
    dict(k=2, act_layer="identity", bias=False),
    dict(k=2, out_features=40, glu=True, bias=False),  # hidden 24 <= out 40: the other weight-scaling branch
    dict(k=2, num_experts=6),
])
def test_loop_on_workers_equals_serial_loop_and_reference(two_threads, kw):
    torch.manual_seed(0)
    kw.setdefault("num_experts", 4)
    moe = SparseMoE(16, 24, dispatch_layout="loop", **kw).double()
    x = torch.randn(int(1.5 * ROWS * moe.num_experts / moe.k), 16, dtype=torch.float64)  # 1.5 * ROWS per expert
    moe(x)
    assert len(plan_expert_groups(CPU, moe.tokens_per_expert.tolist(), MACS)) == 2  # the workers are really used
    parallel = _grads(moe, x)
    set_expert_workers(False)
    try:
        serial = _grads(moe, x)
    finally:
        set_expert_workers(True)
    _assert_all_close(parallel, serial, 1e-10)
    _assert_all_close(parallel, _grads(moe, x, lambda t: reference_moe(moe, t)), 1e-8)


def test_empty_expert_next_to_busy_ones_gets_zero_gradient(two_threads):
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=5, k=1, dispatch_layout="loop").double()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:4, :4] = 5 * torch.eye(4, dtype=torch.float64)
        moe.router.weight[4, 15] = -100.0  # expert 4 never wins: feature 15 is always positive
    x = torch.randn(6 * ROWS, 16, dtype=torch.float64)
    x[:, 15] = 1.0
    moe(x)
    assert moe.tokens_per_expert[4] == 0
    assert len(plan_expert_groups(CPU, moe.tokens_per_expert.tolist(), MACS)) == 2
    _grads(moe, x)  # the first step fills the recycled gradient buffers
    moe.experts.w1.grad.fill_(1.0)
    moe.experts.w2.grad.fill_(1.0)
    moe.zero_grad()  # set to None: the next backward reuses those buffers
    _grads(moe, x)
    assert torch.count_nonzero(moe.experts.w1.grad[4]) == 0 and torch.count_nonzero(moe.experts.w2.grad[4]) == 0
    assert torch.count_nonzero(moe.experts.w1.grad[:4]) > 0


def test_frozen_parts_get_no_gradient_and_the_rest_is_unchanged(two_threads):
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=4, k=2, dispatch_layout="loop").double()
    x = torch.randn(3 * ROWS, 16, dtype=torch.float64)
    full = _grads(moe, x)
    moe.experts.w1.requires_grad_(False)
    moe.router.requires_grad_(False)
    frozen = _grads(moe, x, x_grad=False)
    names = [n for n, _ in moe.named_parameters()]
    assert frozen[1] is None
    for name, got, want in zip(names, frozen[2:], full[2:], strict=True):
        if name in ("experts.w1", "router.weight"):
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_nothing_is_kept_for_backward_without_gradients():
    x = torch.randn(600, 8)
    w1, w2 = torch.randn(2, 8, 6), torch.randn(2, 6, 8)
    order = torch.arange(600)
    kept = []
    original = torch.Tensor.index_select

    def spy(self, dim, index):
        out = original(self, dim, index)
        if self is x:
            kept.append(weakref.ref(out))
        return out

    torch.Tensor.index_select = spy
    try:
        with torch.no_grad():
            y = fused_expert_mlp(x, torch.ones(600, 1), order, [300, 300], 1, w1, None, w2, None, nn.GELU(), False)
    finally:
        torch.Tensor.index_select = original
    assert y.shape == (600, 8) and len(kept) == 2
    assert all(ref() is None for ref in kept)  # the gathered tokens were not saved


def test_fused_loop_refuses_activations_without_closed_form():
    with pytest.raises(ValueError, match="act must be a built-in activation"):
        fused_expert_mlp(torch.randn(4, 8), torch.ones(4, 1), torch.arange(4), [4], 1, torch.randn(1, 8, 6), None,
                         torch.randn(1, 6, 8), None, nn.Softplus(), False)


@pytest.mark.parametrize("act_layer", [nn.PReLU, nn.Softplus])
def test_loop_layout_with_other_activations_trains_them_through_autograd(act_layer):
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=4, k=2, act_layer=act_layer, dispatch_layout="loop").double()
    x = torch.randn(40, 16, dtype=torch.float64)
    _assert_all_close(_grads(moe, x), _grads(moe, x, lambda t: reference_moe(moe, t)), 1e-8)
    if act_layer is nn.PReLU:
        assert moe.experts.act.weight.grad is not None


def _child_step(queue):
    torch.set_num_threads(1)  # as DataLoader workers do: OpenMP cannot use the parent's threads after fork
    torch.manual_seed(0)
    moe = SparseMoE(8, 8, num_experts=2, k=1, dispatch_layout="loop")
    moe(torch.randn(4 * ROWS, 8)).sum().backward()
    queue.put((len(workers._pools), float(moe.experts.w1.grad.abs().sum())))


def test_a_forked_child_starts_without_the_parents_pools(two_threads):
    torch.manual_seed(0)
    moe = SparseMoE(8, 8, num_experts=2, k=1, dispatch_layout="loop")
    moe(torch.randn(4 * ROWS, 8)).sum().backward()
    assert workers._pools  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_step, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0
    pools, grad_sum = queue.get(timeout=5)
    assert pools == 0 and grad_sum > 0


@pytest.mark.parametrize("glu", [False, True])
def test_second_backward_through_the_loop_on_workers_recomputes_its_activations(two_threads, glu):
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=4, k=2, glu=glu, act_layer="silu", dispatch_layout="loop").double()
    x = torch.randn(3 * ROWS, 16, dtype=torch.float64, requires_grad=True)
    out = moe(x).square().sum()
    first = torch.autograd.grad(out, [x, moe.experts.w1, moe.router.weight], retain_graph=True)
    for _ in range(2):  # the kept activations went with the first backward; each further one recomputes them
        again = torch.autograd.grad(out, [x, moe.experts.w1, moe.router.weight], retain_graph=True)
        for a, b in zip(again, first):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_two_python_threads_share_the_workers(two_threads):
    torch.manual_seed(0)
    layers = [SparseMoE(16, 24, num_experts=4, k=2, dispatch_layout="loop").double() for _ in range(2)]
    inputs = [torch.randn(3 * ROWS, 16, dtype=torch.float64) for _ in range(2)]
    expected = [_grads(m, x) for m, x in zip(layers, inputs, strict=True)]
    results, errors = [None, None], []

    def train(i):
        try:
            torch.set_num_threads(2)
            results[i] = _grads(layers[i], inputs[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and all(r is not None for r in results)
    for got, want in zip(results, expected, strict=True):
        _assert_all_close(got, want, 1e-10)
