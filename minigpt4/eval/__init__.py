"""Evaluation: eval sets, metrics, the eval runner, and the inference speed bench."""
