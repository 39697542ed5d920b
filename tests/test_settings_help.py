"""Each setting's help is written once (charlm/config.py): --help prints it, and the README's tables
of settings say the same words and the same defaults."""
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from test_configs import composed

from charlm.commands.settings import settings_help, show_value
from charlm.config import Config, EvaluateConfig, SampleConfig
from conftest import run_cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("data", "recipe", "model")


def readme_table(section: str) -> dict[str, tuple[str, str]]:
    """{key: (default, meaning)} of the first key | default | meaning table under ## section."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (.*?) \| (.*) \|$", body, flags=re.M)
    assert rows, f"no settings table under ## {section}"
    return {key: (default, meaning) for key, default, meaning in rows}


def flat(config, prefix=""):
    out = {}
    for key, value in asdict(config).items() if prefix == "" else config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def shown(value, help_default):
    return help_default if value is None else show_value(value)


@pytest.mark.parametrize("section,schema,skip", [
    ("Changing the configuration", Config, ("data.name",)),  # set by the data= row
    ("Sampling", SampleConfig, ()),
    ("Evaluating a text", EvaluateConfig, ("data.",)),  # the data keys are in the training table
])
def test_readme_tables_match_the_declared_help(section, schema, skip):
    table = readme_table(section)
    declared = {key: (default, text) for key, default, text in settings_help(schema)}
    wanted = {k for k in declared if not k.startswith(skip or ("\0",))}
    assert wanted - set(table) == set(), f"settings missing from the README's {section} table"
    assert set(table) - set(declared) - set(GROUPS) == set(), f"rows for settings that do not exist ({section})"
    for key in wanted:
        default, meaning = table[key]
        assert meaning == declared[key][1], f"{key}: the README and charlm/config.py give different help"
        first = default.split("; ")[0].replace("`", "")
        assert first == declared[key][0].replace("`", ""), f"{key}: README default {default!r}"


def test_training_table_gives_tiny_shakespeares_defaults_where_they_differ():
    """`a; b` in the default column: a for The Time Machine, b for data=tinyshakespeare."""
    table = readme_table("Changing the configuration")
    help_defaults = {key: default for key, default, _ in settings_help(Config)}
    tm, ts = flat(composed("train", [])), flat(composed("train", ["data=tinyshakespeare"]))
    for key in tm:
        if key in ("out_dir", "data.name"):
            continue
        cell = table[key][0].replace("`", "").split("; ")
        expect = [shown(tm[key], help_defaults[key])]
        if ts[key] != tm[key]:
            expect.append(shown(ts[key], help_defaults[key]))
        assert cell == expect, f"{key}: README says {table[key][0]!r}, the configs give {expect}"
    for group in GROUPS:
        for choice in table[group][0].replace("`", "").split("; "):
            assert choice == "none" or (CONFIGS / group / f"{choice}.yaml").is_file(), (group, choice)


@pytest.mark.parametrize("command", ["train.py", "sample.py", "evaluate.py"])
def test_help_lists_every_setting_with_its_help(tmp_path, command):
    out = run_cli(command, "--help", cwd=tmp_path).stdout
    schema = {"train.py": Config, "sample.py": SampleConfig, "evaluate.py": EvaluateConfig}[command]
    assert out.startswith(f"python {command}:")
    for key, default, text in settings_help(schema):
        assert f"  {key}={default.replace('`', '')}\n" in out, key
        assert re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text).replace("`", "") in out, key
