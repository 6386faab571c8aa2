"""Training metrics on disk: one json object per line in metrics.jsonl, and a loss / bits-per-byte plot."""

from __future__ import annotations

import json
from pathlib import Path

from common.files import atomic_path


def append_metrics(path: str | Path, record: dict) -> None:
    """Append one record and flush it, so a killed run keeps every line it logged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, png_path: str | Path, title: str = "training") -> Path | None:
    """Train loss and val bits-per-byte against step, as a PNG (None when there is nothing to plot).

    A resumed run appends steps it already logged before the kill; the last record of a step wins."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    by_step: dict[tuple[str, int], dict] = {}
    for r in read_metrics(metrics_path):
        by_step[(r.get("kind", "train"), r["step"])] = r
    train = sorted((s, r["loss"]) for (k, s), r in by_step.items() if k == "train")
    val = sorted((s, r["val_bpb"]) for (k, s), r in by_step.items() if k == "eval" and "val_bpb" in r)
    if not train and not val:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        axes[0].plot(*zip(*train), lw=1)
    axes[0].set(xlabel="step", ylabel="train loss (nats/token)", title=f"{title}: loss")
    if val:
        axes[1].plot(*zip(*val), marker="o")
    axes[1].set(xlabel="step", ylabel="val bits per byte", title=f"{title}: validation")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(png_path)
