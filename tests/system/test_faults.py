"""Nothing lost, whatever the disk, the file name, a second command, a crash or a kill does: run
directories are owned, write failures end in one line with the earlier checkpoints intact, any
file name works, a kill -9 at any moment leaves loadable checkpoints, a stop resumes bit for bit,
and a non-finite loss stops or is skipped as asked."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from charlm.checkpoint import load_checkpoint
from charlm.errors import CharlmError
from charlm.files import atomic_write
from charlm.training.rundir import LOCK_NAME, RunLock
from helpers import ROOT, TINY, one_error_line, run_cli, scalars, small_text, start_training, wait_for

ARGS = ("data=text", "data.path=notes.txt", *TINY)
ODD = "Wells' \"Time\" (1895), a=b <i>&amp; é"  # a quote, a parenthesis, a comma, =, markup, non-ASCII


def steps_held(run: Path) -> dict:
    """Each checkpoint's step, loading it (so: it still loads)."""
    return {name: load_checkpoint(run / name)["step"] for name in ("last.pt", "best.pt")}


def leftovers(run: Path) -> list:
    return sorted(p.name for p in run.glob("*.tmp"))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text(small_text(), encoding="utf-8")
    return tmp_path


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 3 MB file system of its own (tmpfs), to fill up or make read-only; skips where it cannot mount."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Fill disk until fewer than `leave` bytes are free."""
    with open(disk / "filler", "wb") as f:
        try:
            while shutil.disk_usage(disk).free > leave:
                f.write(b"\0" * min(65536, max(4096, shutil.disk_usage(disk).free - leave)))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


# --- run directories are owned ---------------------------------------------------------------


def test_a_new_run_refuses_a_directory_that_holds_a_run(work):
    run_cli("train.py", *ARGS, "train.max_steps=6", "train.eval_every=3", "out_dir=run", cwd=work)
    before = (work / "run" / "best.pt").read_bytes()
    again = run_cli("train.py", *ARGS, "train.max_steps=6", "train.eval_every=3", "out_dir=run", cwd=work, check=False)
    one_error_line(again, "out_dir=run already holds a run", "train.resume=run", "overwrite=true")
    assert (work / "run" / "best.pt").read_bytes() == before
    assert len(list((work / "run").glob("events.out.tfevents.*"))) == 1  # no second run's curves mixed in

    over = run_cli("train.py", *ARGS, "train.max_steps=3", "train.eval_every=3", "out_dir=run", "overwrite=true",
                   cwd=work)
    assert "done: 3 steps" in over.stdout and steps_held(work / "run") == {"last.pt": 3, "best.pt": 3}
    assert len(list((work / "run").glob("events.out.tfevents.*"))) == 1  # the old curves went with the old run


def test_overwrite_deletes_nothing_when_the_new_run_cannot_start(work):
    run_cli("train.py", *ARGS, "train.max_steps=3", "train.eval_every=3", "out_dir=run", cwd=work)
    bad = run_cli("train.py", *ARGS, "data.path=missing.txt", "out_dir=run", "overwrite=true", cwd=work, check=False)
    one_error_line(bad, "missing.txt")
    assert steps_held(work / "run") == {"last.pt": 3, "best.pt": 3}


@pytest.mark.system
@pytest.mark.slow
def test_a_second_writer_is_refused_while_readers_are_not(work):
    first = start_training(work, *ARGS, "train.max_steps=100000", "train.eval_every=20", "out_dir=live",
                           stdout=subprocess.DEVNULL)
    try:
        wait_for(work / "live" / "last.pt", first)
        second = run_cli("train.py", *ARGS, "train.resume=live", cwd=work, check=False)
        one_error_line(second, "out_dir=live is being written by another training run", f"pid {first.pid}",
                       "train.py")
        fresh = run_cli("train.py", *ARGS, "out_dir=live", cwd=work, check=False)  # not even a fresh start
        one_error_line(fresh, f"pid {first.pid}")
        read = run_cli("sample.py", "checkpoint=live", "prompt=the", "length=5", "seed=1", cwd=work)
        assert read.stdout.startswith("the")
        scored = run_cli("evaluate.py", "checkpoint=live", "data=text", "data.path=notes.txt", "format=json",
                         cwd=work)
        assert json.loads(scored.stdout)["bytes"] > 0
        assert first.poll() is None  # the first run trains on, untouched
    finally:
        first.send_signal(signal.SIGKILL)  # kill -9: the OS drops the lock with the process
        first.communicate(timeout=60)
    resumed = run_cli("train.py", "train.resume=live", "train.max_steps=1", cwd=work, check=False)
    assert "resumed from step" in resumed.stdout, resumed.stderr


