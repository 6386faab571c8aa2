"""End-to-end: `bash speedrun.sh --quick` on a fresh $SCRATCHCHAT_HOME builds every stage's output and the report
card; a rerun skips every stage and rewrites nothing; an interrupted pretraining resumes from its checkpoint; a
failing stage or a bad flag stops with one clear line. The slowest test in the suite (one quick run, ~2 min)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.eval import format_table
from pretrain.checkpoint import latest_checkpoint, load_checkpoint
from pretrain.shards import read_shard
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("corpus", "tokenizer", "tokens", "pretrain", "sft", "eval", "report")
SECTIONS = (
    "## Environment",
    "## Tokenizer",
    "## Data",
    "## Pretraining",
    "## Supervised fine-tuning",
    "## Chat evaluation",
    "## Base model continuations",
    "## Sample conversations",
    "## Time",
)


def speedrun(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SCRATCHCHAT_HOME": str(home),
        "SCRATCHCHAT_NO_SETUP": "1",
        # the suite's own python (and its venv's scripts) first, as a user's activated venv would be
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return subprocess.run(
        ["bash", str(ROOT / "speedrun.sh"), *args], env=env, capture_output=True, text=True, timeout=900
    )


def snapshot(home: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(home)): (p.stat().st_mtime_ns, p.stat().st_size) for p in home.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    home = tmp_path_factory.mktemp("speedrun") / "home"
    run = speedrun(home, "--quick")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return home, run


def test_quick_run_builds_every_stage(quick):
    home, run = quick
    for name in STAGES:
        assert (home / "speedrun" / f"{name}.done").is_file(), name
        assert (home / "logs" / f"{name}.log").stat().st_size > 0, name
        start, end = map(int, (home / "speedrun" / f"{name}.time").read_text().split())
        assert 0 <= end - start < 900
    assert "Traceback" not in run.stdout + run.stderr

    corpus = json.loads((home / "data" / "default" / "manifest.json").read_text())
    assert {s["name"] for s in corpus["sources"]} >= {"wiki", "factbook", "bible"}
    assert all(s["docs"] > 0 and s["chars"] > 0 for s in corpus["sources"])
    assert (home / "data" / "default" / "train.parquet").is_file() and (
        home / "data" / "default" / "val.parquet"
    ).is_file()

    tok = Tokenizer.load(home / "tokenizer" / "tokenizer.json")
    assert tok.vocab_size == 1024 and "<|assistant_start|>" in tok.special_tokens
    assert tok.decode(tok.encode("The capital of France is Paris.")) == "The capital of France is Paris."

    tokens = json.loads((home / "tokens" / "default" / "manifest.json").read_text())
    assert tokens["tokenizer_hash"] == tok.hash and tokens["vocab_size"] == tok.vocab_size
    for split in ("train", "val"):
        info = tokens["splits"][split]
        shard = read_shard(home / "tokens" / "default" / info["files"][0])
        assert len(shard) == info["shard_counts"][0] > 0 and int(shard.max()) < tok.vocab_size

    base = latest_checkpoint(root=home / "checkpoints" / "base")
    sft = latest_checkpoint(root=home / "checkpoints" / "sft")
    assert base.name == "step_000030" and sft.name == "step_000020"
    base_model, base_tok, base_meta = load_checkpoint(base)
    _, sft_tok, sft_meta = load_checkpoint(sft)
    assert base_tok.hash == sft_tok.hash == tok.hash
    assert base_model.config.n_layer == 2 and Path(sft_meta["from"]) == base.resolve()

    evals = [json.loads(line) for line in (home / "report" / "metrics.jsonl").read_text().splitlines()]
    table = [e for e in evals if e["kind"] == "chat_eval"][-1]
    assert set(table["models"]) == {"base", "sft"} and all(r["n"] == 4 for r in table["rows"])
    assert format_table(table["rows"], ["base", "sft"]) in (home / "report" / "chat_eval.md").read_text()

    report = (home / "report" / "report.md").read_text()
    positions = [report.index(s) for s in SECTIONS]
    assert positions == sorted(positions), "sections out of order"
    assert f"**{base_meta['metrics']['val_bpb']:.4f}**" in report  # the final val bpb, from the checkpoint
    assert "| ours | 1,024 |" in report and "| arithmetic | 4 |" in report and "user: What is 12 + 7?" in report
    for png in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (home / "report" / png).is_file(), png
    assert "_No " not in report, "a section found no artifact"

    tail = run.stdout[-1500:]
    assert "python -m serve" in tail and "python -m tui" in tail and "/v1/chat/completions" in tail


def test_rerun_skips_every_stage_and_rewrites_nothing(quick):
    home, _ = quick
    before = snapshot(home)
    t0 = time.monotonic()
    again = speedrun(home, "--quick")
    seconds = time.monotonic() - t0
    assert again.returncode == 0, again.stderr
    for name in STAGES:
        assert f"== {name}: done earlier, skipping" in again.stdout
    assert snapshot(home) == before
    assert seconds < 60, f"a rerun with nothing to do took {seconds:.0f}s"


def test_interrupted_pretraining_resumes_from_its_checkpoint(quick):
    home = quick[0]  # the last test to use the run: the markers hold its paths, so it cannot be copied elsewhere
    # As if killed after the step-20 checkpoint: the last checkpoint and the completion marker never got written.
    command = (home / "speedrun" / "pretrain.done").read_text()
    (home / "speedrun" / "pretrain.done").unlink()
    (home / "speedrun" / "pretrain.started").write_text(command)
    shutil.rmtree(home / "checkpoints" / "base" / "step_000030")
    sft_before = (home / "speedrun" / "sft.done").stat().st_mtime_ns

    run = speedrun(home, "--quick")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "== corpus: done earlier, skipping" in run.stdout and "== tokens: done earlier, skipping" in run.stdout
    log = (home / "logs" / "pretrain.log").read_text()
    assert "resumed from" in log and "step_000020 at step 20" in log
    assert latest_checkpoint(root=home / "checkpoints" / "base").name == "step_000030"
    assert not (home / "speedrun" / "pretrain.started").exists()
    # Every stage after one that ran is rebuilt on the new base model.
    assert (home / "speedrun" / "sft.done").stat().st_mtime_ns > sft_before
    assert not (home / "checkpoints" / "base.prev").exists()


def test_failing_stage_names_the_stage_and_its_log(tmp_path):
    home = tmp_path / "home"
    (home / "speedrun").mkdir(parents=True)
    # The corpus stage counts as done, but its data is missing: the tokenizer stage fails on its input.
    (home / "speedrun" / "corpus.done").write_text("python -m pretrain.data default\n")
    run = speedrun(home, "--quick")
    log = home / "logs" / "tokenizer.log"
    assert run.returncode == 1
    assert f"error: stage 'tokenizer' failed; see {log}" in run.stderr
    assert "error:" in log.read_text() and "Traceback" not in log.read_text()
    assert not (home / "speedrun" / "tokenizer.done").exists() and not (home / "logs" / "tokens.log").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--depth", "two"], "error: --depth needs a whole number"),
        (["--depth"], "error: --depth needs a whole number"),
        (["--corpus", "mine"], "error: --corpus is default or fineweb-edu"),
        (["--fast"], "error: unknown flag --fast"),
    ],
)
def test_bad_flag_is_one_clear_line(tmp_path, args, message):
    run = speedrun(tmp_path / "home", "--quick", *args)
    assert run.returncode == 2
    assert run.stderr.strip().startswith(message) and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "home").exists()


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """A folder of stand-in commands (name -> sh body) to put first on PATH."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text("#!/bin/sh\n" + body + "\n")
        (folder / name).chmod(0o755)
    return folder


