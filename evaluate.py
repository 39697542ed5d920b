"""python evaluate.py: score a text with a trained model (bytes, nats/byte, perplexity, bits/byte).

    python evaluate.py [checkpoint=RUN_DIR|FILE.pt] [data=...] [split=test|val|train|all] [format=json]

The whole text is read as one stream with the hidden state carried from window to window (not
as independent windows), so every byte is predicted from everything before it.
"""
import sys

from charlm.commands import evaluate as command
from charlm.commands.settings import pop_raw_args
from charlm.config import EvaluateConfig, path_keys

if __name__ == "__main__":
    raw = pop_raw_args(sys.argv, path_keys(EvaluateConfig))  # file names, as the shell passed them
    command.main(sys.argv, __doc__, raw)
