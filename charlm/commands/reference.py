"""python -m charlm.commands.reference: write docs/settings.md, every command's settings with their
defaults and help, from the one place they are declared (the dataclasses of charlm/config.py).

    python -m charlm.commands.reference [out=docs/settings.md]

A test fails when the file in the repository is not what this writes.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from charlm.commands.settings import run_config, settings_help, show_value
from charlm.config import BenchConfig, ConvertConfig, EvaluateConfig, ExportConfig, RunConfig, SampleConfig, setting
from charlm.files import output_file, write_file

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "settings.md"  # in a clone of the repository
COMMANDS = (  # (title, command line, schema, what the table leaves to another one)
    ("Training", "python train.py", RunConfig, ("data.name",)),
    ("Sampling", "python sample.py", SampleConfig, ()),
    ("Evaluating", "python evaluate.py", EvaluateConfig, ("data.",)),
    ("Exporting", "python -m charlm.export", ExportConfig, ()),
    ("Converting", "python -m charlm.convert", ConvertConfig, ()),
    ("Benchmarking", "python -m charlm.bench", BenchConfig, ()),
)
GROUPS = (  # train.py's config groups: (key, default, help)
    ("data", "timemachine", "the text: `timemachine`, `tinyshakespeare` (named corpora, checked by SHA-256), or"
     " `text` (your own file, with `data.path=`)"),
    ("recipe", "the corpus's own", "a corpus's tuned model and schedule (`charlm/configs/recipe/<corpus>.yaml`); taken"
     " automatically for `data=`, or chosen for another text"),
    ("model", "none", "a named size over the recipe's: `tiny` (128x2), `small` (256x2), `reference` (512x2)"),
)


@dataclass
class ReferenceConfig:
    """What `python -m charlm.commands.reference` runs."""

    out: Optional[str] = setting(None, "the file to write", shown="docs/settings.md", path=True)


def reference_text() -> str:
    """The whole of docs/settings.md."""
    lines = ["# Settings", "",
             "Every setting of every command, with its default and what it does: each is `key=value` on the",
             "command line, and `--help` prints the same list. This page is written by",
             "`python -m charlm.commands.reference` from `charlm/config.py`, where each setting is declared once.",
             ""]
    corpus_defaults = _corpus_defaults()
    for title, command, schema, skip in COMMANDS:
        lines += [f"## {title}: `{command}`", "", "| key | default | meaning |", "|---|---|---|"]
        if schema is RunConfig:
            lines += [f"| `{key}` | {_code(default)} | {text} |" for key, default, text in GROUPS]
        for key, default, text in settings_help(schema):
            if key.startswith(skip or ("\0",)):
                continue
            shown = corpus_defaults.get(key, _code(default)) if schema is RunConfig else _code(default)
            lines.append(f"| `{key}` | {shown} | {text} |")
        if schema is RunConfig:
            lines += ["", "Where two defaults are given (`a; b`), the first is The Time Machine's and the"
                      " second Tiny Shakespeare's (`data=tinyshakespeare` takes"
                      " `charlm/configs/recipe/tinyshakespeare.yaml`)."]
        lines.append("")
    return "\n".join(lines)


def _corpus_defaults() -> dict[str, str]:
    """`a; b` for each training setting whose default Tiny Shakespeare's recipe changes."""
    timemachine, shakespeare = _flat(run_config([])), _flat(run_config(["data=tinyshakespeare"]))
    return {key: f"{_code(show_value(value))}; {_code(show_value(shakespeare[key]))}"
            for key, value in timemachine.items() if shakespeare[key] != value and key not in ("out_dir", "data.name")}


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in (asdict(config) if not prefix else config).items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _code(default: str) -> str:
    """A default as the tables show it: `0.003`, none, or the help's own words."""
    if default in ("none", "empty", "required") or "`" in default or " " in default:
        return default
    return f"`{default}`"


def main(argv: list[str]) -> int:
    """Write the reference; the exit status."""
    from charlm.commands import run_tool

    def write(cfg: ReferenceConfig) -> None:
        out = output_file(cfg.out or DEFAULT_OUT, "out", "settings.md")
        write_file(out, reference_text().encode("utf-8"), "out")
        print(f"wrote {out}")

    return run_tool(ReferenceConfig, argv, __doc__, write)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
