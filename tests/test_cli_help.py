"""Every command's --help prints its flags and exits 0: argparse %-formats help strings, so one stray "%" in a
flag's text turns --help into a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command, flag",
    [
        (["-m", "tokenizer", "train", "--help"], "--vocab-size"),
        (["-m", "pretrain.data", "tokenize", "--help"], "--corpus"),
        (["-m", "pretrain", "--help"], "--max-minutes"),
        (["-m", "finetune", "--help"], "--mix-scale"),
        (["-m", "finetune.eval", "--help"], "--limit"),
        (["-m", "serve", "--help"], "--prefix-cache-mb"),
        (["-m", "tui", "--help"], "--url"),
        (["scripts/report.py", "--help"], "--gpu-hour-cost"),
    ],
)
def test_help_lists_the_flags(command, flag):
    run = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert flag in run.stdout and "Traceback" not in run.stderr
