"""Failures an operator sees as one line on stderr and a non-zero exit."""


class StartupError(RuntimeError):
    """The daemon cannot start (e.g. its HTTP address is taken)."""


class DaemonCrashed(RuntimeError):
    """A part of the daemon failed unexpectedly; it stopped cleanly so systemd can restart it."""


class CliError(Exception):
    """A failure of a CLI command to report as one line (bad input, a missing row)."""
