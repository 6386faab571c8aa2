"""Pretraining benchmark: our GPT + Muon/AdamW against a nanoGPT-style GPT-2 + AdamW, same tokens, same clock.

Both models have the same width, depth and (within ~1%) parameter count, read the same token stream from the
default corpus' shards, train for the same wall-clock budget on this machine (alternating in slices, so load
from other processes falls on both alike), and are scored on the same validation batches in bits per byte. Also measures the TokenLoader's own throughput.

    python benchmarks/pretrain.py [--minutes 3] [--depth 2] [--tokens-dir DIR] [--threads N]
    python benchmarks/pretrain.py --newton-schulz [--depth 2] [--ranks 1,2,4]   # Muon's work per gloo CPU rank

Without shards (run `python -m pretrain.data tokenize` first) it falls back to SYNTHETIC tokens and says so;
then only the loss is comparable, not bits per byte.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the `pretrain` package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from common.dist import Dist
from common.paths import tokenizer_path, tokens_dir
from pretrain import optim
from pretrain.model import GPT, GPTConfig
from pretrain.optim import build_optimizers, lr_multiplier, set_schedule
from pretrain.shards import ShardError, TokenLoader, load_manifest
from pretrain.train import SyntheticLoader, evaluate_bpb, token_byte_lengths

# ----------------------------------------------------------------------------- the nanoGPT baseline


class BaselineBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd, bias=False), nn.LayerNorm(n_embd, bias=False)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.attn_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class BaselineGPT(nn.Module):
    """GPT-2 as in nanoGPT: learned positions, pre-LayerNorm, GELU MLP, no biases (nanoGPT's bias=False),
    untied head here so the parameter count matches ours; init N(0, 0.02), residual projections / sqrt(2L)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.sequence_len, config.n_embd)
        self.h = nn.ModuleList([BaselineBlock(config.n_embd, config.n_head) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x)).float()
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="none")
        return loss.view(targets.shape) if reduction == "none" else loss.mean()


def baseline_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """nanoGPT's configure_optimizers: AdamW, weight decay on matrices only, betas (0.9, 0.95)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    for g in opt.param_groups:
        g["initial_lr"] = lr
    return opt


def cosine(progress: float, warmup: float = 0.05, min_frac: float = 0.1) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_frac of the peak."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * p))


# ----------------------------------------------------------------------------- one timed run


class TimedRun:
    """One model's training, advanced in slices so the two runs can alternate: load from other processes on a
    shared machine then falls on both alike. lr follows this run's own elapsed time / its budget."""

    def __init__(self, model: nn.Module, optimizers: list, schedule, loader, budget: float) -> None:
        self.model, self.optimizers, self.schedule, self.loader = model, optimizers, schedule, loader
        self.budget, self.elapsed, self.tokens, self.step = budget, 0.0, 0, 0

    def train(self, until: float) -> None:
        """Take steps until this run's training time reaches `until` seconds (capped at the budget)."""
        self.model.train()
        until = min(until, self.budget)
        while self.elapsed < until:
            start = time.perf_counter()
            set_schedule(self.optimizers, self.schedule(self.elapsed / self.budget), self.step)
            x, y = next(self.loader)
            loss = self.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            for opt in self.optimizers:
                opt.step()
            self.model.zero_grad(set_to_none=True)
            self.tokens += x.numel()
            self.step += 1
            self.elapsed += time.perf_counter() - start

    @property
    def rate(self) -> float:
        return self.tokens / self.elapsed


# ----------------------------------------------------------------------------- Newton-Schulz per rank


def _ns_rank(rank: int, world: int, port: int, depth: int, steps: int, results) -> None:
    """One gloo rank: time Muon steps on the depth's hidden matrices, with the same gradients on every rank as
    after DDP's all-reduce. Newton-Schulz is timed inside Muon (wall clock and this thread's CPU time: with more
    ranks than cores the wall clock also counts waiting for a core, the CPU time only the work)."""
    torch.set_num_threads(1)  # one core's worth per rank, so adding ranks adds cores rather than splitting them
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(depth, 256, 64))  # vocab and sequence length do not change the matrices
    muon = build_optimizers(model)[1]
    params = muon.param_groups[0]["params"]
    for p in params:
        p.grad = torch.randn_like(p)
    ns = dict(wall=0.0, cpu=0.0, matrices=0)
    orthogonalise = optim._orthogonalise

    def timed(G, ns_steps):
        wall, cpu = time.perf_counter(), time.thread_time()
        out = orthogonalise(G, ns_steps)
        ns["wall"] += time.perf_counter() - wall
        ns["cpu"] += time.thread_time() - cpu
        ns["matrices"] += G.size(0)
        return out

    optim._orthogonalise = timed
    muon.step()  # warm-up: first-call allocations and gloo's connection setup
    dist.barrier()
    per_step = []
    for _ in range(steps):
        ns.update(wall=0.0, cpu=0.0, matrices=0)
        start = time.perf_counter()
        muon.step()
        per_step.append([ns["wall"], ns["cpu"], ns["matrices"], time.perf_counter() - start])
    # Medians over the steps, so a burst from other jobs on a shared machine does not set the figure; then the
    # maximum over ranks, since the slowest rank sets the pace (the all-gather waits for it).
    figures = torch.tensor(per_step).median(dim=0).values
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    if rank == 0:
        results.put((len(params), *figures.tolist()))
    dist.destroy_process_group()


