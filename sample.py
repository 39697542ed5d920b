"""python sample.py: charlm's sample command (`charlm sample` where charlm is installed); its usage is in
charlm/commands/entry.py, and `python sample.py --help` prints it with every setting."""
import sys

from charlm.commands.entry import run_script

if __name__ == "__main__":
    run_script("sample", sys.argv)
