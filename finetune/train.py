"""`python -m finetune`: supervised fine-tuning of a base checkpoint into a chat model.

Loads the base checkpoint (default: the latest under checkpoints/base), renders the conversation mix
with finetune.chat (loss on assistant tokens only), packs it into rows of the model's context and runs
the pretraining loop (pretrain.train.train: same optimizers, schedule, DDP under torchrun, metrics,
plot and atomic checkpoints) with a smaller learning rate. Checkpoints go to checkpoints/sft/step_N/.
Validation reports the loss on held-out conversations' assistant tokens; a quick chat eval on held-out
task items runs at every evaluation.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common.cli import config_from_args, explicit_flags, flag, parser_for, run_cli
from common.dist import Dist, distributed, fs_barrier
from common.paths import checkpoints_dir
from finetune import data as chat_data
from finetune import tasks
from finetune.eval import TOOL_TASKS
from finetune.eval import evaluate as chat_evaluate
from pretrain.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from pretrain.download import DownloadError
from pretrain.train import TrainConfig, accumulation, print_result, train

# Flags the user leaves unset take these values. The lr decays linearly over the last 80% of the run
# (pretraining: 20%), so its mean is ~0.6x pretraining's from the same peak. A lower peak (half) was
# measured worse on a CPU-sized run (val loss 3.57 vs 3.53, held-out arithmetic 12% vs 14%).
SFT_DEFAULTS = dict(
    matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, warmdown_ratio=0.8, eval_every=150, eval_tokens=2**15
)
CPU_DEFAULTS = dict(device_batch_size=16, max_minutes=7.5)  # + data, evals and saving: <= 10 min on 2 cores
CUDA_DEFAULTS = dict(device_batch_size=16)
SFT_ROWS_PER_STEP = {"cpu": 16, "cuda": 64}  # packed rows of the model's context per optimizer step
QUICK_EVAL_TASKS = ("arithmetic", "letters", "capital", "largest_mc")


@dataclass
class SFTConfig:
    from_checkpoint: str = flag(
        "", "base checkpoint dir, also --from (default: latest in $SCRATCHCHAT_HOME/checkpoints/base)"
    )
    data: str = flag(
        "default",
        "comma-separated sources: default (embedded mix), smoltalk (downloads), .jsonl/.parquet files or folders",
    )
    mix_scale: float = flag(1.0, "multiply the size of every part of the default mix")
    smoltalk_files: int = flag(1, "SmolTalk parquet shards to download for --data smoltalk")
    skip_bad: bool = flag(False, "skip (and count) malformed lines in user .jsonl/.parquet files instead of stopping")
    epochs: float = flag(1.0, "passes over the data when --max-steps is -1 (--max-minutes may stop it sooner)")
    val_conversations: int = flag(200, "conversations held out from the mix for the validation loss")
    quick_eval_items: int = flag(10, "held-out items per task in the chat eval at each evaluation (0: off)")
    run_dir: str = flag("", "checkpoints, metrics and plots (default: $SCRATCHCHAT_HOME/checkpoints/sft)")


def load_conversations(cfg: SFTConfig, seed: int, dist: Dist | None = None) -> tuple[list[chat_data.Conversation], str]:
    """All conversations named by --data, and a one-line summary of where they came from."""
    dist = dist or Dist()
    convs, notes = [], []
    for source in [s.strip() for s in cfg.data.split(",") if s.strip()]:
        if source == "default":
            mix, counts = chat_data.default_mix(seed, cfg.mix_scale)
            convs += mix
            notes.append("default mix (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")
            continue
        files = [source]
        if source == "smoltalk":
            if dist.fs_main:  # one process per filesystem downloads; the others then find the files complete
                chat_data.download_smoltalk(n_files=cfg.smoltalk_files)
            fs_barrier(dist)
            files = chat_data.download_smoltalk(n_files=cfg.smoltalk_files)
        got, skipped = chat_data.load_user_data(files, cfg.skip_bad)
        convs += got
        notes.append(f"{source} {len(got)}" + (f" ({skipped} bad skipped)" if skipped else ""))
    if not convs:
        raise chat_data.DataError("--data names no conversations")
    return convs, "; ".join(notes)


def quick_eval(tok, n: int, seed: int, say):
    """An `evaluate` hook for the training loop: accuracy on n held-out items of a few tasks (None when n is 0)."""
    if n <= 0:
        return None
    items = {t: tasks.generate(t, "eval", n, seed) for t in QUICK_EVAL_TASKS}

    def run(model) -> dict:
        out = {}
        for task, its in items.items():  # the calculator's tasks with the calculator, as a chat would run them
            tool = task in TOOL_TASKS
            res = chat_evaluate(model, tok, its, max_new_tokens=16, tool=tool)
            out[f"acc_{task}{'+tool' * tool}"] = res.accuracy
        prompt, response, *_ = res.samples[0]
        say(f"  chat sample: {prompt.splitlines()[0]!r} -> {response!r}")
        return out

    return run


def load_base(scfg: SFTConfig, device: torch.device):
    """(model, tokenizer, path) of the base checkpoint to fine-tune: --from, else the newest one."""
    base = Path(scfg.from_checkpoint) if scfg.from_checkpoint else latest_checkpoint("base")
    if base is None:
        raise CheckpointError(
            f"no base checkpoint in {checkpoints_dir('base')}; run python -m pretrain first or pass --from CHECKPOINT"
        )
    if not base.is_dir():
        raise CheckpointError(f"{base}: no such checkpoint directory")
    model, tok, _ = load_checkpoint(base, device=device)
    if tok is None:
        raise CheckpointError(f"{base} has no tokenizer (a synthetic run?); SFT needs a real tokenizer")
    return model, tok, base


def set_defaults(tcfg: TrainConfig, explicit: set[str], dist: Dist, seq_len: int) -> None:
    """Fill the flags the user left unset for this hardware."""
    table = {**SFT_DEFAULTS, **(CUDA_DEFAULTS if dist.device.type == "cuda" else CPU_DEFAULTS)}
    for key, value in table.items():
        if key not in explicit and not (key == "max_minutes" and tcfg.max_steps > 0):
            setattr(tcfg, key, value)
    if "total_batch_tokens" not in explicit:
        # The same optimizer batch on any number of devices, so the learning rates hold: fewer rows per device
        # as devices are added, gradient accumulation where one micro-step holds fewer than the step.
        rows = SFT_ROWS_PER_STEP["cuda" if dist.device.type == "cuda" else "cpu"]
        tcfg.total_batch_tokens = rows * seq_len
        if "device_batch_size" not in explicit:
            tcfg.device_batch_size = max(1, min(tcfg.device_batch_size, rows // dist.world_size))


def finetune(scfg: SFTConfig, tcfg: TrainConfig, explicit: set[str]) -> None:
    """Render the conversations, pack them into rows, train, and say where the checkpoint went."""
    with distributed(tcfg.device) as dist:
        model, tok, base = load_base(scfg, dist.device)
        seq_len = model.config.sequence_len
        set_defaults(tcfg, explicit, dist, seq_len)
        say = tqdm.write if dist.is_main else (lambda *a, **k: None)

        convs, summary = load_conversations(scfg, tcfg.seed, dist)
        random.Random(tcfg.seed).shuffle(convs)
        n_val = min(scfg.val_conversations, len(convs) // 10)
        examples, stats = chat_data.render_all(tok, convs[n_val:], seq_len + 1)
        val_examples, _ = chat_data.render_all(tok, convs[:n_val], seq_len + 1)
        say(f"data: {summary}")
        say(
            f"fit to {seq_len + 1} tokens: {stats.conversations} conversations -> {len(examples)} examples; "
            f"{stats.split} split between exchanges, {stats.dropped_exchanges} over-long exchanges dropped, "
            f"{stats.dropped} conversations dropped, {sum(stats.invalid.values())} invalid"
            + (f" ({dict(stats.invalid.most_common(3))})" if stats.invalid else "")
        )

        def packed(exs: list) -> chat_data.SFTLoader:
            return chat_data.SFTLoader(exs, tcfg.device_batch_size, seq_len, tok.bos_id, tcfg.seed, dist)

        loader = packed(examples)
        learned = sum(sum(m) for _, m in examples)
        rows = loader.rows_per_epoch()
        say(
            f"{rows} packed rows of {seq_len} tokens per epoch, {learned:,} learned (assistant) tokens "
            f"({learned / (rows * seq_len):.0%} of the rows)"
        )
        if tcfg.max_steps <= 0:  # rows counts every rank's rows, so compare it with every rank's rows per step
            _, step_tokens = accumulation(tcfg.total_batch_tokens, tcfg.device_batch_size * seq_len * dist.world_size)
            tcfg.max_steps = max(1, round(scfg.epochs * rows * seq_len / step_tokens))
        val_loader = packed(val_examples) if val_examples else None
        run_dir = Path(scfg.run_dir) if scfg.run_dir else checkpoints_dir("sft")
        meta = {
            "kind": "sft",
            "from": str(base.resolve()),
            "data": summary,
            "examples": len(examples),
            "dropped_conversations": stats.dropped,
            "dropped_exchanges": stats.dropped_exchanges,
            "split_conversations": stats.split,
        }
        result = train(
            model,
            tcfg,
            loader,
            run_dir=run_dir,
            tokenizer=tok,
            val_batches=(lambda: val_loader.iter_val(tcfg.eval_tokens)) if val_loader else None,
            evaluate=quick_eval(tok, scfg.quick_eval_items, tcfg.seed, say),
            dist=dist,
            meta=meta,
            prompts=(),
        )
    if dist.is_main:
        print_result(result, run_dir)
        print(f"next: python -m finetune.eval --checkpoint {result['checkpoint']}")


def main(argv: list[str] | None = None) -> int:
    # `--from` is the documented spelling; a dataclass field cannot be named `from`.
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["--from-checkpoint" + a[len("--from") :] if a == "--from" or a.startswith("--from=") else a for a in argv]
    parser = parser_for(SFTConfig, TrainConfig, prog="python -m finetune", description=__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    scfg, tcfg = config_from_args(SFTConfig, args), config_from_args(TrainConfig, args)
    explicit = explicit_flags(parser, argv)
    return run_cli(
        lambda: finetune(scfg, tcfg, explicit),
        (CheckpointError, chat_data.DataError, DownloadError, FileNotFoundError, ValueError, OSError),
    )
