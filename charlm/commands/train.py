"""python train.py: the composed config becomes a RunConfig (a resume or a fine-tuning start
merged with its checkpoint's), then charlm.training.loop.train runs it with this layer's reporter.

How a run flows: train.py composes (settings.compose) -> run_train -> config_for_run ->
training.loop.train(config, out_dir, report=TrainReport()) -> Trainer.run() -> a summary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from charlm.commands.settings import literal, literal_tree, to_object, with_raw
from charlm.config import RunConfig
from charlm.errors import CharlmError

MODEL_SHAPE = ("d_model", "n_layers", "cell")  # what a checkpoint's weights fix (resume, init_from)
RESUME_FIXES = {"data": ("name", "path", "separator", "train_frac", "val_frac"), "model": MODEL_SHAPE}
# what a group choice on the command line stands for: data=... and model=... their section,
# recipe=... the model and train sections (as this command composes them)
GROUP_SECTIONS = {"data": ["data"], "model": ["model"], "recipe": ["model", "train"]}


def run_train(cfg: DictConfig, overrides: list[str], raw: dict[str, str], sweep_dir: Optional[str] = None) -> int:
    """Body of `python train.py`: overrides are the command line's (Hydra's grammar), raw its path
    settings exactly as typed; sweep_dir is a sweep job's own directory. The exit status."""
    config, state, init = config_for_run(with_raw(cfg, raw), overrides, raw)
    if sweep_dir and "out_dir" not in raw:
        config.out_dir = sweep_dir  # one directory per job of a sweep
    from charlm.commands.train_report import TrainReport
    from charlm.training.loop import train  # torch is imported only once the config is known to be good

    summary = train(config, Path(config.out_dir), report=TrainReport(), resume_state=state, init_state=init)
    if "stopped_by" in summary:  # Ctrl-C or SIGTERM: saved; the shell's code for that signal
        return 128 + summary["stopped_by"]
    return 0


