"""Chat evaluation: ``python -m finetune.eval --checkpoint PATH [--base PATH] [--benchmark mmlu,arc,gsm8k]``.

Generative tasks (held-out arithmetic, letter counting, spelling backwards, word problems, factbook
capitals; GSM8K) are scored by exact match after ``tasks.normalize`` of the greedy answer.
Multiple-choice tasks (largest number, capital of X; MMLU, ARC) are scored by which option letter
the model rates highest right after <|assistant_start|>. The table shows the SFT model beside the
base model and chance (1/k for multiple choice; for generative tasks the share of items whose
answer is the eval set's most common answer).

Benchmarks named on the command line are downloaded once into $SCRATCHCHAT_HOME/data/benchmarks/,
from the Hugging Face hub or from a mirror at $SCRATCHCHAT_BENCHMARK_URL/<name>.parquet.

Items run in batches of similar length: one right-padded forward scores many multiple-choice prompts,
and answers are decoded together through the KV cache, in bf16 on CUDA. The tests hold the reference that
these batches and the serving engine must match: a plain greedy loop over the full forward, in fp32.
"""

from __future__ import annotations

import math
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import config_from_args, flag, parser_for
from common.dist import pick_device
from common.files import write_text_atomic
from common.paths import data_dir, report_dir
from finetune import tasks
from finetune.calculator import TOOL_TOKENS, ToolUse
from finetune.chat import assistant_end_id, render_prompt
from finetune.tasks import Item, normalize
from pretrain.checkpoint import latest_checkpoint, load_checkpoint
from pretrain.download import DownloadError, download
from pretrain.model import KVCache, sample_next
from pretrain.report import append_metrics


def answer_text(tok, generated: list[int], show_calls: bool = False) -> str:
    """The assistant's reply text: generated tokens up to (not including) its end token, calculator calls and their
    results left out (the prose is what gets scored), or shown as [calculator: expression = result]."""
    end = assistant_end_id(tok)
    generated = generated[: generated.index(end)] if end in generated else generated
    tool, text, prose, skip = ToolUse(tok), "", [], 0
    for t in generated:
        if skip:  # the result block the decoder fed in after a call
            skip -= 1
        elif exchange := tool.after(t):
            text, prose, skip = text + tok.decode(prose), [], len(exchange.forced)
            if show_calls:
                text += f"[calculator: {exchange.expression} = {exchange.result}]"
        elif tool.call is None:  # not inside a call
            prose.append(t)
    return text + tok.decode(prose)


def letter_ids(tok, n: int) -> list[int]:
    ids = [tok.encode(tasks.LETTERS[i]) for i in range(n)]
    if any(len(i) != 1 for i in ids):
        raise ValueError("the tokenizer does not encode each option letter as a single token")
    return [i[0] for i in ids]


def _padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, list[int]]:
    """Prompts right-padded with token 0 into one [b, T] batch, and their lengths."""
    lengths = [len(p) for p in prompts]
    idx = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, : len(p)] = torch.tensor(p)
    return idx.to(device), lengths


@torch.no_grad()
def choose(model, prompts: list[list[int]], options: list[list[int]]) -> list[int]:
    """For each prompt, the index into its option token ids of the one the model rates highest next.

    One forward for the batch: attention is causal, so padding after a prompt cannot change the logits
    at its last real position, which is where each row is read."""
    idx, lengths = _padded(prompts, next(model.parameters()).device)
    last = model(idx)[torch.arange(len(prompts)), torch.tensor(lengths) - 1]
    return [int(row[opts].argmax()) for row, opts in zip(last, options)]


@torch.no_grad()
def greedy_decode_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop: int | None = None,
    tools: list[ToolUse] | None = None,
    ban: int | None = None,
) -> list[list[int]]:
    """Greedy continuations of several prompts at once through the KV cache: one right-padded prefill (the cache
    keeps each row's own length, so the padding is never attended to and is overwritten), then one forward per new
    token for the whole batch. A row's answer ends at `stop` (kept); decoding ends when every row has.

    With `tools` (one ToolUse per row) a finished calculator call's result block is fed in, one token per step, in
    place of the model's picks; `ban` is a token never picked (the tool's start when the tool is off)."""
    device = next(model.parameters()).device
    idx, lengths = _padded(prompts, device)
    cache = KVCache(
        model.config, len(prompts), max(lengths) + max_new_tokens, device=device, dtype=next(model.parameters()).dtype
    )
    logits = model(idx, kv_cache=cache, lengths=lengths)[torch.arange(len(prompts)), torch.tensor(lengths) - 1]
    out: list[list[int]] = [[] for _ in prompts]
    forced: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        if ban is not None:
            logits[:, ban] = float("-inf")
        nxt = sample_next(logits)  # temperature 0: the argmax
        for row in range(len(prompts)):
            if forced[row]:
                nxt[row] = forced[row].pop(0)
            if not done[row]:
                token = int(nxt[row])
                out[row].append(token)
                done[row] = token == stop
                if tools and (exchange := tools[row].after(token)):
                    forced[row] = exchange.forced
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], kv_cache=cache)[:, -1]  # finished rows run on; their tokens are dropped
    return out


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