def test_gpus_that_torch_cannot_use_stop_the_run(tmp_path):
    # nvidia-smi lists a GPU, but this torch (a CPU build here; on a node, a CUDA build too new for the driver)
    # sees none: the speedrun must not quietly train on the CPU for hours.
    fake = fake_bin(tmp_path, **{"nvidia-smi": 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"'})
    env = {
        **os.environ,
        "SCRATCHCHAT_HOME": str(tmp_path / "home"),
        "SCRATCHCHAT_NO_SETUP": "1",
        "PATH": f"{fake}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("SCRATCHCHAT_DEVICE", None)
    run = subprocess.run(["bash", str(ROOT / "speedrun.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout[-2000:]
    assert (
        run.stderr.startswith("error: nvidia-smi lists 1 GPU(s) but torch") and "SCRATCHCHAT_DEVICE=cpu" in run.stderr
    )
    assert not (tmp_path / "home" / "data").exists()


def test_setup_refuses_a_python_older_than_3_11(tmp_path):
    # As on Ubuntu 22.04: python3 is 3.10 and no newer python is on PATH.
    fake = fake_bin(tmp_path, python3='[ "$1" = --version ] && echo "Python 3.10.12" && exit 0; exit 1')
    (fake / "dirname").symlink_to(shutil.which("dirname"))
    env = {"PATH": str(fake), "SCRATCHCHAT_VENV": str(tmp_path / "venv"), "HOME": str(tmp_path)}
    run = subprocess.run(
        [shutil.which("bash"), str(ROOT / "scripts" / "setup.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "error: scratchchat needs Python 3.11 or newer; found Python 3.10.12. Install one "
        "(e.g. apt install python3.11 python3.11-venv) and run again."
    )
    assert not (tmp_path / "venv").exists()
