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

from .config import Config, SampleConfig
from .errors import CharlmError

# The schemas the YAML files in configs/ are checked against: a typo'd key or a wrong type
# stops the run at start-up.
_store = ConfigStore.instance()
_store.store(name="train_schema", node=Config)
_store.store(name="sample_schema", node=SampleConfig)


def fail(message: str) -> None:
    """Print one line for the user and exit with status 1."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _to_object(cfg: DictConfig, schema: type) -> Any:
    """The composed config as plain dataclass instances (runs their validation)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
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
    """The saved run's config with this command line's explicit key=value overrides on top."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(cfg.train.resume, prefer="last.pt")
    state = load_checkpoint(path)
    merged = OmegaConf.merge(OmegaConf.structured(Config), state["config"])
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key == "train.resume":
            continue
        if "." not in key and key not in ("seed", "out_dir"):
            fail(f"{key}={o.value()} cannot change when resuming; a run keeps its {key}")
        try:
            OmegaConf.update(merged, key, o.value(), merge=True)
        except OmegaConfBaseException as e:
            fail(f"{o.input_line}: {str(e).splitlines()[0]}")
    merged.train.resume = str(path)
    return _to_object(merged, Config), state


def run_train(cfg: DictConfig) -> None:
    """Body of `python train.py`."""
    from hydra.core.hydra_config import HydraConfig

    from .train import train

    def go() -> None:
        if cfg.train.resume:
            config, state = _resume_config(cfg, list(HydraConfig.get().overrides.task))
        else:
            config, state = _to_object(cfg, Config), None
        out_dir = Path(config.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise CharlmError(f"out_dir={out_dir} is a file; give a directory")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CharlmError(f"cannot create out_dir={out_dir}: {e.strerror}") from None
        train(config, out_dir, resume_state=state)

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
    from .sample import sample

    def go() -> None:
        merged = OmegaConf.merge(cfg, raw)
        sample(_to_object(merged, SampleConfig))

    _guarded(go)
