"""finetune: placeholder until its issue lands."""
