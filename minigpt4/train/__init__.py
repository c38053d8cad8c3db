"""Training: the loop, its config, checkpoints, the frozen-feature cache and the training bench."""
