"""`python -m finetune` and `python -m finetune.eval` end to end on a tiny base checkpoint.

A tiny GPT learns a handful of conversations through the real SFT entry point; greedy decoding of
the SFT checkpoint then gives the answers and stops at <|assistant_end|>, and the eval CLI writes
its base-vs-SFT table. Errors a user can cause give one line and a non-zero exit.
"""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from finetune import eval as chat_eval
from finetune import train as sft
from finetune.chat import assistant_end_id, render_prompt
from pretrain.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pretrain.model import GPT, GPTConfig
from tests.test_finetune_eval import greedy_decode
from tokenizer import Tokenizer

CONVERSATIONS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("Spell 'cat' backwards.", "tac"),
    ("What is 2 + 3?", "5"),
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCRATCHCHAT_HOME", str(root))
        text = " ".join(q + " " + a for q, a in CONVERSATIONS) * 20
        tok = Tokenizer.train([text], vocab_size=300)
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
        save_checkpoint(root / "checkpoints" / "base" / "step_000010", model, tok, {"step": 10})
        data = root / "chat.jsonl"
        data.write_text(
            "".join(
                json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                for q, a in CONVERSATIONS
            )
        )
        yield root


QUIET = ["--eval-every", "0", "--quick-eval-items", "0"]  # no evaluations during these short runs


def run_sft(*extra: str) -> int:
    data = str(os.environ["SCRATCHCHAT_HOME"]) + "/chat.jsonl"
    lrs = "--matrix-lr 0.04 --embedding-lr 0.3 --unembedding-lr 0.02".split()
    return sft.main(["--data", data, "--device-batch-size", "4", *QUIET, *lrs, "--no-compile", *extra])


def test_sft_learns_the_conversations_and_stops_at_the_end_token(home, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHCHAT_HOME", str(home))
    assert run_sft("--max-steps", "40") == 0
    out = capsys.readouterr().out
    assert "checkpoint:" in out and "next: python -m finetune.eval" in out
    path = latest_checkpoint("sft")
    assert path is not None and path.name == "step_000040"
    model, tok, meta = load_checkpoint(path)
    assert meta["kind"] == "sft" and meta["from"] == str((home / "checkpoints" / "base" / "step_000010").resolve())
    for q, a in CONVERSATIONS:
        out = greedy_decode(model, render_prompt(tok, [{"role": "user", "content": q}]), 10, stop=assistant_end_id(tok))
        assert out[-1] == assistant_end_id(tok) and tok.decode(out[:-1]) == a
    metrics = [json.loads(line) for line in (home / "checkpoints" / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m["kind"] == "train"]
    assert losses[-1] < 0.1 * losses[0]
    assert (home / "checkpoints" / "sft" / "loss.png").stat().st_size > 0

    # The eval CLI compares the SFT model with the base model it started from, and writes the table.
    pq.write_table(
        pa.table({"question": ["What is 2 + 3?", "x?"], "answer": ["2 + 3 = 5\n#### 5", "#### 7"]}),
        home / "gsm8k.parquet",
    )
    assert (
        chat_eval.main(
            ["--limit", "2", "--show", "1", "--max-new-tokens", "8", "--benchmark", str(home / "gsm8k.parquet")]
        )
        == 0
    )
    report = (home / "report" / "chat_eval.md").read_text()
    assert "| task | n | chance | base | sft |" in report
    assert "| arithmetic | 2 |" in report and "| capital_mc | 2 |" in report
    # The SFT model learned "What is 2 + 3?" -> "5"; the untrained base did not.
    assert "| gsm8k | 2 | 50.0% | 0.0% (0-66) | 50.0% (9-91) |" in report
    shown = capsys.readouterr().out
    assert "[sft arithmetic]" in shown and "[base capital]" in shown
    assert "[<|assistant_end|>]" in shown and "[cut at 8 tokens]" in shown  # SFT stops; the base rambles


def test_missing_base_checkpoint_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHCHAT_HOME", str(tmp_path))
    assert sft.main(["--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no base checkpoint in") and err.count("\n") == 1
    assert sft.main(["--from", str(tmp_path / "nope"), "--max-steps", "1"]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert chat_eval.main([]) == 2
    assert capsys.readouterr().err.startswith("error: no SFT checkpoint found")
    assert chat_eval.main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_bad_data_names_the_line_and_can_be_skipped(home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHCHAT_HOME", str(home))
    bad = tmp_path / "bad.jsonl"
    lines = (home / "chat.jsonl").read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"messages": [{"role": "wizard", "content": "x"}]}'] + lines[2:]) + "\n")
    args = ["--from", str(home / "checkpoints" / "base" / "step_000010"), "--data", str(bad), "--max-steps", "1"]
    args += ["--device-batch-size", "2", *QUIET, "--run-dir", str(tmp_path / "run")]
    assert sft.main(args) == 1
    err = capsys.readouterr().err
    assert err == f"error: {bad}:3: message 0 has unknown role 'wizard'; expected one of system, user, assistant\n"
    assert not (tmp_path / "run").exists()
    assert sft.main(args + ["--skip-bad"]) == 0
    assert f"data: {bad} 4 (1 bad skipped)" in capsys.readouterr().out
    assert latest_checkpoint("sft", root=tmp_path / "run") is not None


def test_epochs_and_batch_do_not_grow_with_the_world_size(home, tmp_path):
    # rows_per_epoch counts every rank's rows: 2 ranks once ran 2 epochs for --epochs 1, at twice the batch.
    import re
    import socket
    import subprocess
    import sys
    from pathlib import Path

    args = ["-m", "finetune", "--data", str(home / "chat.jsonl"), "--epochs", "40", *QUIET, "--device", "cpu"]
    env = {
        **os.environ,
        "SCRATCHCHAT_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plans = []
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    for launch, run_dir in (([sys.executable], "one"), ([*torchrun, f"--master_port={port}"], "two")):
        run = subprocess.run(
            [*launch, *args, "--run-dir", str(tmp_path / run_dir)], env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-3000:]
        plans.append(
            re.search(
                r"([\d,]+) tokens/step \((\d+) x (\d+) x \d+ x (\d+) devices\), up to (\d+) steps",
                run.stdout + run.stderr,
            ).groups()
        )
    (one_tokens, *_, one_steps), (two_tokens, *_, two_steps) = plans
    assert one_tokens == two_tokens and one_steps == two_steps, plans
    assert plans[1][3] == "2" and int(plans[0][2]) == 2 * int(plans[1][2])  # half the rows per device on 2 ranks
