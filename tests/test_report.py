"""scripts/report.py's pieces: the FineWeb-Edu corpus (a manifest without char counts, a val split that is one
big parquet shard), and the run's wall time and cost over every stage, nodes included."""

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrain import data
from tests.test_download import Server
from tokenizer import Tokenizer

# scripts/ is not a package: load the script as a module (registered first: its dataclass looks itself up there).
_spec = importlib.util.spec_from_file_location("scripts_report", Path(__file__).parent.parent / "scripts" / "report.py")
report = sys.modules["scripts_report"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def fineweb_docs(shard: int, n: int) -> list[str]:
    return [f"Shard {shard} lesson {i}: photosynthesis turns light into sugar. " * (3 + i % 5) for i in range(n)]


@pytest.fixture
def fineweb_home(tmp_path, monkeypatch):
    """A home whose FineWeb-Edu corpus was made by the real fineweb_corpus, from a local mirror."""
    src = tmp_path / "src"
    src.mkdir()
    for shard, n in ((0, 40), (9, 400)):
        pq.write_table(pa.table({"text": fineweb_docs(shard, n)}), src / f"shard_{shard:05d}.parquet")
    srv = Server({p.name: p.read_bytes() for p in src.iterdir()})
    home = tmp_path / "home"
    try:
        data.fineweb_corpus(1, home / "data" / "fineweb-edu", val_shard=9, base_url=srv.url, progress=False)
    finally:
        srv.close()
    monkeypatch.setenv("SCRATCHCHAT_HOME", str(home))
    return home


def test_data_section_reads_the_fineweb_manifest(fineweb_home):
    manifest = json.loads((fineweb_home / "data" / "fineweb-edu" / "manifest.json").read_text())
    assert manifest["sources"][0]["chars"] is None and manifest["splits"]["val"]["chars"] is None  # the case
    text = "\n".join(report.data_section(fineweb_home))
    assert "| fineweb-edu |" in text and "| ODC-By 1.0 (FineWeb-Edu) | 440 | - |" in text
    assert "train: 40 docs / - chars, val: 400 docs / - chars." in text


def test_tokenizer_section_compares_on_a_capped_sample_of_the_fineweb_val_shard(fineweb_home, monkeypatch):
    tok = Tokenizer.train(fineweb_docs(0, 40), vocab_size=300)
    (fineweb_home / "tokenizer").mkdir()
    tok.save(fineweb_home / "tokenizer" / "tokenizer.json")
    (fineweb_home / "tokens" / "fineweb-edu").mkdir(parents=True)  # pretrained on fineweb-edu
    shard = fineweb_home / "data" / "fineweb-edu" / "shard_00009.parquet"
    docs = fineweb_docs(9, 400)
    cap = 20_000
    monkeypatch.setattr(report, "VAL_BATCH_ROWS", 7)  # the cap lands inside a batch, not at its end
    texts, n_bytes = report.val_sample([shard], cap)
    k = len(texts)
    assert texts == docs[:k] and n_bytes == sum(len(d.encode()) for d in texts)
    assert n_bytes >= cap > n_bytes - len(docs[k - 1].encode())  # stops at the first document past the cap
    assert sum(len(d.encode()) for d in docs) > 5 * cap

    monkeypatch.setattr(report, "VAL_BYTES", cap)
    text = "\n".join(report.tokenizer_section(fineweb_home, {}))
    assert f"Compression on {n_bytes:,} bytes of held-out text (`data/fineweb-edu/shard_00009.parquet`;" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert {"ours", "gpt2", "cl100k"} <= set(rows)
    ours = sum(map(len, tok.encode_batch(texts)))
    assert rows["ours"] == f"| ours | 300 | {ours:,} | {n_bytes / ours:.3f} |"


def test_a_broken_val_shard_is_one_clear_line(tmp_path):
    (tmp_path / "val.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"val.parquet: cannot read its 'text' column"):
        report.val_sample([tmp_path / "val.parquet"], 100)


def write_times(home: Path, times: dict[str, tuple[float, float]]) -> None:
    (home / "speedrun").mkdir(parents=True)
    for name, (start, end) in times.items():
        (home / "speedrun" / f"{name}.time").write_text(f"{start:.0f} {end:.0f}\n")


T0 = 1_700_000_000
TIMES = {
    "pretrain": (T0 + 400, T0 + 4000),
    "setup": (T0, T0 + 100),
    "tokenizer": (T0 + 150, T0 + 300),
    "download": (T0 + 100, T0 + 400),
    "corpus": (T0 + 100, T0 + 150),
    "eval": (T0 + 4000, T0 + 4100),
}


def test_time_is_first_start_to_last_end_and_cost_counts_every_node(tmp_path):
    write_times(tmp_path, TIMES)
    (tmp_path / "speedrun" / "sft.time").write_text("garbage\n")  # a half-written file is left out
    times = report.stage_times(tmp_path)
    assert list(times) == ["setup", "corpus", "download", "tokenizer", "pretrain", "eval"]  # by start, then end
    assert report.total_seconds(times) == 4100  # not the sum of the stages: download and tokenizer overlap
    assert report.cost(4100, gpus=8, nodes=2, gpu_hour_cost=2.5) == pytest.approx(4100 / 3600 * 16 * 2.5)
    cfg = report.ReportConfig(gpu_hour_cost=2.5, nodes=2)
    text = "\n".join(report.time_section(times, 8, cfg))
    assert "| setup | 1m40s |  |" in text and "| download | 5m00s | `logs/download.log` |" in text
    assert "Total: **1h08m20s**" in text
    assert f"Estimated cost: **${4100 / 3600 * 16 * 2.5:,.2f}** (2 node(s) x 8 GPU x 1.14 h x $2.50/GPU-hour" in text
    assert "Estimated cost" not in "\n".join(report.time_section(times, 0, cfg))  # a CPU run costs no GPU-hours


def test_cli_takes_gpus_and_nodes_and_rejects_bad_values(tmp_path, capsys):
    write_times(tmp_path, TIMES)
    out = tmp_path / "report.md"
    args = ["--home", str(tmp_path), "--out", str(out), "--samples", "0"]
    assert report.main([*args, "--gpus", "8", "--nodes", "4", "--gpu-hour-cost", "2"]) == 0
    text = out.read_text()
    assert f"**${4100 / 3600 * 32 * 2:,.2f}** (4 node(s) x 8 GPU" in text and "1h08m20s" in text
    capsys.readouterr()
    assert report.main([*args, "--nodes", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --gpus must be >= 0 (or -1), --nodes >= 1") and err.count("\n") == 1


@pytest.mark.parametrize(
    "text, share",
    [("a b c d e f g", 0.0), ("the cat sat", 0.0), ("", 0.0), ("x y z w " * 4, 9 / 13), ("a b c d a b c d e", 1 / 6)],
)
def test_repeated_ngrams(text, share):
    """The report's loop measure: the share of word 4-grams that repeat an earlier one in the same text."""
    assert report.repeated_ngrams(text) == pytest.approx(share)


def test_sweep_rows_show_the_best_shapes_when_the_sweep_ran_here(tmp_path):
    assert report.sweep_rows(tmp_path) == []
    head = "| val bpb | depth |\n|---|---|"
    rows = [f"| 1.{i}000 | {i} |" for i in range(1, 8)]  # best first, as benchmarks/sweep.py writes it
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "sweep.md").write_text(
        "## Shape sweep: 10 minutes per point, 2 threads\n\n" + head + "\n" + "\n".join(rows) + "\n"
    )
    lines = report.sweep_rows(tmp_path, best=3)
    assert lines[-5:] == [*head.splitlines(), *rows[:3]]
