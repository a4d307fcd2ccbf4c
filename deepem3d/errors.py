"""The one exception type for expected mistakes: the CLI turns it into a one-line error, exit 2."""


class InputError(ValueError):
    """Bad input from the user: a message naming the problem and, where possible, the fix."""
