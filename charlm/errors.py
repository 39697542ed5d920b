"""The one exception type whose message is shown to the user as-is, and how a command shows it."""
import sys


class CharlmError(Exception):
    """A problem the user can fix; the message says what to do."""


def fail(message: str) -> None:
    """Print one line for the user and exit with status 1 (commands only; library code raises)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
