import multiprocessing
import threading

import pytest
import torch
from torch import nn

from moemix.layers import SparseMoE
from moemix.layers import expert_workers as workers
from moemix.layers.expert_workers import expert_groups, expert_worker_count, run_expert_groups, set_expert_workers
from tests.layers._reference import reference_moe

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_groups_balance_rows_and_cover_every_hit_expert_once():
    counts = [5, 0, 3, 3, 1, 9, 0, 2]
    groups = expert_groups(counts, 2)
    assert sorted(e for g in groups for e in g) == [0, 2, 3, 4, 5, 7]
    assert all(g == sorted(g) for g in groups)
    loads = sorted(sum(counts[e] for e in g) for g in groups)
    assert loads == [11, 12]
    assert expert_groups(counts, 2) == groups  # depends on counts only


def test_groups_never_exceed_hit_experts_or_requested_number():
    assert expert_groups([0, 4, 0], 8) == [[1]]
    assert expert_groups([0, 0], 2) == []
    assert len(expert_groups([1] * 10, 3)) == 3
    assert expert_groups([7, 7, 7], 1) == [[0, 1, 2]]


def test_worker_count_rule(two_threads):
    many = [workers.WORKERS_MIN_MEAN_ROWS] * 4
    assert expert_worker_count(CPU, many) == 2
    assert expert_worker_count(torch.device("cuda"), many) == 1
    assert expert_worker_count(CPU, [workers.WORKERS_MIN_MEAN_ROWS - 1] * 4) == 1
    assert expert_worker_count(CPU, [4 * workers.WORKERS_MIN_MEAN_ROWS, 0, 0]) == 1  # one hit expert
    set_expert_workers(False)
    try:
        assert not workers.expert_workers_enabled()
        assert expert_worker_count(CPU, many) == 1
    finally:
        set_expert_workers(True)
    torch.set_num_threads(1)
    assert expert_worker_count(CPU, many) == 1


def test_workers_run_single_threaded_without_grad_and_leave_thread_counts_alone(two_threads):
    seen = run_expert_groups(lambda g: (g, torch.get_num_threads(), torch.is_grad_enabled(),
                                        threading.current_thread().name), [[0], [1, 2]])
    assert [s[0] for s in seen] == [[0], [1, 2]]
    assert all(s[1] == 1 and not s[2] and s[3].startswith("moemix-expert") for s in seen)
    assert torch.get_num_threads() == 2
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [2]  # threads started afterwards still get the process-wide count


def test_worker_errors_reach_the_caller(two_threads):
    def fail(group):
        raise ValueError(f"group {group}")

    with pytest.raises(ValueError, match="group"):
        run_expert_groups(fail, [[0], [1]])


def _grads(module, x, fn=None):
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = (fn or module)(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * target).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("kw", [
    dict(),
    dict(glu=True, bias=False, act_layer="silu"),
    dict(glu=True, act_layer=nn.Softplus),  # autograd on a recomputed forward inside a worker
    dict(act_layer=lambda: nn.ReLU(inplace=True)),
])
def test_loop_on_workers_equals_serial_loop_and_reference(two_threads, kw):
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=4, k=1, dispatch_layout="loop", **kw).double()
    x = torch.randn(4 * workers.WORKERS_MIN_MEAN_ROWS + 200, 16, dtype=torch.float64)
    moe(x)
    assert expert_worker_count(CPU, moe.tokens_per_expert.tolist()) == 2  # the workers are really used
    parallel = _grads(moe, x)
    set_expert_workers(False)
    try:
        serial = _grads(moe, x)
    finally:
        set_expert_workers(True)
    for got, want in zip(parallel, serial, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    expected = _grads(moe, x, lambda t: reference_moe(moe, t))
    for got, want in zip(parallel, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)


def _child_step(queue):
    torch.set_num_threads(1)  # as DataLoader workers do: OpenMP cannot use the parent's threads after fork
    torch.manual_seed(0)
    moe = SparseMoE(8, 8, num_experts=2, k=1, dispatch_layout="loop")
    moe(torch.randn(4 * workers.WORKERS_MIN_MEAN_ROWS, 8)).sum().backward()
    queue.put((torch.get_num_threads(), float(moe.experts.w1.grad.abs().sum())))


def test_a_forked_child_runs_the_loop(two_threads):
    """A DataLoader-style forked child must not wait on the parent's worker threads (absent after fork)."""
    torch.manual_seed(0)
    moe = SparseMoE(8, 8, num_experts=2, k=1, dispatch_layout="loop")
    moe(torch.randn(4 * workers.WORKERS_MIN_MEAN_ROWS, 8)).sum().backward()  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_step, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0
    threads, grad_sum = queue.get(timeout=5)
    assert threads == 1 and grad_sum > 0


def test_second_backward_through_the_loop_says_why_it_fails():
    moe = SparseMoE(8, 8, num_experts=2, k=1, dispatch_layout="loop")
    out = moe(torch.randn(10, 8)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.backward()
