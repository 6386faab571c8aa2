"""Chat evaluation pieces (finetune.eval): greedy decoding, letter choice, batching, scoring, benchmark files
(from paths, and by name through a local HTTP server standing in for the hub mirror)."""

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from finetune import eval as chat_eval
from finetune import tasks
from finetune.calculator import ToolUse
from finetune.chat import render_prompt
from finetune.tasks import Item
from pretrain.model import GPT, GPTConfig
from tests.test_download import Server
from tokenizer import Tokenizer


@torch.no_grad()
def greedy_decode(
    model,
    prompt: list[int],
    max_new_tokens: int,
    stop: int | None = None,
    tool: ToolUse | None = None,
    ban: int | None = None,
) -> list[int]:
    """The reference decoder: argmax of the full forward (no cache) at each step, stop token included; with a
    ToolUse, a finished call's result block replaces the next picks; `ban` is never picked. Batched evaluation and
    the serving engine must match it token for token."""
    device = next(model.parameters()).device
    ids, out, forced = list(prompt), [], []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=device))[0, -1]
        if ban is not None:
            logits[ban] = float("-inf")
        nxt = forced.pop(0) if forced else int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == stop:
            break
        if tool and (exchange := tool.after(nxt)):
            forced = list(exchange.forced)
    return out


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([s for _, s in tasks.wiki_summaries()[:200]], vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    with torch.no_grad():  # a random but non-uniform model (lm_head starts at zero)
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m.eval()


def test_greedy_decode_matches_the_kv_cache_path(tok, model, one_thread):
    """The plain loop is the reference the serving engine must match; the model's cached generate does."""
    for text in ["What is 2 + 2?", "Hello there", "Spell 'cat' backwards."]:
        prompt = render_prompt(tok, [{"role": "user", "content": text}])
        ours = greedy_decode(model, prompt, 20)
        assert ours == model.generate(prompt, 20, temperature=0.0)
        assert len(ours) == 20
        # Stopping: cut at the first occurrence of a chosen stop token, which is kept.
        stop = ours[5]
        assert greedy_decode(model, prompt, 20, stop=stop) == ours[: ours.index(stop) + 1]


def test_answer_text_stops_at_the_end_token(tok):
    end = tok.special_tokens["<|assistant_end|>"]
    assert chat_eval.answer_text(tok, tok.encode("Paris") + [end] + tok.encode("junk")) == "Paris"
    assert chat_eval.answer_text(tok, tok.encode("no end")) == "no end"


def test_choice_is_the_highest_letter_logit(tok, model):
    item = Item("largest_mc", "k", "Which number is the largest?", "B", ("3", "9", "1", "2"))
    prompt = render_prompt(tok, [{"role": "user", "content": item.prompt()}])
    logits = model(torch.tensor([prompt]))[0, -1]
    letters = [tok.encode(c)[0] for c in "ABCD"]
    want = int(logits[letters].argmax())
    assert chat_eval.choose(model, [prompt], [letters]) == [want]
    result = chat_eval.evaluate(model, tok, [item])
    assert result.n == 1 and result.correct == (want == 1)


def reference_answers(model, tok, items, max_new_tokens, tool=False):
    """The unbatched fp32 reference: one full forward per item (choice) or per generated token (greedy_decode)."""
    end = chat_eval.assistant_end_id(tok)
    start = tok.special_tokens["<|tool_start|>"]
    out = []
    for item in items:
        prompt = render_prompt(tok, [{"role": "user", "content": item.prompt()}])
        if item.choices:
            logits = model(torch.tensor([prompt]))[0, -1]
            out.append(tasks.LETTERS[int(logits[chat_eval.letter_ids(tok, len(item.choices))].argmax())])
        else:
            answer = greedy_decode(
                model, prompt, max_new_tokens, end, ToolUse(tok) if tool else None, ban=None if tool else start
            )
            out.append(chat_eval.answer_text(tok, answer))
    return out


def test_batched_evaluation_gives_the_reference_answers(tok, model, one_thread):
    """Prompts of many lengths (right padding, per-row cache lengths), rows that stop at <|assistant_end|> at
    different steps while others run on, and mixed multiple-choice and generative items in one call."""
    items = [
        it
        for t in ("arithmetic", "reverse", "capital", "largest_mc", "capital_mc")
        for it in tasks.generate(t, "eval", 6, 0)
    ]
    items.append(Item("arc", "long", "Which? " + "Think about it carefully. " * 6, "A", ("yes", "no", "maybe")))
    # A model whose answers end, at different steps: <|assistant_end|> gets the output row of a token that the
    # random model emits in some answers but not all, scaled up a little so it wins wherever that token would.
    end = chat_eval.assistant_end_id(tok)
    prompts = [render_prompt(tok, [{"role": "user", "content": i.prompt()}]) for i in items if not i.choices]
    answers = [greedy_decode(model, p, 12) for p in prompts]
    common = Counter(t for a in answers for t in set(a[1:]))  # not the first token: each row says something
    token = min((t for t, n in common.items() if n < len(answers)), key=lambda t: abs(common[t] - len(answers) / 2))
    stopper = GPT(model.config)
    stopper.load_state_dict(model.state_dict())
    with torch.no_grad():
        stopper.lm_head.weight[end] = 1.05 * model.lm_head.weight[token]
    for m in (model, stopper.eval()):
        for tool in (False, True):  # the random model starts calculator calls in some rows: banned, or run
            want = reference_answers(m, tok, items, 12, tool)
            for batch_tokens in (1, 200, 8192):  # one row per batch, a few rows, everything at once
                result = chat_eval.evaluate(m, tok, items, max_new_tokens=12, batch_tokens=batch_tokens, tool=tool)
                assert [s[1] for s in result.samples] == want, (batch_tokens, tool)
                assert result.correct == sum(chat_eval.is_correct(i, a) for i, a in zip(items, want))
    endings = {s[4] for s in result.samples}
    assert {"<|assistant_end|>", "cut at 12 tokens", "choice"} <= endings  # the stopper stops some rows only


def test_batches_follow_the_token_budget():
    lengths = [5, 30, 10, 10, 40, 5]
    groups = chat_eval._groups(lengths, 40)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(len(g) * max(lengths[i] for i in g) <= 40 or len(g) == 1 for g in groups)
    assert groups == [[0, 5, 2, 3], [1], [4]]  # shortest first; a row longer than the budget goes alone


def test_scoring_and_chance():
    item = Item("capital", "France", "What is the capital of France?", "Paris")
    assert chat_eval.is_correct(item, "  paris. ") and chat_eval.is_correct(item, "PARIS!")
    assert not chat_eval.is_correct(item, "It is Paris") and not chat_eval.is_correct(item, "Lyon")
    gsm = Item("gsm8k", "0", "q", "1200")
    assert chat_eval.is_correct(gsm, "She pays 3 x 400 = 1,200 dollars.")
    assert not chat_eval.is_correct(gsm, "1200 then 7")
    mc = [Item("m", str(i), "q", "A", ("x", "y", "z", "w")) for i in range(3)] + [Item("m", "9", "q", "A", ("x", "y"))]
    assert chat_eval.chance(mc) == pytest.approx((3 * 0.25 + 0.5) / 4)
    gen = [Item("letters", str(i), "q", a) for i, a in enumerate(["1", "1", "0", "2"])]
    assert chat_eval.chance(gen) == 0.5  # always answering the most common answer


def test_benchmark_parquet_loaders(tmp_path):
    pq.write_table(
        pa.table(
            {
                "question": ["2+2?", "Sky?"],
                "subject": ["math", "sci"],
                "choices": [["3", "4", "5", "6"], ["blue", "red", "green", "pink"]],
                "answer": [1, 0],
            }
        ),
        tmp_path / "mmlu.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "id": ["a1", "a2"],
                "question": ["Q1", "Q2"],
                "choices": [
                    {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
                    {"text": ["p", "q", "r", "s"], "label": ["1", "2", "3", "4"]},
                ],
                "answerKey": ["C", "2"],
            }
        ),
        tmp_path / "arc.parquet",
    )
    pq.write_table(
        pa.table({"question": ["Tom has 2 and gets 3. Total?"], "answer": ["2 + 3 = 5\n#### 5"]}),
        tmp_path / "gsm8k.parquet",
    )
    name, items = chat_eval.load_benchmark(tmp_path / "mmlu.parquet")
    assert name == "mmlu"
    assert [(i.answer, i.choices) for i in items] == [
        ("B", ("3", "4", "5", "6")),
        ("A", ("blue", "red", "green", "pink")),
    ]
    assert "A. 3\nB. 4\nC. 5\nD. 6" in items[0].prompt()
    name, items = chat_eval.load_benchmark(tmp_path / "arc.parquet")
    assert name == "arc" and [(i.answer, len(i.choices)) for i in items] == [("C", 3), ("B", 4)]
    name, items = chat_eval.load_benchmark(tmp_path / "gsm8k.parquet")
    assert name == "gsm8k" and items[0].answer == "5"
    assert len(chat_eval.load_benchmark(tmp_path / "mmlu.parquet", n=1)[1]) == 1
    pq.write_table(pa.table({"text": ["hi"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not an MMLU, ARC or GSM8K parquet file"):
        chat_eval.load_benchmark(tmp_path / "other.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="cannot read parquet"):
        chat_eval.load_benchmark(tmp_path / "broken.parquet")


def test_table_format():
    rows = [{"task": "arithmetic", "n": 10, "chance": 0.1, "base": 0.0, "sft": 0.5}]
    table = chat_eval.format_table(rows, ["base", "sft"])
    assert table.splitlines()[0] == "| task | n | chance | base | sft |"
    assert table.splitlines()[2] == "| arithmetic | 10 | 10.0% | 0.0% (0-28) | 50.0% (24-76) |"
    # The Wilson interval against its textbook values (5 of 10: 0.2366-0.7634; 0 of 10: 0-0.2775).
    assert chat_eval.wilson(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert chat_eval.wilson(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)


def benchmark_parquets(tmp_path) -> dict[str, bytes]:
    """Small parquet files in each published format, named as the mirror serves them."""
    src = tmp_path / "mirror"
    src.mkdir()
    pq.write_table(
        pa.table(
            {
                "question": [f"Q{i}?" for i in range(5)],
                "subject": ["s"] * 5,
                "choices": [["a", "b", "c", "d"]] * 5,
                "answer": [0, 1, 2, 3, 0],
            }
        ),
        src / "mmlu.parquet",
    )
    for name, key in (("arc-challenge", "C"), ("arc-easy", "B")):
        pq.write_table(
            pa.table(
                {
                    "id": ["x1", "x2"],
                    "question": ["Q1", "Q2"],
                    "choices": [{"text": ["x", "y", "z"], "label": ["A", "B", "C"]}] * 2,
                    "answerKey": [key, "A"],
                }
            ),
            src / f"{name}.parquet",
        )
    pq.write_table(
        pa.table({"question": ["Tom has 2 and gets 3. Total?"], "answer": ["2 + 3 = 5\n#### 5"]}), src / "gsm8k.parquet"
    )
    return {p.name: p.read_bytes() for p in src.iterdir()}


def test_benchmarks_by_name_come_from_the_mirror_once(tmp_path, monkeypatch):
    srv = Server(benchmark_parquets(tmp_path))
    try:
        monkeypatch.setenv("SCRATCHCHAT_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("SCRATCHCHAT_BENCHMARK_URL", srv.url + "/")
        got = chat_eval.eval_items(3, 0, ["mmlu", "arc", "gsm8k"])
        assert [k for k in got if k not in tasks.EVAL_TASKS] == ["mmlu", "arc-challenge", "arc-easy", "gsm8k"]
        assert [len(got[k]) for k in ("mmlu", "arc-challenge", "arc-easy", "gsm8k")] == [3, 2, 2, 1]
        assert {i.answer for i in got["arc-challenge"]} == {"C", "A"} and got["gsm8k"][0].answer == "5"
        assert sorted(name for name, _ in srv.log) == sorted(srv.files)
        bench = tmp_path / "home" / "data" / "benchmarks"
        assert (bench / "mmlu" / "mmlu.parquet").read_bytes() == srv.files["mmlu.parquet"]
        chat_eval.eval_items(3, 0, ["arc-easy", str(bench / "mmlu" / "mmlu.parquet")])  # a path still works
        assert len(srv.log) == 4  # nothing is fetched twice
    finally:
        srv.close()


def test_benchmark_errors_are_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="'mmlux' is neither a benchmark name .*arc-easy.* nor a parquet file"):
        chat_eval.eval_items(1, 0, ["mmlux"])
    from pretrain.checkpoint import save_checkpoint  # a checkpoint, so the CLI gets as far as the download

    tok = Tokenizer.train(["What is 2 + 2? The answer is 4."] * 20, vocab_size=300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    save_checkpoint(tmp_path / "sft", model, tok, {"step": 1})
    srv = Server({})  # serves nothing: every file is a 404
    try:
        monkeypatch.setenv("SCRATCHCHAT_HOME", str(tmp_path))
        monkeypatch.setenv("SCRATCHCHAT_BENCHMARK_URL", srv.url)
        with pytest.raises(ValueError, match=r"^benchmark gsm8k: .*/gsm8k.parquet: HTTP 404"):
            chat_eval.eval_items(1, 0, ["gsm8k"])
        capsys.readouterr()
        assert chat_eval.main(["--checkpoint", str(tmp_path / "sft"), "--base", "none", "--benchmark", "mmlu"]) == 2
    finally:
        srv.close()
    err = capsys.readouterr().err
    assert err.startswith("error: benchmark mmlu: ") and "/mmlu.parquet: HTTP 404" in err and err.count("\n") == 1
    assert not (tmp_path / "report" / "chat_eval.md").exists()
