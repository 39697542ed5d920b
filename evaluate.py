"""python evaluate.py: score a text with a trained model (bytes, nats/byte, perplexity, bits/byte).

    python evaluate.py [checkpoint=RUN_DIR|FILE.pt] [data=...] [split=test|val|train|all] [format=json]

The whole text is read as one stream with the hidden state carried from window to window (not
as independent windows), so every byte is predicted from everything before it.
"""
import sys

import hydra
from omegaconf import DictConfig

from charlm.cli import check_overrides, pop_raw_args, run_evaluate
from charlm.config import EvaluateConfig, path_keys

RAW = pop_raw_args(sys.argv, path_keys(EvaluateConfig))  # file names: kept away from Hydra's parser


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_evaluate(cfg, RAW)


if __name__ == "__main__":
    check_overrides("evaluate", sys.argv, __doc__)  # a typo'd or mistyped override: one clear line
    main()
