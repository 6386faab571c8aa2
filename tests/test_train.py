"""The training loop and `python -m pretrain`: exact resume after SIGKILL, DDP with gloo, masks, bpb, CLI errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.dist import Dist
from pretrain.__main__ import main
from pretrain.checkpoint import latest_checkpoint
from pretrain.model import GPT, GPTConfig
from pretrain.report import read_metrics
from pretrain.shards import write_shard
from pretrain.train import SyntheticLoader, TrainConfig, accumulation, evaluate_bpb, sample, token_byte_lengths, train
from tests.test_optim_distributed import free_port
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "Water is a chemical substance. The capital of France is Paris, a city on the Seine. "
    "In the beginning God created the heaven and the earth. The history of Rome spans many centuries. "
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A real tokenizer file and token shards made from it, as the data stage would write them."""
    root = tmp_path_factory.mktemp("corpus")
    tok = Tokenizer.train([TEXT * 10], vocab_size=320)
    tok.save(root / "tokenizer.json")
    ids = np.array(([tok.bos_id] + tok.encode(TEXT)) * 60, dtype=np.int64)
    tokens = root / "tokens"
    write_shard(tokens / "train_00000.bin", ids[: len(ids) // 2], tok.vocab_size)
    write_shard(tokens / "train_00001.bin", ids[len(ids) // 2 :], tok.vocab_size)
    write_shard(tokens / "val_00000.bin", ids[:2000], tok.vocab_size)
    (tokens / "manifest.json").write_text(json.dumps({"tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size}))
    return root, tok


def cli_args(corpus_root, run_dir, *extra):
    paths = ["--tokens-dir", str(corpus_root / "tokens"), "--tokenizer", str(corpus_root / "tokenizer.json")]
    small = "--depth 1 --sequence-len 32 --device-batch-size 4 --device cpu --eval-every 10 --eval-tokens 256"
    return [*paths, *small.split(), "--run-dir", str(run_dir), *extra]


def cli_env(home):
    return {**os.environ, "SCRATCHCHAT_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_cli(args, home):
    cmd = [sys.executable, "-m", "pretrain", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=cli_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def test_resume_after_sigkill_is_bit_identical(tmp_path, corpus):
    root, _ = corpus
    steps = ["--max-steps", "40", "--save-every", "5", "--keep-last", "2"]
    full = run_cli(cli_args(root, tmp_path / "full", *steps), tmp_path)
    out, err = full.communicate(timeout=120)
    assert full.returncode == 0, err
    assert "next: python -m finetune" in out and "step_000040" in out

    run_dir = tmp_path / "killed"
    proc = run_cli(cli_args(root, run_dir, *steps), tmp_path)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill once a checkpoint exists and training has moved past it
        ckpt = latest_checkpoint(root=run_dir)
        logged = train_losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
        if ckpt is not None and logged and max(logged) > int(ckpt.name.split("_")[1]) + 1:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = int(latest_checkpoint(root=run_dir).name.split("_")[1])
    assert 0 < saved < 40

    resumed = run_cli(cli_args(root, run_dir, *steps, "--resume"), tmp_path)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resumed from {run_dir / f'step_{saved:06d}'}" in err + out
    expected, got = train_losses(tmp_path / "full"), train_losses(run_dir)
    assert [got[s] for s in range(saved + 1, 41)] == [expected[s] for s in range(saved + 1, 41)]
    evals = lambda d: [r for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "eval" and r["step"] == 40]
    assert evals(run_dir)[-1]["val_bpb"] == evals(tmp_path / "full")[-1]["val_bpb"]
    assert (run_dir / "loss.png").stat().st_size > 1000 and (tmp_path / "report" / "killed_loss.png").exists()


DDP_SCRIPT = """
import sys, torch
from pretrain.model import GPT, GPTConfig
import pretrain.optim
from common.dist import cleanup_distributed, init_distributed
from pretrain.train import SyntheticLoader, TrainConfig, train
# fp32 Newton-Schulz: bf16 rounds the differently summed (but equal) gradients of 1 vs 2 ranks apart by ~1e-3.
pretrain.optim.fast_matmul_dtype = lambda device: torch.float32
dist = init_distributed("cpu")
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=64, sequence_len=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
loader = SyntheticLoader(64, 2, 32, seed=0, rank=dist.rank, world_size=dist.world_size)
cfg = TrainConfig(max_steps=6, total_batch_tokens=256, eval_every=3, eval_tokens=64, device="cpu")
train(model, cfg, loader, run_dir=sys.argv[1], dist=dist)
torch.save(model.state_dict(), f"{sys.argv[1]}/weights_rank{dist.rank}.pt")
cleanup_distributed()
"""


@pytest.fixture
def ddp_script(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    return script


def run_script(script: Path, out: Path, home: Path, nproc: int = 0) -> subprocess.CompletedProcess:
    """The script in one process, or under torchrun with `nproc` ranks; it writes to `out`."""
    launcher = []
    if nproc:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"]
        launcher.append(f"--master_port={free_port()}")
    cmd = [sys.executable, *launcher, str(script), str(out)]
    return subprocess.run(cmd, env=cli_env(home), cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_ddp_two_ranks_match_single_process_accumulation(tmp_path, ddp_script):
    # 256 tokens per step: 4 micro-batches in one process, 2 on each of 2 ranks (no_sync on all but the last).
    single = run_script(ddp_script, tmp_path / "single", tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = run_script(ddp_script, tmp_path / "ddp", tmp_path, nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / "ddp" / f"weights_rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # every rank took the same steps
    ws = torch.load(tmp_path / "single" / "weights_rank0.pt")
    for k in ws:
        torch.testing.assert_close(w0[k], ws[k], atol=2e-4, rtol=1e-3)
    a, b = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(math.isclose(a[s], b[s], rel_tol=1e-4) for s in a)
    assert a[6] != a[1]  # and something was learned, not a constant


def test_world_size_that_does_not_divide_the_batch_rounds_it(tmp_path, ddp_script):
    # 3 ranks x 2 x 32 = 192 tokens per micro-step against 256 asked: one micro-batch, said in one line.
    run = run_script(ddp_script, tmp_path / "ddp3", tmp_path, nproc=3)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "256 tokens per step is not a multiple of 192" in run.stdout + run.stderr
    weights = [torch.load(tmp_path / "ddp3" / f"weights_rank{r}.pt") for r in range(3)]
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in w)


@pytest.mark.parametrize(
    "total, micro, want",
    [
        (-1, 192, (1, 192)),
        (256, 192, (1, 192)),
        (524288, 65536, (8, 524288)),
        (524288, 2 * 8 * 32 * 2048, (1, 1048576)),
        (1000, 300, (3, 900)),
    ],
)
def test_accumulation_takes_the_nearest_multiple(total, micro, want):
    assert accumulation(total, micro) == want


class MaskedBatches:
    def __init__(self, mask_value: float):
        self.g, self.mask_value = torch.Generator().manual_seed(0), mask_value

    def __next__(self):
        x = torch.randint(0, 64, (2, 16), generator=self.g)
        return x, torch.roll(x, -1, 1), torch.full((2, 16), self.mask_value)


def test_loss_mask_batches(tmp_path):
    def run(mask_value):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, sequence_len=16, n_layer=1, n_head=1, n_kv_head=1, n_embd=32))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train(
            model,
            TrainConfig(max_steps=3, eval_every=0, device="cpu"),
            MaskedBatches(mask_value),
            run_dir=tmp_path / f"m{mask_value}",
        )
        return before, model.state_dict()

    before, after = run(0.0)  # nothing to learn from: not a single weight moves
    assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = run(1.0)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_bits_per_byte_against_direct_computation(corpus):
    _, tok = corpus
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.2)
    model.eval()
    text = "The capital of France is Paris. Water is wet."
    ids = torch.tensor([[tok.bos_id] + tok.encode(text) + [tok.bos_id]])
    x, y = ids[:, :-1], ids[:, 1:]
    got = evaluate_bpb(model, [(x, y)], token_byte_lengths(tok), Dist())
    nats = torch.nn.functional.cross_entropy(model(x)[0], y[0], reduction="none")
    expected = nats[:-1].sum().item() / (math.log(2) * len(text.encode()))  # the final bos target has no bytes
    assert got["val_bpb"] == pytest.approx(expected, rel=1e-6)
    assert got["val_loss"] == pytest.approx(nats.mean().item(), rel=1e-6)
    texts = sample(model, tok, ["The capital"], max_new_tokens=5)
    assert texts[0].startswith("The capital") and texts == sample(model, tok, ["The capital"], max_new_tokens=5)


def test_cli_errors_are_one_line(tmp_path, corpus, capsys, monkeypatch):
    root, _ = corpus
    monkeypatch.setenv("SCRATCHCHAT_HOME", str(tmp_path))
    assert main(["--corpus", "nothing", "--device", "cpu"]) == 1
    assert "run python -m pretrain.data tokenize first" in capsys.readouterr().err

    other = Tokenizer.train([TEXT], vocab_size=280)
    other.save(tmp_path / "other.json")
    args = cli_args(root, tmp_path / "run", "--max-steps", "2")
    assert main(args[:3] + [str(tmp_path / "other.json")] + args[4:]) == 1
    assert "re-run python -m pretrain.data tokenize" in capsys.readouterr().err

    assert main(cli_args(root, tmp_path / "run", "--max-steps", "2", "--resume")) == 1
    assert "nothing to resume" in capsys.readouterr().err

    assert main(cli_args(root, tmp_path / "run", "--max-steps", "2", "--save-every", "1")) == 0
    (latest_checkpoint(root=tmp_path / "run") / "model.safetensors").write_bytes(b"broken")
    assert main(cli_args(root, tmp_path / "run", "--max-steps", "4", "--resume")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar of the save run
    assert err.startswith("error:") and "corrupt" in err


def test_synthetic_loader_is_resumable_and_rank_strided():
    a = SyntheticLoader(100, 2, 8, seed=3)
    first = [next(a) for _ in range(4)]
    b = SyntheticLoader(100, 2, 8, seed=3)
    b.load_state_dict({"index": 2})
    assert torch.equal(next(b)[0], first[2][0])
    r1 = SyntheticLoader(100, 2, 8, seed=3, rank=1, world_size=2)
    assert torch.equal(next(r1)[0], first[1][0])  # rank 1 of 2 takes the second micro-batch of the step
    x, y = first[0]
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_bf16_autocast_on_cpu_trains_like_fp32(tmp_path):
    # The hand-written CPU RMSNorm and soft-capped loss run under bf16 autocast here (bf16 residual stream, fp32
    # logits). bf16 keeps 8 bits of mantissa (~0.4% per rounding): the losses of 8 steps must stay within 1% of
    # fp32's (measured: within 0.05%), and must differ somewhere, or autocast never took effect.
    def losses(dtype):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=128, sequence_len=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
        loader = SyntheticLoader(128, 4, 32, seed=0)
        result = train(
            model,
            TrainConfig(max_steps=8, eval_every=0, save_every=-1, device="cpu", dtype=dtype),
            loader,
            run_dir=tmp_path / dtype,
            val_batches=lambda: loader.iter_val(256),
        )
        return train_losses(tmp_path / dtype), result["val_loss"]

    (fp32, val32), (bf16, val16) = losses("fp32"), losses("bf16")
    assert sorted(fp32) == sorted(bf16) == list(range(1, 9))
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=1e-2)
    assert val16 == pytest.approx(val32, rel=1e-2)
    assert any(bf16[s] != fp32[s] for s in fp32)
    assert fp32[8] < fp32[1]  # it learned something, so the comparison is of training, not of noise


def test_dtype_flag_picks_the_autocast(monkeypatch):
    from pretrain import train as train_module

    cpu = torch.device("cpu")
    for native in (True, False):  # auto on CPU follows the bf16 matmul instructions
        monkeypatch.setattr(train_module, "cpu_has_bf16_matmul", lambda native=native: native)
        assert train_module.autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
        assert train_module.autocast_dtype("bf16", cpu) == torch.bfloat16
        assert train_module.autocast_dtype("fp32", cpu) is None
    assert train_module.autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert train_module.autocast_dtype("auto", torch.device("mps")) is None
    with pytest.raises(ValueError, match="--dtype must be auto, bf16 or fp32"):
        train_module.autocast_dtype("fp16", cpu)
