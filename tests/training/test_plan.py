"""One plan per run (charlm.plan): every choice of code made once, printed in the run header,
recorded in config.yaml and the checkpoint, replayed on resume, forced by settings; and the same
command gives the same weights in this process, in another, and across a SIGTERM and a resume
while the second core is busy.

CHARLM_TEST_PLANS=all runs the same-command test for every plan part this machine can vary, one
part at a time (CI does); by default it runs auto's plan."""
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from charlm import cpu
from charlm import plan as plans
from charlm.checkpoint import load_checkpoint, save_checkpoint
from charlm.config import PlanConfig
from charlm.model import matmuls
from helpers import ROOT, TINY, run_cli, scalars, small_text

RUN = ("data=text", "data.path=notes.txt", *TINY, "model.n_layers=2")


@pytest.fixture
def work(tmp_path):
    (tmp_path / "notes.txt").write_text(small_text(), encoding="utf-8")
    return tmp_path


def header_plan(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("plan: "))


def test_the_plan_is_printed_recorded_and_replayed_on_resume(work):
    first = run_cli("train.py", *RUN, "train.max_steps=4", "train.eval_every=2", "out_dir=run", cwd=work)
    plan, _, _ = plans.resolve(PlanConfig(), "cpu", "fp32")
    assert header_plan(first.stdout) == f"plan: {plan.line()}"
    assert yaml.safe_load((work / "run" / "config.yaml").read_text())["plan"] == dataclasses.asdict(plan)
    assert load_checkpoint(work / "run" / "last.pt")["plan"] == dataclasses.asdict(plan)
    again = run_cli("train.py", "train.resume=run", "train.max_steps=6", cwd=work)
    assert header_plan(again.stdout) == f"plan: {plan.line()}" and "cannot run" not in again.stdout


def test_a_part_set_on_the_command_line_runs_is_saved_and_stays_on_resume(work):
    first = run_cli("train.py", *RUN, "plan.kernels=off", "plan.table=off", "train.max_steps=4",
                    "train.eval_every=2", "out_dir=run", cwd=work)
    assert " kernels=off " in header_plan(first.stdout) and " table=off " in header_plan(first.stdout)
    saved = load_checkpoint(work / "run" / "last.pt")
    assert saved["plan"]["kernels"] == "off" and saved["config"]["plan"]["kernels"] == "off"
    again = run_cli("train.py", "train.resume=run", "train.max_steps=6", cwd=work)
    assert " kernels=off " in header_plan(again.stdout)


def _saved_with_plan(work: Path, **parts) -> None:
    """run/last.pt as if its run had planned these parts (a checkpoint from another machine)."""
    path = work / "run" / "last.pt"
    state = load_checkpoint(path)
    state.pop("format"), state.pop("version")
    state["plan"] = {**state["plan"], **parts}
    save_checkpoint(path, state)


def test_a_resume_replays_the_saved_plan_where_auto_would_choose_otherwise(work):
    run_cli("train.py", *RUN, "train.max_steps=4", "train.eval_every=2", "out_dir=run", cwd=work)
    _saved_with_plan(work, kernels="off", table="off", threads=1)  # other than auto's (off compiles nothing)
    again = run_cli("train.py", "train.resume=run", "train.max_steps=6", cwd=work)
    assert " kernels=off " in header_plan(again.stdout) and " table=off " in header_plan(again.stdout)
    assert header_plan(again.stdout).endswith(" threads=1")
    assert load_checkpoint(work / "run" / "last.pt")["plan"]["kernels"] == "off"


def test_a_saved_plan_this_machine_cannot_run_says_what_runs_instead(work):
    foreign = next((b for b in cpu.BUILDS if b not in cpu.runnable_builds()), None)
    if foreign is None:
        pytest.skip("this CPU runs every kernel build")
    run_cli("train.py", *RUN, "train.max_steps=4", "train.eval_every=2", "out_dir=run", cwd=work)
    _saved_with_plan(work, kernels=foreign)
    again = run_cli("train.py", "train.resume=run", "train.max_steps=6", cwd=work)
    auto = plans.auto_kernels()[0]
    assert (f"plan: this machine cannot run the checkpoint's kernels={foreign} (this CPU runs the builds "
            f"{', '.join(cpu.runnable_builds())}; kernels={auto} runs instead): the weights will not equal"
            " those of a run in one go bit for bit") in again.stdout
    assert f" kernels={auto} " in header_plan(again.stdout)


