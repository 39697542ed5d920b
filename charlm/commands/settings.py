"""The command line as settings: `key=value` arguments, file names taken as typed, --help from the
settings' own help, and a bad override caught in one line before Hydra prints its page.

The only code that talks to Hydra and OmegaConf: a composed config becomes the plain dataclasses
of charlm.config here, once, and the library below never sees either.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from charlm.config import EvaluateConfig, RunConfig, SampleConfig, path_keys
from charlm.errors import CharlmError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # inside the package, so a wheel carries them
SCHEMAS = {"train": RunConfig, "sample": SampleConfig, "evaluate": EvaluateConfig}


def register_schemas() -> None:
    """Give Hydra the schemas charlm/configs/*.yaml name (train_schema, ...): a typo'd key or a wrong
    type in a config or an override then stops the run at start-up."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=f"{name}_schema", node=schema)


def settings_help(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default as shown, help) for every setting of schema, sections flattened (train.lr)."""
    rows = []
    types = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(types[f.name]):  # a section: data, model, train
            rows += settings_help(types[f.name], f"{prefix}{f.name}.")
            continue
        shown = f.metadata.get("shown") or show_value(f.default)
        rows.append((prefix + f.name, shown, f.metadata.get("help", "")))
    return rows


def show_value(value: Any) -> str:
    """A default as --help and docs/settings.md write it: true/false, 0.003, 1e-05."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plain(markdown: str) -> str:
    """Help markdown as terminal text: no backticks, a link as its words."""
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", markdown).replace("`", "")


def help_text(usage: str, schema: type, groups: Optional[dict[str, list[str]]] = None) -> str:
    """usage, then every setting as `key=default` over its help (what --help prints)."""
    lines = [usage.strip(), ""]
    if groups:
        lines.append("config groups (each choice a file in charlm/configs/<group>/):")
        lines += [f"  {group}=  one of {', '.join(options)}" for group, options in groups.items()]
        lines.append("")
    rows = settings_help(schema)
    lines.append("settings (key=value; the default after =):" if rows else "settings: none")
    for key, default, text in rows:
        lines += [f"  {key}={_plain(default)}", f"      {_plain(text)}"]
    return "\n".join(lines)


def _group_choices(config_name: str) -> dict[str, list[str]]:
    groups = ("data", "recipe", "model") if config_name == "train" else ("data",) if config_name == "evaluate" else ()
    return {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml")) for g in groups}


def parse_settings(schema: type, argv: list[str], usage: str) -> Any:
    """`key=value` arguments as a schema instance, for the `python -m charlm.X` tools; None after
    printing the help for -h/--help. A bad argument raises CharlmError naming it."""
    prog = usage.strip().split(":")[0]
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(usage, schema))
        return None
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            raise CharlmError(f"{arg!r} is not a key=value setting; `{prog} --help` lists them")
    argv = [prog, *argv]
    raw = pop_raw_args(argv, path_keys(schema))  # file names: as typed, not read as YAML
    try:
        given = OmegaConf.from_dotlist(argv[1:])
    except OmegaConfBaseException as e:
        raise CharlmError(str(e).splitlines()[0]) from None
    return to_object(with_raw(given, raw), schema, prog)


def compose(config_name: str, argv: list[str], usage: str) -> Optional[DictConfig]:
    """The config argv asks for, composed once, with a bad override as a CharlmError in one line
    (not Hydra's page); None where argv holds Hydra's own flags (-m, --cfg, --hydra-help, ...),
    which @hydra.main then handles. -h/--help prints usage and every setting with its default and
    help, and exits."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    overrides = argv[1:]
    if any(a in ("-h", "--help") for a in overrides):
        print(help_text(usage, SCHEMAS[config_name], _group_choices(config_name)))
        sys.exit(0)
    register_schemas()
    if config_name == "train":
        _check_recipe_choices(overrides)
    if any(a.startswith("-") for a in overrides):
        return None  # Hydra's own flags: its parser and @hydra.main, not this one
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=overrides)
    except MissingConfigException as e:
        options = getattr(e, "options", None) or []
        missing = getattr(e, "missing_cfg_file", "") or str(e).splitlines()[0]
        group, _, name = str(missing).partition("/")
        raise CharlmError(f"{group}={name} is not a config; choose one of: {', '.join(options)}" if options
                          else str(e).splitlines()[0]) from None
    except HydraException as e:
        cause = e.__cause__
        key = getattr(cause, "full_key", None)
        if key and "not in" in str(cause):
            raise CharlmError(f"{key} is not a setting; `python {config_name}.py --help` lists them all") from None
        if key:
            raise CharlmError(f"{key}: {str(cause).splitlines()[0]}") from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CharlmError(" ".join(lines[:2]) + " (quote free text: key='a, b')") from None
    return cfg


def run_config(overrides: list[str]) -> RunConfig:
    """What `python train.py <overrides>` trains with (the corpus's recipe applied): for tools that
    time or describe a corpus's default model without restating its recipe."""
    return to_object(compose("train", ["train.py", *overrides], ""), RunConfig)


def _check_recipe_choices(overrides: list[str]) -> None:
    """recipe=... (and model=...) name files that must exist. charlm/configs/train.yaml marks recipe
    optional (a corpus without one takes the defaults), and Hydra skips a missing optional choice
    without a word, so a misspelt one is caught here (sweeps' a,b,c included)."""
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if sep and key == "train":
            raise CharlmError(f"{arg}: train holds settings (train.lr=...); a corpus's model and schedule are"
                              " chosen with recipe=<corpus>")
        if sep and key in ("recipe", "model"):
            options = sorted(p.stem for p in (CONFIG_DIR / key).glob("*.yaml"))
            for choice in value.split(","):
                if choice not in options:
                    raise CharlmError(f"{key}={choice} is not a config; choose one of: {', '.join(options)}")


def to_object(cfg: DictConfig, schema: type, prog: str = "") -> Any:
    """The composed config as plain dataclass instances (runs their validation); prog names the
    command whose --help lists the settings, for a key that is not one."""
    try:
        # Through a plain container: a schema-typed config would carry `+key=...` additions along.
        plain = OmegaConf.to_container(cfg, resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        if "Missing mandatory value" in msg and key:
            msg = f"{key} needs a value: add {key}=..."
        elif prog and key and " not in " in msg:
            msg = f"{key} is not a setting; `{prog} --help` lists them"
        elif key and key not in msg:
            msg = f"{key}: {msg}"
        raise CharlmError(msg) from None


def pop_raw_args(argv: list[str], keys: tuple[str, ...]) -> dict[str, str]:
    """Take `key=value` arguments for keys out of argv, values exactly as the shell passed them.

    Hydra's override grammar would reject or reinterpret free text and file names (commas,
    quotes, brackets, `=`, non-ASCII), so prompts and paths never go through it.
    """
    raw = {}
    for arg in list(argv[1:]):
        key, sep, value = arg.partition("=")
        if sep and key in keys:
            raw[key] = value
            argv.remove(arg)
    return raw


def literal(value: str) -> str:
    """value as OmegaConf will read it back unchanged: `${` is escaped, so no interpolation runs.

    >>> literal("a ${b}")
    'a \\\\${b}'
    """
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)


def with_raw(cfg: DictConfig, raw: dict[str, str]) -> DictConfig:
    """The composed config with the raw `key=value` arguments set, as plain strings."""
    for key, value in raw.items():
        OmegaConf.update(cfg, key, literal(value), merge=False)
    return cfg


def literal_tree(d: Any) -> Any:
    """A saved config (plain data) with every string made literal() for OmegaConf."""
    if isinstance(d, dict):
        return {k: literal_tree(v) for k, v in d.items()}
    if isinstance(d, list):
        return [literal_tree(v) for v in d]
    return literal(d) if isinstance(d, str) else d
