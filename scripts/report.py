"""The speedrun's report card: `python scripts/report.py` writes $SCRATCHCHAT_HOME/report/report.md.

It reads only the files the stages left behind (corpus and token manifests, tokenizer.json, checkpoints'
config.json and metrics.jsonl, the chat eval's metrics, logs/ and speedrun.sh's stage times), so it can be
rerun on its own at any time. The cost estimate counts every GPU of every node for the run's wall time:
`python scripts/report.py --gpu-hour-cost X --gpus G --nodes N` (G GPUs per node, N nodes). A stage that has
not run yet gets a one-line note instead of its section.
The output is plain markdown (tables, links to the PNG plots) that reads on GitHub and in a terminal.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python scripts/report.py` from a checkout that is not pip-installed

from common.cli import config_from_args, flag, parser_for, run_cli  # noqa: E402
from common.dist import pick_device  # noqa: E402
from common.files import write_text_atomic  # noqa: E402
from common.paths import scratchchat_home  # noqa: E402
from finetune.calculator import ToolUse  # noqa: E402
from finetune.chat import assistant_end_id, render_prompt  # noqa: E402
from finetune.eval import answer_text, format_table, greedy_decode_batch  # noqa: E402
from pretrain.checkpoint import latest_checkpoint, load_checkpoint, read_config  # noqa: E402
from pretrain.model import GPT, GPTConfig  # noqa: E402
from pretrain.report import read_metrics  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from tokenizer.openai_vocabs import compression  # noqa: E402

SAMPLE_PROMPTS = (
    "Hello! Who are you?",
    "What is the capital of France?",
    "What is 12 + 7?",
    "Calculate 23 x 4.",
    "Mia has 6 boxes with 4 shells in each box. How many shells is that in total?",
    "Spell 'water' backwards.",
    "Tell me about the Moon.",
    "What can you do?",
)
CONTINUATION_PROMPTS = ("The history of the city", "Water is", "In the morning, the children")
CONTINUATION_TOKENS = 96
VAL_BYTES = 2_000_000  # enough held-out text for a stable bytes/token, quick to encode with three vocabularies
VAL_BATCH_ROWS = 256  # documents per parquet read: a FineWeb-Edu val shard holds ~250 M characters


@dataclass
class ReportConfig:
    home: str = flag("", "the speedrun's artifacts (default: $SCRATCHCHAT_HOME)")
    out: str = flag("", "where to write the report (default: <home>/report/report.md)")
    gpu_hour_cost: float = flag(3.0, "dollars per GPU-hour for the cost estimate on GPU (e.g. an H100)")
    gpus: int = flag(-1, "GPUs per node in the cost estimate (-1: the GPUs torch sees here)")
    nodes: int = flag(1, "nodes the run used: the cost counts gpus x nodes")
    samples: int = flag(
        8, "sample conversations with the SFT model, from fixed prompts (0: none and no base continuations)"
    )
    max_new_tokens: int = flag(48, "longest sample answer in tokens")
    device: str = flag("auto", "where the sample conversations run: cpu, cuda, mps or auto")


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(str(c) for c in r) + " |" for r in rows),
    ]


def _count(x) -> str:
    """A count with thousands separators; "-" where a manifest does not know it (FineWeb-Edu counts no chars)."""
    return f"{x:,}" if isinstance(x, (int, float)) else "-"


def _num(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _missing(what: str, command: str) -> list[str]:
    return [f"_No {what} yet: run `{command}`._"]


def stage_times(home: Path) -> dict[str, tuple[float, float]]:
    """(start, end) epoch seconds of each stage's last run, from speedrun/<stage>.time as speedrun.sh records
    them (setup and download included), in the order the stages started. An unreadable file is left out."""
    out = {}
    for path in (home / "speedrun").glob("*.time"):
        try:
            start, end = map(float, path.read_text().split())
        except (OSError, ValueError):
            continue
        out[path.stem] = (start, end)
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def total_seconds(times: dict[str, tuple[float, float]]) -> float:
    """Wall time of the run: from the earliest start to the latest end. Stages overlap (the download runs beside
    the tokenizer), so their sum would count some time twice."""
    return max(end for _, end in times.values()) - min(start for start, _ in times.values())


def cost(seconds: float, gpus: int, nodes: int, gpu_hour_cost: float) -> float:
    """Dollars for the run: every GPU of every node is rented for its whole wall time."""
    return seconds / 3600 * gpus * nodes * gpu_hour_cost


def steady_rate(records: list[dict], key: str) -> float | None:
    """Median of the later half of the steps (as the training loop reports it): skips compilation and warm-up."""
    values = [r[key] for r in records if r.get("kind") == "train" and key in r]
    later = sorted(values[len(values) // 2 :])
    return later[len(later) // 2] if later else None


def _train_records(run_dir: Path) -> list[dict]:
    """Train/eval records, the last one of each step winning (a resumed run re-logs steps after its checkpoint)."""
    by_step = {(r.get("kind"), r.get("step")): r for r in read_metrics(run_dir / "metrics.jsonl")}
    return sorted(by_step.values(), key=lambda r: r.get("step", 0))


# --- sections -------------------------------------------------------------------------------------


def environment(gpus: int) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    gpu = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else "none"

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    rows = [
        ["CPU", f"{cpu}, {os.cpu_count()} cores"],
        ["GPU", gpu],
        ["torch", torch.__version__],
        ["python", platform.python_version()],
        ["git commit", commit],
        ["date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],
    ]
    return ["## Environment", "", *_table(["", ""], rows)]


def tokenizer_section(home: Path, times: dict) -> list[str]:
    lines = ["## Tokenizer", ""]
    path = home / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        return lines + _missing("tokenizer", "python -m tokenizer train")
    tok = Tokenizer.load(path)
    seconds = None  # the training time the CLI printed, else the stage's wall time
    log = home / "logs" / "tokenizer.log"
    found = re.findall(r"tokenizer in ([\d.]+)s", log.read_text(errors="replace")) if log.is_file() else []
    if found:
        seconds = float(found[-1])
    elif "tokenizer" in times:
        seconds = times["tokenizer"][1] - times["tokenizer"][0]
    lines += [
        f"{tok.vocab_size:,} tokens ({len(tok.special_tokens)} special), trained in {_duration(seconds)}, "
        f"hash `{tok.hash[:12]}`.",
        "",
    ]
    val = _val_files(home)
    if not val:
        return lines
    texts, n_bytes = val_sample(val, VAL_BYTES)
    if not n_bytes:
        return lines
    rows = [[name, f"{vocab:,}", f"{n:,}", f"{n_bytes / max(n, 1):.3f}"] for name, vocab, n in compression(tok, texts)]
    where = ", ".join(f"`{Path(p).relative_to(home)}`" for p in val)
    return lines + [
        f"Compression on {n_bytes:,} bytes of held-out text ({where}; higher is better):",
        "",
        *_table(["tokenizer", "vocab", "tokens", "bytes/token"], rows),
    ]


def val_sample(files: list[Path], max_bytes: int) -> tuple[list[str], int]:
    """The first documents of the parquet files, until max_bytes of UTF-8 (and that byte count). Read a few
    hundred rows at a time: iter_texts reads 65,536 rows at once, a whole FineWeb-Edu shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, n_bytes = [], 0
    for path in files:
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=VAL_BATCH_ROWS, columns=["text"]):
                for t in filter(None, batch.column(0).to_pylist()):
                    texts.append(t)
                    n_bytes += len(t.encode("utf-8", "replace"))
                    if n_bytes >= max_bytes:
                        return texts, n_bytes
        except (pa.ArrowException, OSError) as e:  # pyarrow raises many types for a bad file; the user needs one line
            raise ValueError(f"{path}: cannot read its 'text' column ({e})") from None
    return texts, n_bytes


