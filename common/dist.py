"""Devices and processes: which device a stage runs on, and the torchrun process group (NCCL on CUDA, gloo on CPU).

Under torchrun every rank runs the same program; `Dist` says which one this is, and `fs_main` which process
does the work that one process per filesystem must do (checkpoints, downloads)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist

from common.paths import scratchchat_home

DEVICE_ENV = "SCRATCHCHAT_DEVICE"  # e.g. cpu: every stage on the CPU (gloo under torchrun), GPUs or not


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # The first process of each filesystem: it writes checkpoints and downloads there. One per job on a disk that
    # every node shares; one per node on node-local disks, so that every node can read every checkpoint.
    fs_main: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto") -> str:
    """`name`, or for "auto" $SCRATCHCHAT_DEVICE, else the best available: cuda, mps, cpu."""
    if name == "auto":
        name = os.environ.get(DEVICE_ENV, "auto") or "auto"
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); else a single process."""
    kind = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device(kind))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        torch_dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device(kind)
        torch_dist.init_process_group("gloo")
    dist = Dist(rank=rank, local_rank=local, world_size=world, device=dev)
    dist.fs_main = _first_on_filesystem(dist, scratchchat_home())
    return dist


def cleanup_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


@contextmanager
def distributed(device: str = "auto") -> Iterator[Dist]:
    """init_distributed() for a block; the process group is torn down however the block ends."""
    try:
        yield init_distributed(device)
    finally:
        cleanup_distributed()


def _first_on_filesystem(dist: Dist, home: Path) -> bool:
    """Whether this process is the lowest rank that sees `home`: the first process of every node leaves a mark
    in a directory named by a token from rank 0, and a node that finds a lower rank's mark shares its disk."""
    token = torch.tensor([int.from_bytes(os.urandom(7), "little")], dtype=torch.long, device=dist.device)
    torch_dist.broadcast(token, 0)
    marks = home / "speedrun" / f".ranks-{int(token.item()):x}"
    if dist.local_rank == 0:
        marks.mkdir(parents=True, exist_ok=True)
        (marks / str(dist.rank)).touch()
    torch_dist.barrier()
    first = dist.local_rank == 0 and min(int(p.name) for p in marks.iterdir()) == dist.rank
    torch_dist.barrier()
    if first:
        shutil.rmtree(marks, ignore_errors=True)
    return first


def fs_barrier(dist: Dist) -> None:
    """Wait here until every rank arrives: after one process per filesystem did the shared work."""
    if dist.world_size > 1:
        torch_dist.barrier()


def all_reduce(t: torch.Tensor, dist: Dist, op=None) -> torch.Tensor:
    """Sum (or `op`) `t` over the ranks in place; a single process leaves it as it is."""
    if dist.world_size > 1:
        torch_dist.all_reduce(t, op=op or torch_dist.ReduceOp.SUM)
    return t
