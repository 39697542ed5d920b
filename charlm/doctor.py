"""python -m charlm.doctor: the command lives in charlm/commands/doctor.py."""
import sys

from charlm.commands.doctor import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