def _val_files(home: Path) -> list[Path]:
    """The validation split of the corpus the model was pretrained on, else of the default corpus."""
    corpora = [d.name for d in sorted((home / "tokens").glob("*")) if d.is_dir()]
    for name in sorted(corpora, key=lambda c: c == "default") + ["default"]:
        manifest = _json(home / "data" / name / "manifest.json")
        if manifest:
            files = [home / "data" / name / f for f in manifest.get("splits", {}).get("val", {}).get("files", [])]
            if files and all(f.is_file() for f in files):
                return files
    return []


def data_section(home: Path) -> list[str]:
    lines = ["## Data", ""]
    corpora = sorted(d for d in (home / "data").glob("*") if (d / "manifest.json").is_file())
    if not corpora:
        return lines + _missing("corpus", "python -m pretrain.data default")
    for d in corpora:
        m = _json(d / "manifest.json") or {}
        rows = [
            [*(s.get(k, "?") for k in ("name", "origin", "license")), _count(s.get("docs")), _count(s.get("chars"))]
            for s in m.get("sources", [])
        ]
        lines += [f"Corpus `{d.name}` (`data/{d.name}/manifest.json`):", ""]
        if rows:
            lines += [*_table(["source", "origin", "license", "docs", "chars"], rows), ""]
        splits = [
            f"{k}: {_count(v.get('docs'))} docs / {_count(v.get('chars'))} chars"
            for k, v in m.get("splits", {}).items()
        ]
        if splits:
            lines += [", ".join(splits) + ".", ""]
    for d in sorted(d for d in (home / "tokens").glob("*") if (d / "manifest.json").is_file()):
        m = _json(d / "manifest.json") or {}
        rows = [
            [
                k,
                _count(v.get("tokens")),
                _count(v.get("docs")),
                len(v.get("files", [])),
                _num(v.get("bytes_per_token"), ".3f"),
            ]
            for k, v in m.get("splits", {}).items()
        ]
        lines += [
            f"Tokens `{d.name}` (vocab {_count(m.get('vocab_size'))}, {m.get('dtype', '?')} shards, "
            f"tokenizer `{str(m.get('tokenizer_hash', '?'))[:12]}`):",
            "",
            *_table(["split", "tokens", "docs", "shards", "bytes/token"], rows),
            "",
        ]
    return lines


