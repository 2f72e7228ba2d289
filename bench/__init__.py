"""Benchmarks: `python -m bench.<name>`; results and commands in docs/benchmarks.md."""
