"""The GPT: a modern decoder-only transformer in one file, in the manner of nanochat.

Token embedding -> [RMSNorm -> attention (rotary, QK-norm, grouped-query) -> RMSNorm -> ReLU^2 MLP] x n_layer
-> RMSNorm -> untied lm_head -> tanh logit soft-cap. No biases; RMSNorm is functional (no parameters).
Optionally each layer has value embeddings (as in modded-nanogpt): a second token embedding added to the
attention values: many parameters for almost no compute (the CPU plan's largest single gain).

Training calls `model(idx, targets)` on the fast causal SDPA path. Inference calls `model(idx, kv_cache=cache)`:
the `KVCache` keeps one length per row, so a serving engine can batch sequences of different lengths, prefill
many tokens and decode one at a time through the same forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 65536
    sequence_len: int = 2048  # training context; rotary tables cover 10x this for inference
    n_layer: int = 20
    n_head: int = 10  # query heads
    n_kv_head: int = 10  # key/value heads (< n_head: grouped-query attention)
    n_embd: int = 1280
    softcap: float = 15.0  # logits = softcap * tanh(logits / softcap); 0 disables
    rope_base: float = 10000.0
    value_embeds: bool = False  # a token embedding per layer added to its attention values (False: older checkpoints)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads of even size")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int, **overrides) -> "GPTConfig":
        """One knob for the shape: width 64*depth, heads of ~128 dims (depth 20 ~ 560M params at vocab 65536)."""
        n_embd = overrides.pop("n_embd", None) or 64 * depth
        n_head = overrides.pop("n_head", None)
        if n_head is None:
            # ceil(n_embd / 128) heads, bumped until the head size is a whole even number (odd depths).
            n_head = max(1, math.ceil(n_embd / 128))
            while n_embd % n_head or (n_embd // n_head) % 2:
                n_head += 1
        n_kv_head = overrides.pop("n_kv_head", None) or n_head
        shape = dict(n_layer=depth, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)
        return cls(vocab_size=vocab_size, sequence_len=sequence_len, **shape, **overrides)


class RMSNorm(torch.autograd.Function):
    """F.rms_norm (no learned scale) differentiated by hand: eager on CPU, F.rms_norm runs as ~6 separate
    full-size ops forward and ~10 backward; this takes one reduction and one product each way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps  # F.rms_norm's default
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps).rsqrt_()
        y = x * rstd
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        y, rstd = ctx.saved_tensors
        # d(x * rstd)/dx applied to grad: rstd * (grad - y * mean(grad * y))
        return torch.addcmul(grad, y, (grad * y).mean(-1, keepdim=True), value=-1).mul_(rstd)


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 keeping only relu(x) for backward: two passes each way, where autograd takes five."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return torch.mul(grad, r).mul_(2.0)


def eager_cpu_training(x: torch.Tensor) -> bool:
    """Where the hand-differentiated ops pay: elsewhere fused kernels (GPU, torch.compile) or no backward."""
    return x.is_cpu and x.requires_grad and not torch.compiler.is_compiling()


