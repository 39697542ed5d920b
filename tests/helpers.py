"""What the test modules share (no test module imports another): the project's paths, a small
corpus, the command runner, tiny settings, models, and waiting on real processes. Fixtures are in
conftest.py."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from charlm import cpu
from charlm import plan as plans
from charlm.config import ModelConfig
from charlm.model.network import CharLM

ROOT = Path(__file__).resolve().parents[1]
# The reference corpora live beside the project (../shared/data); tests never download them.
SHARED_DATA = Path(os.environ.get("CHARLM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def small_text() -> str:
    """About 20 KB of varied, learnable text (ASCII and a little UTF-8)."""
    lines = [
        f"the {a} {b} crossed the {c} at {n} o'clock; café déjà vu.\n"
        for n, (a, b, c) in enumerate(
            [(a, b, c) for a in ("grey", "swift", "old") for b in ("traveller", "machine", "fox")
             for c in ("river", "hall", "lawn")] * 12
        )
    ]
    return "".join(lines)


def run_cli(script: str, *args: str, cwd: Path, check: bool = True, in_process: bool = True,
            stdin: str = "") -> subprocess.CompletedProcess:
    """Run train.py / sample.py / evaluate.py / `-m charlm.X` as a user would, from cwd: the finished
    command's exit status and output.

    By default in this process: the same entry point (runpy runs the script as __main__), without a
    new interpreter's start-up for every command. In a process of its own where a test needs one
    (in_process=False) or where Hydra's own flags (-m sweeps, --cfg) are given. stdin: what is typed
    into it, through a pipe (not a terminal).
    """
    own_args = args[1:] if script == "-m" else args
    if in_process and not any(a.startswith("-") and a not in ("-h", "--help") for a in own_args):
        proc = _run_here(script, args, cwd, stdin)
    else:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, *([script] if script == "-m" else [str(ROOT / script)]), *args]
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8",
                              timeout=300, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _run_here(script: str, args: tuple[str, ...], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    """The command as __main__ in this process, with its own argv, working directory, input and output."""
    out, err = io.StringIO(), io.StringIO()
    argv = [*args] if script == "-m" else [str(ROOT / script), *args]
    saved_argv, saved_cwd, saved_stdin, status = sys.argv, os.getcwd(), sys.stdin, 0
    try:
        sys.argv = list(argv)
        sys.stdin = io.StringIO(stdin)  # a pipe: not a terminal
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if script == "-m":
                    runpy.run_module(args[0], run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.stdin = saved_argv, saved_stdin
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The command failed with exactly one line on stderr, no traceback, and that line has words."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + (proc.stdout or ""), proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def copy_run(run: Path, work: Path, name: str) -> Path:
    """A copy of a trained run as work/name, with its text (notes.txt) beside it in work."""
    shutil.copytree(run, work / name)
    if not (work / "notes.txt").exists():
        shutil.copy(run.parent / "notes.txt", work / "notes.txt")
    return work / name


TINY = ("model.d_model=32", "model.n_layers=1", "train.batch_size=8", "train.seq_len=32", "train.precision=fp32",
        "train.log_every=5", "train.sample_length=20", "train.warmup_steps=5")


def builds_under_test() -> list[str]:
    """The kernel builds the kernel tests check: auto's build here, or every build this CPU runs
    with CHARLM_TEST_BUILDS=all (CI), or the builds named (CHARLM_TEST_BUILDS=portable,avx2)."""
    wanted = os.environ.get("CHARLM_TEST_BUILDS", "")
    if wanted == "all":
        return cpu.runnable_builds()
    if wanted:
        return wanted.split(",")
    build = plans.auto_kernels()[0]
    return [build] if build != "off" else []


def with_plan(**parts):
    """The plan in use with some parts forced (kernels="off", matmul="onednn", ...): how a test
    chooses a path, as plan.<part>= does on the command line."""
    return plans.use(dataclasses.replace(plans.current(), **parts))


def small_model(**kw) -> CharLM:
    torch.manual_seed(0)
    return CharLM(ModelConfig(d_model=kw.get("d", 16), n_layers=kw.get("layers", 2), dropout=0.0)).eval()


def random_model(cell: str, d: int = 12, layers: int = 2) -> CharLM:
    torch.manual_seed(0)
    model = CharLM(ModelConfig(d_model=d, n_layers=layers, cell=cell)).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the default init: gates far from 0.5
            p.normal_(0, 0.8)
    return model


def numpy_params(model: CharLM) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def random_keras_weights(d, layers, reset_after, seed=0):
    rng = np.random.default_rng(seed)
    w = [rng.normal(0, 0.5, (256, d))]
    for _ in range(layers):
        w += [rng.normal(0, 0.5, (d, 3 * d)), rng.normal(0, 0.5, (d, 3 * d)),
              rng.normal(0, 0.5, (2, 3 * d) if reset_after else (3 * d,))]
    return [a.astype(np.float32) for a in w + [rng.normal(0, 0.5, (d, 256)), rng.normal(0, 0.5, 256)]]


def start_training(cwd: Path, *args: str, stdout: int = subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            stdout=stdout, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


def scalars(run_dir: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # file by file, in the order they were written: a resumed run's file can sort first by name
    # (names hold the second it started and the pid, and a test resumes within the same second)
    events = []
    for path in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            events += acc.Scalars(tag)
    return [(e.step, e.value) for e in sorted(events, key=lambda e: e.wall_time)]
