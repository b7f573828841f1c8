"""Measuring alpha and beta here: a tiny gloo allreduce benchmark on local ranks, fitted to the
ring allreduce's time 2(p-1)alpha + 2((p-1)/p)n/beta (dd-scaling --model --measure-comm)."""

from __future__ import annotations

import statistics
import time

from .perfmodel import Network


def _allreduce_worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, queue) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    timings = {}
    for n_bytes in sizes:
        tensor = torch.ones(max(1, n_bytes // 4), dtype=torch.float32)
        for _ in range(3):  # warm-up: connections, buffers
            dist.all_reduce(tensor)
        dist.barrier()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            dist.all_reduce(tensor)
            samples.append(time.perf_counter() - start)
        timings[n_bytes] = statistics.median(samples)
    if rank == 0:
        queue.put(timings)
    dist.barrier()
    dist.destroy_process_group()


def fit_alpha_beta(timings: dict[int, float], p: int) -> Network:
    """Least squares t = a + b·n, then α = a / (2(p-1)) and β = 2((p-1)/p) / b."""
    xs, ys = list(timings), [timings[n] for n in timings]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    if a <= 0:  # noise: take the smallest message's time as all latency
        a = min(ys)
    b = max(b, 1e-15)
    return Network(alpha=a / (2 * (p - 1)), beta=2 * (p - 1) / p / b)


def measure_network(p: int = 2, repeats: int = 20) -> tuple[Network, dict[int, float]]:
    import torch.multiprocessing as mp

    from ..launch import free_port
    port = free_port()
    sizes = [4, 1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_allreduce_worker, args=(p, port, sizes, repeats, queue), nprocs=p, join=True,
                       start_method="spawn")
    timings = queue.get()
    return fit_alpha_beta(timings, p), timings
