"""Checkpoints: a self-contained directory per saved step, written atomically.

    <dir>/model.safetensors   the model weights (fp32, no optimizer, no derived buffers)
    <dir>/config.json         model config, the tokenizer (json) and its hash, step, data position, metrics
    <dir>/optim.safetensors   optimizer state + RNG state, only needed to resume training

Everything is written into a temporary sibling directory, flushed to disk, and renamed into place at the end,
so a killed process (or a crashed machine) never leaves half a checkpoint. Anything wrong on load (missing or
corrupt files, shapes that do not fit, a different tokenizer) raises `CheckpointError` with one clear line.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.files import fsync_dir
from common.paths import checkpoints_dir
from pretrain.model import GPT, GPTConfig

FORMAT = 1
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or not matching the model/tokenizer at hand."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def _as_list(optimizer) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    return list(optimizer) if isinstance(optimizer, Sequence) else [optimizer]


def _optim_tensors(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten optimizer states into named tensors; hyper-parameters and plain numbers go to the json metadata."""
    tensors: dict[str, torch.Tensor] = {}
    groups, scalars = [], {}
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        groups.append(sd["param_groups"])
        for pid, state in sd["state"].items():
            for key, value in state.items():
                name = f"opt{i}.{pid}.{key}"
                if torch.is_tensor(value):
                    tensors[name] = value.detach().cpu().contiguous()
                else:
                    scalars[name] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors, {"param_groups": json.dumps(groups), "scalars": json.dumps(scalars)}


