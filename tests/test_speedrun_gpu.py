"""The GPU plan of speedrun.sh end to end on CPU ranks: SCRATCHCHAT_DEVICE=cpu puts every stage on the CPU and
torchrun's ranks on gloo. FineWeb-Edu, SmolTalk and the benchmarks come from a local HTTP server that serves
files the test writes. One run uses 2 ranks on one node and is SIGKILLed during pretraining, then resumed; two
more run two "nodes" on this machine (two speedrun invocations, NNODES=2), with node-local homes and with one
shared home. The plan is --quick sized: depth 2, 30 steps of 2048 tokens (gradient accumulation 2 on 2 ranks)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file
from test_download import Server

from pretrain.checkpoint import latest_checkpoint
from pretrain.download import FINEWEB_LAST_SHARD, fineweb_shard_name
from pretrain.report import read_metrics

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the river city water light history people north small stone music garden winter market school bridge "
    "language mountain island farmer story ancient quiet machine forest harbor"
).split()
FINEWEB = [fineweb_shard_name(i) for i in (0, 1, FINEWEB_LAST_SHARD)]
SMOLTALK = "train-00000-of-00004.parquet"
BENCHMARKS = ("mmlu.parquet", "arc-challenge.parquet", "arc-easy.parquet", "gsm8k.parquet")


def parquet(columns: dict) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def web_text(rng: random.Random, docs: int) -> list[str]:
    return [
        " ".join(
            " ".join(rng.choices(WORDS, k=rng.randint(6, 14))).capitalize() + "." for _ in range(rng.randint(3, 8))
        )
        for _ in range(docs)
    ]


@pytest.fixture(scope="module")
def mirror():
    rng = random.Random(0)
    files = {name: parquet({"text": web_text(rng, 250)}) for name in FINEWEB}
    chats = [
        [
            {"role": "user", "content": f"Tell me about the {w}."},
            {"role": "assistant", "content": f"The {w} is a fine thing to talk about."},
        ]
        for w in WORDS
    ]
    files[SMOLTALK] = parquet({"messages": chats})
    files["mmlu.parquet"] = parquet(
        {"question": ["Which is a colour?"] * 8, "choices": [["red", "run", "up", "so"]] * 8, "answer": [0] * 8}
    )
    arc = {
        "id": [f"q{i}" for i in range(8)],
        "question": ["What melts ice?"] * 8,
        "answerKey": ["A"] * 8,
        "choices": [{"label": ["A", "B", "C"], "text": ["heat", "cold", "dark"]}] * 8,
    }
    files["arc-challenge.parquet"] = files["arc-easy.parquet"] = parquet(arc)
    files["gsm8k.parquet"] = parquet(
        {"question": ["Tom has 2 apples and gets 3 more. How many?"] * 8, "answer": ["2 + 3 = 5\n#### 5"] * 8}
    )
    server = Server(files)
    yield server
    server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(home: Path, mirror, *args: str, port: int, node: int | None = None) -> subprocess.Popen:
    env = {
        **os.environ,
        "SCRATCHCHAT_HOME": str(home),
        "SCRATCHCHAT_NO_SETUP": "1",
        "SCRATCHCHAT_DEVICE": "cpu",
        "SCRATCHCHAT_FINEWEB_URL": mirror.url,
        "SCRATCHCHAT_BENCHMARK_URL": mirror.url,
        "SCRATCHCHAT_SMOLTALK_URL": mirror.url + "/train-{i:05d}-of-{n:05d}.parquet",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if node is not None:
        env.update(NNODES="2", NODE_RANK=str(node))
    log = open(home.parent / f"{home.name}-node{node or 0}.out", "a")
    return subprocess.Popen(
        ["bash", str(ROOT / "speedrun.sh"), "--quick", "--shards", "2", "--vocab-size", "512", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_at_checkpoint(procs: list[subprocess.Popen], homes: list[Path], step: int = 20) -> None:
    """SIGKILL every process of every run once each home holds pretraining's step checkpoint."""
    deadline = time.monotonic() + 600
    while not all((h / "checkpoints" / "base" / f"step_{step:06d}").is_dir() for h in homes):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint to kill at"
        time.sleep(0.02)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def finish(procs: list[subprocess.Popen], homes: list[Path]) -> None:
    for p, h in zip(procs, homes):
        rc = p.wait(timeout=900)
        out = (h.parent / f"{h.name}-node{procs.index(p) if len(procs) > 1 else 0}.out").read_text()
        assert rc == 0, out[-4000:]
        assert "Traceback" not in out


def gets(mirror) -> Counter:
    """Whole-file GET requests per file name (a resumed download would carry a Range header)."""
    return Counter(name for name, rng in mirror.log if rng is None)


def weights(home: Path, kind: str) -> dict:
    return load_file(latest_checkpoint(root=home / "checkpoints" / kind) / "model.safetensors")


