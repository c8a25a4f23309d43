"""Sharding independent ADMM problems over processes with ``torch.distributed``.

Problems never interact, so each rank solves a contiguous block of them and rank 0 gathers the
blocks in problem order. Every problem has its own init seed and the solver treats problems
independently, so rank r's block is solved as a 1-process run of that block alone would solve it
(with the same threads). A different number of ranks changes the shapes of the batched kernels,
whose rounding may then change a projected token: texts are not promised to equal a
single-process run's (README, "Several processes").

Two ways in:

* ``gradmm generate --nproc N``: spawns N local processes.
* ``torchrun --nproc-per-node N -m gradmm.cli generate ...`` (or ``--nnodes``/``--rdzv-*`` for
  several machines): the environment variables torchrun sets are honoured as they are.

On CUDA each rank uses one GPU (``cuda:LOCAL_RANK``) and the group uses NCCL; on the CPU, gloo.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from gradmm.core.settings import Runtime


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n_items: int, rank: int, world: int) -> range:
    """Contiguous block of ``range(n_items)`` owned by ``rank`` (sizes differ by at most one)."""
    base, extra = divmod(n_items, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather_to_zero(obj: Any) -> list[Any] | None:
    """Objects of all ranks in rank order on rank 0, None elsewhere (``[obj]`` when alone)."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def backend(device_type: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def rank_runtime(runtime: Runtime) -> Runtime:
    """``runtime`` for this rank: on CUDA with several ranks, this node's GPU ``LOCAL_RANK``."""
    if rank_and_world()[1] == 1 or runtime.torch_device().type != "cuda":
        return runtime
    return runtime.model_copy(update={"device": f"cuda:{local_rank()}"})


def init_from_env(device_type: str = "cpu") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True if we did."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank())  # NCCL's object collectives use this GPU
        dist.init_process_group(backend(device_type))
        return True
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world: int, port: int, fn: Callable, args: tuple, threads: int, device_type: str
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(threads)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend(device_type), rank=rank, world_size=world)
    try:
        fn(*args)
        dist.barrier()  # no rank tears the group down while another still talks (gloo aborts)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, args: tuple, nproc: int, device_type: str = "cpu") -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes joined in one process group (one GPU each
    on CUDA). The machine's CPU threads are divided among the processes."""
    threads = max(1, torch.get_num_threads() // nproc)
    torch.multiprocessing.spawn(
        _worker,
        args=(nproc, _free_port(), fn, args, threads, device_type),
        nprocs=nproc,
        join=True,
    )
