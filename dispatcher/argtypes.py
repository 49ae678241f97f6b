"""Argument types shared by the CLI's commands: each turns text into a value or says, in one
line, why it cannot."""

from __future__ import annotations

import argparse


def record_id(text: str) -> int:
    """A row id: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an id (a whole number of at least 1)")
    return int(text)
