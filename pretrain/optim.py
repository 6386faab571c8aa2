"""Optimizers: Muon for the 2-D hidden matrices, AdamW for everything else, and the learning-rate schedule.

Muon (Keller Jordan's MomentUm Orthogonalized by Newton-Schulz) keeps a Nesterov momentum of the gradient and
replaces it by the nearest semi-orthogonal matrix (a quintic Newton-Schulz iteration), so every direction of a
weight matrix moves at the same rate. Embeddings, the output head and scalars are not matrices in that sense
and use AdamW. Under DDP the gradients are already all-reduced, so every rank takes the same step.
"""
from __future__ import annotations

import torch
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
    """SGD-momentum (Nesterov) whose update is orthogonalised; only for 2-D weight matrices."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            # Matrices of one shape (q, k, v and proj of every layer; every MLP input...) are orthogonalised
            # together: one batched matmul chain instead of one small chain per matrix keeps the cores busy.
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for (rows, cols), params in by_shape.items():
                grads = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - momentum)
                    grads.append(p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
                updates = _orthogonalise(torch.stack(grads), group["ns_steps"])
                # Orthogonal updates have RMS ~ 1/sqrt(max dim); scale tall matrices up so every shape learns alike.
                alpha = -lr * max(1.0, rows / cols) ** 0.5
                for p, update in zip(params, updates):
                    if group["weight_decay"]:
                        p.mul_(1 - lr * group["weight_decay"])
                    p.add_(update.to(p.dtype), alpha=alpha)


def build_optimizers(model: nn.Module, matrix_lr: float = 0.02, embedding_lr: float = 0.2,
                     unembedding_lr: float = 0.004, scalar_lr: float = 0.004, weight_decay: float = 0.0,
                     betas: tuple[float, float] = (0.8, 0.95), model_dim: int | None = None) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] over the model with every trainable parameter in exactly one group.

    Groups: embeddings (nn.Embedding weights), the unembedding (`model.lm_head`), scalars/vectors (any < 2-D
    parameter), and the hidden matrices (every other 2-D parameter, for Muon). AdamW learning rates are scaled
    by (model_dim / 768) ** -0.5 as in nanochat, so the defaults transfer across widths. Each group keeps its
    `initial_lr`, which the schedule multiplies.
    """
    embed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = {id(p) for p in model.lm_head.parameters()} if hasattr(model, "lm_head") else set()
    groups: dict[str, list[nn.Parameter]] = {"embedding": [], "unembedding": [], "scalar": [], "matrix": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        kind = ("embedding" if id(p) in embed else "unembedding" if id(p) in head
                else "matrix" if p.ndim == 2 else "scalar")
        groups[kind].append(p)
    if model_dim is None:
        model_dim = model.config.n_embd
    scale = (model_dim / 768) ** -0.5
    adam_groups = [dict(params=groups[k], lr=lr * scale, name=k)
                   for k, lr in (("embedding", embedding_lr), ("unembedding", unembedding_lr), ("scalar", scalar_lr))
                   if groups[k]]
    fused = all(p.is_cuda for g in adam_groups for p in g["params"])
    adamw = torch.optim.AdamW(adam_groups, betas=betas, eps=1e-10, weight_decay=weight_decay, fused=fused or None)
    muon = Muon(groups["matrix"], lr=matrix_lr, weight_decay=weight_decay)
    muon.param_groups[0]["name"] = "matrix"
    optimizers: list[torch.optim.Optimizer] = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(progress: float, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    """Warmup -> constant -> linear warmdown, as a function of training progress in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup_ratio > 0 and progress < warmup_ratio:
        return (progress + 1e-9) / warmup_ratio
    if warmdown_ratio > 0 and progress > 1 - warmdown_ratio:
        frac = (1 - progress) / warmdown_ratio
        return frac + (1 - frac) * final_lr_frac
    return 1.0


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon's momentum ramps up over the first steps: early gradients change fast, later ones average well."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def set_schedule(optimizers: list[torch.optim.Optimizer], lr_mult: float, step: int) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum(step)
