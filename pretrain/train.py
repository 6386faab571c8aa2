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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from common.cli import flag
from common.dist import Dist, all_reduce, fs_barrier
from common.paths import report_dir
from pretrain.checkpoint import (
    CheckpointError,
    load_model_state,
    load_optimizer_state,
    prune_checkpoints,
    save_checkpoint,
    step_dirs,
)
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
    eval_tokens: int = flag(1_048_576, "validation tokens per evaluation, the same ones for any batch shape (0: all)")
    sample_every: int = flag(0, "print samples from fixed prompts every N steps (0: at the end only)")
    save_every: int = flag(0, "checkpoint every N steps (0: at the end only, -1: never, e.g. for benchmarks)")
    save_every_minutes: float = flag(0.0, "also checkpoint every M minutes of training (0: off)")
    keep_last: int = flag(2, "checkpoints to keep (0: all)")
    resume: bool = flag(False, "continue the newest checkpoint in the run directory exactly")
    compile: bool | None = flag(None, "torch.compile the model (default: on for CUDA, off otherwise)")
    dtype: str = flag(
        "auto",
        "autocast dtype of the matmuls: bf16, fp32 or auto (bf16 on CUDA and on CPUs with "
        "bf16 matmul instructions, fp32 elsewhere)",
    )
    device: str = flag("auto", "cuda, cpu, mps or auto ($SCRATCHCHAT_DEVICE, else the best available)")
    seed: int = flag(42, "seed for the model init and sampling")


# ----------------------------------------------------------------------------- devices and precision


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, for MFU; None where we do not know it (CPU, unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # The first name part that matches: "H200" covers GH200 too, and L40S comes before L4.
    tflops = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "A10G": 125, "L4": 121, "4090": 165}
    return next((t * 1e12 for key, t in tflops.items() if key in name), None)


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


