"""What every experiments/ command line shares and that defines no flag: the one-line error
exit and absl parsing that uses it (importing this module adds nothing to a tool's flags)."""

from __future__ import annotations

import sys

from absl import flags


def fail(message: str) -> None:
    """Prints `error: message` on stderr and exits with status 2 (the project's bad-input rule)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv):
    """absl parsing with a one-line error instead of absl's usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))
