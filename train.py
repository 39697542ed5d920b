"""Train a byte-level GRU language model: python train.py data=timemachine"""
import sys

import hydra
from omegaconf import DictConfig

from charlm.cli import check_overrides, run_train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run_train(cfg)


if __name__ == "__main__":
    check_overrides("train", sys.argv)  # a typo'd or mistyped override: one clear line
    main()
