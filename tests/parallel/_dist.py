"""Run a function on N local gloo processes with a hard deadline (no test can hang)."""
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


def init_worker(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)  # two processes share two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))


def _entry(rank: int, fn, world_size: int, port: int, args) -> None:
    init_worker(rank, world_size, port)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; raises if any fails or times out."""
    context = mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, 9)
            raise TimeoutError(f"distributed workers did not finish within {timeout} s")