def norm(x: torch.Tensor) -> torch.Tensor:
    return RMSNorm.apply(x) if eager_cpu_training(x) else F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x [B, T, H, D] by angles whose tables [cos, cos] and [sin, -sin]
    (see GPT._rotary_tables) broadcast to [B, T, 1, D]: one swap, a product and a fused multiply-add."""
    d = x.shape[-1] // 2
    swapped = torch.cat([x[..., d:], x[..., :d]], dim=-1)
    return torch.addcmul(x * cos, swapped, sin)


class SoftcapHeadLoss(torch.autograd.Function):
    """The training loss from the last hidden states h [N, C]: lm_head weight w [V, C], soft-capped logits
    cap * tanh(h w^T / cap), cross-entropy against targets, averaged with per-row weights [N] (0 = not learned).

    Eager autograd would keep [N, V] logits and several temporaries that size; on a CPU, passes over those
    buffers (and page faults on fresh ones) cost as much as the lm_head matmuls. Here HEAD_CHUNK rows at a time
    go through logits, loss and the gradient while they sit in cache, and both gradients are made in the forward
    pass. With s = sigmoid(2z / cap): cap * tanh(z / cap) = cap * (2s - 1), whose softmax is that of 2 cap s,
    and d/dz = 1 - tanh^2 = 4 s (1 - s). Logits are at most cap in size, so exp() needs no max-subtraction."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, cap: float):
        dt = h.dtype  # bf16 under autocast: the matmuls in it, the loss arithmetic in fp32
        fp32 = dt == torch.float32
        with torch.autocast(h.device.type, enabled=False):
            w_dt, w_scaled = w.to(dt), (w.t() * (2.0 / cap)).to(dt)
            grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w)
            total = torch.zeros((), device=h.device)
            # Two buffers reused by every chunk: a fresh one each time would cost a page fault per 4 KB.
            s_buf, g_buf = (torch.empty(HEAD_CHUNK, w.size(0), device=h.device) for _ in range(2))
            for start in range(0, h.size(0), HEAD_CHUNK):
                hc, tc, wc = (t[start : start + HEAD_CHUNK] for t in (h, targets, weights))
                n = hc.size(0)
                rows, tgt = torch.arange(n, device=h.device), tc.clamp(min=0)
                s = torch.mm(hc, w_scaled, out=s_buf[:n]) if fp32 else s_buf[:n].copy_(hc @ w_scaled)
                s.sigmoid_()
                g = torch.mul(s, 2.0 * cap, out=g_buf[:n]).exp_()
                sums = g.sum(-1)
                total += ((sums.log() - 2.0 * cap * s[rows, tgt]) * wc).sum()
                g.mul_((4.0 * wc / sums)[:, None])  # weighted softmax, times the 4 of 4 s (1 - s)
                g[rows, tgt] -= 4.0 * wc
                g = g.mul_(s.addcmul_(s, s, value=-1.0)).to(dt)  # the gradient w.r.t. the raw logits h w^T
                torch.mm(g, w_dt, out=grad_h[start : start + n])
                grad_w.addmm_(g.t(), hc) if fp32 else grad_w.add_(g.t() @ hc)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total, grad_w * grad_total, None, None, None


HEAD_CHUNK = 256  # rows per pass of SoftcapHeadLoss: 8 MB of fp32 logits at vocab 8192, which the L3 cache holds