def test_gpu_plan_on_two_cpu_ranks_survives_sigkill(tmp_path, mirror):
    home = tmp_path / "home"
    home.mkdir()
    mirror.log.clear()
    kill_at_checkpoint([start(home, mirror, "--gpus", "2", port=free_port())], [home])
    run = start(home, mirror, "--gpus", "2", port=free_port())
    finish([run], [home])

    # The tokenizer trained on the web text, and every stage ran on it.
    assert "fineweb-edu/shard_00000.parquet" in (home / "speedrun" / "tokenizer.done").read_text()
    log = (home / "logs" / "pretrain.log").read_text()
    assert "speedrun: plan=quick gpus=2" in (tmp_path / "home-node0.out").read_text()
    assert "(2 x 4 x 128 x 2 devices)" in log  # gradient accumulation 2 on each of 2 ranks
    for rank in (0, 1):
        assert f"step_000020 at step 20 (rank {rank})" in log
    assert "weights identical on all 2 ranks at every checkpoint" in log
    assert latest_checkpoint(root=home / "checkpoints" / "base").name == "step_000030"
    assert latest_checkpoint(root=home / "checkpoints" / "sft") is not None

    # One process with the same total batch (4 micro-batches of 4 rows) sees the same data and loss.
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain",
            "--corpus",
            "fineweb-edu",
            "--depth",
            "2",
            "--max-steps",
            "3",
            "--device-batch-size",
            "4",
            "--sequence-len",
            "128",
            "--total-batch-tokens",
            "2048",
            "--run-dir",
            str(tmp_path / "single"),
            "--device",
            "cpu",
        ],
        env={**os.environ, "SCRATCHCHAT_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    loss = {
        r["step"]: r["loss"]
        for r in read_metrics(home / "checkpoints" / "base" / "metrics.jsonl")
        if r["kind"] == "train"
    }
    one = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if r["kind"] == "train"}
    assert one[1] == pytest.approx(loss[1], rel=1e-5)
    assert [one[s] for s in (2, 3)] == pytest.approx([loss[s] for s in (2, 3)], rel=2e-3)

    # SmolTalk and the benchmarks came through the mirror, once each, and reached the eval and the report.
    assert all(n == 1 for n in gets(mirror).values()) and set(gets(mirror)) == {*FINEWEB, SMOLTALK, *BENCHMARKS}
    assert "smoltalk" in (home / "logs" / "sft.log").read_text()
    evals = (home / "report" / "chat_eval.md").read_text()
    assert all(f"| {name} |" in evals for name in ("mmlu", "arc-challenge", "arc-easy", "gsm8k"))
    report = (home / "report" / "report.md").read_text()
    assert "## Tokenizer" in report and "## Time" in report and "download" in report

    # A rerun finds every stage done, fetches nothing, and keeps every recorded time.
    times = {p.name: p.read_text() for p in (home / "speedrun").glob("*.time")}
    mirror.log.clear()
    again = start(home, mirror, "--gpus", "2", port=free_port())
    finish([again], [home])
    out = (tmp_path / "home-node0.out").read_text()
    assert all(
        f"== {name}: done earlier, skipping" in out.rsplit("speedrun: plan=", 1)[1]
        for name in ("corpus", "tokenizer", "tokens", "pretrain", "sft", "eval", "report")
    )
    assert not gets(mirror) and times == {p.name: p.read_text() for p in (home / "speedrun").glob("*.time")}


@pytest.mark.parametrize("layout", ["node-local", "shared"])
def test_two_nodes_on_one_machine(tmp_path, mirror, layout):
    homes = [tmp_path / "home0", tmp_path / "home1"] if layout == "node-local" else [tmp_path / "home"] * 2
    for h in homes:
        h.mkdir(exist_ok=True)
    mirror.log.clear()
    port = free_port()
    kill_at_checkpoint(
        [start(h, mirror, "--gpus", "1", port=port, node=n) for n, h in enumerate(homes)], list(set(homes))
    )
    port = free_port()
    finish([start(h, mirror, "--gpus", "1", port=port, node=n) for n, h in enumerate(homes)], homes)

    fetched = gets(mirror)
    assert set(fetched) == {*FINEWEB, SMOLTALK, *BENCHMARKS}
    for name, n in fetched.items():  # once per filesystem: the benchmarks only on the first node, which evaluates
        assert n == (1 if layout == "shared" or name in BENCHMARKS else 2), (name, n)
    for h in homes:
        log = (h / "logs" / "pretrain.log").read_text()
        assert "resumed from" in log and "at step 20" in log
        assert latest_checkpoint(root=h / "checkpoints" / "base").name == "step_000030"
    # Every node holds the same trained weights; only the first node evaluates and writes the report card.
    if layout == "node-local":
        for kind in ("base", "sft"):
            a, b = weights(homes[0], kind), weights(homes[1], kind)
            assert all((a[k] == b[k]).all() for k in a)
        assert not (homes[1] / "report" / "report.md").exists()
    assert "| mmlu |" in (homes[0] / "report" / "chat_eval.md").read_text()
    # Each node trained its own tokenizer on its own copy of the text: the same one, so the shards agree too.
    hashes = {json.loads((h / "tokens" / "fineweb-edu" / "manifest.json").read_text())["tokenizer_hash"] for h in homes}
    assert len(hashes) == 1