def newton_schulz_benchmark(depth: int, ranks: list[int], steps: int) -> None:
    """Muon's Newton-Schulz time per rank for 1, 2, 4... gloo CPU ranks on one model's matrices."""
    matrices = build_optimizers(GPT(GPTConfig.from_depth(depth, 256, 64)))[1].param_groups[0]["params"]
    shapes = sorted({tuple(p.shape) for p in matrices})
    print(
        f"Muon on depth {depth}'s hidden matrices {shapes}, one thread per gloo rank, {os.cpu_count()} cores, "
        f"dtype {optim.fast_matmul_dtype(torch.device('cpu'))}, median of {steps} steps"
    )
    print(
        f"{'ranks':>5} {'matrices/rank':>13} {'NS wall s/step':>14} {'NS cpu s/step':>13} {'Muon step s':>11} "
        f"{'NS wall vs 1':>12} {'NS cpu vs 1':>11}"
    )
    ctx = mp.get_context("spawn")
    base = None
    for world in ranks:
        results = ctx.SimpleQueue()
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_ns_rank, args=(world, port, depth, steps, results), nprocs=world, start_method="spawn")
        total, ns_wall, ns_cpu, per_rank, step_wall = results.get()
        base = base or (ns_wall, ns_cpu)
        note = "  (more ranks than cores: wall includes waiting for a core)" if world > (os.cpu_count() or 1) else ""
        print(
            f"{world:>5} {int(per_rank):>6} of {total:<4} {ns_wall:>14.4f} {ns_cpu:>13.4f} {step_wall:>11.4f} "
            f"{ns_wall / base[0]:>11.2f}x {ns_cpu / base[1]:>10.2f}x{note}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="training wall clock per model")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--sequence-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=0, help="validation tokens (0: the whole val split)")
    parser.add_argument("--baseline-lr", type=float, default=1e-3, help="nanoGPT's small-model AdamW lr")
    parser.add_argument("--tokens-dir", default=str(tokens_dir("default")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--newton-schulz", action="store_true", help="instead: time Muon's Newton-Schulz per rank")
    parser.add_argument("--ranks", default="1,2,4", help="with --newton-schulz: the world sizes to time")
    parser.add_argument("--steps", type=int, default=20, help="with --newton-schulz: timed Muon steps per world size")
    args = parser.parse_args()
    if args.newton_schulz:
        newton_schulz_benchmark(args.depth, [int(r) for r in args.ranks.split(",")], args.steps)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T = args.batch_size, args.sequence_len

    token_dir = Path(args.tokens_dir)
    try:
        manifest = load_manifest(token_dir)
        from tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer_path())
        if tok.hash != manifest.get("tokenizer_hash"):
            raise ShardError("the default tokenizer does not match the shards")
        vocab, token_bytes = tok.vocab_size, token_byte_lengths(tok)
        make_loader = lambda split: TokenLoader(token_dir, split, B, T)  # noqa: E731
        source = f"default-corpus shards in {token_dir} (vocab {vocab})"
    except (ShardError, FileNotFoundError, ValueError) as e:
        vocab, token_bytes = 8192, None
        make_loader = lambda split: SyntheticLoader(vocab, B, T, seed=0 if split == "train" else 1)  # noqa: E731
        source = f"SYNTHETIC FALLBACK tokens ({e}); bits per byte unavailable, compare val loss only"
    print(f"data: {source}")
    print(f"threads: {torch.get_num_threads()}, budget: {args.minutes:.1f} min per model, batch {B} x {T}")

    if isinstance(make_loader("train"), TokenLoader):
        loader, n, t0 = make_loader("train"), 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            x, _ = next(loader)
            n += x.numel()
        print(f"TokenLoader alone: {n / (time.perf_counter() - t0):,.0f} tokens/s")

    config = GPTConfig.from_depth(args.depth, vocab, T)
    runs: dict[str, TimedRun] = {}
    for name in ("ours", "baseline"):
        torch.manual_seed(args.seed)
        if name == "ours":
            model = GPT(config)
            optimizers = build_optimizers(model)
            schedule = lambda p: lr_multiplier(p, warmdown_ratio=0.2)  # noqa: E731
        else:
            model = BaselineGPT(config)
            optimizers = [baseline_optimizer(model, args.baseline_lr)]
            schedule = cosine
        runs[name] = TimedRun(model, optimizers, schedule, make_loader("train"), args.minutes * 60)
    # Alternate in slices of ~1/20 of the budget, so both runs see the same share of the machine's moods.
    slice_s = max(1.0, args.minutes * 60 / 20)
    while any(run.elapsed < run.budget for run in runs.values()):
        target = min(run.elapsed for run in runs.values()) + slice_s
        for run in runs.values():
            run.train(target)
    results = {}
    for name, run in runs.items():
        run.model.eval()
        val = make_loader("val")
        figures = evaluate_bpb(run.model, val.iter_val(args.eval_tokens), token_bytes, Dist())
        params = sum(p.numel() for p in run.model.parameters())
        results[name] = dict(params=params, tokens=run.tokens, rate=run.rate, **figures)
        bpb = f", val bpb {figures['val_bpb']:.4f}" if "val_bpb" in figures else ""
        print(
            f"{name:9s} {params / 1e6:6.2f}M params: {run.tokens:,} tokens in {run.step} steps, {run.rate:,.0f} tokens/s, "
            f"val loss {figures['val_loss']:.4f}{bpb}"
        )

    ours, base = results["ours"], results["baseline"]
    print(f"tokens/s ratio ours/baseline: {ours['rate'] / base['rate']:.2f}x (target >= 1.3x)")
    key = "val_bpb" if "val_bpb" in ours else "val_loss"
    print(
        f"{key}: ours {ours[key]:.4f} vs baseline {base[key]:.4f} -> {100 * (1 - ours[key] / base[key]):.1f}% lower "
        f"(target >= 5%)"
    )


if __name__ == "__main__":
    main()
