"""Write text with a trained model: python sample.py prompt="t" length=32"""
import sys

import hydra
from omegaconf import DictConfig

from charlm.cli import check_overrides, pop_raw_args, run_sample

RAW = pop_raw_args(sys.argv, ("prompt", "prompt_file", "stop"))  # free text: kept away from Hydra's parser


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_sample(cfg, RAW)


if __name__ == "__main__":
    check_overrides("sample", sys.argv)  # a typo'd or mistyped override: one clear line
    main()
