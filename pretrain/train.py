"""The training loop, shared by pretraining (`python -m pretrain`) and fine-tuning (`python -m finetune`).

`train(model, cfg, batches, run_dir=...)` runs Muon + AdamW with a warmup / constant / warmdown schedule,
gradient accumulation to `total_batch_tokens`, clipping, bf16 autocast (CUDA, and CPUs with bf16 matmul),
torch.compile on CUDA and DDP under torchrun. It evaluates validation bits per byte, samples from fixed prompts,
logs to `<run_dir>/metrics.jsonl` and a tqdm bar, checkpoints to `<run_dir>/step_N/` and resumes exactly (model,
optimizer, schedule, RNG, data).

Batches are (x, y) or (x, y, loss_mask) tensors; the batch source needs `__next__`, and `state_dict()` /
`load_state_dict()` when checkpoints should resume on the same data (TokenLoader and SyntheticLoader do).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from common.cli import flag
from common.dist import Dist, all_reduce, fs_barrier
from common.paths import report_dir
from pretrain.checkpoint import (CheckpointError, load_model_state, load_optimizer_state, prune_checkpoints,
                                 save_checkpoint, step_dirs)
from pretrain.model import GPT
from pretrain.optim import build_optimizers, lr_multiplier, set_schedule
from pretrain.report import append_metrics, plot_metrics

SAMPLE_PROMPTS = ("The capital of France is", "The history of", "Water is", "In the beginning")


@dataclass
class TrainConfig:
    max_steps: int = flag(-1, "optimizer steps to run; -1: from the token budget (--param-data-ratio)")
    max_minutes: float = flag(0.0, "stop after this many minutes of training (0: no limit); the lr warmdown follows it")
    param_data_ratio: float = flag(20.0, "token budget = this x parameters when --max-steps is -1 (chinchilla-like)")
    device_batch_size: int = flag(0, "sequences per micro-batch per device (0: pick for the hardware)")
    total_batch_tokens: int = flag(-1, "tokens per optimizer step across devices; accumulates micro-batches (-1: one)")
    matrix_lr: float = flag(0.02, "Muon learning rate for the hidden matrices")
    embedding_lr: float = flag(0.2, "AdamW learning rate for the token embedding (scaled by (n_embd/768)^-0.5)")
    unembedding_lr: float = flag(0.004, "AdamW learning rate for the lm_head (scaled by (n_embd/768)^-0.5)")
    weight_decay: float = flag(0.0, "decoupled weight decay for every group")
    warmup_ratio: float = flag(0.0, "fraction of training spent warming the lr up from 0")
    warmdown_ratio: float = flag(0.2, "final fraction of training in which the lr decays linearly")
    final_lr_frac: float = flag(0.0, "lr at the end of the warmdown, as a fraction of the peak")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: off)")
    eval_every: int = flag(250, "evaluate validation bits per byte every N steps (and at the end; 0: end only)")
    eval_batches: int = flag(20, "validation micro-batches per evaluation (per device)")
    sample_every: int = flag(0, "print samples from fixed prompts every N steps (0: at the end only)")
    save_every: int = flag(0, "checkpoint every N steps (0: at the end only, -1: never, e.g. for benchmarks)")
    save_every_minutes: float = flag(0.0, "also checkpoint every M minutes of training (0: off)")
    keep_last: int = flag(2, "checkpoints to keep (0: all)")
    resume: bool = flag(False, "continue the newest checkpoint in the run directory exactly")
    compile: bool | None = flag(None, "torch.compile the model (default: on for CUDA, off otherwise)")
    dtype: str = flag("auto", "autocast dtype of the matmuls: bf16, fp32 or auto (bf16 on CUDA and on CPUs with "
                              "bf16 matmul instructions, fp32 elsewhere)")
    device: str = flag("auto", "cuda, cpu, mps or auto ($SCRATCHCHAT_DEVICE, else the best available)")
    seed: int = flag(42, "seed for the model init and sampling")


# ----------------------------------------------------------------------------- devices and precision

def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, for MFU; None where we do not know it (CPU, unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12),
                       ("A10G", 125e12), ("L4", 121e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 autocast about halves a training
    step's time; elsewhere oneDNN emulates bf16 and is no faster than fp32. The kernel flags come from Linux's
    /proc/cpuinfo; torch must also dispatch its AVX512 kernels (ATEN_CPU_CAPABILITY may lower it)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: unknown, so the safe choice
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    return bool({"avx512_bf16", "amx_bf16"} & set(flags)) and capability.startswith("AVX512")


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The dtype to autocast the matmuls to for --dtype `name` on `device` (None: plain fp32)."""
    if name not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--dtype must be auto, bf16 or fp32, got {name!r}")
    if name == "auto":
        name = "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_matmul()) else "fp32"
    return torch.bfloat16 if name == "bf16" else None


