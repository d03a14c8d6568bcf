"""Microbenchmarks of selfreplay-fast: each implementation beside its baselines, in one run."""
