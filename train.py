"""python train.py: train a byte-level GRU language model.

    python train.py [data=timemachine|tinyshakespeare|text] [model=...] [key=value ...]

A run writes config.yaml, last.pt, best.pt and TensorBoard events to out_dir; README.md has
examples. data=tinyshakespeare also takes configs/recipe/tinyshakespeare.yaml, which changes some
of the defaults below. File names (data.path=, out_dir=, train.resume=, ...) are taken exactly as
the shell passes them.
"""
import sys

from charlm.commands import train as command
from charlm.commands.settings import pop_raw_args
from charlm.config import RunConfig, path_keys

if __name__ == "__main__":
    raw = pop_raw_args(sys.argv, path_keys(RunConfig))  # file names, as the shell passed them
    command.main(sys.argv, __doc__, raw)
