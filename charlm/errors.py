"""The one exception type whose message is shown to the user as-is, without a traceback."""


class CharlmError(Exception):
    """A problem the user can fix; the message says what to do."""
