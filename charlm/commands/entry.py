"""The three composed commands as a shell starts them: `python train.py` (sample.py, evaluate.py)
in a clone, `charlm train` (sample, evaluate) and `python -m charlm train` where charlm is
installed. Each takes its file names and free text exactly as the shell passed them (pop_raw_args)
before Hydra reads the rest."""
from __future__ import annotations

from charlm.commands.settings import pop_raw_args
from charlm.config import EvaluateConfig, RunConfig, SampleConfig, path_keys

USAGE = {
    "train": """python train.py (or: charlm train): train a byte-level GRU language model.

    python train.py [data=timemachine|tinyshakespeare|text] [model=...] [key=value ...]

A run writes config.yaml, last.pt, best.pt and TensorBoard events to out_dir; README.md has
examples. data=tinyshakespeare also takes charlm/configs/recipe/tinyshakespeare.yaml, which changes
some of the defaults below. File names (data.path=, out_dir=, train.resume=, ...) are taken exactly
as the shell passes them.
""",
    "sample": """python sample.py (or: charlm sample): write text with a trained model.

    python sample.py [checkpoint=RUN_DIR|FILE.pt] prompt="..." [length=200] [temperature=0.8] ...

prompt=, stop= and the file names checkpoint= and prompt_file= are taken exactly as typed;
temperature=0 is greedy.
""",
    "evaluate": """python evaluate.py (or: charlm evaluate): score a text with a trained model (bytes,
nats/byte, perplexity, bits/byte).

    python evaluate.py [checkpoint=RUN_DIR|FILE.pt] [data=...] [split=test|val|train|all] [format=json]

The whole text is read as one stream with the hidden state carried from window to window (not
as independent windows), so every byte is predicted from everything before it.
""",
}
# the settings each takes as typed: file names, and sample.py's free text
RAW = {"train": path_keys(RunConfig), "sample": ("prompt", "stop", *path_keys(SampleConfig)),
       "evaluate": path_keys(EvaluateConfig)}


def run_script(name: str, argv: list[str]) -> None:
    """Run command `name` (train, sample or evaluate) on argv (argv[0]: the program's name, as
    sys.argv holds it, which Hydra's sweeps read); it exits with the command's status."""
    from importlib import import_module

    command = import_module(f"charlm.commands.{name}")
    raw = pop_raw_args(argv, RAW[name])
    command.main(argv, USAGE[name], raw)
