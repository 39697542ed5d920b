"""python sample.py: write text with a trained model.

    python sample.py [checkpoint=RUN_DIR|FILE.pt] prompt="..." [length=200] [temperature=0.8] ...

prompt=, stop= and the file names checkpoint= and prompt_file= are taken exactly as typed;
temperature=0 is greedy.
"""
import sys

from charlm.commands import sample as command
from charlm.commands.settings import pop_raw_args
from charlm.config import SampleConfig, path_keys

if __name__ == "__main__":
    raw = pop_raw_args(sys.argv, ("prompt", "stop", *path_keys(SampleConfig)))  # free text and file names, as typed
    command.main(sys.argv, __doc__, raw)
