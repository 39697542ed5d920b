"""Each setting's help is written once (charlm/config.py): --help prints it, docs/settings.md is
generated from it, and every command line the README and docs/ show uses settings that exist."""
import re

import pytest

from charlm.commands.reference import DEFAULT_OUT, ReferenceConfig, reference_text
from charlm.commands.settings import path_keys, settings_help
from charlm.config import (
    BenchConfig,
    ConvertConfig,
    DoctorConfig,
    EvaluateConfig,
    ExportConfig,
    RunConfig,
    SampleConfig,
)
from helpers import ROOT, run_cli

SCHEMAS = {"train.py": RunConfig, "sample.py": SampleConfig, "evaluate.py": EvaluateConfig,
           "charlm.export": ExportConfig, "charlm.convert": ConvertConfig, "charlm.bench": BenchConfig,
           "charlm.doctor": DoctorConfig, "charlm.commands.reference": ReferenceConfig}
GROUPS = {"train.py": ("data", "recipe", "model"), "evaluate.py": ("data",)}
PAGES = [(ROOT / "README.md").resolve(), *sorted(p.resolve() for p in (ROOT / "docs").glob("*.md"))]


def test_the_settings_reference_is_what_the_code_declares():
    assert DEFAULT_OUT.read_text(encoding="utf-8") == reference_text(), (
        "docs/settings.md is out of date: run python -m charlm.commands.reference")


def command_lines(text: str) -> list[str]:
    """Every `python train.py ...`, `python -m charlm.X ...` line of a page's code."""
    code = "\n".join(re.findall(r"^(?: {4}|\t)(.*)$", text, re.M) + re.findall(r"`([^`\n]+)`", text))
    command = r"((?:train|sample|evaluate)\.py|charlm(?:\.\w+)+)"
    return re.findall(r"python (?:-m )?(?:torch\.distributed\.run [^\n]*?)?" + command + r"((?: [^\s#|`]+)*)", code)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_line_in_the_docs_uses_settings_that_exist(page):
    lines = command_lines(page.read_text(encoding="utf-8"))
    for command, args in lines:
        schema = SCHEMAS[command]
        keys = {key for key, _, _ in settings_help(schema)} | set(path_keys(schema)) | set(GROUPS.get(command, ()))
        for arg in args.split():
            key, sep, _ = arg.lstrip("+~").partition("=")
            if not sep or arg.startswith("-") or key.startswith(("hydra.", '"', "'")):
                continue
            assert key in keys, f"{page.name}: `{command} ... {arg}`: {key} is not a setting of {command}"


@pytest.mark.parametrize("command", ["train.py", "sample.py", "evaluate.py"])
def test_help_lists_every_setting_with_its_help(tmp_path, command):
    out = run_cli(command, "--help", cwd=tmp_path).stdout
    schema = SCHEMAS[command]
    assert out.startswith(f"python {command} (or: charlm {command[:-3]}):")
    for key, default, text in settings_help(schema):
        assert f"  {key}={default.replace('`', '')}\n" in out, key
        assert re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text).replace("`", "") in out, key


def slug(title: str) -> str:
    """A heading's anchor, as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", title.lower().strip()).replace(" ", "-")


def test_every_link_in_the_docs_leads_somewhere():
    anchors = {page: {slug(h) for h in re.findall(r"(?m)^#+ (.+)$", page.read_text(encoding="utf-8"))}
               for page in PAGES}
    for page in PAGES:
        for words, target in re.findall(r"\[([^\]]+)\]\(([^)]+)\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.name}: [{words}]({target}) names no file"
            if anchor and path.suffix == ".md":
                assert anchor in anchors[path], f"{page.name}: [{words}]({target}) names no heading"
