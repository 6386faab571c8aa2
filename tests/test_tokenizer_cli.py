"""`python -m tokenizer` and tokenizer.files: real files written here, real exit codes, no leftovers."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.paths import scratchchat_home
from tokenizer import Tokenizer, iter_texts
from tokenizer.__main__ import main

TEXT = "The cat sat on the mat. The dog sat on the log. " * 40


@pytest.fixture
def corpus(tmp_path):
    """A folder with one file of each supported type, plus a file that must be ignored."""
    d = tmp_path / "corpus"
    (d / "nested").mkdir(parents=True)
    (d / "a.txt").write_text(TEXT)
    (d / "nested" / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": f"line {i}: {TEXT[:200]}"}) for i in range(5)) + "\n\n"
    )
    pq.write_table(pa.table({"text": ["parquet doc one " * 20, None, "parquet doc two"]}), d / "c.parquet")
    (d / "README.md").write_text("not a corpus file")
    return d


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ---- files -----------------------------------------------------------------------------------


def test_iter_texts_reads_every_format(corpus):
    docs = list(iter_texts([corpus]))
    assert docs[0] == TEXT  # sorted: a.txt, c.parquet, nested/b.jsonl
    assert docs[1:3] == ["parquet doc one " * 20, "parquet doc two"]
    assert len(docs) == 8 and docs[3].startswith("line 0:")
    assert list(iter_texts([corpus / "a.txt", str(corpus / "a.txt")])) == [TEXT, TEXT]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.csv", "a,b", "unsupported file type"),
        ("bad.jsonl", '{"text": "ok"}\n{"nope": 1}\n', "bad.jsonl:2"),
        ("bad.txt", b"\xff\xfe bad utf8", "not valid UTF-8"),
        ("bad.parquet", b"PAR1 garbage", "cannot read"),
    ],
)
def test_iter_texts_rejects_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        list(iter_texts([path]))


def test_iter_texts_missing_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        list(iter_texts([tmp_path / "missing"]))
    with pytest.raises(ValueError, match="no .txt"):
        list(iter_texts([tmp_path]))


def test_scratchchat_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHCHAT_HOME", str(tmp_path))
    assert scratchchat_home() == tmp_path
    monkeypatch.delenv("SCRATCHCHAT_HOME")
    assert scratchchat_home().parts[-2:] == (".cache", "scratchchat")


# ---- CLI -------------------------------------------------------------------------------------


def test_train_then_encode_then_stats(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SCRATCHCHAT_HOME", str(tmp_path / "home"))
    code, out, err = run(["train", "--input", str(corpus), "--vocab-size", "300"], capsys)
    assert code == 0, err
    path = tmp_path / "home" / "tokenizer" / "tokenizer.json"
    assert str(path) in out and "next:" in out
    assert "merges" in err  # the progress bar
    tok = Tokenizer.load(path)
    assert tok.vocab_size == 300
    assert tok.merges == Tokenizer.train(iter_texts([corpus]), 300).merges

    code, out, _ = run(["encode", "The cat <|bos|>"], capsys)
    assert code == 0 and list(map(int, out.split())) == tok.encode("The cat <|bos|>")
    code, out, _ = run(["encode", "--allow-special", "The cat <|bos|>"], capsys)
    assert list(map(int, out.split()))[-1] == tok.bos_id

    code, out, err = run(["stats", "--input", str(corpus / "a.txt")], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"ours", "gpt2", "cl100k"}
    assert int(rows["ours"][2].replace(",", "")) == len(tok.encode(TEXT))
    assert float(rows["ours"][3]) == pytest.approx(len(TEXT) / len(tok.encode(TEXT)), abs=1e-3)


def test_encode_reads_stdin_in_a_real_process(corpus, tmp_path):
    out = tmp_path / "tok.json"
    train = subprocess.run(
        [sys.executable, "-m", "tokenizer", "train", "--input", str(corpus), "--vocab-size", "280", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert train.returncode == 0, train.stderr
    enc = subprocess.run(
        [sys.executable, "-m", "tokenizer", "encode", "--tokenizer", str(out)],
        input="héllo\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enc.returncode == 0 and list(map(int, enc.stdout.split())) == Tokenizer.load(out).encode("héllo\n")


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["train", "--input", "{corpus}", "--vocab-size", "100"], 1, "too small"),
        (["train", "--input", "{empty}", "--vocab-size", "300"], 1, "empty"),
        (["train", "--input", "{tmp}/missing", "--vocab-size", "300"], 1, "no such file"),
        (["train", "--input", "{bad}", "--vocab-size", "300"], 1, "not valid UTF-8"),
        (["train", "--input", "{corpus}", "--vocab-size", "300", "--pattern", "(["], 1, "pattern"),
        (["train", "--input", "{corpus}", "--vocab-size", "abc"], 2, "invalid int"),
        (["train", "--input", "{corpus}"], 2, "--vocab-size"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_train_bad_input_is_one_line_and_leaves_no_file(corpus, tmp_path, capsys, argv, code, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    out_dir = tmp_path / "out"
    argv = [a.format(corpus=corpus, empty=tmp_path / "empty.txt", bad=tmp_path / "bad.txt", tmp=tmp_path) for a in argv]
    got, out, err = run(argv + ["--out", str(out_dir / "tok.json")], capsys)
    assert got == code
    assert err.startswith("error:") and message in err and err.count("\n") == 1, err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_out_is_a_folder(corpus, tmp_path, capsys):
    code, _, err = run(["train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path)], capsys)
    assert code == 1 and "is a folder" in err


def test_missing_and_corrupt_tokenizer_file(tmp_path, capsys):
    code, _, err = run(["encode", "--tokenizer", str(tmp_path / "nope.json"), "hi"], capsys)
    assert code == 1 and err.startswith("error:") and "not found" in err
    corrupt = tmp_path / "tok.json"
    corrupt.write_text(Tokenizer.train(["hello world"], 280).to_json().replace("[104,", "[105,", 1))
    code, _, err = run(["encode", "--tokenizer", str(corrupt), "hi"], capsys)
    assert code == 1 and "corrupt" in err and err.count("\n") == 1
    corrupt.write_text('{"version": 1')
    code, _, err = run(["stats", "--tokenizer", str(corrupt), "--input", str(corrupt)], capsys)
    assert code == 1 and "not valid JSON" in err