def save_checkpoint(
    dir: str | Path,
    model: torch.nn.Module,
    tokenizer,
    meta: dict,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> Path:
    """Write model (+ optimizer/RNG state when given) and config to `dir` atomically; returns `dir`.

    `meta` must be json-able (step, data loader position, metrics...); `tokenizer` may be None (synthetic runs)."""
    dir = Path(dir)
    model = unwrap(model)
    dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dir.parent, prefix=f".tmp-{dir.name}-"))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        config = {
            "format": FORMAT,
            "model_config": asdict(model.config),
            "tokenizer": tokenizer.to_json() if tokenizer is not None else None,
            "tokenizer_hash": tokenizer.hash if tokenizer is not None else None,
            "meta": meta,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if optimizer is not None:
            tensors, metadata = _optim_tensors(_as_list(optimizer))
            save_file(tensors, tmp / "optim.safetensors", metadata=metadata)
        for f in tmp.iterdir():  # on disk before any rename can make them the checkpoint
            with open(f, "rb+") as file:
                os.fsync(file.fileno())
        fsync_dir(tmp)
        old = None
        if dir.exists():  # re-saving a step: move the old one aside first so the rename below cannot fail
            old = Path(tempfile.mkdtemp(dir=dir.parent, prefix=f".old-{dir.name}-"))
            os.replace(dir, old / dir.name)  # a crash from here to the next rename: prune_checkpoints puts it back
        os.replace(tmp, dir)
        fsync_dir(dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dir


def _check_model_config(config: dict) -> None:
    """Each field of the right type (json "8192" is not 8192): flags true or false, integers at least 1, numbers
    finite and >= 0."""
    for f in fields(GPTConfig):
        value = config.get(f.name, f.default)
        if isinstance(f.default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(f.default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            kind = "an integer >= 1"
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
            kind = "a finite number >= 0"
        if not ok:
            raise ValueError(f"model_config.{f.name} must be {kind}, got {value!r}")


def read_config(path: str | Path) -> dict:
    """A checkpoint's config.json, validated enough to build the model from it."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        GPTConfig(**config["model_config"])
        _check_model_config(config["model_config"])
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint (no config.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json is corrupt: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}/config.json is corrupt: nested too deeply") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {config.get('format')}, this code reads {FORMAT}")
    return config


def _load_tensors(file: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(file, device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file} is unreadable or corrupt: {e}") from None


def load_model_state(path: str | Path, model: torch.nn.Module) -> dict:
    """Load the weights at `path` into an existing model (shapes must match); returns the config.json dict."""
    path = Path(path)
    config = read_config(path)
    model = unwrap(model)
    if config["model_config"] != asdict(model.config):
        raise CheckpointError(f"{path} holds a model {config['model_config']}, expected {asdict(model.config)}")
    state = _load_tensors(path / "model.safetensors", model.lm_head.weight.device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}/model.safetensors does not fit the model: {' '.join(first[:3])}") from None
    return config


def load_optimizer_state(path: str | Path, optimizer) -> None:
    """Restore optimizer states and the RNG from `<path>/optim.safetensors` (resume only)."""
    file = Path(path) / "optim.safetensors"
    optimizers = _as_list(optimizer)
    try:
        with safe_open(file, "pt") as f:
            meta = f.metadata()
        groups, scalars = json.loads(meta["param_groups"]), json.loads(meta["scalars"])
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: this checkpoint cannot resume training") from None
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file} is corrupt: {e}") from None
    tensors = _load_tensors(file)
    if len(groups) != len(optimizers):
        raise CheckpointError(f"{file} holds {len(groups)} optimizers, the run has {len(optimizers)}")
    for i, (opt, saved_groups) in enumerate(zip(optimizers, groups)):
        state: dict[int, dict] = {}
        for name, value in list(tensors.items()) + list(scalars.items()):
            if name.startswith(f"opt{i}."):
                _, pid, key = name.split(".", 2)
                state.setdefault(int(pid), {})[key] = value
        for g in saved_groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        try:
            opt.load_state_dict({"state": state, "param_groups": saved_groups})
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{file} does not fit the optimizer: {e}") from None
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, meta) from a checkpoint directory; the model is in eval mode on `device`.

    meta is the saved meta dict plus `model_config` and `tokenizer_hash`; tokenizer is None for synthetic runs."""
    path = Path(path)
    config = read_config(path)
    with torch.device("meta"):  # build without initialising: the weights come from the file
        model = GPT(GPTConfig(**config["model_config"]))
    model = model.to_empty(device=device)
    cos, sin = model._rotary_tables(model.rotary_len)
    model.cos, model.sin = cos.to(device), sin.to(device)
    load_model_state(path, model)
    tokenizer = None
    if config.get("tokenizer") is not None:
        from tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.from_json(config["tokenizer"])
        except Exception as e:  # any failure to rebuild it means the file is unusable
            raise CheckpointError(f"{path}/config.json holds an unreadable tokenizer: {e}") from None
        if config.get("tokenizer_hash") and tokenizer.hash != config["tokenizer_hash"]:
            raise CheckpointError(
                f"{path}: tokenizer hash {tokenizer.hash[:12]} != recorded "
                f"{config['tokenizer_hash'][:12]}; the checkpoint is corrupt"
            )
    meta = dict(config.get("meta") or {})
    meta.update(model_config=config["model_config"], tokenizer_hash=config.get("tokenizer_hash"))
    return model.eval(), tokenizer, meta


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Complete `step_N` checkpoints under root, oldest first (temp dirs of killed saves are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "config.json").is_file() and (p / "model.safetensors").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(kind: str = "base", root: str | Path | None = None) -> Path | None:
    """Newest `step_N` under `root` (default: $SCRATCHCHAT_HOME/checkpoints/<kind>), or None."""
    found = step_dirs(root if root is not None else checkpoints_dir(kind))
    return found[-1][1] if found else None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Keep the newest `keep` step dirs (keep <= 0 keeps all) and clear leftovers of killed saves."""
    root = Path(root)
    for old in root.glob(".old-step_*/step_*"):
        if STEP_DIR.match(old.name) and not (root / old.name).exists():
            os.replace(old, root / old.name)  # a re-save died between its two renames: the old copy is the step
    found = step_dirs(root)
    for _, p in found[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in list(root.glob(".tmp-step_*")) + list(root.glob(".old-step_*")):
        shutil.rmtree(p, ignore_errors=True)
