"""Spawning gloo ranks on the CPU for the distributed tests (one FileStore per test, under tmp_path)."""

import os
from datetime import timedelta

import torch


def init_gloo(rank: int, world: int, init_file: str, timeout_s: int = 120):
    """Called first in a spawned rank: one thread (the CI machine has 2 cores for all ranks), the
    Triton interpreter (the ranks' tensors are on the CPU), and a gloo process group over a FileStore."""
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    return dist


def spawn(worker, world: int, tmp_path, *args):
    """Runs ``worker(rank, world, init_file, out_dir, *args)`` on ``world`` ranks; raises if any fails."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path), *args), nprocs=world, join=True)
