"""Write text with a trained model: python sample.py prompt="t" length=32"""
import sys

import hydra
from omegaconf import DictConfig

from charlm.cli import pop_raw_args, run_sample

RAW = pop_raw_args(sys.argv, ("prompt", "prompt_file"))  # free text: kept away from Hydra's parser


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_sample(cfg, RAW)


if __name__ == "__main__":
    main()
