"""The command layer: each command of charlm is one module here (train, sample, evaluate, export,
convert, bench, doctor), over a library that never prints, exits or reads argv.

Only this layer imports Hydra or OmegaConf, parses the command line, writes a command's output
or sets an exit status; `run` is where a CharlmError becomes its one line and status.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

from charlm.errors import CharlmError

SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away
INTERRUPTED_STATUS = 130  # 128 + SIGINT


def run(body: Callable[[], Optional[int]], error_status: int = 1) -> int:
    """Run a command's body: its exit status, or error_status after a CharlmError, which is shown
    as one line, `error: <message>`, on stderr. Its output behaves as a Unix tool's: a reader that
    goes away (`| head`) ends it quietly with 141, Ctrl-C is one line and 130, and text the
    terminal's encoding cannot show is written as bytes (UTF-8) or replaced (any other encoding)."""
    forgiving_stdout()
    try:
        return body() or 0
    except CharlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return error_status
    except BrokenPipeError:
        _silence_stdout()
        return SIGPIPE_STATUS
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED_STATUS


def forgiving_stdout() -> None:
    """stdout that writes what it is given: a prompt's bytes that are not UTF-8 (a Latin-1 terminal's,
    which Python hands over as surrogate escapes) go out as the same bytes, and where stdout is not
    UTF-8 what it cannot encode is replaced instead of ending the command."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is None:
        return
    encoding = (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "").replace("_", "")
    reconfigure(errors="surrogateescape" if encoding == "utf8" else "replace")


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null, so that the flush at exit does not fail again
    and print a traceback (Python's own advice for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (a test's capture)
        pass


def exit_on_error(body: Callable[[], Optional[int]]) -> None:
    """run(body), then leave with its status unless that is 0 (for code that returns nothing to
    its caller: Hydra's task functions, the checks before them)."""
    status = run(body)
    if status:
        sys.exit(status)


def run_composed(config_name: str, argv: list[str], usage: str,
                 body: Callable[[Any, list[str], Optional[str]], Optional[int]]) -> None:
    """train.py, sample.py and evaluate.py: argv's config composed once and body(cfg, overrides,
    sweep_dir) run on it, then exit with its status. Where argv holds Hydra's own flags (-m sweeps,
    --cfg, ...) @hydra.main composes instead, and sweep_dir is a sweep job's own directory."""
    from charlm.commands.settings import CONFIG_DIR, compose

    composed = None

    def plain() -> Optional[int]:
        nonlocal composed
        composed = compose(config_name, argv, usage)
        return None if composed is None else body(composed, argv[1:], None)

    exit_on_error(plain)
    if composed is not None:
        return
    import hydra

    def task(cfg: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        sweep_dir = hydra_cfg.runtime.output_dir if hydra_cfg.mode == RunMode.MULTIRUN else None
        exit_on_error(lambda: body(cfg, list(hydra_cfg.overrides.task), sweep_dir))

    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)(task)()


def run_tool(schema: type, argv: list[str], usage: str, body: Callable[[Any], Optional[int]],
             error_status: int = 1) -> int:
    """A `python -m charlm.<tool>`: its key=value settings parsed into schema and body run with them
    (nothing after --help); the exit status."""
    from charlm.commands.settings import parse_settings

    def go() -> Optional[int]:
        cfg = parse_settings(schema, argv, usage)
        return None if cfg is None else body(cfg)

    return run(go, error_status)
