"""pretrain: corpora, token shards, the GPT model, optimizers and the training loop."""
