"""python -m charlm.convert: the command lives in charlm/commands/convert.py."""
import sys

from charlm.commands.convert import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
