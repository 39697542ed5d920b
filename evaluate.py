"""python evaluate.py: charlm's evaluate command (`charlm evaluate` where charlm is installed); its usage is in
charlm/commands/entry.py, and `python evaluate.py --help` prints it with every setting."""
import sys

from charlm.commands.entry import run_script

if __name__ == "__main__":
    run_script("evaluate", sys.argv)