class KVCache:
    """Keys and values of every layer for `batch_size` rows; row b holds `pos[b]` valid positions.

    forward(idx [b, T], kv_cache=cache, lengths=...) writes the new tokens of each row at positions
    pos[row] .. pos[row]+T-1, attends over that row's prefix, then advances pos[row] by lengths[row] (default T).
    A `view` of some rows continues only those.
    Right-padded prefills pass `lengths`: the padding is written but lies beyond pos, so it is never attended
    to and is overwritten by the next tokens. `pos` lives on the host even when k/v are on a GPU: the forward
    needs the lengths for shapes every step, and reading them back from the device would stall it.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (config.n_layer, batch_size, max_len, config.n_kv_head, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long)
        self.batch_size, self.max_len = batch_size, max_len

    def view(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop-1 as a KVCache sharing this one's storage: the model writes, reads and advances
        those rows in place, without gathering them."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.pos = self.k[:, start:stop], self.v[:, start:stop], self.pos[start:stop]
        view.batch_size, view.max_len = stop - start, self.max_len
        return view

    def move(self, src: int, dst: int) -> None:
        """Copy row src (its valid positions and length) into row dst."""
        n = int(self.pos[src])
        self.k[:, dst, :n] = self.k[:, src, :n]
        self.v[:, dst, :n] = self.v[:, src, :n]
        self.pos[dst] = n

    def reset(self) -> None:
        """Forget every row (of this view) so the slots can take new sequences."""
        self.pos.zero_()


@dataclass
class CacheStep:
    """Where one forward's T new tokens go in a KVCache and what they attend to: the same for every layer."""

    kv: KVCache
    write: tuple  # index of the new keys/values in one layer's [batch, position] cache
    read: tuple  # index of the keys/values the new tokens attend over
    mask: torch.Tensor | None = None  # [T, span] or [b, 1, T, span]: key j visible to query t
    causal: bool = False  # a prefill from position 0: SDPA's own causal mask instead of `mask`


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(
        self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, cache: CacheStep | None
    ) -> torch.Tensor:
        B, T, C = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        # q and k side by side get one rotary and one norm. (Concatenating the three weights for one matmul
        # instead costs a copy of them per call, which decoding one token at a time cannot afford.)
        qkv = torch.cat([self.c_q(x), self.c_k(x), self.c_v(x)], dim=-1).view(B, T, H + 2 * Hkv, self.head_dim)
        qk = norm(apply_rotary(qkv[:, :, : H + Hkv], cos, sin))  # QK-norm keeps logits tame
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv :]
        if ve is not None:  # the value embeddings of these tokens [B, T, Hkv * D]
            v = v + ve.view_as(v)
        mask, causal = None, True
        if cache is not None:  # write the new keys/values, then attend over the cached prefix
            kc, vc = cache.kv.k[self.layer_idx], cache.kv.v[self.layer_idx]
            kc[cache.write] = k.to(kc.dtype)
            vc[cache.write] = v.to(vc.dtype)
            k, v, mask, causal = kc[cache.read].to(q.dtype), vc[cache.read].to(q.dtype), cache.mask, cache.causal
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=H != Hkv)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        return self.c_proj(ReluSquared.apply(h) if eager_cpu_training(h) else F.relu(h).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, cache: CacheStep | None
    ) -> torch.Tensor:
        x = x + self.attn(norm(x), ve, cos, sin, cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # On the meta device (checkpoint loading: the weights come from the file) no init runs at all:
        # normal_ there imports torch._dynamo, seconds at every CLI start. An empty _weight skips nn.Embedding's.
        meta = torch.get_default_device().type == "meta"

        def embedding(dim: int) -> nn.Embedding:
            return nn.Embedding(config.vocab_size, dim, _weight=torch.empty(config.vocab_size, dim) if meta else None)

        blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.transformer = nn.ModuleDict({"wte": embedding(config.n_embd), "h": blocks})
        # Empty without value embeddings; they go in AdamW's embedding group like wte.
        n_ve = config.n_layer if config.value_embeds else 0
        self.value_embeds = nn.ModuleList(embedding(config.n_kv_head * config.head_dim) for _ in range(n_ve))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables are derived, not learned: non-persistent buffers, so checkpoints hold only weights.
        self.rotary_len = 10 * config.sequence_len
        device = self.lm_head.weight.device  # where `with torch.device(...)` builds us
        cos, sin = self._rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)
        if not meta:
            self.init_weights()

    def _rotary_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables [length, head_dim], computed on the CPU (on the meta device they would be useless)."""
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d))
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device="cpu"), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)  # the layout apply_rotary wants

    @torch.no_grad()
    def init_weights(self) -> None:
        """Unit-variance embeddings, fan-in scaled matrices, and zero output projections so every block
        starts as the identity and the model starts at the uniform prediction (loss = ln(vocab))."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                fan_out, fan_in = m.weight.shape
                nn.init.normal_(m.weight, std=fan_in**-0.5 * min(1.0, (fan_out / fan_in) ** 0.5))
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        embeddings = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n - embeddings if non_embedding else n

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per non-embedding weight + attention scores (nanochat's estimate)."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def _cache_step(self, kv: KVCache, T: int) -> tuple[CacheStep, torch.Tensor, torch.Tensor]:
        """Where each layer writes and reads the cache for T new tokens of every row, and the rotary angles. All of
        it is worked out on the host from kv.pos: no device round trip per step."""
        device = kv.k.device
        start = kv.pos
        span = int(start.max()) + T
        if span > min(kv.max_len, self.rotary_len):
            raise ValueError(
                f"sequence of {span} tokens exceeds the cache ({kv.max_len}) or rotary table ({self.rotary_len})"
            )
        read = (slice(None), slice(None, span))
        if bool((start == start[0]).all()):
            # Every row continues from the same length p (one stream; a batch prefilled together): plain slices,
            # and no mask for one new token (it sees every key) or a prefill from 0 (causal).
            p = int(start[0])
            mask = torch.ones(T, span, dtype=torch.bool, device=device).tril(p) if T > 1 and p > 0 else None
            step = CacheStep(kv, (slice(None), slice(p, p + T)), read, mask, causal=T > 1 and p == 0)
            return step, self.cos[None, p : p + T, None], self.sin[None, p : p + T, None]
        positions = (start[:, None] + torch.arange(T)).to(device)  # [b, T]
        rows = torch.arange(kv.batch_size, device=device)
        mask = (torch.arange(span, device=device) <= positions[:, :, None])[:, None]
        step = CacheStep(kv, (rows[:, None], positions), read, mask)
        return step, self.cos[positions][:, :, None], self.sin[positions][:, :, None]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        lengths: torch.Tensor | list[int] | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits [B, T, V] when targets is None, else the loss: mean over positions where targets != -1 and
        loss_mask (bool or float, 1 = learn) is set; reduction="none" gives the per-position loss [B, T].

        With kv_cache, idx [b, T] continues every row of the cache (b == its batch size; a view for some rows);
        `lengths` [b] says how many of the T tokens are real in each right-padded row."""
        B, T = idx.shape
        cache = None
        if kv_cache is None:
            if T > self.rotary_len:
                raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.rotary_len})")
            cos, sin = self.cos[None, :T, None], self.sin[None, :T, None]
        else:
            cache, cos, sin = self._cache_step(kv_cache, T)
        x = self.transformer.wte(idx)
        if torch.is_autocast_enabled(x.device.type):
            # Autocast leaves the embedding and the rotary tables fp32, which would make the residual stream and
            # q/k fp32 too: half the activation memory is saved by keeping them in the matmuls' dtype.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, cos, sin = x.to(dtype), cos.to(dtype), sin.to(dtype)
        x = norm(x)
        for i, block in enumerate(self.transformer.h):
            ve = self.value_embeds[i](idx).to(x.dtype) if self.value_embeds else None
            x = block(x, ve, cos, sin, cache)
        x = norm(x)
        if cache is not None:
            step = T if lengths is None else torch.as_tensor(lengths, dtype=torch.long).cpu()
            kv_cache.pos += step
        cap = self.config.softcap
        if targets is not None:
            weight = (targets != -1).float()
            if loss_mask is not None:
                weight = weight * loss_mask.float()
            if cap and reduction == "mean" and eager_cpu_training(x):
                # The chunked head and loss; compiled or on a GPU the plain formula below fuses into a few kernels,
                # and without gradients (evaluation) it is only the forward.
                rows = (weight / weight.sum().clamp(min=1.0)).view(-1)
                return SoftcapHeadLoss.apply(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1), rows, cap)
        logits = self.lm_head(x).float()  # the loss and soft-cap want fp32 even under bf16 autocast
        if cap:
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="none"
        ).view(B, T)
        if reduction == "none":
            return loss
        return (loss * weight).sum() / weight.sum().clamp(min=1.0)

    @torch.no_grad()
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: set[int] | None = None,
    ) -> list[int]:
        """Continue one prompt with the KV cache, each token picked by `sample_next`: greedy at temperature 0,
        else seeded sampling."""
        device = self.lm_head.weight.device
        gen = torch.Generator(device=device).manual_seed(seed)
        cache = KVCache(self.config, 1, len(prompt) + max_new_tokens, device=device, dtype=self.lm_head.weight.dtype)
        logits = self(torch.tensor([prompt], device=device), kv_cache=cache)[:, -1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            out.append(int(nxt))
            if stop and out[-1] in stop:
                break
            logits = self(nxt[:, None], kv_cache=cache)[:, -1]
        return out


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token [b] of each row of logits [b, V]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) kept to the top_k likeliest tokens (0: all) and then to the smallest set of them
    whose probability reaches top_p (1: all). The one token picker of training samples, evaluation and serving.

    The rows share `generator`, so a row's draw depends on the rows before it: the serving engine, whose seeded
    requests must not depend on their neighbours, calls this once per row with that row's generator."""
    if temperature < torch.finfo(logits.dtype).tiny:  # 0, or a temperature that rounds to 0 in the logits' dtype
        return logits.argmax(-1)
    # Shift so the largest logit is 0 before dividing: any other temperature, however tiny, then gives finite
    # values <= 0 (at worst -inf for the others), so a tiny temperature is greedy instead of inf - inf = NaN.
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
