"""finetune: turn a base checkpoint into a chat model.

- finetune.chat   the conversation format: messages -> token ids + loss mask, prompts for serving
- finetune.tasks  generated chat tasks (arithmetic, letters, facts, identity) with a held-out eval split
- finetune.data   conversation sources, the default SFT mix, fitting to the context, packed batches
- finetune.train  `python -m finetune`: masked SFT on the pretraining loop, checkpoints under checkpoints/sft
- finetune.eval   `python -m finetune.eval`: generative and multiple-choice chat evals, base vs SFT vs chance
"""
