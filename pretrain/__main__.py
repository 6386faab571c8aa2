"""`python -m pretrain`: train the base GPT on a tokenized corpus (or synthetic tokens) and save checkpoints.

Defaults pick themselves from the hardware: on CPU a depth-4 toy that learns visibly within minutes;
on CUDA a depth-20 model at sequence 2048 with bf16 + torch.compile. Under torchrun it trains on every GPU.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import config_from_args, explicit_flags, flag, parser_for, run_cli
from common.dist import all_reduce, distributed
from common.paths import checkpoints_dir, tokenizer_path, tokens_dir
from pretrain.checkpoint import CheckpointError
from pretrain.model import GPT, GPTConfig
from pretrain.shards import ShardError, TokenLoader, load_manifest
from pretrain.train import SyntheticLoader, TrainConfig, print_result, train

# Per-hardware defaults for the flags the user left unset.
# CPU: a warmdown over the last half of a 10-minute run ends 0.0095 bits/byte lower than over the last fifth;
# after a fixed 300 steps, value embeddings end 0.044 bits/byte lower.
CPU_DEFAULTS = dict(
    depth=2,
    value_embeds=True,
    sequence_len=256,
    device_batch_size=32,
    max_minutes=10.0,
    warmdown_ratio=0.5,
    eval_every=100,
    eval_tokens=2**17,
)
CUDA_DEFAULTS = dict(depth=20, sequence_len=2048, device_batch_size=32, total_batch_tokens=524288, eval_tokens=2**22)


@dataclass
class PretrainConfig:
    corpus: str = flag("default", "token corpus in $SCRATCHCHAT_HOME/tokens/<corpus>/")
    tokens_dir: str = flag("", "explicit token directory (overrides --corpus)")
    tokenizer: str = flag("", "tokenizer.json (default: $SCRATCHCHAT_HOME/tokenizer/tokenizer.json)")
    synthetic: bool = flag(False, "train on seeded synthetic tokens: no corpus or tokenizer needed (benchmarks)")
    vocab_size: int = flag(65536, "vocabulary size for --synthetic (otherwise the tokenizer's)")
    depth: int = flag(0, "transformer layers; width = 64 x depth, heads of ~128 dims (0: 2 on CPU, 20 on CUDA)")
    sequence_len: int = flag(0, "context length in tokens (0: 256 on CPU, 2048 on CUDA)")
    n_embd: int = flag(0, "override the width (0: 64 x depth)")
    n_head: int = flag(0, "override the query heads (0: from the width)")
    n_kv_head: int = flag(0, "override the key/value heads, < n_head for grouped-query attention (0: = n_head)")
    softcap: float = flag(15.0, "logit soft-cap (0: off)")
    run_dir: str = flag("", "checkpoints, metrics and plots go here (default: $SCRATCHCHAT_HOME/checkpoints/base)")
    # Off on CUDA: at depth 20 and vocabulary 65,536 value embeddings would add 1.7 B parameters, so far untried.
    value_embeds: bool = flag(False, "add a token embedding per layer to the attention values (on by default on CPU)")


def apply_hardware_defaults(pcfg: PretrainConfig, tcfg: TrainConfig, device: torch.device, explicit: set[str]) -> None:
    """Fill flags the user left unset from the CPU or CUDA table."""
    table = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in table.items():
        if key in explicit or (key == "max_minutes" and tcfg.max_steps > 0):  # a step count is the stop rule
            continue
        setattr(pcfg if hasattr(pcfg, key) else tcfg, key, value)


def fit_device_batch(model: GPT, batch: int, seq_len: int, device: torch.device) -> int:
    """The largest of batch, batch/2, ... whose forward + backward fits beside the optimizer state, found by trying
    (so 24, 40 and 80 GB cards all run with one default). Only CUDA reports out-of-memory this way."""
    if device.type != "cuda":
        return batch
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = torch.cuda.get_device_properties(device).total_memory * 0.95 - 2 * params  # + Muon/AdamW state
    while batch > 1:
        try:
            x = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
            torch.cuda.reset_peak_memory_stats(device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(x, x).backward()
            if torch.cuda.max_memory_allocated(device) <= budget:
                break
        except torch.cuda.OutOfMemoryError:
            pass
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        batch //= 2
    return batch


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(PretrainConfig, TrainConfig, prog="python -m pretrain", description=__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    pcfg, tcfg = config_from_args(PretrainConfig, args), config_from_args(TrainConfig, args)
    explicit = explicit_flags(parser, argv)
    return run_cli(lambda: pretrain(pcfg, tcfg, explicit), (ShardError, CheckpointError, FileNotFoundError, ValueError))


def pretrain(pcfg: PretrainConfig, tcfg: TrainConfig, explicit: set[str]) -> None:
    """Build the model and its data for this hardware, train it, and say where the checkpoint went."""
    with distributed(tcfg.device) as dist:
        apply_hardware_defaults(pcfg, tcfg, dist.device, explicit)
        tokenizer, vocab_size, token_dir = None, pcfg.vocab_size, None
        if not pcfg.synthetic:
            from tokenizer import Tokenizer

            token_dir = Path(pcfg.tokens_dir) if pcfg.tokens_dir else tokens_dir(pcfg.corpus)
            manifest = load_manifest(token_dir)
            tok_path = Path(pcfg.tokenizer) if pcfg.tokenizer else tokenizer_path()
            if not tok_path.is_file():
                raise FileNotFoundError(f"no tokenizer at {tok_path}; run python -m tokenizer train first")
            tokenizer = Tokenizer.load(tok_path)
            if manifest.get("tokenizer_hash") != tokenizer.hash:
                raise ShardError(
                    f"the shards in {token_dir} were made with tokenizer "
                    f"{str(manifest.get('tokenizer_hash'))[:12]}, not {tok_path} ({tokenizer.hash[:12]});"
                    f" re-run python -m pretrain.data tokenize"
                )
            vocab_size = tokenizer.vocab_size
        config = GPTConfig.from_depth(
            pcfg.depth,
            vocab_size,
            pcfg.sequence_len,
            n_embd=pcfg.n_embd or None,
            n_head=pcfg.n_head or None,
            n_kv_head=pcfg.n_kv_head or None,
            softcap=pcfg.softcap,
            value_embeds=pcfg.value_embeds,
        )
        torch.manual_seed(tcfg.seed)
        model = GPT(config).to(dist.device)
        if "device_batch_size" not in explicit:  # every rank must take the same shape: the tightest rank's fit
            fit = fit_device_batch(model, tcfg.device_batch_size, pcfg.sequence_len, dist.device)
            fit = all_reduce(torch.tensor([fit], device=dist.device), dist, torch.distributed.ReduceOp.MIN)
            tcfg.device_batch_size = int(fit.item())
        B, T = tcfg.device_batch_size, pcfg.sequence_len
        if pcfg.synthetic:
            loader = SyntheticLoader(vocab_size, B, T, tcfg.seed, dist.rank, dist.world_size, dist.device)
            val_batches = lambda: loader.iter_val(tcfg.eval_tokens)  # noqa: E731
        else:
            loader = TokenLoader(token_dir, "train", B, T, dist.rank, dist.world_size, dist.device)
            val = TokenLoader(token_dir, "val", B, T, dist.rank, dist.world_size, dist.device)
            val_batches = lambda: val.iter_val(tcfg.eval_tokens)  # noqa: E731
        meta = {"corpus": str(token_dir) if token_dir else "synthetic"}
        run_dir = Path(pcfg.run_dir) if pcfg.run_dir else checkpoints_dir("base")
        if dist.is_main:
            print(
                f"model: depth {config.n_layer}, width {config.n_embd}, {config.n_head} heads "
                f"({config.n_kv_head} kv), sequence {config.sequence_len}, vocab {config.vocab_size}"
            )
        result = train(
            model, tcfg, loader, run_dir=run_dir, tokenizer=tokenizer, val_batches=val_batches, dist=dist, meta=meta
        )
    if dist.is_main:
        print_result(result, run_dir)
        print("next: python -m finetune")


if __name__ == "__main__":
    sys.exit(main())
