"""serve over HTTP: a real `python -m serve` process on 127.0.0.1 and a free port, serving a tiny checkpoint
trained in this session to memorise a few answers, so replies are known exactly. The official `openai`
client (max_retries=0) covers the happy paths, raw httpx every error status.

`build_checkpoint` and `running_server` are imported by the other serve test modules.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from finetune.chat import render_conversation, render_prompt
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.model import GPT, GPTConfig
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
HELLO = "Hello! I am **scratchchat**, a small model."
XSS = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script> `<b>code</b>` **safe**"
EMOJI = "Ünïcödé 你好 🙂🎉 done"
COUNT = "one two three four five six seven eight nine ten " * 4
CONVERSATIONS = [("Say hi", HELLO), ("xss", XSS), ("Emoji", EMOJI), ("Count", COUNT)]
SEQ_LEN = 4096  # long enough that a "Count" generation to the end of the context takes seconds


def build_checkpoint(root: Path) -> Path:
    """Train a tiny tokenizer and GPT until they reproduce CONVERSATIONS, and save an SFT checkpoint.

    "Count" is trained without its <|assistant_end|>, so the model keeps counting: a long generation on demand."""
    texts = [t for pair in CONVERSATIONS for t in pair] * 3
    tok = Tokenizer.train(texts, 400)
    rows = [
        render_conversation(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        for q, a in CONVERSATIONS
    ]
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        if CONVERSATIONS[i][0] == "Count":
            mask[-1] = False
        x[i, : len(ids) - 1] = ids[:-1]
        y[i, : len(ids) - 1] = ids[1:].masked_fill(~mask[1:], -1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend with the other processes on 2 cores
    try:
        torch.manual_seed(0)
        model = GPT(
            GPTConfig(vocab_size=tok.vocab_size, sequence_len=SEQ_LEN, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        for _ in range(300):
            loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 0.005:
                break
    finally:
        torch.set_num_threads(threads)
    return save_checkpoint(root / "checkpoints" / "sft" / "step_1", model, tok, {"step": 1})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(
    checkpoint: Path | None,
    *args: str,
    env: dict | None = None,
    timeout: float = 60.0,
    log: Path | None = None,
    fd_limit: int | None = None,
):
    """`python -m serve` in a subprocess; yields (base_url, process) once /health says ok; stops it with SIGINT.

    Its output goes to `log`, or a temporary file (an unread pipe would fill up and freeze the server).
    `fd_limit`: its limit on open files (ulimit -n)."""
    port = free_port()
    cmd = [sys.executable, "-m", "serve", "--port", str(port), "--threads", "1", "--log-level", "warning", *args]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    log = open(log, "w+") if log else tempfile.TemporaryFile(mode="w+")

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limit_fds if fd_limit else None,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"server exited with {proc.returncode}: {log.read()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("server did not become healthy")
            time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def shared_checkpoint(tmp_path_factory) -> Path:
    """build_checkpoint once per test session (both serve test modules use it)."""
    root = tmp_path_factory.getbasetemp() / "serve-checkpoint"
    done = root / "checkpoints" / "sft" / "step_1"
    return done if done.is_dir() else build_checkpoint(root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return shared_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def tok(checkpoint) -> Tokenizer:
    return load_checkpoint(checkpoint)[1]


@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(checkpoint, "--max-batch", "8") as (url, _):
        yield url


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------- happy paths through the openai client


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["scratchchat"]
    assert client.models.retrieve("scratchchat").id == "scratchchat"


def test_chat_non_stream_gives_the_memorised_answer_and_usage(client, tok):
    r = client.chat.completions.create(model="scratchchat", messages=user("Say hi"), temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == HELLO
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(render_prompt(tok, user("Say hi")))
    # the answer's tokens plus <|assistant_end|>
    assert r.usage.completion_tokens == len(tok.encode(HELLO)) + 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_chunks_follow_the_openai_wire_format(client, tok):
    chunks = list(
        client.chat.completions.create(
            model="scratchchat",
            messages=user("Emoji"),
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == EMOJI
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tok.encode(EMOJI)) + 1
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def stream_chunks(url: str, body: dict) -> list[dict]:
    """A streamed chat completion's chunks, over raw HTTP, checked to be server-sent events ending with [DONE]."""
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def test_raw_stream_is_sse_ending_with_done(server):
    chunks = stream_chunks(server, {"messages": user("Say hi"), "temperature": 0})
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == HELLO


