"""python train.py: charlm's train command (`charlm train` where charlm is installed); its usage is in
charlm/commands/entry.py, and `python train.py --help` prints it with every setting."""
import sys

from charlm.commands.entry import run_script

if __name__ == "__main__":
    run_script("train", sys.argv)
