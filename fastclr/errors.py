"""The one exception type for mistakes in the user's input or environment."""


class FastclrError(Exception):
    """An error caused by the user's input or environment; the CLIs print it as one line and exit 2."""
