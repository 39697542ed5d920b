"""python sample.py: write text with a trained model.

    python sample.py [checkpoint=RUN_DIR|FILE.pt] prompt="..." [length=200] [temperature=0.8] ...

prompt=, stop= and the file names checkpoint= and prompt_file= are taken exactly as typed;
temperature=0 is greedy.
"""
import sys

import hydra
from omegaconf import DictConfig

from charlm.cli import check_overrides, pop_raw_args, run_sample
from charlm.config import SampleConfig, path_keys

# free text and file names: kept away from Hydra's parser
RAW = pop_raw_args(sys.argv, ("prompt", "stop", *path_keys(SampleConfig)))


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_sample(cfg, RAW)


if __name__ == "__main__":
    check_overrides("sample", sys.argv, __doc__)  # a typo'd or mistyped override: one clear line
    main()
