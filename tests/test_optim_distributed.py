"""Muon under torchrun: the ranks split Newton-Schulz between them and still take one process's exact step.

Real gloo process groups on CPU (spawned processes, one thread each). Every rank gets the same gradients, as it
would after DDP's all-reduce; the parameters and momentum buffers after a few steps must equal those of a single
process bit for bit, on every rank, and each matrix must have been orthogonalised by exactly one rank.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain import optim
from pretrain.optim import Muon

# Shape groups chosen for the splits: 5 does not divide by 2 or 3, 1 matrix leaves ranks with nothing to do
# (padding only), tall and wide matrices take the transposed path and the tall-matrix lr scale.
SHAPES = [(32, 32)] * 5 + [(64, 32)] + [(32, 64)] * 2
STEPS = 3


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape) * 0.1) for shape in SHAPES]


def _run_muon(params: list[torch.nn.Parameter]) -> Muon:
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)  # the same gradients on every rank, as after DDP
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        orthogonalised = []  # batch sizes this rank handed to Newton-Schulz
        real = optim._orthogonalise

        def counting(G, steps):
            orthogonalised.append(G.size(0))
            return real(G, steps)

        optim._orthogonalise = counting
        params = _params()
        opt = _run_muon(params)
        buffers = [opt.state[p]["momentum_buffer"] for p in params]
        torch.save(
            dict(params=[p.detach() for p in params], buffers=buffers, orthogonalised=sum(orthogonalised)),
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_muon_matches_one_process_on_every_rank(world, tmp_path, one_thread):
    # fork, not spawn: the ranks inherit the imported torch instead of each paying seconds to import it again.
    mp.start_processes(_rank_main, args=(world, free_port(), str(tmp_path)), nprocs=world, start_method="fork")

    reference = _params()
    ref_opt = _run_muon(reference)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for shape, p, want in zip(SHAPES, got["params"], reference):
            # Exact: a rank orthogonalises a slice of the stack and batched matmuls treat each matrix alone.
            assert torch.equal(p, want.detach()), f"rank {rank} of {world}: a {shape} matrix differs"
        for buf, p in zip(got["buffers"], reference):
            assert torch.equal(buf, ref_opt.state[p]["momentum_buffer"]), "momentum buffers must stay whole"
    # The work really is split: over the ranks, each matrix of each step went through Newton-Schulz once.
    counts = [torch.load(tmp_path / f"rank{r}.pt")["orthogonalised"] for r in range(world)]
    assert sum(counts) == len(SHAPES) * STEPS, counts
    assert max(counts) < len(SHAPES) * STEPS, "one rank orthogonalised everything"
