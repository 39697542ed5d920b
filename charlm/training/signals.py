"""Ctrl-C and SIGTERM end a run after the step in hand, which is then saved."""
from __future__ import annotations

import signal
from typing import Any, Callable, Optional


class StopOnSignal:
    """Within `with`: Ctrl-C / SIGTERM set .signum so the loop can finish its step and save.

    A second Ctrl-C stops at once (the last checkpoint stays as it was).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: Callable[[str], None]) -> None:
        self.announce = announce
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.announce(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt")

    def __enter__(self) -> "StopOnSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
