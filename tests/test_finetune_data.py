"""SFT data (finetune.data, finetune.tasks): sources, held-out split, user files, fitting and packing."""

import json
import re
import socket
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml  # a dependency of transformers (dev): the reference YAML parser

from common.dist import Dist
from finetune import data, tasks
from finetune.chat import render_conversation
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = [s for _, s in tasks.wiki_summaries()[:300]]
    return Tokenizer.train(texts, vocab_size=500)


# --- sources -------------------------------------------------------------------------------------


def test_chatterbot_parser_matches_pyyaml_on_every_file():
    files = sorted(tasks.package_dir("chatterbot_corpus").glob("data/*/*.yml"))
    assert len(files) > 100
    for f in files:
        text = f.read_text(encoding="utf-8")
        ref = yaml.load(text.lstrip("\ufeff"), Loader=yaml.BaseLoader).get("conversations", [])
        assert data.parse_chatterbot_yaml(text) == ref, f


def test_chatterbot_parser_handles_block_and_quoted_scalars():
    text = (
        "categories:\n- test\nconversations:\n- - 'It''s \"quoted\"'\n  - |\n    line one\n\n      indented\n"
        '- - "tab\\tand \\u00e9"\n  - plain text\n    folded on\n    two lines # a comment\n'
        "- - q\n  - >-\n    folded\n    block\n"
    )
    assert data.parse_chatterbot_yaml(text) == yaml.load(text, Loader=yaml.BaseLoader)["conversations"]


def test_embedded_sources_are_alternating_conversations():
    bot, chit = data.chatterbot_conversations(), data.chitchat_conversations()
    assert len(bot) > 1500 and len(chit) > 3000
    for conv in bot[:200] + chit[:200]:
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert all(m["content"].strip() for m in conv)


def test_heldout_items_never_appear_in_training():
    for task in tasks.GENERATORS:
        family = tasks.SPLIT_FAMILY.get(task, task)
        train = tasks.generate(task, "train", 1000, seed=1)
        evals = tasks.generate(task, "eval", 300, seed=2)
        assert train, task
        assert all(not tasks.is_heldout(family, i.key) for i in train)
        if task in tasks.EVAL_TASKS:
            assert evals, task
            assert not {i.key for i in train} & {i.key for i in evals}, task
            assert not {i.prompt() for i in train} & {i.prompt() for i in evals}, task
    # Tasks about the same country share its fate: no capital_mc or fact question leaks an eval capital.
    eval_countries = {i.key for i in tasks.generate("capital", "eval", 500, 0)}
    for t in ("capital_mc", "country_fact"):
        assert not eval_countries & {i.key for i in tasks.generate(t, "train", 3000, 0)}


def test_generated_answers_are_right():
    for item in tasks.generate("arithmetic", "eval", 100, 0):
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", item.key).groups()
        assert str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]) == item.answer
    for item in tasks.generate("reverse", "eval", 50, 0):
        assert item.answer[::-1] == item.key and item.key in item.question
    for item in tasks.generate("largest_mc", "eval", 50, 0):
        nums = [int(c) for c in item.choices]
        assert item.choices[tasks.LETTERS.index(item.answer)] == str(max(nums))
    caps = {c.name: c.capital for c in tasks.countries()}
    assert caps["France"] == "Paris" and caps["Japan"] == "Tokyo"
    for item in tasks.generate("capital_mc", "eval", 20, 0):
        assert item.choices[tasks.LETTERS.index(item.answer)] == caps[item.key]
        assert len(set(item.choices)) == 4


def test_generation_is_deterministic_per_seed():
    assert tasks.generate("letters", "train", 50, 7) == tasks.generate("letters", "train", 50, 7)
    assert tasks.generate("letters", "train", 50, 7) != tasks.generate("letters", "train", 50, 8)
    a, counts = data.default_mix(seed=3, scale=0.05)
    b, _ = data.default_mix(seed=3, scale=0.05)
    assert a == b and all(counts[k] > 0 for k in data.DEFAULT_MIX)
    assert any("scratchchat" in c[-1]["content"] for c in a)  # identity conversations are in


# --- user files ------------------------------------------------------------------------------------


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("{not json", "not valid JSON"),
        ({"text": "hi"}, 'expected an object with a "messages" list'),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "must end with an assistant message"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "should be 'assistant'"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad, fragment):
    f = _jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(data.DataError, match=fragment) as e:
        data.load_jsonl(f)
    assert str(e.value).startswith(f"{f}:3: ")
    convs, skipped = data.load_jsonl(f, skip_bad=True)
    assert len(convs) == 3 and skipped == 1


def test_empty_or_missing_files_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(data.DataError, match="empty.jsonl: no conversations"):
        data.load_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(data.DataError, match="no such file"):
        data.load_user_data([tmp_path / "missing.jsonl"])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(data.DataError, match="unsupported file type"):
        data.load_user_data([tmp_path / "x.txt"])