@dataclass
class SyntheticLoader:
    """Seeded token batches for a bare machine: each row repeats a random snippet of skewed (low ids common)
    tokens, so a model has something to learn at once (the unigram) and later (copying).

    Batch i of a run is the same on any number of ranks (rank r of w takes batch index*w + r), and its
    position is one integer, so resume and DDP behave as with real shards."""

    vocab_size: int
    batch_size: int
    seq_len: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    device: str | torch.device = "cpu"
    index: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)

    def _batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        period = int(torch.randint(4, 64, (1,), generator=g))
        snippet = (self.vocab_size * torch.rand(self.batch_size, period, generator=g) ** 3).long()
        rows = snippet.repeat(1, (self.seq_len + 1) // period + 1)[:, : self.seq_len + 1].to(self.device)
        return rows[:, :-1], rows[:, 1:]

    def __iter__(self) -> SyntheticLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._batch(self.index * self.world_size + self.rank)
        self.index += 1
        return batch

    def iter_val(self, max_tokens: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        per_batch = self.batch_size * self.seq_len * self.world_size
        for i in range(-(-max_tokens // per_batch) if max_tokens > 0 else 4):
            yield self._batch(-1 - (i * self.world_size + self.rank))  # negative indices: never trained on

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


# ----------------------------------------------------------------------------- evaluation


def token_byte_lengths(tokenizer, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bytes each token id decodes to (0 for special tokens), for bits per byte."""
    return torch.tensor(
        [len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=torch.float64, device=device
    )


@torch.no_grad()
def evaluate_bpb(
    model: GPT,
    batches: Iterable,
    token_bytes: torch.Tensor | None,
    dist: Dist | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict:
    """Validation loss (nats/token) and bits per byte = sum of nats over target tokens / (ln 2 * their bytes).

    Special-token targets (0 bytes) are left out of bits per byte, so it measures text only and is comparable
    across tokenizers. Sums are reduced over DDP ranks."""
    dist = dist or Dist()
    device = model.lm_head.weight.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats over text, bytes, nats over all, tokens
    for x, y, *_ in batches:
        T, V = x.size(1), model.config.vocab_size
        rows = max(1, 2**29 // (T * V))  # bound the fp32 logits of one forward to ~2 GB
        for i in range(0, x.size(0), rows):
            xs, ys = x[i : i + rows], y[i : i + rows]
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


def sample(
    model: GPT,
    tokenizer,
    prompts: Sequence[str] = SAMPLE_PROMPTS,
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
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
    low = all_reduce(sums.clone(), dist, torch_dist.ReduceOp.MIN)
    high = all_reduce(sums.clone(), dist, torch_dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("the ranks' weights have diverged; this is a bug, please report it")


def _resume_point(run_dir: Path, dist: Dist) -> Path:
    """The newest checkpoint that every rank can read: on node-local disks a kill during a save may have left
    one node a step ahead, so all ranks take the lowest of their newest steps."""
    steps = dict(step_dirs(run_dir))
    found = torch.tensor([max(steps, default=-1)], device=dist.device)
    all_reduce(found, dist, torch_dist.ReduceOp.MIN)
    step = int(found.item())
    if step < 0:
        raise CheckpointError(
            f"nothing to resume: no step_N checkpoint in {run_dir}" + (" on every node" if dist.world_size > 1 else "")
        )
    if step not in steps:
        raise CheckpointError(f"cannot resume: step {step} is missing from {run_dir} on this node; start afresh")
    return steps[step]


def _batch_parts(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x, y, *mask = batch
    return x, y, mask[0] if mask else None


def train(
    model: GPT,
    cfg: TrainConfig,
    batches,
    *,
    run_dir: str | Path,
    tokenizer=None,
    val_batches: Callable[[], Iterable] | None = None,
    evaluate: Callable[[GPT], dict] | None = None,
    dist: Dist | None = None,
    meta: dict | None = None,
    prompts: Sequence[str] = SAMPLE_PROMPTS,
) -> dict:
    """Train `model` (already on its device, initialised or loaded) on `batches`; returns the final figures.

    run_dir: where step_N/ checkpoints, metrics.jsonl and loss.png go (e.g. $SCRATCHCHAT_HOME/checkpoints/base).
    tokenizer: saved into checkpoints; with it, validation reports bits per byte and samples are printed.
    val_batches: returns a fresh deterministic iterable of validation batches (this rank's share).
    evaluate: extra evaluation (model -> metrics dict), e.g. chat evals in fine-tuning; runs on every rank.
    meta: json-able facts stored in every checkpoint (e.g. the corpus, the base checkpoint).
    """
    run = _Run(model, cfg, batches, Path(run_dir), tokenizer, dist or Dist(device=model.lm_head.weight.device), meta)
    while True:
        last = run.step >= run.total_steps or (cfg.max_minutes > 0 and run.elapsed >= 60 * cfg.max_minutes)
        ran = run.step > run.start_step
        if (ran or run.step == 0) and (last or _every(cfg.eval_every, run.step)):
            run.evaluate(val_batches, evaluate)
        if tokenizer is not None and ran and (last or _every(cfg.sample_every, run.step)):
            run.sample(prompts)
        due = cfg.save_every_minutes > 0 and run.elapsed >= run.saved_at + 60 * cfg.save_every_minutes
        if ran and cfg.save_every >= 0 and (last or due or _every(cfg.save_every, run.step)):
            run.save()
        if last:
            return run.finish()
        run.optimizer_step()


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


class _Run:
    """One training run's state and its phases, in the order train() calls them: set up (optimizers, resume,
    DDP and compile, the batch plan), then evaluate / sample / save / step until the end, then the figures."""

    def __init__(
        self, model: GPT, cfg: TrainConfig, batches, run_dir: Path, tokenizer, dist: Dist, meta: dict | None
    ) -> None:
        self.model, self.cfg, self.batches, self.run_dir = model, cfg, batches, run_dir
        self.tokenizer, self.dist = tokenizer, dist
        self.meta, self.device, self.metrics_path = meta or {}, dist.device, run_dir / "metrics.jsonl"
        self.say = tqdm.write if dist.is_main else (lambda *a, **k: None)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.low = autocast_dtype(cfg.dtype, self.device)
        hyper = {k: getattr(cfg, k) for k in ("matrix_lr", "embedding_lr", "unembedding_lr", "weight_decay")}
        self.optimizers = build_optimizers(model, **hyper)
        self.token_bytes = token_byte_lengths(tokenizer, self.device) if tokenizer is not None else None
        self.step, self.elapsed, self.tokens, self.checkpoint = 0, 0.0, 0, None
        if cfg.resume:
            self._restore()
        self.start_step, self.saved_at = self.step, self.elapsed
        self.result: dict = {"val_bpb": None, "loss": None}
        self.rates: list[float] = []  # tokens/s of each step this session
        self._wrap()
        self._plan()
        self.epoch = getattr(batches, "epoch", 0)
        self.bar = tqdm(
            total=self.total_steps, initial=self.step, disable=not dist.is_main, dynamic_ncols=True, unit="step"
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.low) if self.low else contextlib.nullcontext()

    # --- set-up

    def _restore(self) -> None:
        """Continue the newest checkpoint every rank has: weights, optimizer state, position, data."""
        path = _resume_point(self.run_dir, self.dist)
        saved = load_model_state(path, self.model)
        if self.tokenizer is not None and saved.get("tokenizer_hash") not in (None, self.tokenizer.hash):
            raise CheckpointError(
                f"{path} was trained with tokenizer {saved['tokenizer_hash'][:12]}, "
                f"this run uses {self.tokenizer.hash[:12]}"
            )
        load_optimizer_state(path, self.optimizers)
        m = saved["meta"]
        self.step, self.elapsed, self.tokens = m["step"], m["elapsed"], m["tokens"]
        if "loader" in m and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(m["loader"])
        rank = f" (rank {self.dist.rank})" if self.dist.world_size > 1 else ""
        print(f"resumed from {path} at step {self.step}{rank}")
        self.checkpoint = path  # stays so when the resumed run had already finished

    def _wrap(self) -> None:
        """DDP first, then compile: the compiled graph splits at DDP's buckets, so each gradient all-reduce
        overlaps the rest of the backward pass. The rotary tables never change: no buffers re-sent per step."""
        self.ddp, self.train_model = None, self.model
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; 2.11 knows only this name
                warnings.simplefilter("ignore", FutureWarning)
                ids = [self.dist.local_rank] if self.device.type == "cuda" else None
                self.ddp = self.train_model = DDP(self.model, device_ids=ids, broadcast_buffers=False)
        self.compiled = self.device.type == "cuda" if self.cfg.compile is None else self.cfg.compile
        if self.compiled:
            self.train_model = torch.compile(self.train_model)
        self.model.train()

    def _plan(self) -> None:
        """The first batch fixes the micro-batch shape, hence the accumulation and the token budget."""
        cfg, dist = self.cfg, self.dist
        self.pending_state = self._loader_state()
        self.x, self.y, self.mask = _batch_parts(next(self.batches))
        micro_tokens = self.x.numel() * dist.world_size
        self.grad_accum, self.total_batch = accumulation(cfg.total_batch_tokens, micro_tokens)
        if cfg.total_batch_tokens > 0 and self.total_batch != cfg.total_batch_tokens:
            self.say(
                f"note: {cfg.total_batch_tokens:,} tokens per step is not a multiple of {micro_tokens:,} "
                f"(device batch x sequence x {dist.world_size} devices): using {self.total_batch:,} "
                f"({self.grad_accum} micro-batches)"
            )
        params = self.model.num_params()
        self.total_steps = (
            cfg.max_steps if cfg.max_steps > 0 else max(1, round(cfg.param_data_ratio * params / self.total_batch))
        )
        self.flops_per_token, self.peak = self.model.flops_per_token(), peak_flops(self.device)
        self.say(
            f"{params:,} parameters, {self.flops_per_token:.3g} FLOPs/token, {self.total_batch:,} tokens/step "
            f"({self.grad_accum} x {self.x.size(0)} x {self.x.size(1)} x {dist.world_size} devices), up to "
            f"{self.total_steps:,} steps on {self.device} ({'bf16 autocast' if self.low else 'fp32'}"
            f"{', compiled' if self.compiled else ''})"
        )

    def _loader_state(self) -> dict | None:
        return self.batches.state_dict() if hasattr(self.batches, "state_dict") else None

    # --- the phases of the loop

    def evaluate(self, val_batches: Callable[[], Iterable] | None, evaluate: Callable[[GPT], dict] | None) -> None:
        self.model.eval()
        figures = {}
        if val_batches is not None:
            figures.update(evaluate_bpb(self.model, val_batches(), self.token_bytes, self.dist, self.autocast()))
        if evaluate is not None:
            figures.update(evaluate(self.model))
        self.model.train()
        if figures:
            self.result.update(figures)
            if self.dist.is_main:
                append_metrics(self.metrics_path, {"kind": "eval", "step": self.step, **figures})
            self.say(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))

    def sample(self, prompts: Sequence[str]) -> None:
        if not self.dist.is_main:
            return
        with self.autocast():
            texts = sample(self.model, self.tokenizer, prompts, seed=self.cfg.seed)
        for t in texts:
            self.say(f"  sample: {t!r}")
        append_metrics(self.metrics_path, {"kind": "sample", "step": self.step, "samples": texts})
        self.result["samples"] = texts

    def save(self) -> None:
        # The batch fetched for the next step is not consumed yet, so record the position it came from.
        record = {
            **self.meta,
            "step": self.step,
            "elapsed": self.elapsed,
            "tokens": self.tokens,
            "loader": self.pending_state,
            "total_steps": self.total_steps,
            "metrics": {k: v for k, v in self.result.items() if k in ("val_bpb", "val_loss", "loss")},
        }
        self.checkpoint = self.run_dir / f"step_{self.step:06d}"
        check_ranks_agree(self.model, self.dist)
        if self.dist.fs_main:  # one copy per filesystem: on node-local disks every node keeps its own
            save_checkpoint(self.checkpoint, self.model, self.tokenizer, record, self.optimizers)
            prune_checkpoints(self.run_dir, self.cfg.keep_last)
        fs_barrier(self.dist)
        self.saved_at = self.elapsed

    def progress(self) -> float:
        p = self.step / self.total_steps
        return max(p, self.elapsed / (60 * self.cfg.max_minutes)) if self.cfg.max_minutes > 0 else p

    def optimizer_step(self) -> None:
        cfg, dist = self.cfg, self.dist
        t0 = time.perf_counter()
        lr_mult = lr_multiplier(self.progress(), cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
        set_schedule(self.optimizers, lr_mult, self.step)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            # Only the last micro-batch all-reduces the gradients; no_sync() is a fresh context every time.
            sync = self.ddp is None or micro == self.grad_accum - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.autocast():
                    loss = self.train_model(self.x, self.y, loss_mask=self.mask)
                (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
            self.pending_state = self._loader_state()
            self.x, self.y, self.mask = _batch_parts(next(self.batches))
        if getattr(self.batches, "epoch", 0) != self.epoch:
            self.epoch = self.batches.epoch
            self.say(
                f"warning: the training data ran out at step {self.step + 1}: epoch {self.epoch + 1} repeats "
                f"it (a bigger corpus, e.g. more FineWeb-Edu shards, or fewer steps avoids this)"
            )
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        loss = (all_reduce(loss_sum, dist) / (self.grad_accum * dist.world_size)).item()  # .item() syncs the device
        dt = time.perf_counter() - t0
        if dist.world_size > 1:  # every rank follows rank 0's clock: the same lr, checkpoints and stop
            dt_t = torch.tensor([dt], dtype=torch.float64, device=self.device)
            torch_dist.broadcast(dt_t, 0)
            dt = dt_t.item()
        self.step, self.elapsed, self.tokens = self.step + 1, self.elapsed + dt, self.tokens + self.total_batch
        self._log_step(loss, self.total_batch / dt)

    def _log_step(self, loss: float, tok_s: float) -> None:
        group = self.optimizers[0].param_groups[0]
        record = {
            "kind": "train",
            "step": self.step,
            "loss": loss,
            "lr_mult": group["lr"] / group["initial_lr"],
            "tokens": self.tokens,
            "tok_per_s": tok_s,
            "elapsed": self.elapsed,
        }
        if self.peak:
            record["mfu"] = self.flops_per_token * tok_s / (self.peak * self.dist.world_size)
        self.result["loss"] = loss
        self.rates.append(tok_s)
        if self.dist.is_main:
            append_metrics(self.metrics_path, record)
            self.bar.set_postfix(
                loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", **({"mfu": f"{record['mfu']:.1%}"} if self.peak else {})
            )
            if self.cfg.max_minutes > 0:  # a time limit ends the run first: let the bar's total and ETA follow it
                self.bar.total = min(self.total_steps, max(self.step, round(self.step / self.progress())))
            self.bar.update(1)

    # --- the end

    def finish(self) -> dict:
        """Plots, the steady throughput, and the figures train() returns."""
        self.bar.close()
        dist, result = self.dist, self.result
        if dist.world_size > 1 and self.cfg.save_every >= 0:
            self.say(f"weights identical on all {dist.world_size} ranks at every checkpoint")
        if dist.is_main:
            name = self.run_dir.name
            if plot_metrics(self.metrics_path, self.run_dir / "loss.png", title=name) is not None:
                plot_metrics(self.metrics_path, report_dir() / f"{name}_loss.png", title=name)
        if self.rates:  # the steady state: the median of the later half skips compilation and warm-up
            later = sorted(self.rates[len(self.rates) // 2 :])
            result["tok_per_s"] = later[len(later) // 2]
            if self.peak:
                result["mfu"] = self.flops_per_token * result["tok_per_s"] / (self.peak * dist.world_size)
        if self.device.type == "cuda":
            result["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        result.update(
            step=self.step,
            elapsed=self.elapsed,
            tokens=self.tokens,
            total_steps=self.total_steps,
            checkpoint=str(self.checkpoint) if self.checkpoint else None,
        )
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
