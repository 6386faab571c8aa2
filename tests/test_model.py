"""The GPT and its optimizers: shapes, causality, init loss, KV-cache equivalence, grouping, determinism."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain import model as model_module
from pretrain.model import GPT, GPTConfig, KVCache, sample_next
from pretrain.optim import Muon, build_optimizers, lr_multiplier, newton_schulz

TINY = dict(vocab_size=101, sequence_len=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, randomize: bool = True, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    if randomize:  # the real init zeroes output projections; tests of the mechanics want every path live
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
    return model.eval()


def test_from_depth_shapes():
    c = GPTConfig.from_depth(20, 65536, 2048)
    assert (c.n_embd, c.n_head, c.head_dim, c.n_layer) == (1280, 10, 128, 20)
    embed = 2 * c.vocab_size * c.n_embd
    per_layer = 4 * c.n_embd**2 + 8 * c.n_embd**2
    assert 540e6 < embed + c.n_layer * per_layer < 580e6
    for depth in range(1, 13):  # every depth gives whole, even head sizes
        c = GPTConfig.from_depth(depth, 1000, 64)
        assert c.n_embd == 64 * depth and c.n_head * c.head_dim == c.n_embd and c.head_dim % 2 == 0
    assert GPTConfig.from_depth(4, 1000, 64, n_kv_head=1, softcap=0).n_kv_head == 1
    with pytest.raises(ValueError):
        GPTConfig(n_embd=64, n_head=3)


@pytest.mark.parametrize("value_embeds", [False, True])
def test_param_and_flop_counts(value_embeds):
    model = tiny_model(value_embeds=value_embeds)
    c = model.config
    kv = c.n_kv_head * c.head_dim
    body = c.n_layer * (c.n_embd * (c.n_embd + 2 * kv) + c.n_embd**2 + 8 * c.n_embd**2)
    embeddings = c.vocab_size * (c.n_embd + (c.n_layer * kv if value_embeds else 0))
    assert model.num_params() == embeddings + c.vocab_size * c.n_embd + body
    # Embeddings are lookups, not FLOPs: value embeddings leave the estimate as it was.
    assert model.flops_per_token() == 6 * (c.vocab_size * c.n_embd + body) + 12 * 2 * 4 * 16 * 32


@pytest.mark.parametrize("value_embeds", [False, True])
def test_logits_shape_and_causality(value_embeds):
    model = tiny_model(value_embeds=value_embeds)
    idx = torch.randint(0, 101, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 101)
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 101, (3, 8))
    logits2 = model(changed)
    torch.testing.assert_close(logits[:, :12], logits2[:, :12])
    assert not torch.allclose(logits[:, 12:], logits2[:, 12:])
    assert logits.abs().max() <= model.config.softcap  # soft-capped


def test_init_loss_is_uniform_and_gradients_flow():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 101, (2, 32))
    loss = model(idx, idx)
    assert abs(loss.item() - math.log(101)) < 1e-4
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_loss_mask_and_ignore_index():
    model = tiny_model()
    idx, tgt = torch.randint(0, 101, (2, 10)), torch.randint(0, 101, (2, 10))
    per_pos = F.cross_entropy(model(idx).view(-1, 101), tgt.view(-1), reduction="none").view(2, 10)
    torch.testing.assert_close(model(idx, tgt, reduction="none"), per_pos)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 3:7] = True
    mask[1, 9] = True
    torch.testing.assert_close(model(idx, tgt, loss_mask=mask), per_pos[mask].mean())
    torch.testing.assert_close(model(idx, tgt, loss_mask=mask.float()), per_pos[mask].mean())
    ignored = tgt.masked_fill(~mask, -1)
    torch.testing.assert_close(model(idx, ignored), per_pos[mask].mean())


def test_hand_differentiated_cpu_training_matches_autograd_of_plain_ops(monkeypatch):
    # Eager CPU training runs RMSNorm, ReLU^2 and the chunked soft-capped head loss by hand; the plain ops (what
    # GPUs and torch.compile run) differentiated by autograd must give the same loss and gradients.
    model = tiny_model()
    # 3 x 100 rows: the head loss takes HEAD_CHUNK (256) rows at a time, the last chunk partial.
    idx, tgt = torch.randint(0, 101, (3, 100)), torch.randint(0, 101, (3, 100))
    tgt[1, 40:] = -1
    weight = torch.rand(3, 100)  # a float loss_mask weighs each position
    weight[2, :10] = 0
    grads, losses = [], []
    for by_hand in (True, False):
        monkeypatch.setattr(model_module, "eager_cpu_training", lambda x, by_hand=by_hand: by_hand and x.requires_grad)
        model.zero_grad()
        loss = model(idx, tgt, loss_mask=weight)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(*losses)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("value_embeds", [False, True])
def test_kv_cache_matches_full_forward_for_ragged_batch(value_embeds):
    model = tiny_model(value_embeds=value_embeds)
    lengths = [9, 15, 5]
    seqs = [torch.randint(0, 101, (n,)) for n in lengths]
    full = [model(s[None])[0] for s in seqs]
    cache = KVCache(model.config, batch_size=3, max_len=16)
    prompts = [4, 10, 2]
    padded = torch.zeros(3, max(prompts), dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : prompts[i]] = s[: prompts[i]]
    logits = model(padded, kv_cache=cache, lengths=prompts)  # one ragged prefill
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i, :p], full[i][:p], atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == prompts
    # Decode the whole batch one token at a time: each row at its own position.
    for t in range(3):
        nxt = torch.stack([s[p + t] for s, p in zip(seqs, prompts)])[:, None]
        step = model(nxt, kv_cache=cache)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(step[i, 0], full[i][p + t], atol=1e-5, rtol=1e-5)
    # A subset of rows continues (multi-token chunk) while the others wait.
    chunk = torch.stack([seqs[0][7:9], seqs[1][13:15]])
    step = model(chunk, kv_cache=cache.view(0, 2))
    torch.testing.assert_close(step[0], full[0][7:9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1], full[1][13:15], atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [9, 15, 5]
    slot = cache.view(1, 2)
    slot.reset()  # a freed slot takes a new sequence from scratch
    step = model(seqs[2][None, :5], kv_cache=slot)
    torch.testing.assert_close(step[0], full[2][:5], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        model(torch.zeros(3, 20, dtype=torch.long), kv_cache=cache)


def test_kv_cache_rows_of_equal_length_views_and_moves():
    """Rows at one common length take the sliced, maskless path; views and moves keep rows intact."""
    model = tiny_model()
    seqs = torch.randint(0, 101, (2, 12))
    full = model(seqs)
    cache = KVCache(model.config, batch_size=3, max_len=16)
    block = cache.view(0, 2)
    torch.testing.assert_close(model(seqs[:, :5], kv_cache=block), full[:, :5], atol=1e-5, rtol=1e-5)  # causal
    torch.testing.assert_close(model(seqs[:, 5:8], kv_cache=block), full[:, 5:8], atol=1e-5, rtol=1e-5)  # chunk
    torch.testing.assert_close(model(seqs[:, 8:9], kv_cache=block), full[:, 8:9], atol=1e-5, rtol=1e-5)  # one token
    assert cache.pos.tolist() == [9, 9, 0]  # the view advanced the rows it covers, in place
    cache.move(1, 2)  # row 1's sequence now lives in slot 2 too
    step = model(seqs[1:, 9:10], kv_cache=cache.view(2, 3))
    torch.testing.assert_close(step[0], full[1, 9:10], atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [9, 9, 10]


def test_generate_greedy_matches_argmax_loop():
    model = tiny_model()
    prompt = [5, 17, 42]
    out = model.generate(prompt, max_new_tokens=6)
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]
    sampled = model.generate(prompt, 6, temperature=1.0, top_k=10, seed=3)
    assert sampled == model.generate(prompt, 6, temperature=1.0, top_k=10, seed=3)


def test_sample_next_is_greedy_at_temperature_0_and_keeps_to_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.0, 0.0]])  # row 0's softmax: .64 .24 .09 .03
    assert sample_next(logits).tolist() == [0, 1]
    gen = torch.Generator().manual_seed(0)
    for tiny in (1e-38, 5e-324):  # logits / tiny overflows; shifted first, it is the argmax, not NaN
        assert sample_next(logits, tiny, generator=gen).tolist() == [0, 1]
    many = logits[:1].repeat(2000, 1)

    def drawn(**kw) -> set[int]:
        return set(sample_next(many, 1.0, generator=torch.Generator().manual_seed(1), **kw).tolist())

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_p=0.7) == {0, 1}  # .64 falls short of .7, so the next token is kept too
    assert drawn(top_p=0.5) == {0}
    assert drawn(top_k=3, top_p=0.99) == {0, 1, 2}
    seeded = [sample_next(many[:50], 1.0, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*seeded)


def test_optimizer_groups_cover_every_parameter_once():
    model = tiny_model(value_embeds=True)
    model.register_parameter("gain", torch.nn.Parameter(torch.ones(64)))  # a scalar/vector goes to AdamW
    adamw, muon = build_optimizers(model)
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
    names = {g["name"]: g["params"] for g in adamw.param_groups}
    assert names["embedding"] == [model.transformer.wte.weight] + [ve.weight for ve in model.value_embeds]
    assert names["unembedding"] == [model.lm_head.weight]
    assert names["scalar"] == [model.gain]
    assert all(p.ndim == 2 for p in muon.param_groups[0]["params"])
    assert len(muon.param_groups[0]["params"]) == 6 * model.config.n_layer
    assert isinstance(muon, Muon) and all("initial_lr" in g for g in adamw.param_groups + muon.param_groups)


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for shape in [(32, 64), (64, 32)]:
        G = torch.randn(shape)
        for dtype in (torch.float32, torch.bfloat16):
            s = torch.linalg.svdvals(newton_schulz(G, steps=5, dtype=dtype).float())
            assert s.max() < 1.3 and s.min() > 0.6  # the quintic lands singular values near 1, not exactly
    # Muon orthogonalises same-shape matrices as one batch: each result must equal its own orthogonalisation.
    batch = torch.randn(3, 48, 16)
    for G, X in zip(batch, newton_schulz(batch, dtype=torch.float32)):
        torch.testing.assert_close(X, newton_schulz(G, dtype=torch.float32), atol=1e-5, rtol=1e-4)


def test_schedule():
    assert lr_multiplier(0.0) == 1.0 and lr_multiplier(0.5) == 1.0
    assert lr_multiplier(0.9, warmdown_ratio=0.2) == pytest.approx(0.5)
    assert lr_multiplier(1.0, warmdown_ratio=0.2, final_lr_frac=0.1) == pytest.approx(0.1)
    assert lr_multiplier(0.05, warmup_ratio=0.1) == pytest.approx(0.5)


def train_on(model, opts, batches) -> list[float]:
    """One step of every optimizer per batch of token rows (inputs, then targets shifted by one); the losses."""
    losses = []
    for idx in batches:
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _first_steps(seed: int) -> list[float]:
    model = tiny_model(seed, randomize=False)
    idx = torch.randint(0, 101, (4, 33), generator=torch.Generator().manual_seed(1))
    return train_on(model, build_optimizers(model), [idx] * 5)  # one fixed batch: the model should start memorising it


def test_deterministic_training_and_learning():
    a, b = _first_steps(0), _first_steps(0)
    assert a == b
    assert a[-1] < a[0] - 0.5  # Muon + AdamW move the loss down from ln(V)
