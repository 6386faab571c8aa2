"""Chat evaluation pieces (finetune.eval): greedy decoding, letter choice, scoring, benchmark files."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from finetune import eval as chat_eval
from finetune import tasks
from finetune.chat import render_prompt
from finetune.tasks import Item
from pretrain.model import GPT, GPTConfig
from tokenizer import Tokenizer


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


def test_greedy_decode_matches_the_kv_cache_path(tok, model):
    """The plain loop is the reference the serving engine must match; the model's cached generate does."""
    for text in ["What is 2 + 2?", "Hello there", "Spell 'cat' backwards."]:
        prompt = render_prompt(tok, [{"role": "user", "content": text}])
        ours = chat_eval.greedy_decode(model, prompt, 20)
        assert ours == model.generate(prompt, 20, temperature=0.0)
        assert len(ours) == 20
        # Stopping: cut at the first occurrence of a chosen stop token, which is kept.
        stop = ours[5]
        assert chat_eval.greedy_decode(model, prompt, 20, stop=stop) == ours[: ours.index(stop) + 1]


def test_answer_text_stops_at_the_end_token(tok):
    end = tok.special_tokens["<|assistant_end|>"]
    assert chat_eval.answer_text(tok, tok.encode("Paris") + [end] + tok.encode("junk")) == "Paris"
    assert chat_eval.answer_text(tok, tok.encode("no end")) == "no end"


def test_choice_is_the_highest_letter_logit(tok, model):
    item = Item("largest_mc", "k", "Which number is the largest?", "B", ("3", "9", "1", "2"))
    prompt = render_prompt(tok, [{"role": "user", "content": item.prompt()}])
    logits = model(torch.tensor([prompt]))[0, -1]
    letters = [tok.encode(c)[0] for c in "ABCD"]
    assert chat_eval.choose(model, tok, item) == int(logits[letters].argmax())
    result = chat_eval.evaluate(model, tok, [item])
    assert result.n == 1 and result.correct == (chat_eval.choose(model, tok, item) == 1)


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
    pq.write_table(pa.table({"question": ["2+2?", "Sky?"], "subject": ["math", "sci"],
                             "choices": [["3", "4", "5", "6"], ["blue", "red", "green", "pink"]],
                             "answer": [1, 0]}), tmp_path / "mmlu.parquet")
    pq.write_table(pa.table({"id": ["a1", "a2"], "question": ["Q1", "Q2"],
                             "choices": [{"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
                                         {"text": ["p", "q", "r", "s"], "label": ["1", "2", "3", "4"]}],
                             "answerKey": ["C", "2"]}), tmp_path / "arc.parquet")
    pq.write_table(pa.table({"question": ["Tom has 2 and gets 3. Total?"],
                             "answer": ["2 + 3 = 5\n#### 5"]}), tmp_path / "gsm8k.parquet")
    name, items = chat_eval.load_benchmark(tmp_path / "mmlu.parquet")
    assert name == "mmlu"
    assert [(i.answer, i.choices) for i in items] == [("B", ("3", "4", "5", "6")),
                                                      ("A", ("blue", "red", "green", "pink"))]
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
    assert table.splitlines()[2] == "| arithmetic | 10 | 10.0% | 0.0% | 50.0% |"
