"""Serving speed, side by side in one run on the same small model.

1. Single-stream decode tokens/s: our engine vs Hugging Face `transformers` `generate` (KV cache on, greedy) on a
   LlamaForCausalLM of the same shape (width, depth, heads, vocab; SwiGLU width chosen for the same parameter
   count) with random weights, plus pretrain's plain cached loop `GPT.generate` for reference. Target: >= 1.5x HF.
2. Aggregate tokens/s through HTTP (`python -m serve` subprocess) with 1, 4 and 8 concurrent streaming clients.
   Target: 8 clients >= 3x one client. Time to first token p50/p99 at 8 clients.
3. /health requests/s from a second process, idle and while 8 clients generate.
4. A 10-turn chat, resent whole every turn as chat clients do, near 2,000 tokens by its 10th turn: time to first
   token of the 10th turn with the prefix cache (the earlier turns' keys and values reused) and without it (the
   whole prompt prefilled). Target: >= 3x. Its model is the benchmark's if its context holds 2,048 tokens, else a
   random GPT of the same depth with that context.

The model is the newest SFT checkpoint when --checkpoint says so, else a random GPT of the CPU default shape
(depth 4, vocab 8192) with a synthetic tokenizer. Usage: python benchmarks/serve.py [--depth 4] [--new-tokens 128] [--sections 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pretrain.model import GPT, GPTConfig  # noqa: E402
from serve.engine import Engine, SamplingParams  # noqa: E402
from tokenizer import CHAT_SPECIAL_TOKENS, GPT4_PATTERN, Tokenizer  # noqa: E402


@dataclass
class BenchConfig:
    checkpoint: str = ""  # a checkpoint directory to benchmark instead of a random model
    depth: int = 4
    vocab_size: int = 8192
    sequence_len: int = 512
    prompt_tokens: int = 32
    new_tokens: int = 128
    repeats: int = 5
    requests_per_client: int = 2
    http_rounds: int = 3
    health_seconds: float = 3.0
    threads: int = 0  # torch threads (0: torch's default)
    device: str = "cpu"  # the targets are for CPU; cuda runs the same comparison on a GPU (bf16)
    sections: str = "1,2,3,4"  # which of the numbered comparisons to run
    chat_tokens: int = 2000  # the multi-turn chat's length at its 10th turn


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A valid tokenizer of exactly vocab_size ids without training: bytes, then merges of printable byte pairs."""
    tokens = [bytes([b]) for b in range(256)]
    printable = list(range(32, 127))
    merges = []
    for a in printable:
        for b in printable:
            if len(tokens) == vocab_size - len(CHAT_SPECIAL_TOKENS):
                break
            merges.append((a, b))
            tokens.append(bytes([a, b]))
    specials = {name: len(tokens) + i for i, name in enumerate(CHAT_SPECIAL_TOKENS)}
    return Tokenizer(tokens, GPT4_PATTERN, specials, merges)


def hf_twin(config: GPTConfig):
    """A LlamaForCausalLM with our width, depth, heads and vocab; SwiGLU hidden size set for equal parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = round(4 * config.n_embd * 2 / 3)  # 3 matrices of n_embd x hidden == our 2 of n_embd x 4 n_embd
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.n_embd,
            intermediate_size=hidden,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            num_key_value_heads=config.n_kv_head,
            max_position_embeddings=config.sequence_len,
            tie_word_embeddings=False,
        )
    ).eval()


def interleaved_rates(runs: dict, tokens: int, repeats: int) -> dict[str, float]:
    """tokens/s of each run: one warm-up each, then rounds that run them in turn (a shared machine's load then
    hits every contender alike), the median round for each."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def single_stream(
    model: GPT, tok: Tokenizer, prompt: list[int], new: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """Decode tokens/s of one greedy stream: our engine, pretrain's plain cached loop, transformers' generate."""
    hf = hf_twin(model.config).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    ids = torch.tensor([prompt], device=device)

    def run_hf() -> None:
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        assert out.shape[1] == len(prompt) + new
        if device.type == "cuda":
            torch.cuda.synchronize()

    plain = model
    if device.type == "cuda":  # the engine casts its model to bf16 in place: give the plain loop the same weights
        plain = GPT(model.config).to(device, torch.bfloat16)
        plain.load_state_dict(model.state_dict())
    engine = Engine(model, tok, max_batch=8, stop_ids=set())  # no stop token: exactly `new` tokens every time

    async def one() -> None:
        async for _ in engine.submit(prompt, SamplingParams(max_tokens=new, temperature=0)):
            pass

    try:
        return interleaved_rates(
            {
                "engine": lambda: asyncio.run(one()),
                "plain": lambda: plain.generate(prompt, new, stop=None),
                "hf": run_hf,
            },
            new,
            repeats,
        )
    finally:
        engine.shutdown(0)
        engine.join(5)


