"""The command layer: each command of charlm is one module here (train, sample, evaluate, export,
convert, bench, doctor), over a library that never prints, exits or reads argv.

Only this layer imports Hydra or OmegaConf, parses the command line, writes a command's output
or sets an exit status; `run` is where a CharlmError becomes its one line and status.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

from charlm.errors import CharlmError


def run(body: Callable[[], Optional[int]], error_status: int = 1) -> int:
    """Run a command's body: its exit status, or error_status after a CharlmError, which is shown
    as one line, `error: <message>`, on stderr."""
    try:
        return body() or 0
    except CharlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return error_status


def exit_on_error(body: Callable[[], Optional[int]]) -> None:
    """run(body), then leave with its status unless that is 0 (for code that returns nothing to
    its caller: Hydra's task functions, the checks before them)."""
    status = run(body)
    if status:
        sys.exit(status)
