"""The downloader against a real HTTP server on 127.0.0.1 that serves parquet files the test writes, drops
connections mid-file, answers 5xx, and honours (or ignores) Range requests."""

import http.server
import json
import re
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrain import data
from pretrain.download import DownloadError, download


class Server:
    """Serves `files` (name -> bytes). `faults[name]` is a list consumed one per request: "drop" sends the headers
    and half the body then closes the socket, an int answers that HTTP status, None serves normally."""

    def __init__(self, files: dict[str, bytes], honour_range: bool = True):
        self.files, self.faults, self.honour_range, self.log = files, {}, honour_range, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.log.append((name, self.headers.get("Range")))
                fault = server.faults.get(name, []).pop(0) if server.faults.get(name) else None
                if name not in server.files:
                    return self._status(404)
                if isinstance(fault, int):
                    return self._status(fault)
                body, start = server.files[name], 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and server.honour_range:
                    start = int(m.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if fault == "drop":
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the client sees the body cut short
                    return
                self.wfile.write(body[start:])

            def _status(self, code):
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def parquet_bytes(tmp_path, name, n_docs, seed):
    path = tmp_path / "src" / name
    path.parent.mkdir(exist_ok=True)
    texts = [f"Shard {seed} document {i}: " + "educational prose " * (5 + i % 7) for i in range(n_docs)]
    pq.write_table(pa.table({"text": texts, "id": list(range(n_docs))}), path)
    return path.read_bytes()


@pytest.fixture
def server(tmp_path):
    files = {
        f"shard_{i:05d}.parquet": parquet_bytes(tmp_path, f"shard_{i:05d}.parquet", 300 + 50 * i, i)
        for i in (0, 1, 2, 9)
    }
    srv = Server(files)
    yield srv
    srv.close()


def test_resumes_after_drop_retries_5xx_and_never_refetches(tmp_path, server):
    names = ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    server.faults = {names[0]: ["drop", 500], names[1]: [503, "drop", "drop"], names[2]: []}
    dests = download([f"{server.url}/{n}" for n in names], tmp_path / "out", workers=3, backoff=0.01, progress=False)
    assert [d.name for d in dests] == names
    for n, d in zip(names, dests):
        assert d.read_bytes() == server.files[n]
    # After a drop the client resumed with a Range request from the bytes it already had.
    ranges = [r for n, r in server.log if n == names[0]]
    assert ranges[0] is None and ranges[1] == ranges[2] == f"bytes={len(server.files[names[0]]) // 2}-"
    assert not list((tmp_path / "out").glob("*.part"))
    before = len(server.log)
    download([f"{server.url}/{n}" for n in names], tmp_path / "out", progress=False)
    assert len(server.log) == before  # complete files are never requested again


def test_server_ignoring_range_still_gives_the_right_file(tmp_path, server):
    server.honour_range = False
    server.faults = {"shard_00001.parquet": ["drop"]}
    (dest,) = download([f"{server.url}/shard_00001.parquet"], tmp_path, backoff=0.01, progress=False)
    assert dest.read_bytes() == server.files["shard_00001.parquet"]


def test_a_complete_part_file_is_finished_without_a_body(tmp_path, server):
    (tmp_path / "shard_00002.parquet.part").write_bytes(server.files["shard_00002.parquet"])
    (dest,) = download([f"{server.url}/shard_00002.parquet"], tmp_path, progress=False)
    assert dest.read_bytes() == server.files["shard_00002.parquet"]  # 416 with the full size: rename, done


def test_permanent_and_persistent_errors(tmp_path, server):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download([f"{server.url}/missing.parquet"], tmp_path, backoff=0.01, progress=False)
    server.faults = {"shard_00000.parquet": [500] * 10}
    with pytest.raises(DownloadError, match=r"giving up after 3 attempts \(HTTP 500\)"):
        download([f"{server.url}/shard_00000.parquet"], tmp_path, retries=2, backoff=0.01, progress=False)
    assert not (tmp_path / "shard_00000.parquet").exists()
    # Nothing listens on a closed port: connection errors are retried, then reported.
    with pytest.raises(DownloadError, match="ConnectError"):
        download(["http://127.0.0.1:9/x.parquet"], tmp_path, retries=1, backoff=0.01, progress=False)


def test_fineweb_cli_downloads_train_and_val_shards(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SCRATCHCHAT_FINEWEB_URL", server.url)
    server.faults = {"shard_00001.parquet": ["drop", 502]}

    def fetch(shards):
        return data.main(["fineweb-edu", "--shards", str(shards), "--val-shard", "9", "--backoff", "0.01"])

    assert fetch(2) == 0
    assert "next: python -m pretrain.data tokenize --corpus fineweb-edu" in capsys.readouterr().out
    out = tmp_path / "home" / "data" / "fineweb-edu"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["files"] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert manifest["splits"]["val"]["files"] == ["shard_00009.parquet"]
    assert manifest["splits"]["val"]["docs"] == 750
    for name in ("shard_00000.parquet", "shard_00001.parquet", "shard_00009.parquet"):
        assert (out / name).read_bytes() == server.files[name]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    requests = len(server.log)
    assert fetch(2) == 0
    assert len(server.log) == requests and (out / "manifest.json").stat().st_mtime_ns == stamp
    assert fetch(3) == 0  # growing fetches only the new shard
    assert [n for n, _ in server.log[requests:]] == ["shard_00002.parquet"]
    capsys.readouterr()
    assert fetch(4) == 1  # shard 3 is not on the server
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert last.startswith("error: ") and "shard_00003.parquet: HTTP 404" in last
