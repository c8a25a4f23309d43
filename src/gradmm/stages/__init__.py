"""The pipeline's stages: release (the only one that reads private data), generate, filter,
finetune, evaluate; ``configs`` defines every stage's options."""
