"""What train.py and sample.py run once Hydra has composed their config: validate, call, report.

Model, data and training code know nothing of Hydra; this module converts the composed config
into the plain dataclasses of charlm.config once, and turns user errors into one clear line.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import Config, EvaluateConfig, SampleConfig
from .errors import CharlmError, fail

# The schemas the YAML files in configs/ are checked against: a typo'd key or a wrong type
# stops the run at start-up.
_store = ConfigStore.instance()
_store.store(name="train_schema", node=Config)
_store.store(name="sample_schema", node=SampleConfig)
_store.store(name="evaluate_schema", node=EvaluateConfig)


def check_overrides(config_name: str, argv: list[str]) -> None:
    """Compose the config once up front so that a bad override ends in one line, not Hydra's page.

    Hydra's own flags (--help, --cfg, -m, ...) are left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    overrides = argv[1:]
    if any(a.startswith("-") for a in overrides):
        return
    config_dir = str(Path(__file__).resolve().parent.parent / "configs")
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose(config_name, overrides=overrides)
    except MissingConfigException as e:
        options = getattr(e, "options", None) or []
        missing = getattr(e, "missing_cfg_file", "") or str(e).splitlines()[0]
        group, _, name = str(missing).partition("/")
        fail(f"{group}={name} is not a config; choose one of: {', '.join(options)}" if options
             else str(e).splitlines()[0])
    except HydraException as e:
        cause = e.__cause__
        key = getattr(cause, "full_key", None)
        if key and "not in" in str(cause):
            fail(f"{key} is not a setting; `python {config_name}.py --cfg job` lists them all")
        if key:
            fail(f"{key}: {str(cause).splitlines()[0]}")
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        fail(" ".join(lines[:2]) + " (quote free text: key='a, b')")


def _to_object(cfg: DictConfig, schema: type) -> Any:
    """The composed config as plain dataclass instances (runs their validation)."""
    try:
        # Through a plain container: a schema-typed config would carry `+key=...` additions along.
        plain = OmegaConf.to_container(cfg, resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        if "Missing mandatory value" in msg and key:
            msg = f"{key} needs a value: add {key}=..."
        raise CharlmError(msg) from None


def _guarded(fn: Callable[[], Any]) -> Any:
    """Run fn; a CharlmError becomes one line on stderr and exit status 1."""
    try:
        return fn()
    except CharlmError as e:
        fail(str(e))


def _resume_config(cfg: DictConfig, overrides: list[str]) -> tuple[Config, dict[str, Any]]:
    """The saved run's config with this command line's overrides on top.

    Every override takes effect (train.lr included) or is refused here: a resumed run keeps its
    text and its model's shape. Repeating the run's own choices (data=..., model=...) is fine.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(cfg.train.resume, prefer="last.pt")
    state = load_checkpoint(path)
    saved = OmegaConf.merge(OmegaConf.structured(Config), state["config"])
    merged = saved.copy()
    given = [o for o in OverridesParser.create().parse_overrides(overrides) if o.key_or_group != "train.resume"]
    for o in given:
        key = o.key_or_group
        # a group choice (data=..., model=...) stands for its section as this command composes it
        value = OmegaConf.to_container(cfg[key], resolve=True) if key in ("data", "model", "train") else o.value()
        try:
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as e:
            fail(f"{o.input_line}: {str(e).splitlines()[0]}")
    fixed = {"data": ("name", "path", "train_frac", "val_frac"), "model": ("d_model", "n_layers", "cell")}
    for section, keys in fixed.items():
        for k in keys:
            if merged[section][k] != saved[section][k]:
                culprit = [o.input_line for o in given if o.key_or_group in (section, f"{section}.{k}")][-1]
                fail(f"{culprit} would change {section}.{k} from {saved[section][k]} to {merged[section][k]},"
                     " which a resumed run cannot; drop it, or start a new run")
    merged.train.resume = str(path)
    return _to_object(merged, Config), state


def run_train(cfg: DictConfig) -> None:
    """Body of `python train.py`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    def go() -> None:
        hydra_cfg = HydraConfig.get()
        if cfg.train.resume:
            config, state = _resume_config(cfg, list(hydra_cfg.overrides.task))
        else:
            config, state = _to_object(cfg, Config), None
        explicit_out_dir = any(o.startswith("out_dir=") for o in hydra_cfg.overrides.task)
        if hydra_cfg.mode == RunMode.MULTIRUN and not explicit_out_dir:
            config.out_dir = hydra_cfg.runtime.output_dir  # one directory per job of a sweep
        out_dir = Path(config.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise CharlmError(f"out_dir={out_dir} is a file; give a directory")
        from .train import train  # torch is imported only once the config is known to be good

        summary = train(config, out_dir, resume_state=state)
        if "stopped_by" in summary:  # Ctrl-C or SIGTERM: saved; the shell's code for that signal
            sys.exit(128 + summary["stopped_by"])

    _guarded(go)


def pop_raw_args(argv: list[str], keys: tuple[str, ...]) -> dict[str, str]:
    """Take `key=value` arguments for keys out of argv, values exactly as the shell passed them.

    Hydra's override grammar would reject or reinterpret free text (commas, quotes, brackets,
    non-ASCII), so prompts never go through it.
    """
    raw = {}
    for arg in list(argv[1:]):
        key, sep, value = arg.partition("=")
        if sep and key in keys:
            raw[key] = value
            argv.remove(arg)
    return raw


def run_sample(cfg: DictConfig, raw: dict[str, str]) -> None:
    """Body of `python sample.py`; raw holds prompt/prompt_file exactly as typed."""
    def go() -> None:
        config = _to_object(OmegaConf.merge(cfg, raw), SampleConfig)
        from .sample import sample  # torch is imported only once the config is known to be good

        sample(config)

    _guarded(go)


def run_evaluate(cfg: DictConfig) -> None:
    """Body of `python evaluate.py`."""
    from hydra.core.hydra_config import HydraConfig

    def go() -> None:
        config = _to_object(cfg, EvaluateConfig)
        given = [o.lstrip("+~").split("=")[0].split(".")[0] for o in HydraConfig.get().overrides.task]
        from .evaluation import run_evaluation  # torch only once the config is known to be good

        run_evaluation(config, data_given="data" in given)

    _guarded(go)
