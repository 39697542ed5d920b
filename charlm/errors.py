"""The one exception type whose message is shown to the user as-is (charlm.commands.run shows it)."""


class CharlmError(Exception):
    """A problem the user can fix; the message says what to do."""
