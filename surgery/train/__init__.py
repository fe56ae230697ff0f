"""Training: the fine-tune loop, augmentation, pinned numerics and the zoo of source models."""
