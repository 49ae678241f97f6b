"""Benchmarks for the dispatcher: `python -m bench` (see bench/cli.py for the options)."""
