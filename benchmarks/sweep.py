"""Shape sweep: which depth, context, batch and vocabulary reach the lowest val bits/byte in a fixed wall-clock
budget on this machine. The CPU plan of speedrun.sh picks its shape from this table.

Each point is a real `python -m pretrain` run on the default corpus with a time limit (its lr warmdown follows
the clock), scored by the same validation bits per byte as the speedrun, so vocabularies compare. A vocabulary
gets its own tokenizer and token shards once, in <home>/sweep/vocab_<N>/ (the corpus is shared).

    python benchmarks/sweep.py [--minutes 10] [--depths 3,4,5] [--sequence-lens 256] [--batch-tokens 4096]
                               [--vocab-sizes 8192] [--threads 0]

Points run one after another and append to <home>/report/sweep.jsonl as they finish: an interrupted sweep keeps
its points, and a rerun skips points already measured at the same budget and threads. The table, best first, goes
to <home>/report/sweep.md. The load average is recorded beside each point: other work on the machine slows a
point down and makes it look worse, so sweep on an idle machine.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path; the repo root must be importable.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.paths import data_dir, report_dir, scratchchat_home  # noqa: E402
from pretrain.report import read_metrics  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@functools.cache  # checked once per sweep: each check starts a python process
def vocab_home(home: Path, vocab: int) -> Path:
    """A home with the shared default corpus and this vocabulary's tokenizer and shards (made once)."""
    sub = home / "sweep" / f"vocab_{vocab}"
    (sub / "data").mkdir(parents=True, exist_ok=True)
    if not (sub / "data" / "default").exists():
        (sub / "data" / "default").symlink_to(data_dir("default"))
    quiet = dict(env={**os.environ, "SCRATCHCHAT_HOME": str(sub)}, check=True, stdout=subprocess.DEVNULL)
    if not (sub / "tokenizer" / "tokenizer.json").is_file():
        train = ["train", "--input", str(data_dir("default") / "train.parquet"), "--vocab-size", str(vocab)]
        subprocess.run([sys.executable, "-m", "tokenizer", *train], **quiet)
    # A no-op when the shards are up to date.
    subprocess.run([sys.executable, "-m", "pretrain.data", "tokenize", "--corpus", "default"], **quiet)
    return sub


def run_point(sub: Path, depth: int, seq: int, batch_tokens: int, minutes: float, threads: int) -> dict:
    """One time-limited pretraining run; its final figures."""
    rows = max(1, batch_tokens // seq)
    env = {**os.environ, "SCRATCHCHAT_HOME": str(sub), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=sub) as run_dir:
        shape = f"--depth {depth} --sequence-len {seq} --device-batch-size {rows} --max-minutes {minutes}"
        flags = ["--corpus", "default", *shape.split(), "--save-every", "-1", "--eval-every", "0", "--run-dir", run_dir]
        cmd = [sys.executable, "-m", "pretrain", *flags]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        records = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    final = [r for r in records if r.get("kind") == "eval"][-1]
    later = sorted(r["tok_per_s"] for r in train[len(train) // 2 :])
    return {
        "val_bpb": final["val_bpb"],
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"],
        "tok_per_s": later[len(later) // 2],
        "load": round((load + os.getloadavg()[0]) / 2, 2),
    }


def table(points: list[dict]) -> str:
    head = (
        "| val bpb | depth | context | batch tokens | vocab | steps | tokens | tokens/s | load |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {p['val_bpb']:.4f} | {p['depth']} | {p['sequence_len']} | {p['batch_tokens']:,} | {p['vocab']:,} | "
        f"{p['steps']:,} | {p['tokens']:,} | {p['tok_per_s']:,.0f} | {p['load']} |"
        for p in sorted(points, key=lambda p: p["val_bpb"])
    ]
    return "\n".join([head, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="pretraining wall clock per point")
    parser.add_argument("--depths", default="3,4,5")
    parser.add_argument("--sequence-lens", default="256")
    parser.add_argument("--batch-tokens", default="4096", help="tokens per optimizer step")
    parser.add_argument("--vocab-sizes", default="8192")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: all cores)")
    args = parser.parse_args()
    home, out = scratchchat_home(), report_dir()
    if not (data_dir("default") / "train.parquet").is_file():
        sys.exit("error: no default corpus; run `python -m pretrain.data default` first")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "sweep.jsonl"
    points = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    setting = {"minutes": args.minutes, "threads": args.threads or os.cpu_count()}
    grid = itertools.product(
        ints(args.vocab_sizes), ints(args.depths), ints(args.sequence_lens), ints(args.batch_tokens)
    )
    for vocab, depth, seq, batch_tokens in grid:
        shape = {"vocab": vocab, "depth": depth, "sequence_len": seq, "batch_tokens": batch_tokens, **setting}
        if any(all(p.get(k) == v for k, v in shape.items()) for p in points):
            continue
        point = {**shape, **run_point(vocab_home(home, vocab), depth, seq, batch_tokens, args.minutes, args.threads)}
        print(json.dumps(point), flush=True)
        points.append(point)
        with log.open("a") as f:
            f.write(json.dumps(point) + "\n")
    mine = [p for p in points if all(p.get(k) == v for k, v in setting.items())]
    text = f"## Shape sweep: {args.minutes:g} minutes per point, {setting['threads']} threads\n\n{table(mine)}\n"
    (out / "sweep.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