def config_for_run(cfg: DictConfig, overrides: list[str], raw: dict[str, str]
                   ) -> tuple[RunConfig, Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    """(the run's config, the checkpoint it resumes, the checkpoint it starts from)."""
    if cfg.train.resume and cfg.train.init_from:
        raise CharlmError("give train.resume (continue a run) or train.init_from (start a new run from its"
                          " weights), not both")
    if cfg.train.resume and cfg.overwrite:
        raise CharlmError("give train.resume (continue a run) or overwrite=true (start it over), not both")
    if cfg.train.resume:
        config, state = _resume_config(cfg, overrides, raw)
        return config, state, None
    if cfg.train.init_from:
        config, init = _init_from_config(cfg, overrides)
        return config, None, init
    return to_object(cfg, RunConfig), None, None


def _resume_config(cfg: DictConfig, overrides: list[str], raw: dict[str, str]
                   ) -> tuple[RunConfig, Optional[dict[str, Any]]]:
    """The saved run's config with this command line's overrides (and raw path settings) on top.

    Every override takes effect (train.lr included) or is refused here: a resumed run keeps its
    text and its model's shape. Repeating the run's own choices (data=..., model=...) is fine.
    The run is continued where it is: in the directory of its checkpoint (best.pt or last.pt),
    whatever the working directory; a checkpoint under another name (a copy) continues in a
    directory of its run's name beside it, or in out_dir= where given. A run stopped before its
    first checkpoint is trained again from step 0 with its config.yaml (the state returned is then
    None).
    """
    from charlm.checkpoint import load_checkpoint, resolve_checkpoint, run_settings

    run_dir = Path(cfg.train.resume)
    if _saved_nothing(run_dir):
        path, state, settings = run_dir, None, _settings_file(run_dir / "config.yaml")
    else:
        path = resolve_checkpoint(cfg.train.resume, prefer="last.pt")
        run_dir, state = path.parent, load_checkpoint(path)
        settings = run_settings(state)
    saved = OmegaConf.merge(OmegaConf.structured(RunConfig), literal_tree(settings))
    merged = saved.copy()
    given = _parsed(overrides)
    for o in given:
        sections = GROUP_SECTIONS.get(o.key_or_group)
        try:
            for key in sections or [o.key_or_group]:
                value = OmegaConf.to_container(cfg[key], resolve=True) if sections else o.value()
                OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise CharlmError(f"{o.input_line}: {str(e).splitlines()[0]}") from None
    with_raw(merged, {k: v for k, v in raw.items() if k != "train.resume"})
    if path.is_file() and path.name not in ("best.pt", "last.pt"):  # a lone or renamed checkpoint: a
        run_dir = path.parent / Path(str(saved.out_dir)).name  # run directory of the run's own name beside it
        run_dir = Path(raw.get("out_dir", run_dir))
    elif "out_dir" in raw and not _same_dir(Path(raw["out_dir"]), run_dir):
        raise CharlmError(f"out_dir={raw['out_dir']}: a resumed run goes on in its own directory, {run_dir}; drop"
                          " out_dir=, or copy the run there first and resume the copy")
    merged.out_dir = literal(str(run_dir))
    _find_text(saved, merged, (state or {}).get("corpus"), "data.path" in raw)
    lines = [(o.key_or_group, o.input_line) for o in given] + [(k, f"{k}={v}") for k, v in raw.items()]
    for section, key, was, now in _changed(saved, merged, RESUME_FIXES):
        culprit = [line for k, line in lines if k in (section, f"{section}.{key}", "recipe")][-1]
        raise CharlmError(f"{culprit} would change {section}.{key} from {was} to {now}, which a resumed run"
                          " cannot; drop it, or start a new run")
    merged.train.resume = literal(str(path))
    return to_object(merged, RunConfig), state


def _saved_nothing(run_dir: Path) -> bool:
    """Whether run_dir is a run stopped before its first checkpoint: its config.yaml, no .pt."""
    return (run_dir.is_dir() and (run_dir / "config.yaml").is_file()
            and not any((run_dir / name).exists() for name in ("best.pt", "last.pt")))


def _settings_file(path: Path) -> dict[str, Any]:
    """A run's settings from its config.yaml (without its resolved plan: nothing was trained on it)."""
    import yaml

    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CharlmError(f"{path} cannot be read ({str(e).splitlines()[0][:80]}); start a new run with"
                          f" overwrite=true out_dir={path.parent}") from None
    if not isinstance(settings, dict):
        raise CharlmError(f"{path} is not a run's config.yaml; start a new run with overwrite=true")
    settings.pop("plan", None)
    return settings


def _find_text(saved: DictConfig, merged: DictConfig, corpus: Optional[dict[str, Any]], given: bool) -> None:
    """A resumed run's text, wherever the command runs from: a data.path saved relative to another
    working directory is found where the checkpoint recorded it; a data.path given here may name
    another copy of the same text (its SHA-256 is the checkpoint's)."""
    from charlm.data.text import identity, load_bytes

    was = saved.data.path
    if not was:
        return
    if not given and not Path(was).exists() and corpus and Path(corpus["path"]).is_file():
        merged.data.path = saved.data.path = literal(corpus["path"])
    elif given and merged.data.path != was and corpus and Path(merged.data.path).is_file():
        now = merged.data.path
        if identity(now, load_bytes(now, merged.data.separator, merged.data.cache_dir))["sha256"] == corpus["sha256"]:
            saved.data.path = now  # the same text, moved


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _init_from_config(cfg: DictConfig, overrides: list[str]) -> tuple[RunConfig, dict[str, Any]]:
    """This command's config with the model's size taken from train.init_from's checkpoint.

    A model setting given on the command line applies where it fits the weights (dropout); one
    that contradicts them (model.d_model, n_layers, cell, or a model= size) is refused here.
    """
    from charlm.checkpoint import load_checkpoint, model_settings, resolve_checkpoint

    path = resolve_checkpoint(cfg.train.init_from, prefer="best.pt")
    state = load_checkpoint(path)
    saved = OmegaConf.merge(OmegaConf.structured(RunConfig), {"model": model_settings(state)})
    merged = cfg.copy()
    merged.model = saved.model
    for o in _parsed(overrides):
        key = o.key_or_group
        if key != "model" and not key.startswith("model."):
            continue
        value = OmegaConf.to_container(cfg.model, resolve=True) if key == "model" else o.value()
        OmegaConf.update(merged, key, value, merge=True)
        for _, k, _, now in _changed(saved, merged, {"model": MODEL_SHAPE}):
            m = saved.model
            raise CharlmError(f"{o.input_line} would make model.{k} {now}, but train.init_from={path} is a"
                              f" {m.d_model}x{m.n_layers} {m.cell} model; drop it, or start from scratch")
    merged.train.init_from = literal(str(path.resolve()))  # the record in config.yaml and HParams
    return to_object(merged, RunConfig), state


def _changed(saved: DictConfig, merged: DictConfig, fixed: dict[str, tuple[str, ...]]) -> list[tuple]:
    """(section, key, saved value, new value) for each key a checkpoint fixes that merged changes:
    the part of the resume and init_from rules they share."""
    return [(section, k, saved[section][k], merged[section][k]) for section, keys in fixed.items() for k in keys
            if merged[section][k] != saved[section][k]]


def _parsed(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def main(argv: list[str], usage: str, raw: dict[str, str]) -> None:
    """`python train.py`: raw holds the file-name settings exactly as typed."""
    from charlm.commands import run_composed

    run_composed("train", argv, usage, lambda cfg, overrides, sweep_dir: run_train(cfg, overrides, raw, sweep_dir))
