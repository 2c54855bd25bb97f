"""The one exception type users see: a single line that says what to fix."""


class PascalError(Exception):
    """A user-facing error: one line saying what to fix (the CLI prints it without a traceback)."""