# ----------------------------------------------------------------------------- data without a corpus

class SyntheticLoader:
    """Seeded token batches for a bare machine: each row repeats a random snippet of skewed (low ids common)
    tokens, so a model has something to learn at once (the unigram) and later (copying).

    Batch i of a run is the same on any number of ranks (rank r of w takes batch index*w + r), and its
    position is one integer, so resume and DDP behave as with real shards."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu") -> None:
        self.vocab_size, self.batch_size, self.seq_len, self.seed = vocab_size, batch_size, seq_len, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.index = 0

    def _batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        period = int(torch.randint(4, 64, (1,), generator=g))
        snippet = (self.vocab_size * torch.rand(self.batch_size, period, generator=g) ** 3).long()
        rows = snippet.repeat(1, (self.seq_len + 1) // period + 1)[:, :self.seq_len + 1].to(self.device)
        return rows[:, :-1], rows[:, 1:]

    def __iter__(self) -> SyntheticLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._batch(self.index * self.world_size + self.rank)
        self.index += 1
        return batch

    def iter_val(self, max_batches: int | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(max_batches or 4):
            yield self._batch(-1 - (i * self.world_size + self.rank))  # negative indices: never trained on

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


# ----------------------------------------------------------------------------- evaluation

def token_byte_lengths(tokenizer, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bytes each token id decodes to (0 for special tokens), for bits per byte."""
    return torch.tensor([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)],
                        dtype=torch.float64, device=device)


