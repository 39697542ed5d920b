"""The code style is checked, not hoped for: ruff with the settings in pyproject.toml."""
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the test extras: pip install -e '.[test]'")
def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "charlm", "tests", "train.py", "sample.py",
                           "evaluate.py", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the test extras: pip install -e '.[test]'")
@pytest.mark.parametrize("debris", ["\n\n\n\n", "\n\n\n"], ids=["three blank lines", "blank lines at the end"])
def test_ruff_catches_runs_of_blank_lines(tmp_path, debris):
    """The debris the settings must catch: a run of blank lines inside a module, and at its end."""
    module = tmp_path / "debris.py"
    module.write_text('"""A module."""\n\nA = 1\n' + debris + ("B = 2\n" if debris.count("\n") == 4 else ""))
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--config", str(ROOT / "pyproject.toml"),
                           "--no-cache", "--output-format=concise", str(module)], capture_output=True, text=True)
    assert proc.returncode == 1 and ("blank lines" in proc.stdout or "newline" in proc.stdout), proc.stdout