BENCHMARK_URL_ENV = "SCRATCHCHAT_BENCHMARK_URL"  # a mirror serving <name>.parquet for each name below
_HUB = "https://huggingface.co/datasets"
BENCHMARKS = {  # name -> the test split as published on the Hugging Face hub
    "mmlu": f"{_HUB}/cais/mmlu/resolve/main/all/test-00000-of-00001.parquet",
    "arc-challenge": f"{_HUB}/allenai/ai2_arc/resolve/main/ARC-Challenge/test-00000-of-00001.parquet",
    "arc-easy": f"{_HUB}/allenai/ai2_arc/resolve/main/ARC-Easy/test-00000-of-00001.parquet",
    "gsm8k": f"{_HUB}/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet",
}
ALIASES = {"arc": ("arc-challenge", "arc-easy")}


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
            answer = tasks.LETTERS[labels.index(r["answerKey"])]
            items.append(Item(name, r.get("id", r["question"]), r["question"].strip(), answer, tuple(texts)))
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


def _groups(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices in batches of similar length (sorted, so little padding), each within batch_tokens as rows x the
    longest row (a row longer than that goes alone)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if not groups or (len(groups[-1]) + 1) * lengths[i] > batch_tokens:
            groups.append([])
        groups[-1].append(i)
    return groups


def evaluate(
    model, tok, items: list[Item], max_new_tokens: int = 32, batch_tokens: int = 8192, tool: bool = False
) -> TaskResult:
    """Score one task's items with greedy answers (generative) or letter choice (multiple choice), in batches
    of at most batch_tokens tokens (prompt plus answer, times rows); bf16 autocast on CUDA, fp32 elsewhere.
    With tool the model may call the calculator; without, it must answer directly (it cannot start a call)."""
    model.eval()
    device = next(model.parameters()).device
    end = assistant_end_id(tok)
    prompts = [render_prompt(tok, [{"role": "user", "content": item.prompt()}]) for item in items]
    responses: list[tuple[str, str]] = [("", "")] * len(items)  # (answer, how it ended)
    mc = [k for k, item in enumerate(items) if item.choices]
    gen = [k for k, item in enumerate(items) if not item.choices]
    ban = None if tool else tok.special_tokens.get(TOOL_TOKENS[0])  # without the tool, no call can start
    # On CPU autocast is off: answers stay identical to the fp32 reference loop (greedy_decode).
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        for group in _groups([len(prompts[k]) for k in mc], batch_tokens):
            ks = [mc[g] for g in group]
            picks = choose(model, [prompts[k] for k in ks], [letter_ids(tok, len(items[k].choices)) for k in ks])
            for k, pick in zip(ks, picks):
                responses[k] = (tasks.LETTERS[pick], "choice")
        for group in _groups([len(prompts[k]) + max_new_tokens for k in gen], batch_tokens):
            ks = [gen[g] for g in group]
            tools = [ToolUse(tok) for _ in ks] if tool else None
            answers = greedy_decode_batch(model, [prompts[k] for k in ks], max_new_tokens, end, tools, ban)
            for k, generated in zip(ks, answers):
                ending = "<|assistant_end|>" if generated[-1:] == [end] else f"cut at {max_new_tokens} tokens"
                responses[k] = (answer_text(tok, generated), ending)
    correct, samples = 0, []
    for item, (response, ending) in zip(items, responses):
        ok = is_correct(item, response)
        correct += ok
        samples.append((item.prompt(), response, item.answer, ok, ending))
    return TaskResult(items[0].task if items else "", len(items), correct, samples)


TOOL_TASKS = ("arithmetic", "word_problem")  # scored twice: answering directly, and with the calculator (+tool)


def benchmark_file(name: str) -> Path:
    """A named benchmark's parquet file, downloaded on first use to $SCRATCHCHAT_HOME/data/benchmarks/<name>/."""
    mirror = os.environ.get(BENCHMARK_URL_ENV)
    url = f"{mirror.rstrip('/')}/{name}.parquet" if mirror else BENCHMARKS[name]
    try:
        (path,) = download([url], data_dir("benchmarks") / name, progress=False)
    except DownloadError as e:
        raise ValueError(f"benchmark {name}: {e}") from None
    return path


def eval_items(n: int, seed: int, benchmarks: list[str]) -> dict[str, list[Item]]:
    """Held-out items of our own eval tasks, plus benchmarks: names (see BENCHMARKS) or parquet file paths."""
    out = {t: tasks.generate(t, "eval", n, seed) for t in tasks.EVAL_TASKS}
    for spec in benchmarks:
        if spec in BENCHMARKS or spec in ALIASES:
            for name in ALIASES.get(spec, (spec,)):  # one row per set: arc-easy and arc-challenge stay apart
                out.setdefault(name, []).extend(load_benchmark(benchmark_file(name), n, seed)[1])
        elif Path(spec).is_file():
            name, items = load_benchmark(spec, n, seed)
            out.setdefault(name, []).extend(items)
        else:
            known = ", ".join([*BENCHMARKS, *ALIASES])
            raise ValueError(f"--benchmark {spec!r} is neither a benchmark name ({known}) nor a parquet file")
    return out


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy p measured on n items (sound near 0 and 1, unlike p +- 2 sd)."""
    if n <= 0:
        return 0.0, 1.0
    mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, mid - half / (1 + z * z / n)), min(1.0, mid + half / (1 + z * z / n))


def format_table(rows: list[dict], models: list[str]) -> str:
    """Markdown table: task, n, chance, then one accuracy column per model with its 95% interval."""
    head = "| task | n | chance | " + " | ".join(models) + " |"
    lines = [head, "|" + "---|" * (3 + len(models))]
    for r in rows:
        accs = " | ".join(
            "{:.1f}% ({:.0f}-{:.0f})".format(100 * r[m], *(100 * x for x in wilson(r[m], r["n"]))) for m in models
        )
        lines.append(f"| {r['task']} | {r['n']} | {100 * r['chance']:.1f}% | {accs} |")
    return "\n".join(lines)


@dataclass
class EvalConfig:
    checkpoint: str = flag("", "SFT checkpoint dir (default: the latest under $SCRATCHCHAT_HOME/checkpoints/sft)")
    base: str = flag("", "base checkpoint to compare (default: the one the SFT started from); 'none' skips it")
    limit: int = flag(100, "items per task (100 gives a 95% interval of about +-10 points)")
    seed: int = flag(0, "seed for drawing the eval items")
    show: int = flag(0, "print this many answers per task and model")
    max_new_tokens: int = flag(32, "longest generated answer")
    benchmark: str = flag(
        "",
        "comma-separated benchmarks to add: mmlu, arc (both sets), arc-challenge, arc-easy, "
        "gsm8k (downloaded once; $SCRATCHCHAT_BENCHMARK_URL/<name>.parquet if set), "
        "or MMLU / ARC / GSM8K parquet files",
    )
    batch_tokens: int = flag(
        8192, "tokens per forward pass (rows x longest prompt plus answer); lower it if memory runs out"
    )
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
    items = eval_items(cfg.limit, cfg.seed, [b.strip() for b in cfg.benchmark.split(",") if b.strip()])
    rows, t0 = [], time.time()
    for task, its in items.items():
        for tool in (False, True) if task in TOOL_TASKS else (False,):
            row = {"task": task + "+tool" * tool, "n": len(its), "chance": chance(its)}
            for name, (_, m) in models.items():
                res = evaluate(m, tok, its, cfg.max_new_tokens, cfg.batch_tokens, tool)
                row[name] = res.accuracy
                for prompt, resp, want, ok, ending in res.samples[: cfg.show]:
                    print(
                        f"[{name} {row['task']}] {'ok ' if ok else 'BAD'} user: {prompt!r}\n"
                        f"    assistant: {resp!r} [{ending}]  (expected {want!r})"
                    )
            rows.append(row)
    table = format_table(rows, list(models))
    header = "## Chat evaluation\n\n" + "\n".join(f"- {name}: `{path}`" for name, (path, _) in models.items())
    text = f"{header}\n\n{table}\n\n({sum(r['n'] for r in rows)} items per model, {time.time() - t0:.0f}s)\n"
    print(text)
    out = Path(cfg.report_dir) if cfg.report_dir else report_dir()
    write_text_atomic(out / "chat_eval.md", text)
    append_metrics(
        out / "metrics.jsonl",
        {"kind": "chat_eval", "rows": rows, "models": {k: str(p) for k, (p, _) in models.items()}},
    )
    print(f"wrote {out / 'chat_eval.md'}\nnext: chat with it: python -m serve --checkpoint {sft_path}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(EvalConfig, prog="python -m finetune.eval", description=__doc__.split("\n\n")[0])
    cfg = config_from_args(EvalConfig, parser.parse_args(argv))
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
