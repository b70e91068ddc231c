"""Benchmarks of the engine against plain `transformers.Trainer`, a hand-written PyTorch loop
and its own settings: `python -m benchmarks.run` (see benchmarks/README.md)."""
