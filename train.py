"""Train a byte-level GRU language model: python train.py data=timemachine"""
import hydra
from omegaconf import DictConfig

from charlm.cli import run_train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run_train(cfg)


if __name__ == "__main__":
    main()
