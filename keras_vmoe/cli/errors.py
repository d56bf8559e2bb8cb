"""The command line's one error type."""


class UsageError(ValueError):
    """A bad command-line argument: reported in one line, exit status 2."""
