"""The one exception type for expected mistakes: the CLI turns it into a one-line error, exit 2;
and the one spelling of a warning, a line on stderr that lets the command go on."""

import sys


class InputError(ValueError):
    """Bad input from the user: a message naming the problem and, where possible, the fix."""


def warn(message: str) -> None:
    """`deepem3d: warning: MESSAGE` on stderr (stdout stays for what a command reports)."""
    print(f"deepem3d: warning: {message}", file=sys.stderr, flush=True)
