"""python train.py: train a byte-level GRU language model.

    python train.py [data=timemachine|tinyshakespeare|text] [model=...] [key=value ...]

A run writes config.yaml, last.pt, best.pt and TensorBoard events to out_dir; README.md has
examples. data=tinyshakespeare also takes configs/recipe/tinyshakespeare.yaml, which changes some
of the defaults below. File names (data.path=, out_dir=, train.resume=, ...) are taken exactly as
the shell passes them.
"""
import sys

import hydra
from omegaconf import DictConfig

from charlm.cli import check_overrides, pop_raw_args, run_train
from charlm.config import Config, path_keys

RAW = pop_raw_args(sys.argv, path_keys(Config))  # file names: kept away from Hydra's parser


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run_train(cfg, RAW)


if __name__ == "__main__":
    check_overrides("train", sys.argv, __doc__)  # a typo'd or mistyped override: one clear line
    main()