def test_a_part_this_machine_cannot_run_is_one_line(work):
    foreign = next((b for b in cpu.BUILDS if b not in cpu.runnable_builds()), None)
    args = (f"plan.kernels={foreign}",) if foreign else ("plan.kernels=off", "plan.weight_grads=charlm")
    proc = run_cli("train.py", *RUN, *args, "out_dir=run", cwd=work, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {args[-1]} cannot run here: ")
    assert not (work / "run").exists()  # refused before anything was written
    typo = run_cli("train.py", *RUN, "plan.kernels=avx9", cwd=work, check=False)
    names = ["auto", "off", *cpu.BUILDS]  # the settings' choices are the builds charlm.cpu knows
    assert typo.returncode == 1 and f"plan.kernels must be {', '.join(names[:-1])} or {names[-1]}" in typo.stderr


# --- the same command, the same weights ----------------------------------------------------------

SAME = ("data=text", "data.path=notes.txt", "model.d_model=32", "model.n_layers=2", "model.dropout=0.2",
        "train.batch_size=8", "train.seq_len=16", "train.warmup_steps=5", "train.log_every=10",
        "train.sample_length=10")
CELLS = ("reset_after", "reset_before", "lstm")


def plan_variants() -> list[tuple[str, ...]]:
    """auto's plan, and with CHARLM_TEST_PLANS=all each part this machine can vary, one at a time."""
    variants: list[tuple[str, ...]] = [()]
    if os.environ.get("CHARLM_TEST_PLANS") != "all":
        return variants
    auto = plans.current()
    variants += [(f"plan.kernels={b}",) for b in [*cpu.runnable_builds(), "off"] if b != auto.kernels]
    if matmuls.onednn_matmul() is not None:
        variants.append(("plan.matmul=torch" if auto.matmul == "onednn" else "plan.matmul=onednn",))
    if auto.kernels in cpu.AVX512_BUILDS:
        variants.append(("plan.weight_grads=library" if auto.weight_grads == "charlm" else "plan.weight_grads=charlm",))
    variants += [("train.precision=bf16" if auto.precision == "fp32" else "train.precision=fp32",),
                 ("plan.lstm=pytorch",), ("model.embed_dropout=false", "plan.table=off"), ("plan.threads=1",)]
    return variants


def _weights(run: Path) -> dict:
    state = load_checkpoint(run / "last.pt")
    return {**state["model"], "hidden": state["hidden"]}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{a.name} and {b.name} differ in {differ}"


DRIVER = textwrap.dedent("""
    # runs train.py once for each line of arguments on stdin, in this one process, as a user would
    import runpy, shlex, sys
    for line in sys.stdin.read().splitlines():
        sys.argv = ["train.py", *shlex.split(line)]
        try:
            runpy.run_path({train!r}, run_name="__main__")
        except SystemExit as e:
            print("exit", e.code, flush=True)
""")


def train_in_a_new_process(work: Path, name: str, commands: list[tuple[str, ...]]) -> subprocess.Popen:
    """One fresh interpreter that runs `python train.py ARGS` for each command in turn; its output
    goes to work/name.out (a pipe nobody reads at once would fill and stop it)."""
    import shlex

    (work / f"{name}.in").write_text("\n".join(" ".join(shlex.quote(a) for a in c) for c in commands))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(work / f"{name}.in") as stdin, open(work / f"{name}.out", "w") as out:
        return subprocess.Popen([sys.executable, "-c", DRIVER.format(train=str(ROOT / "train.py"))], cwd=work,
                                env=env, stdin=stdin, stdout=out, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen, work: Path, name: str) -> str:
    proc.wait(timeout=300)
    return (work / f"{name}.out").read_text()


@contextlib.contextmanager
def busy_core():
    """Another process keeping a core busy (the load that once changed the code a run chose)."""
    spin = "import time\nend = time.time() + 300\nwhile time.time() < end: pass"
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.system
@pytest.mark.slow  # about half a minute on two cores: `-m slow` and CI's plan step run it
@pytest.mark.parametrize("variant", plan_variants(), ids=lambda v: " ".join(v) or "auto")
def test_the_same_command_gives_the_same_weights_in_any_process_and_across_a_resume(work, variant):
    """For both GRU cells and the LSTM, with dropout: the same command run in this process, in two
    new processes, and stopped by SIGTERM and resumed while another process keeps a core busy,
    ends with equal weights, carried state and TensorBoard curves. 11% of the text is 18 windows
    of 8x16: the 40 steps cross two epochs' starts."""
    steps = ("train.max_steps=40", "train.eval_every=10", "data.train_frac=0.11")
    command = {cell: (*SAME, f"model.cell={cell}", *variant, *steps) for cell in CELLS}
    with busy_core():  # one new process: the three runs stopped, then the three in one go
        stopped = train_in_a_new_process(work, "stopped", [(*command[c], f"out_dir=stopped_{c}") for c in CELLS]
                                         + [(*command[c], f"out_dir=new1_{c}") for c in CELLS])
        for cell in CELLS:  # stop each run after its first checkpoint; the process goes on to the next
            last, end = work / f"stopped_{cell}" / "last.pt", time.time() + 120
            while not last.exists():
                assert stopped.poll() is None, (work / "stopped.out").read_text()
                assert time.time() < end, f"{last} never appeared"
                time.sleep(0.01)
            stopped.send_signal(signal.SIGTERM)
        out = finished(stopped, work, "stopped")
        assert out.count("\nexit 143\n") == len(CELLS), out[-3000:]  # each stopped by the signal, with its code
        assert out.count("done: 40 steps") == len(CELLS), out[-3000:]
        assert "resume with:  python train.py train.resume=stopped_lstm" in out
        for cell in CELLS:
            at = load_checkpoint(work / f"stopped_{cell}" / "last.pt")["step"]
            assert 10 <= at < 40, at
            resumed = run_cli("train.py", f"train.resume=stopped_{cell}", cwd=work)
            assert f"resumed from step {at}" in resumed.stdout and "cannot run" not in resumed.stdout
    out = finished(train_in_a_new_process(work, "new2", [(*command[c], f"out_dir=new2_{c}") for c in CELLS]),
                   work, "new2")  # and another new process
    assert out.count("done: 40 steps") == len(CELLS) and "\nexit " not in out, out[-3000:]
    for cell in CELLS:
        run_cli("train.py", *command[cell], f"out_dir=here_{cell}", cwd=work)
        for other in (f"new1_{cell}", f"new2_{cell}", f"stopped_{cell}"):
            assert_same_weights(work / f"here_{cell}", work / other)
        for tag in ("train/loss", "val/loss"):  # the resumed run's curves: no step twice, the same values
            one, two = scalars(work / f"here_{cell}", tag), scalars(work / f"stopped_{cell}", tag)
            assert [s for s, _ in two] == sorted(set(s for s, _ in two)) and one == two