@torch.no_grad()
def evaluate_bpb(model: GPT, batches: Iterable, token_bytes: torch.Tensor | None, dist: Dist | None = None,
                 autocast: contextlib.AbstractContextManager | None = None) -> dict:
    """Validation loss (nats/token) and bits per byte = sum of nats over target tokens / (ln 2 * their bytes).

    Special-token targets (0 bytes) are left out of bits per byte, so it measures text only and is comparable
    across tokenizers. Sums are reduced over DDP ranks."""
    dist = dist or Dist()
    device = model.lm_head.weight.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats over text, bytes, nats over all, tokens
    for x, y, *rest in batches:
        T, V = x.size(1), model.config.vocab_size
        rows = max(1, 2**29 // (T * V))  # bound the fp32 logits of one forward to ~2 GB
        for i in range(0, x.size(0), rows):
            xs, ys = x[i:i + rows], y[i:i + rows]
            with autocast or contextlib.nullcontext():
                nats = model(xs, ys, reduction="none").double()
            valid = ys >= 0
            sums[2] += nats[valid].sum()
            sums[3] += valid.sum()
            if token_bytes is not None:
                nbytes = token_bytes[ys.clamp(min=0)] * valid
                sums[0] += (nats * (nbytes > 0)).sum()
                sums[1] += nbytes.sum()
    all_reduce(sums, dist)
    out = {"val_loss": (sums[2] / sums[3].clamp(min=1)).item()}
    if token_bytes is not None and sums[1] > 0:
        out["val_bpb"] = (sums[0] / (math.log(2) * sums[1])).item()
    return out


def sample(model: GPT, tokenizer, prompts: Sequence[str] = SAMPLE_PROMPTS, max_new_tokens: int = 24,
           temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Continuations of fixed prompts (greedy by default), each starting after <|bos|> as documents do."""
    was_training = model.training
    model.eval()
    out = []
    for p in prompts:
        ids = [tokenizer.bos_id] + tokenizer.encode(p)
        new = model.generate(ids, max_new_tokens, temperature=temperature, seed=seed, stop={tokenizer.bos_id})
        out.append(p + tokenizer.decode([t for t in new if t != tokenizer.bos_id]))
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- the loop

def accumulation(total_batch_tokens: int, micro_tokens: int) -> tuple[int, int]:
    """(micro-batches per step, tokens per step): the multiple of one micro-step's tokens (all devices) nearest to
    the requested total, at least one; -1 asks for one micro-batch. Any world size trains with the defaults."""
    steps = max(1, round(total_batch_tokens / micro_tokens)) if total_batch_tokens > 0 else 1
    return steps, steps * micro_tokens


def check_ranks_agree(model: torch.nn.Module, dist: Dist) -> None:
    """Raise if the ranks' weights differ (they must take identical steps): a checksum per parameter, compared
    by its min and max over ranks, before every checkpoint."""
    if dist.world_size == 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    low, high = sums.clone(), sums.clone()
    torch_dist.all_reduce(low, op=torch_dist.ReduceOp.MIN)
    torch_dist.all_reduce(high, op=torch_dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("the ranks' weights have diverged; this is a bug, please report it")


def _resume_point(run_dir: Path, dist: Dist) -> Path:
    """The newest checkpoint that every rank can read: on node-local disks a kill during a save may have left
    one node a step ahead, so all ranks take the lowest of their newest steps."""
    steps = dict(step_dirs(run_dir))
    found = torch.tensor([max(steps, default=-1)], device=dist.device)
    all_reduce(found, dist, torch_dist.ReduceOp.MIN if dist.world_size > 1 else None)
    step = int(found.item())
    if step < 0:
        raise CheckpointError(f"nothing to resume: no step_N checkpoint in {run_dir}"
                              + (" on every node" if dist.world_size > 1 else ""))
    if step not in steps:
        raise CheckpointError(f"cannot resume: step {step} is missing from {run_dir} on this node; start afresh")
    return steps[step]


def _batch_parts(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return (batch[0], batch[1], batch[2]) if len(batch) == 3 else (batch[0], batch[1], None)


def train(model: GPT, cfg: TrainConfig, batches, *, run_dir: str | Path, tokenizer=None,
          val_batches: Callable[[], Iterable] | None = None, evaluate: Callable[[GPT], dict] | None = None,
          dist: Dist | None = None, meta: dict | None = None, prompts: Sequence[str] = SAMPLE_PROMPTS) -> dict:
    """Train `model` (already on its device, initialised or loaded) on `batches`; returns the final figures.

    run_dir: where step_N/ checkpoints, metrics.jsonl and loss.png go (e.g. $SCRATCHCHAT_HOME/checkpoints/base).
    tokenizer: saved into checkpoints; with it, validation reports bits per byte and samples are printed.
    val_batches: returns a fresh deterministic iterable of validation batches (this rank's share).
    evaluate: extra evaluation (model -> metrics dict), e.g. chat evals in fine-tuning; runs on every rank.
    meta: json-able facts stored in every checkpoint (e.g. the corpus, the base checkpoint).
    """
    dist = dist or Dist(device=model.lm_head.weight.device)
    device, run_dir = dist.device, Path(run_dir)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    low = autocast_dtype(cfg.dtype, device)
    autocast = (lambda: torch.autocast(device.type, dtype=low)) if low else contextlib.nullcontext
    optimizers = build_optimizers(model, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                                  unembedding_lr=cfg.unembedding_lr, weight_decay=cfg.weight_decay)
    token_bytes = token_byte_lengths(tokenizer, device) if tokenizer is not None else None
    metrics_path = run_dir / "metrics.jsonl"
    say = tqdm.write if dist.is_main else (lambda *a, **k: None)

    step, elapsed, tokens_seen, resumed_from = 0, 0.0, 0, None
    if cfg.resume:
        path = _resume_point(run_dir, dist)
        saved = load_model_state(path, model)
        if tokenizer is not None and saved.get("tokenizer_hash") not in (None, tokenizer.hash):
            raise CheckpointError(f"{path} was trained with tokenizer {saved['tokenizer_hash'][:12]}, "
                                  f"this run uses {tokenizer.hash[:12]}")
        load_optimizer_state(path, optimizers)
        m = saved["meta"]
        step, elapsed, tokens_seen = m["step"], m["elapsed"], m["tokens"]
        if "loader" in m and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(m["loader"])
        print(f"resumed from {path} at step {step}" + (f" (rank {dist.rank})" if dist.world_size > 1 else ""))
        resumed_from = path
    start_step = step

    # DDP first, then compile: the compiled graph splits at DDP's buckets, so each gradient all-reduce overlaps
    # the rest of the backward pass. The rotary tables never change: no need to re-send buffers every step.
    ddp = None
    train_model = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; 2.11 knows only this name
            warnings.simplefilter("ignore", FutureWarning)
            ddp = train_model = DDP(model, device_ids=[dist.local_rank] if cuda else None, broadcast_buffers=False)
    compile_on = cuda if cfg.compile is None else cfg.compile
    if compile_on:
        train_model = torch.compile(train_model)
    model.train()

    # The first batch fixes the micro-batch shape, hence the accumulation and the token budget.
    loader_state = (lambda: batches.state_dict()) if hasattr(batches, "state_dict") else (lambda: None)
    pending_state = loader_state()
    x, y, mask = _batch_parts(next(batches))
    micro_tokens = x.numel() * dist.world_size
    grad_accum, total_batch = accumulation(cfg.total_batch_tokens, micro_tokens)
    if cfg.total_batch_tokens > 0 and total_batch != cfg.total_batch_tokens:
        say(f"note: {cfg.total_batch_tokens:,} tokens per step is not a multiple of {micro_tokens:,} (device batch x "
            f"sequence x {dist.world_size} devices): using {total_batch:,} ({grad_accum} micro-batches)")
    if cfg.max_steps > 0:
        total_steps = cfg.max_steps
    else:
        total_steps = max(1, round(cfg.param_data_ratio * model.num_params() / total_batch))
    flops_per_token, peak = model.flops_per_token(), peak_flops(device)
    say(f"{model.num_params():,} parameters, {flops_per_token:.3g} FLOPs/token, {total_batch:,} tokens/step "
        f"({grad_accum} x {x.size(0)} x {x.size(1)} x {dist.world_size} devices), up to {total_steps:,} steps "
        f"on {device} ({'bf16 autocast' if low else 'fp32'}{', compiled' if compile_on else ''})")

    def time_up() -> bool:
        return cfg.max_minutes > 0 and elapsed >= 60 * cfg.max_minutes

    def progress() -> float:
        p = step / total_steps
        return max(p, elapsed / (60 * cfg.max_minutes)) if cfg.max_minutes > 0 else p

    bar = tqdm(total=total_steps, initial=step, disable=not dist.is_main, dynamic_ncols=True, unit="step")
    result: dict = {"val_bpb": None, "loss": None}
    rates: list[float] = []  # tokens/s of each step this session
    ckpt_path = resumed_from  # stays so when the resumed run had already finished
    saved_at = elapsed
    epoch = getattr(batches, "epoch", 0)
    while True:
        last = step >= total_steps or time_up()
        if (step > start_step or step == 0) and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            model.eval()
            figures = {}
            if val_batches is not None:
                figures.update(evaluate_bpb(model, val_batches(), token_bytes, dist, autocast()))
            if evaluate is not None:
                figures.update(evaluate(model))
            model.train()
            if figures:
                result.update(figures)
                if dist.is_main:
                    append_metrics(metrics_path, {"kind": "eval", "step": step, **figures})
                say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
        if tokenizer is not None and dist.is_main and step > start_step and (
                last or (cfg.sample_every > 0 and step % cfg.sample_every == 0)):
            with autocast():
                texts = sample(model, tokenizer, prompts, seed=cfg.seed)
            for t in texts:
                say(f"  sample: {t!r}")
            append_metrics(metrics_path, {"kind": "sample", "step": step, "samples": texts})
            result["samples"] = texts
        every_minutes = cfg.save_every_minutes > 0 and elapsed >= saved_at + 60 * cfg.save_every_minutes
        if step > start_step and cfg.save_every >= 0 and (
                last or every_minutes or (cfg.save_every > 0 and step % cfg.save_every == 0)):
            # The batch fetched for the next step is not consumed yet, so record the position it came from.
            record = {**(meta or {}), "step": step, "elapsed": elapsed, "tokens": tokens_seen,
                      "loader": pending_state, "total_steps": total_steps,
                      "metrics": {k: v for k, v in result.items() if k in ("val_bpb", "val_loss", "loss")}}
            ckpt_path = run_dir / f"step_{step:06d}"
            check_ranks_agree(model, dist)
            if dist.fs_main:  # one copy per filesystem: on node-local disks every node keeps its own
                save_checkpoint(ckpt_path, model, tokenizer, record, optimizers)
                prune_checkpoints(run_dir, cfg.keep_last)
            fs_barrier(dist)
            saved_at = elapsed
        if last:
            break

        t0 = time.perf_counter()
        set_schedule(optimizers, lr_multiplier(progress(), cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac),
                     step)
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            # Only the last micro-batch all-reduces the gradients; no_sync() is a fresh context every time.
            sync = ddp is None or micro == grad_accum - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                with autocast():
                    loss = train_model(x, y, loss_mask=mask)
                (loss / grad_accum).backward()
            loss_sum += loss.detach()
            pending_state = loader_state()
            x, y, mask = _batch_parts(next(batches))
        if getattr(batches, "epoch", 0) != epoch:
            epoch = batches.epoch
            say(f"warning: the training data ran out at step {step + 1}: epoch {epoch + 1} repeats it (a bigger "
                f"corpus, e.g. more FineWeb-Edu shards, or fewer steps avoids this)")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss_val = (all_reduce(loss_sum, dist) / (grad_accum * dist.world_size)).item()  # .item() syncs the device
        dt = time.perf_counter() - t0
        if dist.world_size > 1:  # every rank follows rank 0's clock: the same lr, checkpoints and stop
            dt_t = torch.tensor([dt], dtype=torch.float64, device=device)
            torch_dist.broadcast(dt_t, 0)
            dt = dt_t.item()
        step += 1
        elapsed += dt
        tokens_seen += total_batch
        tok_s = total_batch / dt
        record = {"kind": "train", "step": step, "loss": loss_val, "lr_mult": optimizers[0].param_groups[0]["lr"]
                  / optimizers[0].param_groups[0]["initial_lr"], "tokens": tokens_seen, "tok_per_s": tok_s,
                  "elapsed": elapsed}
        if peak:
            record["mfu"] = flops_per_token * tok_s / (peak * dist.world_size)
        result["loss"] = loss_val
        rates.append(tok_s)
        if dist.is_main:
            append_metrics(metrics_path, record)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}",
                            **({"mfu": f"{record['mfu']:.1%}"} if peak else {}))
            if cfg.max_minutes > 0:  # a time limit ends the run first: let the bar's total and ETA follow it
                bar.total = min(total_steps, max(step, round(step / progress())))
            bar.update(1)
    bar.close()
    if dist.world_size > 1 and cfg.save_every >= 0:
        say(f"weights identical on all {dist.world_size} ranks at every checkpoint")

    if dist.is_main:
        name = run_dir.name
        plot = plot_metrics(metrics_path, run_dir / "loss.png", title=name)
        if plot is not None:
            plot_metrics(metrics_path, report_dir() / f"{name}_loss.png", title=name)
    if rates:  # the steady state: the median of the later half skips compilation and warm-up
        steady = sorted(rates[len(rates) // 2:])[len(rates[len(rates) // 2:]) // 2]
        result["tok_per_s"] = steady
        if peak:
            result["mfu"] = flops_per_token * steady / (peak * dist.world_size)
    if cuda:
        result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    result.update(step=step, elapsed=elapsed, tokens=tokens_seen, checkpoint=str(ckpt_path) if ckpt_path else None,
                  total_steps=total_steps)
    return result


def print_result(result: dict, run_dir: Path) -> None:
    """What a finished run reached and where its files went (pretraining and fine-tuning alike)."""
    # A loss is None when --resume found the run already finished: no step ran in this session.
    names = {"loss": "train loss", "val_loss": "val loss", "val_bpb": "val bpb"}
    figures = "".join(f", {name} {result[key]:.4f}" for key, name in names.items() if result.get(key) is not None)
    print(f"done: {result['step']} steps in {result['elapsed'] / 60:.1f} min{figures}")
    if "tok_per_s" in result:
        mfu = f", MFU {result['mfu']:.1%}" if "mfu" in result else ""
        mem = f", peak GPU memory {result['max_memory_gb']:.1f} GiB" if "max_memory_gb" in result else ""
        print(f"throughput: {result['tok_per_s']:,.0f} tokens/s (median of the later half of the steps){mfu}{mem}")
    print(f"checkpoint: {result['checkpoint']}")
    print(f"metrics: {run_dir / 'metrics.jsonl'}, plot: {run_dir / 'loss.png'}")
