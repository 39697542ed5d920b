"""charlm COMMAND [key=value ...]: every command of charlm, as the installed `charlm` command and
as `python -m charlm`.

    charlm train data=timemachine                    # train (python train.py in a clone)
    charlm sample prompt="the time traveller"        # write with the newest run (python sample.py)
    charlm evaluate                                  # score its test split (python evaluate.py)
    charlm export checkpoint=RUN format=onnx         # onnx, keras or html (python -m charlm.export)
    charlm convert format=keras weights=... out=...  # Keras or Trax weights in (python -m charlm.convert)
    charlm bench                                     # how fast it trains and samples here
    charlm doctor                                    # every path this machine offers, checked

`charlm COMMAND --help` lists the command's settings.
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import Optional

SCRIPTS = ("train", "sample", "evaluate")  # composed by Hydra, file names taken as typed
TOOLS = ("export", "convert", "bench", "doctor")  # key=value settings of their own


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command argv names (default: sys.argv's); the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(__doc__.rstrip())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name in SCRIPTS:
        from charlm.commands.entry import run_script

        sys.argv = [f"charlm {name}", *rest]  # what Hydra's sweeps read
        run_script(name, sys.argv)  # exits with the command's status when it is not 0
        return 0
    if name in TOOLS:
        return import_module(f"charlm.commands.{name}").main(rest)
    print(f"error: charlm has no command {name!r}; choose one of: {', '.join(SCRIPTS + TOOLS)}"
          " (`charlm --help` shows each)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
