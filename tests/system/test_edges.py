"""Nothing lost at the edges: each family of hostile or careless input, made real (a real
symlink, a real second directory, a real file cut short, a long prompt), ends in one line or
just works, and every checkpoint that existed still loads."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from charlm.checkpoint import load_checkpoint
from charlm.data.text import load_bytes
from charlm.training.rundir import LOCK_NAME
from helpers import TINY, copy_run, one_error_line, run_cli, small_text

ARGS = ("data=text", "data.path=notes.txt", *TINY)


@pytest.fixture
def work(tmp_path, tiny_run):
    copy_run(tiny_run, tmp_path, "run")
    return tmp_path


def untouched(run: Path, before: dict) -> None:
    """run's checkpoints are byte for byte what they were, and load."""
    for name, data in before.items():
        assert (run / name).read_bytes() == data, name
        load_checkpoint(run / name)


def snapshot(run: Path) -> dict:
    return {name: (run / name).read_bytes() for name in ("best.pt", "last.pt")}


# --- one output-path rule --------------------------------------------------------------------

def test_no_output_goes_over_a_checkpoint_or_an_input_and_bad_places_are_one_line(work):
    before = snapshot(work / "run")
    for fmt in ("html", "onnx", "keras"):
        one_error_line(run_cli("-m", "charlm.export", "checkpoint=run", f"format={fmt}", "out=run/best.pt",
                               cwd=work, check=False), "out=run/best.pt", "this command's input")
        one_error_line(run_cli("-m", "charlm.export", "checkpoint=run", f"format={fmt}", "out=run/last.pt",
                               cwd=work, check=False), "out=run/last.pt", "holds a checkpoint")
        one_error_line(run_cli("-m", "charlm.export", "checkpoint=run", f"format={fmt}", "out=run", cwd=work,
                               check=False), "out=run is a directory")
        one_error_line(run_cli("-m", "charlm.export", "checkpoint=run", f"format={fmt}", "out=no/such/x", cwd=work,
                               check=False), "out=no/such/x", "does not exist")
    one_error_line(run_cli("evaluate.py", "checkpoint=run", "html=run/best.pt", cwd=work, check=False),
                   "html=run/best.pt", "this command's input")
    one_error_line(run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=notes.txt", "html=notes.txt",
                           cwd=work, check=False), "html=notes.txt", "this command's input")
    keras = run_cli("-m", "charlm.export", "checkpoint=run", "format=keras", "out=k.weights", cwd=work)
    assert "wrote k.weights:" in keras.stdout and (work / "k.weights").is_file()  # the name said is the name written
    assert not (work / "k.weights.npz").exists()
    shutil.copy(work / "k.weights", work / "k.npz")  # convert reads Keras weights by their suffix
    convert = ("-m", "charlm.convert", "format=keras", "weights=k.npz", "reset_after=true")
    one_error_line(run_cli(*convert, "out=run/last.pt", cwd=work, check=False), "holds a checkpoint",
                   "overwrite=true")
    one_error_line(run_cli(*convert, "out=run", cwd=work, check=False), "out=run is a directory")
    untouched(work / "run", before)
    assert "wrote run/last.pt" in run_cli(*convert, "out=run/last.pt", "overwrite=true", cwd=work).stdout  # asked


def test_links_are_replaced_or_refused_never_written_through(work):
    victim = work / "precious.txt"
    victim.write_text("a user's file\n")
    (work / "page.html").symlink_to(victim)
    run_cli("-m", "charlm.export", "checkpoint=run", "format=html", "out=page.html", cwd=work)
    assert victim.read_text() == "a user's file\n" and not (work / "page.html").is_symlink()
    # a temporary that a killed write left, replaced by a link: the next save does not follow it
    (work / "run" / "last.pt.tmp").symlink_to(victim)
    run_cli("train.py", "train.resume=run", "train.max_steps=42", "train.eval_every=2", cwd=work)
    assert victim.read_text() == "a user's file\n" and load_checkpoint(work / "run" / "last.pt")["step"] == 42
    # the run directory's lock
    (work / "run" / LOCK_NAME).unlink(missing_ok=True)
    (work / "run" / LOCK_NAME).symlink_to(victim)
    before = snapshot(work / "run")
    one_error_line(run_cli("train.py", "train.resume=run", "train.max_steps=44", cwd=work, check=False),
                   LOCK_NAME, "symbolic link", "remove it")
    assert victim.read_text() == "a user's file\n"
    untouched(work / "run", before)


