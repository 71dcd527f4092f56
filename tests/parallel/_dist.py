"""Run a function on N local processes (gloo, or NCCL with one GPU per rank) with a hard deadline."""
from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_worker(rank: int, world_size: int, port: int, backend: str = "gloo") -> None:
    torch.set_num_threads(1)  # two processes share two cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))


def _entry(rank: int, fn, world_size: int, port: int, backend: str, args) -> None:
    init_worker(rank, world_size, port, backend)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0, backend: str = "gloo") -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; raises if any fails or times out.

    ``backend="nccl"`` puts rank ``r`` on GPU ``r``.
    """
    context = mp.start_processes(_entry, args=(fn, world_size, free_port(), backend, args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, 9)
            raise TimeoutError(f"distributed workers did not finish within {timeout} s")
