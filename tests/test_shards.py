"""Token shards: the on-disk format, its error checks, and the loader's shuffled windows, resume and rank split."""

import json
import struct

import numpy as np
import pytest
import torch

from pretrain.shards import HEADER, ShardError, TokenLoader, load_manifest, read_header, read_shard, write_shard


def write_stream(tmp_path, stream, sizes, split, vocab):
    """`stream` cut into shards of the given sizes; returns it, for comparison."""
    at = np.cumsum([0, *sizes])
    for i in range(len(sizes)):
        write_shard(tmp_path / f"{split}_{i:05d}.bin", stream[at[i] : at[i + 1]], vocab_size=vocab)
    return stream


def make_dir(tmp_path, sizes, split="train", vocab=50_000, seed=0):
    """Shards of the given sizes holding one known random stream."""
    return write_stream(tmp_path, np.random.default_rng(seed).integers(0, vocab, size=sum(sizes)), sizes, split, vocab)


@pytest.mark.parametrize("vocab,dtype", [(65536, np.uint16), (100_277, np.uint32)])
def test_round_trip_picks_dtype_from_vocab(tmp_path, vocab, dtype):
    tokens = np.array([0, 1, vocab - 1, 42, vocab // 2], dtype=np.int64)
    path = write_shard(tmp_path / "train_00000.bin", tokens, vocab_size=vocab)
    back = read_shard(path)
    assert back.dtype == dtype and back.tolist() == tokens.tolist()
    assert path.stat().st_size == HEADER.size + len(tokens) * np.dtype(dtype).itemsize
    assert read_header(path) == (np.dtype(dtype), len(tokens))


def test_dtype_from_largest_id_and_empty_shard(tmp_path):
    assert read_shard(write_shard(tmp_path / "a.bin", np.array([65535]))).dtype == np.uint16
    assert read_shard(write_shard(tmp_path / "b.bin", np.array([65536]))).dtype == np.uint32
    assert len(read_shard(write_shard(tmp_path / "c.bin", np.array([], dtype=np.int64)))) == 0


def test_write_rejects_bad_ids_and_leaves_no_file(tmp_path):
    for bad in (np.array([-1, 3]), np.array([70_000]), np.array([[1, 2]]), np.array([1.5])):
        with pytest.raises(ShardError):
            write_shard(tmp_path / "x.bin", bad, vocab_size=65536 if bad.size == 1 else None)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_shards_give_clear_errors(tmp_path):
    path = write_shard(tmp_path / "s.bin", np.arange(100), vocab_size=1000)
    raw = path.read_bytes()
    cases = {
        "bad magic": b"NOTTOKEN" + raw[8:],
        "version 9": raw[:8] + struct.pack("<I", 9) + raw[12:],
        "dtype code 3": raw[:12] + struct.pack("<I", 3) + raw[16:],
        "truncated": raw[:-1],
        "trailing bytes": raw + b"\0\0",
        "header needs": raw[:10],
    }
    for message, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(ShardError, match=message):
            read_shard(path)
    with pytest.raises(ShardError, match="cannot read shard"):
        read_shard(tmp_path / "missing.bin")


def unique_dir(tmp_path, sizes, split="train"):
    """Shards holding a stream of distinct ids, so a row's first id names the window it came from."""
    stream = np.random.default_rng(1).permutation(sum(sizes))
    return write_stream(tmp_path, stream, sizes, split, len(stream))


def window_ids(stream, T, x):
    """The window index (stream offset / T) of each row of x."""
    where = np.argsort(stream)
    return [int(where[v]) // T for v in x[:, 0].tolist()]


def test_loader_rows_are_shifted_windows_of_the_stream_across_shards(tmp_path):
    stream = unique_dir(tmp_path, [37, 5, 0, 61])  # windows straddle shard boundaries and an empty shard
    loader = TokenLoader(tmp_path, "train", batch_size=2, seq_len=4)
    seen = set()
    for _ in range(24):  # two epochs of 25 windows (the odd one out is skipped)
        x, y = next(loader)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, 4)
        for row, w in enumerate(window_ids(stream, 4, x)):
            assert x[row].tolist() == stream[4 * w : 4 * w + 4].tolist()
            assert y[row].tolist() == stream[4 * w + 1 : 4 * w + 5].tolist()
            seen.add(w)
    assert loader.epoch == 2
    assert {9, 10} <= seen  # stream offsets 36 and 40: across the 37|5|0|61 shard boundaries


def epochs_of_windows(tmp_path, stream, B, T, world_size, epochs):
    """For each epoch, each rank's list of window indices, read by one loader per rank."""
    loaders = [TokenLoader(tmp_path, "train", B, T, rank=r, world_size=world_size) for r in range(world_size)]
    out = []
    for e in range(epochs):
        ranks = [[] for _ in range(world_size)]
        while loaders[0].epoch == e:
            for r, loader in enumerate(loaders):
                ranks[r] += window_ids(stream, T, next(loader)[0])
        assert len({loader.epoch for loader in loaders}) == 1  # ranks count epochs in step
        out.append(ranks)
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_window_once_per_epoch_in_a_fresh_order(tmp_path, world_size):
    T, B = 3, 2
    stream = unique_dir(tmp_path, [40, 33])  # (73 - 1) // 3 = 24 windows: 4, 2 and 1 full passes of 6
    epochs = epochs_of_windows(tmp_path, stream, B, T, world_size, epochs=3)
    orders = []
    for ranks in epochs:
        every = sorted(w for rank in ranks for w in rank)
        assert every == list(range(24))
        orders.append([w for rank in ranks for w in rank])
    assert orders[0] != orders[1] != orders[2]  # each epoch reshuffles


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_never_share_a_window_in_an_epoch(tmp_path, world_size):
    stream = unique_dir(tmp_path, [50, 53])  # 34 windows of 3: a step of 2 x 2 or 3 x 2 leaves a remainder
    for ranks in epochs_of_windows(tmp_path, stream, 2, 3, world_size, epochs=2):
        for a in range(world_size):
            assert len(set(ranks[a])) == len(ranks[a])
            for b in range(a + 1, world_size):
                assert not set(ranks[a]) & set(ranks[b])
        assert sum(map(len, ranks)) == 34 - 34 % (world_size * 2)  # all but a short remainder


def test_a_batch_mixes_the_stream(tmp_path):
    stream = unique_dir(tmp_path, [200_000])
    loader = TokenLoader(tmp_path, "train", batch_size=8, seq_len=16)
    windows = (len(stream) - 1) // 16
    spans = []
    for _ in range(20):
        ids = sorted(window_ids(stream, 16, next(loader)[0]))
        assert np.diff(ids).max() > 1  # never one contiguous run of windows
        spans.append((ids[-1] - ids[0]) / windows)
    assert np.median(spans) > 0.5  # rows come from across the corpus, not one neighbourhood (8 uniform: ~0.78)


def test_loader_is_deterministic_and_resumes_exactly(tmp_path):
    make_dir(tmp_path, [50, 50, 50])
    for rank in range(2):

        def new(rank=rank):
            return TokenLoader(tmp_path, "train", batch_size=3, seq_len=5, rank=rank, world_size=2)

        uninterrupted = new()
        reference = [next(uninterrupted) for _ in range(13)]  # several epochs of 4 steps

        first = new()
        got = [next(first) for _ in range(6)]
        state = json.loads(json.dumps(first.state_dict()))  # it must survive a checkpoint's JSON
        other = TokenLoader(tmp_path, "train", 3, 5, rank=1 - rank, world_size=2)
        for _ in range(6):
            next(other)
        assert other.state_dict() == state  # any rank's state resumes every rank
        resumed = new()
        resumed.load_state_dict(state)
        got += [next(resumed) for _ in range(7)]
        for (x, y), (rx, ry) in zip(got, reference, strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)
        assert resumed.state_dict() == uninterrupted.state_dict()
        assert resumed.epoch == uninterrupted.epoch == 3

    # The seed picks the order: the same seed repeats it, another seed gives another.
    a, b, c = (TokenLoader(tmp_path, "train", 3, 5, seed=s) for s in (0, 0, 1))
    xa, xb, xc = (torch.cat([next(loader)[0] for _ in range(5)]) for loader in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    c.load_state_dict(TokenLoader(tmp_path, "train", 3, 5, seed=0).state_dict())  # the state's seed wins
    assert torch.equal(torch.cat([next(c)[0] for _ in range(5)]), xa)


def test_load_state_refuses_other_data_and_old_states(tmp_path):
    make_dir(tmp_path / "a", [100])
    make_dir(tmp_path / "b", [120])
    state = TokenLoader(tmp_path / "a", "train", 2, 4).state_dict()
    with pytest.raises(ShardError, match="shards changed"):
        TokenLoader(tmp_path / "b", "train", 2, 4).load_state_dict(state)
    with pytest.raises(ShardError, match="windows of 4 tokens, this run uses 5"):
        TokenLoader(tmp_path / "a", "train", 2, 5).load_state_dict(state)
    old = {"split": "train", "epoch": 0, "shard": 0, "offset": 16, "total_tokens": 100}  # the contiguous loader's
    with pytest.raises(ShardError, match="older loader of contiguous batches") as e:
        TokenLoader(tmp_path / "a", "train", 2, 4).load_state_dict(old)
    assert "\n" not in str(e.value)


def test_val_pass_is_deterministic_and_ignores_train_position(tmp_path):
    stream = make_dir(tmp_path, [30, 30], split="val")
    loader = TokenLoader(tmp_path, "val", batch_size=1, seq_len=7)
    first = [x.flatten().tolist() for x, _ in loader.iter_val()]
    next(loader), next(loader)
    assert [x.flatten().tolist() for x, _ in loader.iter_val()] == first
    assert len(first) == 8 and first[-1] == stream[49:56].tolist()
    assert len(list(loader.iter_val(max_tokens=21))) == 3
    ranks = [list(TokenLoader(tmp_path, "val", 1, 7, rank=r, world_size=2).iter_val()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # equal counts so DDP ranks can all-reduce together


@pytest.mark.parametrize("batch_size,world_size,max_tokens", [(3, 1, 0), (3, 2, 0), (2, 3, 0), (4, 2, 36)])
def test_val_pass_covers_the_same_windows_for_any_batch_shape(tmp_path, batch_size, world_size, max_tokens):
    stream = make_dir(tmp_path, [30, 30], split="val")
    n = 8 if max_tokens == 0 else 6  # 59 // 7 windows in all; 36 tokens need ceil(36 / 7) of them
    rows, counts = [], []
    for rank in range(world_size):
        batches = list(
            TokenLoader(tmp_path, "val", batch_size, 7, rank=rank, world_size=world_size).iter_val(max_tokens)
        )
        counts.append(len(batches))
        for x, y in batches:
            assert x.shape == y.shape == (batch_size, 7)  # padded to one shape
            rows += [(xr.tolist(), yr.tolist()) for xr, yr in zip(x, y) if (yr >= 0).any()]
            assert all((yr >= 0).all() or (yr == -1).all() for yr in y)  # a row is whole or padding
    assert len(set(counts)) == 1
    expected = [(stream[7 * w : 7 * w + 7].tolist(), stream[7 * w + 1 : 7 * w + 8].tolist()) for w in range(n)]
    assert sorted(rows) == sorted(expected)


def test_loader_errors(tmp_path):
    with pytest.raises(ShardError, match="no train_"):
        TokenLoader(tmp_path, "train", 2, 4)
    make_dir(tmp_path, [20])
    with pytest.raises(ShardError, match="fewer than one step"):
        TokenLoader(tmp_path, "train", 4, 8)
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(tmp_path, "train", 1, 2, rank=2, world_size=2)
    with pytest.raises(ShardError, match="tokenize first"):
        load_manifest(tmp_path)


# ---- python -m pretrain.data tokenize: corpus parquet -> shards, end to end with the real tokenizer ----


def test_tokenize_end_to_end(tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq

    from pretrain import data
    from tokenizer import Tokenizer

    monkeypatch.setenv("SCRATCHCHAT_HOME", str(tmp_path / "home"))
    assert data.main(["tokenize", "--corpus", "notes"]) == 1
    assert "run python -m pretrain.data user --name notes" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    for i in range(80):
        (tmp_path / "in" / f"{i}.txt").write_text(f"Note {i}: the river ran past the mill, né {i * 7}. " * (2 + i % 5))
    assert data.main(["user", "--name", "notes", "--input", str(tmp_path / "in"), "--val-fraction", "0.2"]) == 0
    assert data.main(["tokenize", "--corpus", "notes"]) == 1
    assert "error: no tokenizer at" in capsys.readouterr().err

    corpus = tmp_path / "home" / "data" / "notes"
    train_docs = pq.read_table(corpus / "train.parquet")["text"].to_pylist()
    val_docs = pq.read_table(corpus / "val.parquet")["text"].to_pylist()
    tok = Tokenizer.train(train_docs, vocab_size=300)
    tok_path = tmp_path / "home" / "tokenizer" / "tokenizer.json"
    tok_path.parent.mkdir(parents=True)
    tok.save(tok_path)
    assert data.main(["tokenize", "--corpus", "notes", "--shard-tokens", "2000", "--chunk-chars", "3000"]) == 0
    assert "next: python -m pretrain" in capsys.readouterr().out

    out = tmp_path / "home" / "tokens" / "notes"
    manifest = load_manifest(out)
    assert manifest["tokenizer_hash"] == tok.hash and manifest["vocab_size"] == tok.vocab_size
    assert manifest["dtype"] == "uint16"
    for split, docs in (("train", train_docs), ("val", val_docs)):
        expected = [t for d in docs for t in [tok.bos_id] + tok.encode(d)]  # each document opens with <|bos|>
        info = manifest["splits"][split]
        got = np.concatenate([read_shard(out / f) for f in info["files"]])
        assert got.tolist() == expected and info["tokens"] == len(expected) and info["docs"] == len(docs)
        assert info["shard_counts"][:-1] == [2000] * (len(info["files"]) - 1)
        assert info["utf8_bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert len(manifest["splits"]["train"]["files"]) >= 3
    x, _ = next(TokenLoader(out, "train", 2, 16).iter_val())  # the stream's start: the first document's <|bos|>
    assert x[0, 0].item() == tok.bos_id

    stamp = (out / "train_00000.bin").stat().st_mtime_ns
    assert data.main(["tokenize", "--corpus", "notes", "--shard-tokens", "2000"]) == 0
    assert "up to date" in capsys.readouterr().out and (out / "train_00000.bin").stat().st_mtime_ns == stamp
    # Bigger shards: a fresh set replaces the old one, leaving no stale train_00002.bin behind for the loader.
    assert data.main(["tokenize", "--corpus", "notes", "--shard-tokens", "1000000"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train_00000.bin", "val_00000.bin"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    # A damaged shard makes the next run rebuild instead of trusting the manifest.
    with open(out / "val_00000.bin", "ab") as f:
        f.write(b"\0")
    assert data.main(["tokenize", "--corpus", "notes", "--shard-tokens", "1000000"]) == 0
    assert "up to date" not in capsys.readouterr().out and read_shard(out / "val_00000.bin") is not None
    (tmp_path / "bad.json").write_text("{")
    assert data.main(["tokenize", "--corpus", "notes", "--tokenizer", str(tmp_path / "bad.json")]) == 1
    assert capsys.readouterr().err.startswith("error: cannot load tokenizer")