def test_the_lock_names_its_holder_and_is_free_once_released(tmp_path):
    run = tmp_path / "run"
    held = RunLock(run).acquire()
    with pytest.raises(CharlmError, match=f"pid {os.getpid()} on "):
        RunLock(run).acquire()
    (run / "config.yaml").write_text("x")  # the run wrote something: its directory stays
    held.release()
    RunLock(run).acquire().release()
    assert (run / LOCK_NAME).read_text() == ""  # no stale holder named afterwards
    RunLock(tmp_path / "a" / "b").acquire().release()
    assert not (tmp_path / "a").exists()  # a run that wrote nothing leaves nothing behind


# --- write failures: one line, nothing lost ---------------------------------------------------


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, tiny_disk):
    target = tiny_disk / "last.pt"
    atomic_write(target, b"old")
    fill(tiny_disk)
    with pytest.raises(OSError) as e:
        atomic_write(target, b"x" * 1_000_000)
    assert e.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and leftovers(tiny_disk) == []


def test_a_resume_on_a_full_disk_stops_in_one_line(work, tiny_disk):
    run = tiny_disk / "run"
    run_cli("train.py", *ARGS, "train.max_steps=6", "train.eval_every=3", f"out_dir={run}", cwd=work)
    fill(tiny_disk)
    full = run_cli("train.py", f"train.resume={run}", "train.max_steps=12", cwd=work, check=False)
    one_error_line(full, "could not write", "No space left on device", "free some disk space")
    assert steps_held(run) == {"last.pt": 6, "best.pt": 6} and leftovers(run) == []