class Server:
    """`python -m serve` in a subprocess on a free port."""

    def __init__(self, checkpoint: Path, threads: int, device: str) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        flags = ["--port", str(self.port), "--max-batch", "8", "--threads", str(threads), "--device", device]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", "--checkpoint", str(checkpoint), *flags, "--log-level", "warning"],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise SystemExit(f"error: the server did not start:\n{self.log.read().decode()}")
            time.sleep(0.1)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def stream_once(http: httpx.AsyncClient, prompt: str, new: int) -> tuple[int, float]:
    """One streaming completion: (tokens generated, seconds to the first token)."""
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True}
    async with http.stream("POST", "/v1/completions", json={**body, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"]:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, ttft or 0.0


async def load_test(url: str, clients: int, per_client: int, prompt: str, new: int) -> tuple[float, list[float]]:
    """`clients` concurrent streams, each running `per_client` requests back to back: (tokens/s, TTFTs)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await stream_once(http, prompt, 4)  # warm-up

        async def client() -> list[tuple[int, float]]:
            return [await stream_once(http, prompt, new) for _ in range(per_client)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    return sum(n for n, _ in results) / wall, [t for _, t in results]


HEALTH_PROBE = """
import sys, time, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
n, worst = 0, 0.0
with httpx.Client(base_url=url) as http:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        http.get("/health").raise_for_status()
        worst = max(worst, time.perf_counter() - t0)
        n += 1
print(n / seconds, worst)
"""


def health_rate(url: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HEALTH_PROBE, url, str(seconds)], stdout=subprocess.PIPE, text=True)


def multi_turn_ttft(model: GPT, tok: Tokenizer, total: int, reply: int, repeats: int) -> tuple[float, float, int, int]:
    """(TTFT of the 10th turn with the prefix cache, without it, its prompt tokens, of them reused): median of
    `repeats` chats, each on fresh engines. The TTFT is the engine's own (submission to the first token)."""
    import random

    from finetune.chat import render_prompt

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards box and quiz the jovial king".split()
    per_turn = total // 10 - reply - 4  # a user message's tokens; the reply and four format tokens fill the rest
    with_cache, without, reused = [], [], 0
    for _ in range(repeats):
        cached = Engine(model, tok, max_batch=1, stop_ids=set(), prefix_cache_bytes=1 << 30)
        plain = Engine(model, tok, max_batch=1, stop_ids=set(), prefix_cache_bytes=0)

        async def turn(engine: Engine, messages: list[dict]) -> tuple[str, float, int]:
            before = engine.stats.ttft_sum
            parts, last = [], None
            async for last in engine.submit(
                render_prompt(tok, messages), SamplingParams(max_tokens=reply, temperature=0)
            ):
                parts.append(last.text)
            return "".join(parts), engine.stats.ttft_sum - before, last.cached_tokens

        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        try:
            for _ in range(10):
                text = " ".join(rng.choice(words) for _ in range(per_turn))
                messages.append({"role": "user", "content": tok.decode(tok.encode(text)[:per_turn])})
                answer, ttft, reused = asyncio.run(turn(cached, messages))
                messages.append({"role": "assistant", "content": answer})
            with_cache.append(ttft)
            without.append(asyncio.run(turn(plain, messages[:-1]))[1])
        finally:
            for engine in (cached, plain):
                engine.shutdown(0)
                engine.join(5)
    prompt = len(render_prompt(tok, messages[:-1]))
    return statistics.median(with_cache), statistics.median(without), prompt, reused


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(BenchConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    cfg = BenchConfig(**vars(parser.parse_args()))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if cfg.checkpoint:
        model, tok, _ = load_checkpoint(cfg.checkpoint)
        checkpoint = Path(cfg.checkpoint)
    else:
        tok = synthetic_tokenizer(cfg.vocab_size)
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_depth(cfg.depth, cfg.vocab_size, cfg.sequence_len)).eval()
        checkpoint = save_checkpoint(workdir / "step_0", model, tok, {"step": 0})
    model = model.to(device)
    config = model.config
    print(
        f"model: depth {config.n_layer}, width {config.n_embd}, heads {config.n_head}/{config.n_kv_head}, "
        f"vocab {config.vocab_size}, context {config.sequence_len}, {model.num_params() / 1e6:.1f}M params; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(os.sched_getaffinity(0))} cpus, "
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
    )
    prompt_text = "The quick brown fox jumps over the lazy dog. " * 40
    prompt = tok.encode(prompt_text)[: cfg.prompt_tokens]
    new = min(cfg.new_tokens, config.sequence_len - len(prompt) - 1)
    sections = {int(x) for x in cfg.sections.split(",")}
    try:
        if 1 in sections:
            compare_single_stream(cfg, model, tok, prompt, new, device)
        if sections & {2, 3}:  # /health under load needs the server of section 2
            compare_http(cfg, tok, checkpoint, prompt, new)
        if 4 in sections:
            chat_model = model
            if config.sequence_len < 2048:
                torch.manual_seed(0)
                chat_model = GPT(GPTConfig.from_depth(cfg.depth, config.vocab_size, 2048)).to(device).eval()
            print(
                f"\n4. a 10-turn chat (replies of 32 tokens), time to first token of turn 10, median of "
                f"{cfg.repeats} chats, on a {chat_model.config.sequence_len}-token-context model"
            )
            cached, plain, length, reused = multi_turn_ttft(chat_model, tok, cfg.chat_tokens, 32, cfg.repeats)
            print(f"   turn 10's prompt: {length} tokens, {reused} of them from the prefix cache")
            print(f"   with the prefix cache    {cached * 1000:8.1f} ms")
            print(
                f"   without it               {plain * 1000:8.1f} ms   without / with = {plain / cached:.1f}x "
                "(target >= 3x)"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def compare_single_stream(
    cfg: BenchConfig, model: GPT, tok: Tokenizer, prompt: list[int], new: int, device: torch.device
) -> None:
    print(
        f"\n1. single-stream decode, {len(prompt)}-token prompt, {new} new tokens, median of {cfg.repeats} "
        "interleaved rounds"
    )
    rates = single_stream(model, tok, prompt, new, cfg.repeats, device)
    ours, plain, hf = rates["engine"], rates["plain"], rates["hf"]
    print(f"   scratchchat engine        {ours:8.1f} tok/s")
    print(f"   GPT.generate (plain loop) {plain:8.1f} tok/s   engine / plain = {ours / plain:.2f}x")
    print(f"   transformers generate     {hf:8.1f} tok/s   engine / HF    = {ours / hf:.2f}x  (target >= 1.5x)")


def compare_http(cfg: BenchConfig, tok: Tokenizer, checkpoint: Path, prompt: list[int], new: int) -> None:
    print(
        f"\n2. HTTP streaming completions, {new} tokens each, {cfg.requests_per_client} per client, "
        f"median of {cfg.http_rounds} interleaved rounds"
    )
    server = Server(checkpoint, cfg.threads, cfg.device)
    try:
        prompt_http = tok.decode(prompt)
        rates: dict[int, list[float]] = {1: [], 4: [], 8: []}
        ttfts: list[float] = []
        for _ in range(cfg.http_rounds):
            for clients in rates:
                rate, ttft = asyncio.run(load_test(server.url, clients, cfg.requests_per_client, prompt_http, new))
                rates[clients].append(rate)
                if clients == 8:
                    ttfts += ttft
        rate = {clients: statistics.median(r) for clients, r in rates.items()}
        for clients, r in rate.items():
            print(f"   {clients} client(s): {r:8.1f} tok/s aggregate   ({r / rate[1]:.2f}x one client)")
        print(f"   8 clients vs 1: {rate[8] / rate[1]:.2f}x (target >= 3x)")
        print(
            f"   time to first token at 8 clients ({len(ttfts)} requests): "
            f"p50 {percentile(ttfts, 0.5) * 1000:.0f} ms, p99 {percentile(ttfts, 0.99) * 1000:.0f} ms"
        )

        print(f"\n3. /health from a second process, {cfg.health_seconds:g} s each")
        idle_rate, idle_worst = map(float, health_rate(server.url, cfg.health_seconds).communicate()[0].split())
        probe = health_rate(server.url, cfg.health_seconds)
        load = asyncio.run(load_test(server.url, 8, cfg.requests_per_client * 4, prompt_http, new))[0]
        busy_rate, busy_worst = map(float, probe.communicate()[0].split())
        print(f"   idle:               {idle_rate:8.0f} req/s (slowest {idle_worst * 1000:.1f} ms)")
        print(
            f"   while 8 generate:   {busy_rate:8.0f} req/s (slowest {busy_worst * 1000:.1f} ms; "
            f"the 8 streams made {load:.0f} tok/s meanwhile)"
        )
    finally:
        server.close()


if __name__ == "__main__":
    main()
