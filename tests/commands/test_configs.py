"""Every config composes, and the settings have one source: the dataclasses' defaults are what
`python train.py` runs, and a recipe YAML holds only what its corpus changes."""
from dataclasses import asdict

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from charlm.commands.settings import register_schemas
from charlm.config import EvaluateConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig
from charlm.data.corpora import CORPORA
from helpers import ROOT

CONFIGS = ROOT / "charlm" / "configs"
register_schemas()  # the schemas the configs name (train_schema, ...)
NEEDS = {"text": ["data.path=notes.txt"]}  # what a choice cannot run without


def composed(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    schema = {"train": RunConfig, "sample": SampleConfig, "evaluate": EvaluateConfig}[name]
    plain = OmegaConf.to_container(cfg, resolve=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))


@pytest.mark.parametrize("group", ["data", "recipe", "model"])
def test_every_group_option_composes_into_the_schema(group):
    for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
        overrides = [f"{group}={option}", *NEEDS.get(option, [])]
        assert isinstance(composed("train", overrides), RunConfig), (group, option)


@pytest.mark.parametrize("name", ["sample", "evaluate"])
def test_the_other_commands_compose(name):
    assert composed(name, []) is not None


def test_the_defaults_are_what_train_py_runs():
    cfg = composed("train", [])
    assert cfg.model == ModelConfig() and cfg.train == TrainConfig()  # notebook == recipe


def test_corpus_recipes_restate_no_default():
    """charlm/configs/recipe/<corpus>.yaml: only what that corpus changes (the named sizes in charlm/configs/model
    list all of themselves)."""
    defaults = {"train": asdict(TrainConfig()), "model": asdict(ModelConfig())}
    recipes = sorted((CONFIGS / "recipe").glob("*.yaml"))
    assert recipes, "no recipes found"
    for path in recipes:
        assert path.stem in CORPORA, f"charlm/configs/recipe/{path.name} names no corpus of charlm/data/corpora.py"
        sections = yaml.safe_load(path.read_text()) or {}
        assert set(sections) <= {"model", "train"}, f"{path.name}: a recipe sets model.* and train.* only"
        for group, keys in sections.items():
            restated = [k for k, v in keys.items() if defaults[group].get(k) == v]
            assert restated == [], f"charlm/configs/recipe/{path.name} restates defaults: {group}.{restated}"


def test_a_corpus_needs_only_its_data_file_and_corpora_entry():
    """A corpus without recipes trains with the defaults (The Time Machine's)."""
    for name in CORPORA:
        assert (CONFIGS / "data" / f"{name}.yaml").is_file(), f"charlm/configs/data/{name}.yaml is missing"
    cfg = composed("train", ["data=text", "data.path=notes.txt"])  # text has no recipe of its own
    assert cfg.model == ModelConfig() and cfg.train == TrainConfig()
