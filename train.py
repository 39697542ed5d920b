"""python train.py: train a byte-level GRU language model.

    python train.py [data=timemachine|tinyshakespeare|text] [model=...] [key=value ...]

A run writes config.yaml, last.pt, best.pt and TensorBoard events to out_dir; README.md has
examples. data=tinyshakespeare also takes configs/model/tinyshakespeare.yaml and
configs/train/tinyshakespeare.yaml, which change some of the defaults below.
"""
import sys

import hydra
from omegaconf import DictConfig

from charlm.cli import check_overrides, run_train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run_train(cfg)


if __name__ == "__main__":
    check_overrides("train", sys.argv, __doc__)  # a typo'd or mistyped override: one clear line
    main()
