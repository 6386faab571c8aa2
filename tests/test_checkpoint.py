"""Checkpoints: round trips of model, tokenizer and optimizer state; atomic layout; clear errors for bad files."""

import json
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    prune_checkpoints,
    save_checkpoint,
)
from pretrain.model import GPT, GPTConfig
from pretrain.optim import build_optimizers
from tests.test_model import train_on
from tokenizer import Tokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "All that glitters is not gold. "
) * 20

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=300)


def make(tok, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, sequence_len=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    model = GPT(GPTConfig(**{**cfg, **kw}))
    with torch.no_grad():  # non-zero output layers, so a wrongly loaded weight would show in the logits
        model.lm_head.weight.normal_(0, 0.1)
    return model


def train_steps(model, opts, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return train_on(model, opts, (torch.randint(0, model.config.vocab_size, (2, 17), generator=g) for _ in range(n)))


@pytest.mark.parametrize("value_embeds", [False, True])
def test_round_trip_model_tokenizer_meta(tmp_path, tok, value_embeds):
    model = make(tok, value_embeds=value_embeds)
    path = save_checkpoint(tmp_path / "step_000007", model, tok, {"step": 7, "loader": {"epoch": 1}})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded, tok2, meta = load_checkpoint(path)
    assert meta["step"] == 7 and meta["loader"] == {"epoch": 1} and meta["tokenizer_hash"] == tok.hash
    assert tok2.hash == tok.hash and tok2.encode("the lazy fox") == tok.encode("the lazy fox")
    idx = torch.randint(0, tok.vocab_size, (2, 16))
    assert torch.equal(loaded(idx), model.eval()(idx))
    assert not list(tmp_path.glob(".tmp-*"))  # the temp dir became the checkpoint


def test_optimizer_resume_is_bit_identical(tmp_path, tok):
    model = make(tok)
    opts = build_optimizers(model)
    train_steps(model, opts, 3)
    save_checkpoint(tmp_path / "ck", model, tok, {"step": 3}, opts)
    expected = train_steps(model, opts, 3, seed=2)

    fresh = make(tok, seed=123)
    fresh_opts = build_optimizers(fresh)
    load_model_state(tmp_path / "ck", fresh)
    load_optimizer_state(tmp_path / "ck", fresh_opts)
    assert train_steps(fresh, fresh_opts, 3, seed=2) == expected


def test_resave_same_step_replaces_atomically(tmp_path, tok):
    a, b = make(tok, seed=0), make(tok, seed=1)
    save_checkpoint(tmp_path / "step_000001", a, tok, {"step": 1})
    save_checkpoint(tmp_path / "step_000001", b, tok, {"step": 1, "again": True})
    loaded, _, meta = load_checkpoint(tmp_path / "step_000001")
    assert meta["again"] and torch.equal(loaded.lm_head.weight, b.lm_head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]


def test_latest_and_prune(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("SCRATCHCHAT_HOME", str(tmp_path))
    assert latest_checkpoint("base") is None
    root = tmp_path / "checkpoints" / "base"
    model = make(tok)
    for step in (5, 20, 10):
        save_checkpoint(root / f"step_{step:06d}", model, tok, {"step": step})
    (root / ".tmp-step_000030-abc").mkdir()  # what a killed save leaves behind
    (root / "step_000040").mkdir()  # incomplete: no files
    assert latest_checkpoint("base") == root / "step_000020"
    assert latest_checkpoint(root=root) == root / "step_000020"
    prune_checkpoints(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_000010", "step_000020", "step_000040"]


def test_corrupt_and_mismatched_checkpoints(tmp_path, tok):
    model = make(tok)
    path = save_checkpoint(tmp_path / "ck", model, tok, {"step": 1}, build_optimizers(model))

    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="expected"):  # a different architecture
        load_model_state(path, make(tok, n_embd=64))

    weights = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes(weights)

    config = json.loads((path / "config.json").read_text())
    bad = dict(config, model_config=dict(config["model_config"], n_layer=3))
    (path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="does not fit"):  # config says 3 layers, file holds 2
        load_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps(dict(config, tokenizer_hash="0" * 64)))
    with pytest.raises(CheckpointError, match="tokenizer hash"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps(config))

    (path / "optim.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_optimizer_state(path, build_optimizers(model))
    (path / "optim.safetensors").unlink()
    with pytest.raises(CheckpointError, match="cannot resume"):
        load_optimizer_state(path, build_optimizers(model))
    load_checkpoint(path)  # the weights alone still serve


def test_loading_skips_init_and_never_imports_dynamo(tmp_path, tok):
    """Building on the meta device must not run init ops there: they import torch._dynamo (seconds per CLI start)."""
    import subprocess
    import sys

    save_checkpoint(tmp_path / "step_1", make(tok, value_embeds=True), tok, {"step": 1})
    code = (
        "import sys; from pretrain.checkpoint import load_checkpoint; "
        f"load_checkpoint({str(tmp_path / 'step_1')!r}); print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vocab_size": "300"}, "model_config.vocab_size must be an integer >= 1, got '300'"),
        ({"n_layer": True}, "model_config.n_layer must be an integer >= 1, got True"),
        ({"n_layer": 0}, "model_config.n_layer must be an integer >= 1, got 0"),
        ({"softcap": "15"}, "model_config.softcap must be a finite number >= 0, got '15'"),
        ({"value_embeds": 1}, "model_config.value_embeds must be true or false, got 1"),
    ],
)
def test_config_fields_of_the_wrong_type_are_corrupt(tmp_path, tok, change, message):
    path = save_checkpoint(tmp_path / "ck", make(tok), tok, {"step": 1})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, model_config={**config["model_config"], **change})))
    with pytest.raises(CheckpointError, match="corrupt: " + message):
        load_checkpoint(path)


def test_deeply_nested_json_is_a_clear_error(tmp_path, tok):
    path = save_checkpoint(tmp_path / "ck", make(tok), tok, {"step": 1})
    (path / "config.json").write_text('{"meta": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="corrupt: nested too deeply"):
        load_checkpoint(path)


def test_saves_reach_the_disk_before_their_renames(tmp_path, tok, monkeypatch):
    import os

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))
    )
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), replace(a, b)))
    dir = tmp_path / "step_000001"
    for _ in range(2):  # a first save, then a re-save of the same step
        events.clear()
        save_checkpoint(dir, make(tok), tok, {"step": 1}, build_optimizers(make(tok)))
        first_rename = next(i for i, (kind, _) in enumerate(events) if kind == "replace")
        synced = {Path(p).name for kind, p in events[:first_rename] if kind == "fsync"}
        assert {"model.safetensors", "config.json", "optim.safetensors"} <= synced
        assert any(name.startswith(".tmp-step_000001") for name in synced)  # the directory's entries too
        assert events[-1] == ("fsync", str(tmp_path))  # and the renames themselves


def test_prune_after_a_crash_between_the_renames_of_a_resave_keeps_the_step(tmp_path, tok):
    model = make(tok)
    save_checkpoint(tmp_path / "step_000005", model, tok, {"step": 5})
    # What save_checkpoint leaves when killed after moving the old copy aside, before renaming the new one in:
    old = tmp_path / ".old-step_000005-x"
    old.mkdir()
    (tmp_path / "step_000005").rename(old / "step_000005")
    (tmp_path / ".tmp-step_000005-y").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000005"]
    loaded, _, meta = load_checkpoint(tmp_path / "step_000005")
    assert meta["step"] == 5 and torch.equal(loaded.lm_head.weight, model.lm_head.weight)
