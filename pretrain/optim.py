"""Optimizers: Muon for the 2-D hidden matrices, AdamW for everything else, and the learning-rate schedule.

Muon (Keller Jordan's MomentUm Orthogonalized by Newton-Schulz) keeps a Nesterov momentum of the gradient and
replaces it by the nearest semi-orthogonal matrix (a quintic Newton-Schulz iteration), so every direction of a
weight matrix moves at the same rate. Embeddings, the output head and scalars are not matrices in that sense
and use AdamW.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

_compiled_ns = None


def fast_matmul_dtype(device: torch.device) -> torch.dtype:
    """bf16 where matmuls are much faster in it: GPUs, and x86 CPUs with AVX-512, where oneDNN's bf16 kernels
    run Newton-Schulz ~5x faster than fp32. Elsewhere bf16 matmuls may take a slow path: fp32."""
    if device.type == "cuda" or (device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")):
        return torch.bfloat16
    return torch.float32


def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise G [..., m, n] (U S V^T -> U S' V^T with S' ~ 1): the tuned quintic from Muon.
    bf16 is accurate enough (the iteration only needs S' roughly 1) and, where matmuls are fast in it, cheap."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype or fast_matmul_dtype(G.device))
    if X.ndim == 2:
        X = X[None]
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= 1 so the iteration converges
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b * A + c * A @ A
        X = torch.baddbmm(X, B, X, beta=a)  # a * X + B @ X
    X = X.mT if tall else X
    return X.view(G.shape)


def _orthogonalise(G: torch.Tensor, steps: int) -> torch.Tensor:
    global _compiled_ns
    if G.is_cuda:  # compile once, on the device where it pays off; CPU stays eager and debuggable
        if _compiled_ns is None:
            _compiled_ns = torch.compile(newton_schulz)
        return _compiled_ns(G, steps)
    return newton_schulz(G, steps)


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) whose update is orthogonalised; only for 2-D weight matrices.

    Under torchrun (a process group with world size > 1) `step` assumes every rank holds the same gradients, as
    after DDP's all-reduce, and shares the Newton-Schulz work out: rank r orthogonalises its contiguous share of
    each shape's stack and an all-gather gives every rank the whole update, so every rank applies the same bits.
    Momentum buffers stay whole on every rank, so the state dict (checkpoints, resume) does not depend on the
    world size. Every rank must call `step` (it is a collective).
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        )
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        rank, world = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        )
        pending = []  # (group, params, updates, all-gather handle, its block): applied once every gather has started
        for group in self.param_groups:
            momentum = group["momentum"]
            # Matrices of one shape (q, k, v and proj of every layer; every MLP input...) are orthogonalised
            # together: one batched matmul chain instead of one small chain per matrix keeps the cores busy.
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for (rows, cols), params in by_shape.items():
                for p in params:  # every rank keeps every buffer (cheap, elementwise), so the state is world-free
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    state["momentum_buffer"].lerp_(p.grad, 1 - momentum)
                # This rank's contiguous share of the stack; ceil so the shares cover it (the last may be short).
                share = -(-len(params) // world)
                mine = params[min(rank * share, len(params)) : (rank + 1) * share]
                grads = [
                    p.grad.lerp(self.state[p]["momentum_buffer"], momentum)
                    if group["nesterov"]
                    else self.state[p]["momentum_buffer"]
                    for p in mine
                ]
                updates = _orthogonalise(torch.stack(grads), group["ns_steps"]) if grads else None
                block = handle = None
                if world > 1:
                    # all-gather needs equal blocks: pad short shares with zeros (zip drops them below). Gathering
                    # the orthogonaliser's own output (bf16 on GPU) keeps the result bit-identical to one process.
                    device = params[0].device
                    dtype = updates.dtype if updates is not None else fast_matmul_dtype(device)
                    block = updates
                    if len(mine) < share:
                        pad = torch.zeros(share - len(mine), rows, cols, dtype=dtype, device=device)
                        block = pad if updates is None else torch.cat([updates, pad])
                    updates = torch.empty(world * share, rows, cols, dtype=dtype, device=device)
                    # Asynchronous, so the next shape's Newton-Schulz overlaps this gather. torch 2.13 renamed
                    # all_gather_into_tensor to all_gather_single (the old name warns); 2.11 has only the old one.
                    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
                    handle = gather(updates, block, async_op=True)
                pending.append((group, params, updates, handle, block))  # block: alive until its gather is done
        for group, params, updates, handle, _ in pending:
            if handle is not None:
                handle.wait()
            lr = group["lr"]
            rows, cols = params[0].shape
            # Orthogonal updates have RMS ~ 1/sqrt(max dim); scale tall matrices up so every shape learns alike.
            alpha = -lr * max(1.0, rows / cols) ** 0.5
            for p, update in zip(params, updates):  # zip stops before the padding
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=alpha)


def build_optimizers(
    model: nn.Module,
    matrix_lr: float = 0.02,
    embedding_lr: float = 0.2,
    unembedding_lr: float = 0.004,
    weight_decay: float = 0.0,
) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] over the model with every trainable parameter in exactly one group.

    Groups: embeddings (nn.Embedding weights), the unembedding (`model.lm_head`), scalars/vectors (any < 2-D
    parameter, lr 0.004), and the hidden matrices (every other 2-D parameter, for Muon). AdamW
    learning rates are scaled by (n_embd / 768) ** -0.5 as in nanochat, so the defaults transfer across widths.
    Each group keeps its `initial_lr`, which the schedule multiplies.
    """
    embed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = {id(p) for p in model.lm_head.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"embedding": [], "unembedding": [], "scalar": [], "matrix": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        kind = (
            "embedding" if id(p) in embed else "unembedding" if id(p) in head else "matrix" if p.ndim == 2 else "scalar"
        )
        groups[kind].append(p)
    scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [
        dict(params=groups[k], lr=lr * scale, name=k)
        for k, lr in (("embedding", embedding_lr), ("unembedding", unembedding_lr), ("scalar", 0.004))
        if groups[k]
    ]
    fused = all(p.is_cuda for g in adam_groups for p in g["params"])
    adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, fused=fused or None)
    muon = Muon(groups["matrix"], lr=matrix_lr, weight_decay=weight_decay)
    muon.param_groups[0]["name"] = "matrix"
    optimizers: list[torch.optim.Optimizer] = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(
    progress: float, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2, final_lr_frac: float = 0.0
) -> float:
    """Warmup -> constant -> linear warmdown, as a function of training progress in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup_ratio > 0 and progress < warmup_ratio:
        return (progress + 1e-9) / warmup_ratio
    if warmdown_ratio > 0 and progress > 1 - warmdown_ratio:
        frac = (1 - progress) / warmdown_ratio
        return frac + (1 - frac) * final_lr_frac
    return 1.0


def set_schedule(optimizers: list[torch.optim.Optimizer], lr_mult: float, step: int) -> None:
    """Every group's lr at `lr_mult` of its initial one. Muon's momentum ramps from 0.85 to 0.95 over the first
    300 steps: early gradients change fast, later ones average well."""
    frac = min(step / 300, 1.0)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if isinstance(opt, Muon):
                group["momentum"] = (1 - frac) * 0.85 + frac * 0.95