def test_a_disk_that_fills_during_a_run_stops_at_a_checkpoint_in_one_line(work, tiny_disk):
    run = tiny_disk / "run"
    run_cli("train.py", *ARGS, "train.max_steps=6", "train.eval_every=3", f"out_dir={run}", cwd=work)
    fill(tiny_disk, leave=(run / "last.pt").stat().st_size // 2)  # room for config.yaml and events, not a checkpoint
    full = run_cli("train.py", f"train.resume={run}", "train.max_steps=30", cwd=work, check=False)
    line = one_error_line(full, "could not write", ".pt (No space left on device)", "training stopped at step 9",
                          f"train.resume={run}")
    held = steps_held(run)
    assert held == {"last.pt": 6, "best.pt": 6} and "last.pt holds step 6, best.pt step 6" in line
    assert leftovers(run) == []


def test_a_read_only_run_directory_stops_in_one_line(work, tiny_disk):
    run = tiny_disk / "run"
    run_cli("train.py", *ARGS, "train.max_steps=6", "train.eval_every=3", f"out_dir={run}", cwd=work)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    resumed = run_cli("train.py", f"train.resume={run}", "train.max_steps=12", cwd=work, check=False)
    one_error_line(resumed, f"out_dir={run}", "Read-only file system")
    new = run_cli("train.py", *ARGS, f"out_dir={tiny_disk / 'other'}", cwd=work, check=False)
    one_error_line(new, "Read-only file system")
    assert steps_held(run) == {"last.pt": 6, "best.pt": 6}


def test_an_unwritable_directory_stops_in_one_line(work):
    """The same without root's powers: a directory the user may not write (skipped as root, who may)."""
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; the read-only mount above covers this as root")
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    new = run_cli("train.py", *ARGS, f"out_dir={locked / 'run'}", cwd=work, check=False)
    one_error_line(new, "Permission denied")


@pytest.mark.system
@pytest.mark.slow
def test_a_run_directory_removed_during_training_stops_in_one_line(work):
    proc = start_training(work, *ARGS, "train.max_steps=100000", "train.eval_every=3", "out_dir=gone",
                          stdout=subprocess.DEVNULL)
    wait_for(work / "gone" / "last.pt", proc)
    os.rename(work / "gone", work / "moved")  # the directory vanishes from under the run
    out, err = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    one_error_line(done, "could not write gone/", "No such file or directory", "put it back, then resume with",
                   "gone holds no checkpoint")
    assert load_checkpoint(work / "moved" / "last.pt")["step"] >= 3 and leftovers(work / "moved") == []


def test_tensorboard_alone_failing_warns_once_and_training_goes_on(work, monkeypatch):
    """A writer that fails (as TensorBoard's does on a full disk) costs the curves, not the run."""
    from torch.utils.tensorboard import SummaryWriter

    from charlm.commands import train_report as report

    class FailingWriter(SummaryWriter):
        def add_scalar(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "_open_writer", lambda out_dir, resumed_at: FailingWriter(str(out_dir)))
    from charlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from charlm.training.loop import train

    cfg = RunConfig(data=DataConfig(name="text", path=str(work / "notes.txt")),
                    model=ModelConfig(d_model=16, n_layers=1),
                    train=TrainConfig(batch_size=4, seq_len=16, max_steps=6, eval_every=3, log_every=2,
                                      precision="fp32", warmup_steps=1, sample_length=5), out_dir=str(work / "run"))
    lines = []
    monkeypatch.setattr(report.TrainReport, "say", lambda self, message: lines.append(message))
    summary = train(cfg, work / "run", report=report.TrainReport())
    assert summary["steps"] == 6 and steps_held(work / "run") == {"last.pt": 6, "best.pt": 6}
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "checkpoints go on" in warnings[0]


# --- any file name works ----------------------------------------------------------------------


def test_any_file_name_works_on_every_command(work):
    text = work / f"{ODD}.txt"
    text.write_text(small_text(), encoding="utf-8")
    prompt = work / f"prompt {ODD}.txt"
    prompt.write_text("the grey", encoding="utf-8")
    run, tuned = f"runs/{ODD}", f"runs/tuned {ODD}"
    trained = run_cli("train.py", "data=text", f"data.path={text.name}", *TINY, "train.max_steps=6",
                      "train.eval_every=3", f"out_dir={run}", cwd=work)
    assert load_checkpoint(work / run / "last.pt")["config"]["data"]["path"] == text.name
    # the summary's sample command, pasted into a shell as a user would, works
    line = next(line for line in trained.stdout.splitlines() if line.startswith("sample:"))
    command = line.removeprefix("sample:").strip().replace("python sample.py", f"{sys.executable} {ROOT / 'sample.py'}")
    pasted = subprocess.run(["bash", "-c", command.replace("length=200", "length=5")], cwd=work, capture_output=True,
                            text=True)
    assert pasted.returncode == 0 and pasted.stdout.startswith("t"), pasted.stderr
    resumed = run_cli("train.py", f"train.resume={run}", f"data.path={text.name}", "train.max_steps=9", cwd=work)
    assert "resumed from step 6" in resumed.stdout and load_checkpoint(work / run / "last.pt")["step"] == 9
    run_cli("train.py", "data=text", f"data.path={text.name}", *TINY, "train.max_steps=3", "train.eval_every=3",
            f"train.init_from={run}", f"out_dir={tuned}", cwd=work)
    assert load_checkpoint(work / tuned / "last.pt")["config"]["train"]["init_from"].endswith(ODD + "/best.pt")
    wrote = run_cli("sample.py", f"checkpoint={tuned}", f"prompt_file={prompt.name}", "length=5", cwd=work)
    assert wrote.stdout.startswith("the grey")
    scored = run_cli("evaluate.py", f"checkpoint={run}", "data=text", f"data.path={text.name}",
                     f"html={ODD}.html", "format=json", cwd=work)
    assert json.loads(scored.stdout)["html"] == f"{ODD}.html" and (work / f"{ODD}.html").is_file()


def test_any_file_name_works_for_the_module_tools(work, monkeypatch):
    """python -m charlm.export / convert read checkpoint=, out= and weights= as typed, not as YAML."""
    from charlm.commands.convert import main as convert_main
    from charlm.commands.export import main as export_main

    run_cli("train.py", *ARGS, "train.max_steps=3", f"out_dir={ODD}", cwd=work)
    monkeypatch.chdir(work)
    weights = f"{ODD}: weights.npz"  # ": " would make YAML read a mapping
    export_main([f"checkpoint={ODD}", "format=keras", f"out={weights}"])
    assert (work / weights).is_file()
    convert_main(["format=keras", f"weights={weights}", f"out={ODD}.pt", "reset_after=true"])
    assert load_checkpoint(work / f"{ODD}.pt")["model_config"]["d_model"] == 32


# --- crashes, kills and non-finite losses (lose nothing) ----------------------------------------

DROPOUT_ARGS = ("data=text", "data.path=notes.txt", *TINY, "model.n_layers=2", "model.dropout=0.1")


def model_tensors(path: Path) -> dict:
    return load_checkpoint(path)["model"]


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.parametrize("batching", ["random"])  # stream batching: tests/test_plan.py, for every cell
def test_stop_and_resume_is_bit_exact(tmp_path, text_file, batching):
    # a quarter of the text is 19 windows of 8x32: the 40 steps cross two epochs' starts
    args = (*DROPOUT_ARGS, f"data.path={text_file}", f"train.batching={batching}", "train.max_steps=40",
            "train.eval_every=10", "data.train_frac=0.25")
    run_cli("train.py", *args, "out_dir=one_go", cwd=tmp_path)

    proc = start_training(tmp_path, *args, "out_dir=halves")
    wait_for(tmp_path / "halves" / "last.pt", proc)  # past step 10: stop somewhere after it
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "resume with:  python train.py train.resume=halves" in out
    stopped_at = load_checkpoint(tmp_path / "halves" / "last.pt")["step"]
    assert 10 <= stopped_at < 40
    run_cli("train.py", "train.resume=halves", cwd=tmp_path)

    a, b = model_tensors(tmp_path / "one_go" / "last.pt"), model_tensors(tmp_path / "halves" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for tag in ("train/loss", "val/loss"):
        one, two = scalars(tmp_path / "one_go", tag), scalars(tmp_path / "halves", tag)
        assert [s for s, _ in two] == sorted(set(s for s, _ in two))  # no duplicated steps
        assert one == two


@pytest.mark.system
@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_loadable_checkpoints(tmp_path, text_file):
    """Kill a real run at several points (checkpoints are written every step, so some kills land
    inside a write); every time both files load and the run resumes."""
    args = (*DROPOUT_ARGS, f"data.path={text_file}", "train.eval_every=1", "train.max_steps=100000", "out_dir=run")
    last, best = tmp_path / "run" / "last.pt", tmp_path / "run" / "best.pt"
    steps = []
    for i, delay in enumerate([0.0, 0.13, 0.29, 0.41, 0.07]):
        proc = start_training(tmp_path, *(args if i == 0 else ("train.resume=run",)))
        if i == 0:
            wait_for(last, proc)
        else:  # wait for the resumed run to write at least once more
            end = time.time() + 120
            while load_checkpoint(last)["step"] <= steps[-1] and time.time() < end:
                time.sleep(0.02)
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        state = load_checkpoint(last)  # raises if truncated
        load_checkpoint(best)
        steps.append(state["step"])
    assert steps == sorted(steps) and steps[-1] > steps[0]


def test_crash_inside_a_checkpoint_write_keeps_the_old_file(tmp_path):
    """A process that dies half-way through torch.save leaves the previous checkpoint intact."""
    script = f"""
import os, torch
from charlm.checkpoint import model_state, save_checkpoint
from charlm.model.network import CharLM, ModelConfig
path = {str(tmp_path / 'last.pt')!r}
model = CharLM(ModelConfig(d_model=8, n_layers=1))
torch.nn.init.ones_(model.head.bias)
save_checkpoint(path, {{**model_state(model), "step": 1, "best_val_loss": 1.0}})
real_save = torch.save
def dying_save(obj, f, *a, **k):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os._exit(9)
torch.save = dying_save
save_checkpoint(path, {{**model_state(model), "step": 2, "best_val_loss": 0.5}})
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 9
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 1 and torch.equal(state["model"]["head.bias"], torch.ones(256))


def _train_in_process(tmp_path, text_file, nan_at, **train_overrides):
    """Run charlm.training.loop.train directly, with the loss replaced by NaN at step nan_at."""
    from charlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    cfg = RunConfig(
        data=DataConfig(name="text", path=str(text_file)),
        model=ModelConfig(d_model=16, n_layers=1),
        train=TrainConfig(batch_size=4, seq_len=16, max_steps=12, eval_every=5, log_every=1,
                          sample_length=5, warmup_steps=1, precision="fp32", **train_overrides),
    )
    calls = {"n": 0}
    real = torch.nn.functional.nll_loss

    def nll(*a, **k):
        out = real(*a, **k)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == nan_at:
                return out * float("nan")
        return out

    return cfg, nll


def test_nan_loss_stops_with_message_and_keeps_checkpoints(tmp_path, text_file, monkeypatch):
    import charlm.training.loop as tr
    from charlm.errors import CharlmError

    cfg, nll = _train_in_process(tmp_path, text_file, nan_at=7)
    monkeypatch.setattr(torch.nn.functional, "nll_loss", nll)
    out = tmp_path / "run"
    with pytest.raises(CharlmError, match="step 7: the loss or gradient became non-finite") as e:
        tr.train(cfg, out)
    assert "on_nonfinite=skip" in str(e.value)
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 5
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_loss_can_be_skipped_and_counted(tmp_path, text_file, monkeypatch):
    import charlm.training.loop as tr

    cfg, nll = _train_in_process(tmp_path, text_file, nan_at=7, on_nonfinite="skip")
    monkeypatch.setattr(torch.nn.functional, "nll_loss", nll)
    tr.train(cfg, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == 12 and state["skipped"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