def test_user_folder_of_jsonl_and_parquet(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [GOOD] * 3)
    pq.write_table(pa.table({"messages": [GOOD["messages"]] * 2}), tmp_path / "b.parquet")
    convs, skipped = data.load_user_data([tmp_path])
    assert len(convs) == 5 and skipped == 0 and convs[0] == GOOD["messages"]


def test_smoltalk_parquet_through_the_downloader(tmp_path, monkeypatch):
    """SmolTalk's shards come down through pretrain.download from a local server, then load."""
    served = tmp_path / "hub" / "data"
    served.mkdir(parents=True)
    rows = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(10)]
    for i in range(2):
        pq.write_table(
            pa.table({"messages": rows[i * 5 : (i + 1) * 5], "source": ["x"] * 5}),
            served / f"train-{i:05d}-of-00002.parquet",
        )
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "hub"))
    handler.log_message = lambda *a: None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(data.SMOLTALK_URL_ENV, f"http://127.0.0.1:{port}/data/train-{{i:05d}}-of-{{n:05d}}.parquet")
        files = data.download_smoltalk(tmp_path / "dest", n_files=2, total=2)
    finally:
        server.shutdown()
    convs, skipped = data.load_user_data(files)
    assert convs == rows and skipped == 0


# --- fitting and packing ---------------------------------------------------------------------------


def _convo(n_exchanges: int, answer: str = "the capital is Paris") -> list[dict]:
    out = [{"role": "system", "content": "be nice"}]
    for i in range(n_exchanges):
        out += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"{answer} {i}"}]
    return out


def test_long_conversations_split_between_exchanges(tok):
    conv = _convo(12)
    whole, _ = render_conversation(tok, conv)
    stats = data.FitStats()
    pieces = data.fit_conversation(tok, conv, max_len=len(whole) // 3, stats=stats)
    assert len(pieces) >= 3 and stats.split == 1 and stats.dropped == 0
    learned = []
    for ids, mask in pieces:
        assert len(ids) <= len(whole) // 3
        assert ids[0] == tok.bos_id and ids[1] == tok.special_tokens["<|system_start|>"]  # system kept in each piece
        assert ids[-1] == tok.special_tokens["<|assistant_end|>"] and mask[-1] == 1
        learned.append(tok.decode([t for t, m in zip(ids, mask) if m]))
    # Every answer is learned exactly once and whole.
    assert "".join(learned) == "".join(f"the capital is Paris {i}<|assistant_end|>" for i in range(12))


def test_exchange_too_long_alone_is_dropped_and_counted(tok):
    conv = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "word " * 200},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "fine"},
    ]
    examples, stats = data.render_all(
        tok, [conv, [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]], max_len=40
    )
    assert stats.dropped_exchanges == 2 and stats.dropped == 1 and stats.conversations == 2
    texts = [tok.decode(ids) for ids, _ in examples]
    assert len(texts) == 2 and "ok" in texts[0] and "fine" in texts[1]


def test_invalid_conversations_are_counted_not_fatal(tok):
    _, stats = data.render_all(tok, [[{"role": "bot", "content": "x"}], _convo(1)], max_len=100)
    assert sum(stats.invalid.values()) == 1 and stats.conversations == 2


def test_loader_packs_every_example_once_per_epoch(tok):
    convs = [_convo(1, answer=f"answer number {i}") for i in range(40)]
    examples, _ = data.render_all(tok, convs, max_len=64)
    loader = data.SFTLoader(examples, batch_size=2, seq_len=63, pad_id=tok.bos_id, seed=0)
    rows = loader.rows_per_epoch()
    seen = Counter()
    for _ in range((rows + 1) // 2):
        x, y, m = next(loader)
        assert x.shape == y.shape == m.shape == (2, 63) and m.dtype == torch.bool
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_y, row_m in zip(y, m):
            text = tok.decode(row_y[row_m].tolist())
            seen.update(t for t in text.split("<|assistant_end|>") if t)
    # The last batch may wrap into epoch 1; every answer appears, at most twice.
    assert set(seen) == {f"answer number {i} 0" for i in range(40)} and max(seen.values()) <= 2


def test_loader_resumes_and_splits_ranks(tok):
    examples, _ = data.render_all(tok, [_convo(2, answer=f"a{i}") for i in range(30)], max_len=64)
    make = partial(data.SFTLoader, examples, batch_size=3, seq_len=63, pad_id=tok.bos_id, seed=5)
    a = make()
    for _ in range(4):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    b = make()
    b.load_state_dict(state)
    for _ in range(6):  # crosses an epoch boundary
        assert all(torch.equal(u, v) for u, v in zip(next(a), next(b)))
    r0, r1 = make(dist=Dist(rank=0, world_size=2)), make(dist=Dist(rank=1, world_size=2))
    x0, x1 = next(r0)[0], next(r1)[0]
    rows = next(make(batch_size=6))[0]  # the same global batch on one rank
    assert torch.equal(x0, rows[0::2]) and torch.equal(x1, rows[1::2])