# --- runs that know where they are -------------------------------------------------------------

def test_a_resume_from_another_directory_goes_on_in_its_own_run(work):
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    copy_run(work / "run", elsewhere, "run")  # another run of the same name, beside the working directory
    theirs = snapshot(elsewhere / "run")
    # the run's data.path (notes.txt) was saved relative to work; from elsewhere it is found as recorded
    out = run_cli("train.py", f"train.resume={work / 'run'}", "train.max_steps=42", "train.eval_every=2",
                  cwd=elsewhere)
    assert "resumed from step 40" in out.stdout
    assert load_checkpoint(work / "run" / "last.pt")["step"] == 42
    untouched(elsewhere / "run", theirs)
    moved = run_cli("train.py", f"train.resume={work / 'run'}", "out_dir=run", "train.max_steps=44", cwd=elsewhere,
                    check=False)
    one_error_line(moved, "out_dir=run", "its own directory")


def test_a_changed_text_is_refused_and_a_moved_copy_is_accepted(work):
    before = snapshot(work / "run")
    shutil.copy(work / "notes.txt", work / "copy.txt")
    (work / "notes.txt").write_text(small_text().replace("fox", "cat"), encoding="utf-8")
    refused = run_cli("train.py", "train.resume=run", "train.max_steps=42", cwd=work, check=False)
    one_error_line(refused, "has changed since this run started", "SHA-256", "train.init_from=")
    untouched(work / "run", before)
    out = run_cli("train.py", "train.resume=run", "data.path=copy.txt", "train.max_steps=42", "train.eval_every=2",
                  cwd=work)
    assert "resumed from step 40" in out.stdout
    one_error_line(run_cli("train.py", "train.resume=run", "data.path=notes.txt", "train.max_steps=44", cwd=work,
                           check=False), "would change data.path")


def test_a_run_stopped_before_its_first_checkpoint_is_resumed_from_step_0(work):
    run_cli("train.py", *ARGS, "train.max_steps=4", "train.eval_every=4", "out_dir=early", cwd=work)
    for name in ("best.pt", "last.pt"):  # what a kill before the first save leaves: config.yaml and events
        (work / "early" / name).unlink()
    one_error_line(run_cli("train.py", *ARGS, "out_dir=early", cwd=work, check=False), "train.resume=early")
    out = run_cli("train.py", "train.resume=early", cwd=work)
    assert "held no checkpoint yet" in out.stdout and "done: 4 steps" in out.stdout
    assert load_checkpoint(work / "early" / "last.pt")["step"] == 4
    assert len(list((work / "early").glob("events.out.tfevents.*"))) == 1  # the stopped attempt's are gone


# --- the text ----------------------------------------------------------------------------------

def test_a_text_cut_short_after_it_was_read_does_not_reach_the_reader(tmp_path):
    """A memory-mapped text cut short kills its reader with SIGBUS (this process, here)."""
    path = tmp_path / "notes.txt"
    path.write_text(small_text(), encoding="utf-8")
    data = load_bytes(path)
    os.truncate(path, 0)  # `: > notes.txt` while a run trains
    assert bytes(data[-100:]) == small_text().encode()[-100:]


# --- prompts of any length -----------------------------------------------------------------------

def test_a_long_prompt_is_read_in_bounded_pieces_with_the_same_result(monkeypatch):
    from charlm.inference import sampling
    from helpers import small_model

    model = small_model().eval()
    prompt = (small_text() * 2).encode()[:30_000]
    with torch.no_grad():
        whole, h_whole = model(torch.tensor([[0, *prompt]]))
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, h=None: seen.append(x.shape[1]) or forward(x, h))
    log_probs, h = sampling.read_through(model, prompt)
    assert max(seen) <= sampling.PROMPT_CHUNK and sum(seen) == len(prompt) + 1
    torch.testing.assert_close(log_probs, whole[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(h, h_whole, atol=1e-5, rtol=0)