def pretrain_section(home: Path) -> tuple[list[str], dict]:
    lines = ["## Pretraining", ""]
    run_dir = home / "checkpoints" / "base"
    ckpt = latest_checkpoint(root=run_dir)
    if ckpt is None:
        return lines + _missing("base checkpoint", "python -m pretrain"), {}
    config = read_config(ckpt)
    mc, meta = GPTConfig(**config["model_config"]), config.get("meta", {})
    with torch.device("meta"):  # shapes only: counting parameters needs no memory
        model = GPT(mc)
    params, fpt = model.num_params(), model.flops_per_token()
    tokens = meta.get("tokens", 0)
    records = _train_records(run_dir)
    tok_s, mfu = steady_rate(records, "tok_per_s"), steady_rate(records, "mfu")
    figures = meta.get("metrics", {})
    rows = [
        [
            "model",
            f"depth {mc.n_layer}, width {mc.n_embd}, {mc.n_head} heads ({mc.n_kv_head} kv), "
            f"{'value embeddings, ' if mc.value_embeds else ''}context {mc.sequence_len}, vocab {mc.vocab_size:,}",
        ],
        ["parameters", f"{params:,} ({_si(model.num_params(non_embedding=True))} non-embedding)"],
        ["FLOPs/token (training)", _si(fpt)],
        ["steps", f"{meta.get('step', 0):,} of {tokens // max(1, meta.get('step', 0)):,} tokens"],
        ["tokens", f"{tokens:,} ({tokens / params:.3g} per parameter)"],
        ["training FLOPs", f"{fpt * tokens:.3g}"],
        ["training time", _duration(meta.get("elapsed"))],
        ["tokens/s", f"{tok_s:,.0f} (median of the later half of the steps)" if tok_s else "-"],
        ["MFU", _num(mfu, ".1%", "- (GPU only)")],
        ["final train loss", _num(figures.get("loss"), ".4f")],
        ["final val loss", _num(figures.get("val_loss"), ".4f")],
        ["final val bits/byte", f"**{figures['val_bpb']:.4f}**" if figures.get("val_bpb") is not None else "-"],
        ["checkpoint", f"`{ckpt.relative_to(home)}`"],
    ]
    lines += _table(["", ""], rows)
    samples = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "sample"]
    if samples:
        lines += ["", "Greedy continuations at the end:", "", "```text", *samples[-1]["samples"], "```"]
    if (home / "report" / "base_loss.png").is_file():
        lines += ["", "![pretraining loss and validation bits per byte](base_loss.png)"]
    lines += sweep_rows(home)
    return lines, {"params": params, "val_bpb": figures.get("val_bpb")}


def sweep_rows(home: Path, best: int = 5) -> list[str]:
    """The best shapes of benchmarks/sweep.py's table, where the sweep ran with this home."""
    sweep = home / "report" / "sweep.md"
    if not sweep.is_file():
        return []
    table = sweep.read_text().splitlines()[2 : 4 + best]  # below its heading: the table's head, then best first
    return ["", "Shapes measured by `benchmarks/sweep.py` on this machine, best first:", "", *table]