def test_text_completions_stream_and_not(client, tok):
    r = client.completions.create(model="scratchchat", prompt="one two", max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == 1 + len(tok.encode("one two"))  # <|bos|> + the text
    streamed = list(
        client.completions.create(model="scratchchat", prompt="one two", max_tokens=5, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_stop_sequence_cuts_the_answer(client):
    r = client.chat.completions.create(model="scratchchat", messages=user("Say hi"), temperature=0, stop=["scratch"])
    assert r.choices[0].message.content == HELLO[: HELLO.index("scratch")]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model="scratchchat", messages=user("Say hi"), temperature=0, stop="scratch", stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == HELLO[: HELLO.index("scratch")]


def test_max_tokens_ends_with_length(client):
    r = client.chat.completions.create(model="scratchchat", messages=user("Count"), temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    assert COUNT.startswith(r.choices[0].message.content)


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        return (
            client.chat.completions.create(
                model="scratchchat", messages=user("Say hi"), temperature=2.0, top_p=1.0, seed=seed, max_tokens=20
            )
            .choices[0]
            .message.content
        )

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1  # temperature 2 over a 400-token vocab: seeds do differ


def test_tokenize_matches_the_tokenizer(server, tok):
    r = httpx.post(server + "/tokenize", json={"text": "one two three"})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode("one two three")
    r = httpx.post(server + "/tokenize", json={"messages": user("Say hi")})
    assert r.json()["tokens"] == render_prompt(tok, user("Say hi"))
    assert r.json()["max_context"] == SEQ_LEN


def test_page_and_openapi_are_served(server):
    page = httpx.get(server + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" in page.text and "http://" not in page.text and "https://" not in page.text  # no CDN
    spec = httpx.get(server + "/openapi.json").json()
    assert set(spec["paths"]) == {
        "/",
        "/health",
        "/metrics",
        "/openapi.json",
        "/tokenize",
        "/v1/models",
        "/v1/models/{model}",
        "/v1/chat/completions",
        "/v1/completions",
    }


def test_metrics_count_requests_tokens_and_ttft(server, client):
    client.chat.completions.create(model="scratchchat", messages=user("Say hi"), temperature=0)
    text = httpx.get(server + "/metrics").text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['scratchchat_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert values["scratchchat_generated_tokens_total"] >= len(HELLO) // 8
    assert values["scratchchat_time_to_first_token_seconds_count"] >= 1
    assert (
        values['scratchchat_time_to_first_token_seconds_bucket{le="+Inf"}']
        == values["scratchchat_time_to_first_token_seconds_count"]
    )
    assert values["scratchchat_queue_depth"] == 0
    assert "# TYPE scratchchat_time_to_first_token_seconds histogram" in text


# ---------------------------------------------------------------- errors, over raw HTTP


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),  # must end with / start at the user
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "top_k": -1}, "top_k"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 9}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "x" * 40_000}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}] * 65}, "messages"),
    ],
)
def test_invalid_chat_requests_are_400(server, body, param):
    err = error_of(httpx.post(server + "/v1/chat/completions", json=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_is_400_with_both_lengths(server, tok):
    text = "one two three " * 2000
    n = len(render_prompt(tok, user(text)))
    assert n > SEQ_LEN
    err = error_of(httpx.post(server + "/v1/chat/completions", json={"messages": user(text)}), 400)
    assert str(n) in err["message"] and str(SEQ_LEN) in err["message"] and err["code"] == "context_length_exceeded"
    err = error_of(httpx.post(server + "/v1/completions", json={"prompt": text}), 400)
    assert str(SEQ_LEN) in err["message"]


def test_bad_json_unknown_model_unknown_route_and_oversized_body(server):
    error_of(
        httpx.post(server + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
        400,
    )
    error_of(httpx.post(server + "/v1/chat/completions", json=[1, 2]), 400)
    err = error_of(httpx.post(server + "/v1/chat/completions", json={"model": "gpt-9", "messages": user("x")}), 404)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    error_of(httpx.get(server + "/v1/models/gpt-9"), 404)
    error_of(httpx.get(server + "/v1/nothing-here"), 404)
    error_of(httpx.get(server + "/v1/chat/completions"), 405)
    big = json.dumps({"messages": user("x" * (2 << 20))}).encode()
    err = error_of(
        httpx.post(server + "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}), 413
    )
    assert err["code"] == "request_too_large"


def test_cors_is_off_by_default(server):
    r = httpx.options(
        server + "/v1/chat/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


# ---------------------------------------------------------------- concurrency: disconnects and a responsive loop


def _start_stream(url: str, max_tokens: int) -> tuple[socket.socket, bytes]:
    """Open a raw streaming request and read until the first data event arrives."""
    body = json.dumps({"messages": user("Count"), "stream": True, "temperature": 0, "max_tokens": max_tokens})
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    got = b""
    while b"data: " not in got:
        got += s.recv(4096)
    return s, got


def cancelled_count(url: str) -> int:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('scratchchat_generations_total{reason="cancelled"}'):
            return int(line.split()[-1])
    return 0


def test_dropped_clients_free_their_slots(server):
    before = cancelled_count(server)
    sockets = [_start_stream(server, max_tokens=SEQ_LEN)[0] for _ in range(8)]
    assert httpx.get(server + "/health").json()["active"] > 0
    for s in sockets:
        s.close()
    deadline = time.monotonic() + 10
    while (health := httpx.get(server + "/health").json())["active"] or health["queued"]:
        assert time.monotonic() < deadline, f"slots were not freed: {health}"
        time.sleep(0.02)
    t0 = time.monotonic()
    r = httpx.post(server + "/v1/chat/completions", json={"messages": user("Say hi"), "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == HELLO
    assert time.monotonic() - t0 < 5  # served at once, not after eight long generations
    assert cancelled_count(server) - before == 8  # each was ended by its disconnect, not by running out


def test_health_stays_fast_while_generating(server):
    stop = threading.Event()

    def generate() -> None:
        while not stop.is_set():
            httpx.post(
                server + "/v1/chat/completions",
                timeout=60,
                json={"messages": user("Count"), "temperature": 0, "max_tokens": 200},
            )

    workers = [threading.Thread(target=generate) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        with httpx.Client(base_url=server) as http:
            deadline = time.monotonic() + 5
            while http.get("/health").json()["active"] < 2:
                assert time.monotonic() < deadline
            latencies = []
            for _ in range(40):
                t0 = time.perf_counter()
                assert http.get("/health").status_code == 200
                latencies.append(time.perf_counter() - t0)
    finally:
        stop.set()
        for w in workers:
            w.join()
    latencies.sort()
    # Generous bounds: a shared 2-core machine; a blocked event loop would show whole generations (seconds).
    assert latencies[len(latencies) // 2] < 0.05, latencies
    assert latencies[-1] < 0.5, latencies


# ---------------------------------------------------------------- a server with auth, a tiny queue and CORS


@pytest.fixture(scope="module")
def strict_server(checkpoint):
    """No --checkpoint (the newest SFT one under $SCRATCHCHAT_HOME), an API key from the environment, one slot,
    one queue place, CORS for one origin, and no shutdown grace."""
    args = ["--max-batch", "1", "--max-queue", "1", "--cors-origin", "http://ok.example", "--shutdown-grace", "0"]
    env = {"SCRATCHCHAT_API_KEY": "sesame", "SCRATCHCHAT_HOME": str(checkpoint.parents[2])}
    with running_server(None, *args, env=env) as (url, proc):
        yield url, proc


def test_api_key_queue_limit_and_cors(strict_server):
    url, _ = strict_server
    body = {"messages": user("Say hi"), "temperature": 0}
    err = error_of(httpx.post(url + "/v1/chat/completions", json=body), 401)
    assert err["code"] == "invalid_api_key"
    error_of(httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    error_of(httpx.get(url + "/v1/models"), 401)
    assert httpx.get(url + "/health").status_code == 200  # health stays open for load balancers
    client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
    assert (
        client.chat.completions.create(model="scratchchat", messages=user("Say hi"), temperature=0)
        .choices[0]
        .message.content
        == HELLO
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()

    r = httpx.options(
        url + "/v1/chat/completions", headers={"Origin": "http://ok.example", "Access-Control-Request-Method": "POST"}
    )
    assert r.headers["access-control-allow-origin"] == "http://ok.example"

    # One slot and one queue place: of a burst of long requests, one runs, one waits, the rest are turned away.
    long = {"messages": user("Count"), "temperature": 0, "max_tokens": 1000}
    results: list[httpx.Response] = []
    burst = [
        threading.Thread(
            target=lambda: results.append(
                httpx.post(
                    url + "/v1/chat/completions", json=long, headers={"Authorization": "Bearer sesame"}, timeout=60
                )
            )
        )
        for _ in range(6)
    ]
    for t in burst:
        t.start()
    for t in burst:
        t.join()
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) >= 2 and 429 in statuses and set(statuses) <= {200, 429}, statuses
    refused = next(r for r in results if r.status_code == 429)
    assert error_of(refused, 429)["code"] == "queue_full" and refused.headers["retry-after"] == "1"


def test_default_checkpoint_and_graceful_shutdown(strict_server):
    """With no --checkpoint it serves the newest SFT checkpoint under $SCRATCHCHAT_HOME; SIGINT ends a running
    stream cleanly (finish chunk, usage, [DONE]) and the process exits. (Runs last: it stops the server.)"""
    url, proc = strict_server
    auth = {"Authorization": "Bearer sesame"}
    r = httpx.post(url + "/v1/chat/completions", json={"messages": user("Say hi"), "temperature": 0}, headers=auth)
    assert r.json()["choices"][0]["message"]["content"] == HELLO
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        timeout=30,
        headers=auth,
        json={
            "messages": user("Count"),
            "stream": True,
            "temperature": 0,
            "max_tokens": SEQ_LEN,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        proc.send_signal(signal.SIGINT)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-3][6:])["choices"][0]["finish_reason"] == "length"
    assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] < SEQ_LEN - 10  # ended early, not at the end
    assert proc.wait(15) in (0, 130)  # 130: the exit status of a process ended by Ctrl-C (SIGINT)


# ---------------------------------------------------------------- loading, and the command line


def test_health_is_503_until_the_model_is_loaded(checkpoint):
    """In-process: a real uvicorn server whose loader waits for a signal from the test."""
    import uvicorn

    from serve.app import create_app
    from serve.engine import Engine

    release = threading.Event()

    def load() -> Engine:
        release.wait(30)
        model, tok, _ = load_checkpoint(checkpoint)
        return Engine(model, tok, max_batch=2)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(load), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"]
        err = error_of(httpx.post(url + "/v1/chat/completions", json={"messages": user("Say hi")}), 503)
        assert err["code"] == "model_not_ready"
        release.set()
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": user("Say hi"), "temperature": 0})
        assert r.json()["choices"][0]["message"]["content"] == HELLO
    finally:
        release.set()
        server.should_exit = True
        thread.join(20)


@contextlib.contextmanager
def serving(engine_factory):
    """create_app over an engine built by `engine_factory`, under uvicorn on a free port, in this process."""
    import uvicorn

    from serve.app import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine_factory), host="127.0.0.1", port=port, log_level="critical")
    )
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while not server.started or httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(20)


def test_a_forward_that_fails_mid_stream_ends_it_with_an_error_event(checkpoint):
    """Not a silent finish_reason "length": OpenAI's error event, which its client raises as an APIError."""
    from serve.engine import Engine

    model, tok, _ = load_checkpoint(checkpoint)
    forward, calls = model.forward, []

    def fails_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) % 4 == 0:
            raise RuntimeError("out of memory (simulated)")
        return forward(*args, **kwargs)

    model.forward = fails_after_three
    with serving(lambda: Engine(model, tok, max_batch=2)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="generation failed on the server"):
            for _ in client.chat.completions.create(
                model="scratchchat", messages=user("Count"), stream=True, temperature=0
            ):
                pass
        calls.clear()
        r = httpx.post(url + "/v1/chat/completions", json={"messages": user("Count"), "temperature": 0}, timeout=30)
        assert error_of(r, 500)["type"] == "server_error"


def test_cli_without_a_checkpoint_says_run_speedrun(tmp_path, monkeypatch, capsys):
    from serve.__main__ import main

    monkeypatch.setenv("SCRATCHCHAT_HOME", str(tmp_path))
    assert main([]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: no fine-tuned checkpoint under {tmp_path / 'checkpoints' / 'sft'}: "
        "run bash speedrun.sh first (or pass --checkpoint PATH)"
    ]


def test_cli_bad_paths_and_flags_are_one_line(tmp_path, capsys):
    from serve.__main__ import main

    assert main(["--checkpoint", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err == f"error: no checkpoint directory at {tmp_path / 'missing'}\n"
    corrupt = tmp_path / "step_3"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{broken")
    assert main(["--checkpoint", str(corrupt), "--port", str(free_port()), "--log-level", "critical"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load {corrupt}: ") and "Traceback" not in err
    assert "--max-batch must be at least 1" in cli_error(["--max-batch", "0"], capsys)


def cli_error(args: list[str], capsys) -> str:
    """What `python -m serve ARGS` prints when it refuses its flags, with exit status 2."""
    from serve.__main__ import parse_args

    with pytest.raises(SystemExit) as exit:
        parse_args(args)
    assert exit.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------- the OpenAPI document, checked by schemathesis


def test_schemathesis_finds_no_5xx_and_no_response_contradicting_the_schema(server, tmp_path):
    checks = [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "negative_data_rejection",
    ]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            server + "/openapi.json",
            "--checks",
            ",".join(checks),
            "--phases",
            "coverage,fuzzing",
            "--max-examples",
            "15",
            "--seed",
            "0",
            "--request-timeout",
            "20",
            "--no-color",
        ],
        # cwd: schemathesis writes its cache there, not into the repo
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert "No issues found" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shutdown-grace", "nan"], "--shutdown-grace must be a finite number of seconds, got nan"),
        (["--shutdown-grace", "inf"], "--shutdown-grace must be a finite number of seconds, got inf"),
        (["--request-timeout", "nan"], "--request-timeout must be a finite number of seconds, got nan"),
        (["--request-timeout", "0"], "--request-timeout must be more than 0, got 0.0"),
        (["--max-stop", "-1"], "--max-stop must be at least 0, got -1"),
        (["--retry-after", "-5"], "--retry-after must be at least 0, got -5"),
        (["--max-connections", "0"], "--max-connections must be at least 1, got 0"),
        (["--port", "http"], "argument --port: invalid int value: 'http'"),
        (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    ],
)
def test_cli_bad_numbers_are_one_line_exit_2(args, message, capsys):
    assert cli_error(args, capsys) == f"error: {message} (see --help)\n"


def test_cli_bad_device_is_one_line_exit_2(capsys):
    err = cli_error(["--device", "tpu9"], capsys)
    assert err.startswith("error: bad --device 'tpu9': ") and err.count("\n") == 1


def test_cli_api_key_sources(tmp_path, monkeypatch, capsys):
    from serve.__main__ import parse_args

    monkeypatch.setenv("SCRATCHCHAT_API_KEY", "from-env")
    assert parse_args([]).api_key == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert parse_args(["--api-key-file", str(key_file)]).api_key == "from-file"
    assert capsys.readouterr().err == ""
    assert parse_args(["--api-key", "from-flag"]).api_key == "from-flag"
    assert "visible to other users in `ps`" in capsys.readouterr().err  # prefer the variable or the file
    monkeypatch.setenv("SCRATCHCHAT_API_KEY", "clé")  # no HTTP client could ever send it to match
    assert "the API key must be printable ASCII" in cli_error([], capsys)
