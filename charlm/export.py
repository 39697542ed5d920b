"""python -m charlm.export: the command lives in charlm/commands/export.py."""
import sys

from charlm.commands.export import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
