"""python -m charlm.bench: the command lives in charlm/commands/bench.py."""
import sys

from charlm.commands.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