def sft_section(home: Path) -> list[str]:
    lines = ["## Supervised fine-tuning", ""]
    run_dir = home / "checkpoints" / "sft"
    ckpt = latest_checkpoint(root=run_dir)
    if ckpt is None:
        return lines + _missing("SFT checkpoint", "python -m finetune")
    meta = read_config(ckpt).get("meta", {})
    figures = meta.get("metrics", {})
    records = _train_records(run_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    quick = {k[4:]: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("acc_")}
    rows = [
        ["data mix", meta.get("data", "?")],
        [
            "examples",
            f"{meta.get('examples', 0):,} ({meta.get('split_conversations', 0):,} conversations split, "
            f"{meta.get('dropped_conversations', 0):,} dropped as too long)",
        ],
        ["from", f"`{meta['from']}`" if meta.get("from") else "?"],
        ["steps / tokens", f"{meta.get('step', '?')} / {meta.get('tokens', 0):,}"],
        ["training time", _duration(meta.get("elapsed"))],
        ["tokens/s", f"{steady_rate(records, 'tok_per_s') or 0:,.0f}"],
        ["final train loss", _num(figures.get("loss"), ".4f")],
        ["final val loss (assistant tokens)", _num(figures.get("val_loss"), ".4f")],
        ["quick chat eval at the end", ", ".join(f"{k} {v:.0%}" for k, v in quick.items()) or "-"],
        ["checkpoint", f"`{ckpt.relative_to(home)}`"],
    ]
    lines += _table(["", ""], rows)
    if (home / "report" / "sft_loss.png").is_file():
        lines += ["", "![SFT loss and validation](sft_loss.png)"]
    return lines


def eval_section(home: Path) -> list[str]:
    lines = ["## Chat evaluation", ""]
    runs = [r for r in read_metrics(home / "report" / "metrics.jsonl") if r.get("kind") == "chat_eval"]
    if not runs:
        return lines + _missing("chat evaluation", "python -m finetune.eval")
    run = runs[-1]
    models = list(run["models"])
    rows = run["rows"]
    if rows:
        mean = {
            "task": "**mean**",
            "n": sum(r["n"] for r in rows),
            **{k: sum(r[k] for r in rows) / len(rows) for k in ("chance", *models)},
        }
        rows = [*rows, mean]
    lines += [
        format_table(rows, models),
        "",
        "Accuracy per task on held-out items (greedy answers, exact match; multiple choice by the likeliest "
        "option letter). Chance: 1/k for multiple choice, the most common answer's share otherwise.",
        "",
    ]
    lines += [f"- {name}: `{path}`" for name, path in run["models"].items()]
    return lines


def repeated_ngrams(text: str, n: int = 4) -> float:
    """The share of the text's word n-grams that already appeared earlier in it: 0 for text that never repeats
    itself, near 1 for a loop ("the United States of the United States of ...")."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _newest_model(home: Path, kind: str, cfg: ReportConfig) -> tuple:
    """(checkpoint, model, tokenizer) of the newest base or SFT checkpoint, or (lines saying why not, None, None)."""
    ckpt = latest_checkpoint(root=home / "checkpoints" / kind)
    if ckpt is None:
        what, command = {"base": ("base", "pretrain"), "sft": ("SFT", "finetune")}[kind]
        return _missing(f"{what} checkpoint", f"python -m {command}"), None, None
    if cfg.samples <= 0:
        return ["_Skipped._"], None, None
    return (ckpt, *load_checkpoint(ckpt, device=pick_device(cfg.device))[:2])


def base_samples_section(home: Path, cfg: ReportConfig) -> list[str]:
    """Longer greedy continuations of the base model, and how much they repeat themselves."""
    lines = ["## Base model continuations", ""]
    _, model, tok = loaded = _newest_model(home, "base", cfg)
    if model is None:
        return lines + loaded[0]
    texts = []
    for prompt in CONTINUATION_PROMPTS:
        with torch.no_grad():
            out = model.generate(tok.encode(prompt), CONTINUATION_TOKENS, stop={tok.bos_id})  # <|bos|>: a new document
            texts.append(prompt + tok.decode(out[:-1] if out[-1:] == [tok.bos_id] else out))
    share = sum(repeated_ngrams(t) for t in texts) / len(texts)
    return lines + [
        f"Greedy, up to {CONTINUATION_TOKENS} tokens each (a document ends at <|bos|>). Repeated word "
        f"4-grams: **{share:.1%}** (the share of 4-grams that repeat an earlier one in the same text; 0% "
        "never loops).",
        "",
        "```text",
        *(t.replace("```", "'''") + "\n" for t in texts),
        "```",
    ]


def samples_section(home: Path, cfg: ReportConfig) -> list[str]:
    lines = ["## Sample conversations", ""]
    ckpt, model, tok = loaded = _newest_model(home, "sft", cfg)
    if model is None:
        return lines + loaded[0]
    end = assistant_end_id(tok)
    prompts = SAMPLE_PROMPTS[: cfg.samples]
    # The eval's decoder, with the calculator: what a chat through the server would show.
    rendered = [render_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    answers = greedy_decode_batch(model, rendered, cfg.max_new_tokens, end, [ToolUse(tok) for _ in prompts])
    lines += [
        f"Greedy answers of `{ckpt.relative_to(home)}` to fixed prompts (calculator calls in brackets):",
        "",
        "```text",
    ]
    for prompt, out in zip(prompts, answers):
        cut = "" if out[-1:] == [end] else f" [cut at {cfg.max_new_tokens} tokens]"
        answer = answer_text(tok, out, show_calls=True).replace("```", "'''")
        lines += [f"user: {prompt}", f"assistant: {answer}{cut}", ""]
    return lines[:-1] + ["```"]


def time_section(times: dict, gpus: int, cfg: ReportConfig) -> list[str]:
    lines = ["## Time", ""]
    if not times:
        return lines + ["_No stage times: they are recorded by `bash speedrun.sh`._"]
    # Setting up .venv is the one timed step without a log of its own.
    rows = [
        [name, _duration(end - start), "" if name == "setup" else f"`logs/{name}.log`"]
        for name, (start, end) in times.items()
    ]
    total = total_seconds(times)
    lines += [
        *_table(["stage", "time", "log"], rows),
        "",
        f"Total: **{_duration(total)}** (wall time from the "
        f"first stage's start to the last one's end; after a rerun that skipped finished stages, both runs).",
    ]
    if gpus:
        dollars = cost(total, gpus, cfg.nodes, cfg.gpu_hour_cost)
        lines += [
            "",
            f"Estimated cost: **${dollars:,.2f}** ({cfg.nodes} node(s) x {gpus} GPU x "
            f"{total / 3600:.2f} h x ${cfg.gpu_hour_cost:.2f}/GPU-hour; `--gpu-hour-cost`, `--gpus`, "
            f"`--nodes` to change).",
        ]
    return lines


def build(cfg: ReportConfig) -> str:
    home = Path(cfg.home) if cfg.home else scratchchat_home()
    if not home.is_dir():
        raise ValueError(f"{home} does not exist: run bash speedrun.sh first (or pass --home)")
    if cfg.gpus < -1 or cfg.nodes < 1 or cfg.gpu_hour_cost < 0:
        raise ValueError(
            f"--gpus must be >= 0 (or -1), --nodes >= 1 and --gpu-hour-cost >= 0; got {cfg.gpus}, "
            f"{cfg.nodes} and {cfg.gpu_hour_cost}"
        )
    here = torch.cuda.device_count()
    gpus = here if cfg.gpus == -1 else cfg.gpus
    times = stage_times(home)
    pre, figures = pretrain_section(home)
    head = [
        "# scratchchat report card",
        "",
        f"Artifacts: `{home}`. Written by `python scripts/report.py` from the files the stages left.",
    ]
    if figures.get("val_bpb") is not None:
        head += [
            "",
            f"**{figures['params'] / 1e6:.1f}M parameters, val {figures['val_bpb']:.4f} bits/byte"
            + (f", {_duration(total_seconds(times))} in all" if times else "")
            + "**",
        ]
    sections = [
        head,
        environment(here),
        tokenizer_section(home, times),
        data_section(home),
        pre,
        sft_section(home),
        eval_section(home),
        base_samples_section(home, cfg),
        samples_section(home, cfg),
        time_section(times, gpus, cfg),
    ]
    return "\n\n".join("\n".join(s).rstrip() for s in sections) + "\n"


def write(cfg: ReportConfig) -> None:
    text = build(cfg)
    out = Path(cfg.out) if cfg.out else (Path(cfg.home) if cfg.home else scratchchat_home()) / "report" / "report.md"
    write_text_atomic(out, text)
    print(f"{text}\nwrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(ReportConfig, prog="python scripts/report.py", description=__doc__.splitlines()[0])
    cfg = config_from_args(ReportConfig, parser.parse_args(argv))
    return run_cli(lambda: write(cfg))  # ValueError (CheckpointError is one) or OSError: one line, status 1


if __name__ == "__main__":
    sys.exit(main())
