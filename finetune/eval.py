"""Chat evaluation: ``python -m finetune.eval --checkpoint PATH [--base PATH] [--show N]``.

Generative tasks (held-out arithmetic, letter counting, spelling backwards, word problems, factbook
capitals; GSM8K when its parquet is given) are scored by exact match after ``tasks.normalize`` of
the greedy answer. Multiple-choice tasks (largest number, capital of X; MMLU / ARC parquet when
given) are scored by which option letter the model rates highest right after <|assistant_start|>.
The table shows the SFT model beside the base model and chance (1/k for multiple choice; for
generative tasks the share of items whose answer is the eval set's most common answer).

Decoding is a plain greedy loop over the model's forward, no KV cache: the reference that the
serving engine must match token for token (``greedy_decode``).
"""
from __future__ import annotations

import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import tasks
from finetune.chat import assistant_end_id, render_prompt
from finetune.tasks import Item, normalize
from pretrain.checkpoint import latest_checkpoint, load_checkpoint
from pretrain.report import append_metrics
from pretrain.train import config_from_args, dataclass_parser, flag, pick_device
from tokenizer.files import scratchchat_home


@torch.no_grad()
def greedy_decode(model, prompt: list[int], max_new_tokens: int, stop: int | None = None) -> list[int]:
    """Greedy continuation of prompt ids: argmax of the full forward at each step, stop token included."""
    device = next(model.parameters()).device
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=device))[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == stop:
            break
    return out


def answer_text(tok, generated: list[int]) -> str:
    """The assistant's reply text: generated tokens up to (not including) its end token."""
    end = assistant_end_id(tok)
    return tok.decode(generated[: generated.index(end)] if end in generated else generated)


def letter_ids(tok, n: int) -> list[int]:
    ids = [tok.encode(tasks.LETTERS[i]) for i in range(n)]
    if any(len(i) != 1 for i in ids):
        raise ValueError("the tokenizer does not encode each option letter as a single token")
    return [i[0] for i in ids]


@torch.no_grad()
def choose(model, tok, item: Item) -> int:
    """Index of the option whose letter the model rates highest as the first token of its answer."""
    device = next(model.parameters()).device
    prompt = render_prompt(tok, [{"role": "user", "content": item.prompt()}])
    logits = model(torch.tensor([prompt], device=device))[0, -1]
    return int(logits[letter_ids(tok, len(item.choices))].argmax())


def _last_number(text: str) -> str | None:
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def is_correct(item: Item, response: str) -> bool:
    """Exact match after normalisation; GSM8K compares the final number (its answers show working)."""
    if item.task == "gsm8k":
        return _last_number(response) == item.answer
    return normalize(response) == normalize(item.answer)


def chance(items: list[Item]) -> float:
    if not items:
        return 0.0
    if items[0].choices:
        return sum(1 / len(i.choices) for i in items) / len(items)
    top = Counter(normalize(i.answer) for i in items).most_common(1)[0][1]
    return top / len(items)


# --- real benchmark files (parquet, as published on the hub) ----------------------------------------

def load_benchmark(path: str | Path, n: int | None = None, seed: int = 0) -> tuple[str, list[Item]]:
    """(task name, items) from an MMLU, ARC or GSM8K parquet file, recognised by its columns."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises many types for a bad file; the user needs one line
        raise ValueError(f"{path}: cannot read parquet ({e})") from None
    cols = set(rows[0]) if rows else set()
    items: list[Item] = []
    if {"question", "choices", "answer"} <= cols and isinstance(rows[0]["answer"], int):  # cais/mmlu
        name = "mmlu"
        for i, r in enumerate(rows):
            items.append(Item(name, f"{i}", r["question"].strip(), tasks.LETTERS[r["answer"]], tuple(r["choices"])))
    elif {"question", "choices", "answerKey"} <= cols:  # allenai/ai2_arc
        name = "arc"
        for r in rows:
            labels, texts = r["choices"]["label"], r["choices"]["text"]
            if r["answerKey"] not in labels or len(texts) > len(tasks.LETTERS):
                continue
            items.append(Item(name, r.get("id", r["question"]), r["question"].strip(),
                              tasks.LETTERS[labels.index(r["answerKey"])], tuple(texts)))
    elif {"question", "answer"} <= cols and isinstance(rows[0]["answer"], str):  # openai/gsm8k
        name = "gsm8k"
        for i, r in enumerate(rows):
            final = r["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
            items.append(Item(name, f"{i}", r["question"].strip(), final))
    else:
        columns = ", ".join(sorted(cols)) or "none"
        raise ValueError(f"{path}: not an MMLU, ARC or GSM8K parquet file (columns: {columns})")
    if n is not None and len(items) > n:
        items = random.Random(seed).sample(items, n)
    return name, items


# --- running the evaluation ------------------------------------------------------------------------

@dataclass
class TaskResult:
    task: str
    n: int
    correct: int
    # (prompt, response, expected, correct, how the answer ended: "<|assistant_end|>", "cut" or "choice")
    samples: list[tuple[str, str, str, bool, str]]

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def evaluate(model, tok, items: list[Item], max_new_tokens: int = 32) -> TaskResult:
    """Score one task's items with greedy answers (generative) or letter choice (multiple choice)."""
    model.eval()
    correct, samples = 0, []
    for item in items:
        if item.choices:
            response, ending = tasks.LETTERS[choose(model, tok, item)], "choice"
        else:
            prompt = render_prompt(tok, [{"role": "user", "content": item.prompt()}])
            generated = greedy_decode(model, prompt, max_new_tokens, assistant_end_id(tok))
            response = answer_text(tok, generated)
            ended = generated[-1:] == [assistant_end_id(tok)]
            ending = "<|assistant_end|>" if ended else f"cut at {max_new_tokens} tokens"
        ok = is_correct(item, response)
        correct += ok
        samples.append((item.prompt(), response, item.answer, ok, ending))
    return TaskResult(items[0].task if items else "", len(items), correct, samples)


def eval_items(n: int, seed: int, benchmarks: list[str]) -> dict[str, list[Item]]:
    """Held-out items of our own eval tasks, plus any benchmark parquet files."""
    out = {t: tasks.generate(t, "eval", n, seed) for t in tasks.EVAL_TASKS}
    for p in benchmarks:
        name, items = load_benchmark(p, n, seed)
        out.setdefault(name, []).extend(items)
    return out


def format_table(rows: list[dict], models: list[str]) -> str:
    """Markdown table: task, n, chance, then one accuracy column per model."""
    head = "| task | n | chance | " + " | ".join(models) + " |"
    lines = [head, "|" + "---|" * (3 + len(models))]
    for r in rows:
        accs = " | ".join(f"{100 * r[m]:.1f}%" for m in models)
        lines.append(f"| {r['task']} | {r['n']} | {100 * r['chance']:.1f}% | {accs} |")
    return "\n".join(lines)


@dataclass
class EvalConfig:
    checkpoint: str = flag("", "SFT checkpoint dir (default: the latest under $SCRATCHCHAT_HOME/checkpoints/sft)")
    base: str = flag("", "base checkpoint to compare (default: the one the SFT started from); 'none' skips it")
    limit: int = flag(50, "items per task")
    seed: int = flag(0, "seed for drawing the eval items")
    show: int = flag(0, "print this many answers per task and model")
    max_new_tokens: int = flag(32, "longest generated answer")
    benchmark: str = flag("", "comma-separated MMLU / ARC / GSM8K parquet files to add")
    device: str = flag("auto", "cpu, cuda, mps or auto")
    report_dir: str = flag("", "where chat_eval.md goes (default: $SCRATCHCHAT_HOME/report)")


def run(cfg: EvalConfig) -> str:
    """Evaluate the SFT (and base) model, print and write the table; returns the table."""
    sft_path = Path(cfg.checkpoint) if cfg.checkpoint else latest_checkpoint("sft")
    if sft_path is None:
        raise ValueError("no SFT checkpoint found; run `python -m finetune` first or pass --checkpoint PATH")
    device = pick_device(cfg.device)
    model, tok, meta = load_checkpoint(sft_path, device=device)
    if tok is None:
        raise ValueError(f"{sft_path}: checkpoint has no tokenizer; cannot evaluate chat")
    models = {"sft": (sft_path, model)}
    if cfg.base.lower() != "none":
        base_path = Path(cfg.base) if cfg.base else None
        if base_path is None:  # the base this SFT started from, if it is still there
            recorded = Path(meta["from"]) if meta.get("from") else None
            base_path = recorded if recorded and recorded.is_dir() else latest_checkpoint("base")
        elif not base_path.is_dir():
            raise ValueError(f"{base_path}: no such base checkpoint directory")
        if base_path is None:
            print("no base checkpoint found: showing the SFT model alone")
        else:
            base_model, base_tok, _ = load_checkpoint(base_path, device=device)
            if base_tok is None or base_tok.hash != tok.hash:
                raise ValueError(f"{base_path}: base checkpoint uses a different tokenizer than {sft_path}")
            models = {"base": (base_path, base_model), **models}
    items = eval_items(cfg.limit, cfg.seed, [b for b in cfg.benchmark.split(",") if b.strip()])
    rows, t0 = [], time.time()
    for task, its in items.items():
        row = {"task": task, "n": len(its), "chance": chance(its)}
        for name, (_, m) in models.items():
            res = evaluate(m, tok, its, cfg.max_new_tokens)
            row[name] = res.accuracy
            for prompt, resp, want, ok, ending in res.samples[: cfg.show]:
                print(f"[{name} {task}] {'ok ' if ok else 'BAD'} user: {prompt!r}\n"
                      f"    assistant: {resp!r} [{ending}]  (expected {want!r})")
        rows.append(row)
    table = format_table(rows, list(models))
    header = "## Chat evaluation\n\n" + "\n".join(f"- {name}: `{path}`" for name, (path, _) in models.items())
    text = f"{header}\n\n{table}\n\n({sum(r['n'] for r in rows)} items per model, {time.time() - t0:.0f}s)\n"
    print(text)
    out = Path(cfg.report_dir) if cfg.report_dir else scratchchat_home() / "report"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "chat_eval.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "chat_eval.md")
    append_metrics(out / "metrics.jsonl", {"kind": "chat_eval", "rows": rows,
                                           "models": {k: str(p) for k, (p, _) in models.items()}})
    print(f"wrote {out / 'chat_eval.md'}\nnext: chat with it: python -m serve --checkpoint {sft_path}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = dataclass_parser(EvalConfig, description=__doc__.split("\n\n")[0])
    parser.prog = "python -m finetune.eval"
    cfg = config_from_args(EvalConfig, parser.parse_args(argv))
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
