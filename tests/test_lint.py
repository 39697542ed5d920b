"""The code style is checked, not hoped for: ruff with the settings in pyproject.toml."""
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the test extras: pip install -e '.[test]'")
def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "charlm", "tests", "train.py", "sample.py",
                           "evaluate.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
