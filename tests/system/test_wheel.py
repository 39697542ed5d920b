"""charlm as users install it: a wheel, installed without -e into a fresh virtual environment,
used from an empty directory through its `charlm` command and `python -m charlm`."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.system
@pytest.mark.slow
def test_the_wheel_installs_and_trains_samples_and_evaluates_from_an_empty_directory(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("charlm-*.whl")
    venv = tmp_path / "venv"  # torch and the other dependencies come from this Python's site-packages
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python, charlm = venv / "bin" / "python", venv / "bin" / "charlm"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}

    def run(*command):
        proc = subprocess.run([str(c) for c in command], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    where = run(python, "-c", "import charlm, charlm.commands.settings as s; print(charlm.__file__, s.CONFIG_DIR)")
    assert str(venv) in where and str(ROOT) not in where  # the wheel's copy, configs inside it
    out = run(charlm, "train", "data=timemachine", "model.d_model=16", "model.n_layers=1", "train.batch_size=4",
              "train.seq_len=16", "train.max_steps=4", "train.eval_every=4", "out_dir=run")
    assert "done: 4 steps" in out
    assert run(charlm, "sample", "checkpoint=run", "prompt=the", "length=8", "seed=1").startswith("the")
    assert "bits/byte:" in run(python, "-m", "charlm", "evaluate", "checkpoint=run")
    assert sorted(p.name for p in work.iterdir()) == ["run"]  # nothing else written where it ran
