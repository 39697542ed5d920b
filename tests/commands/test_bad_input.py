"""Whatever a user can type wrong gets one clear line, a non-zero exit, and nothing damaged."""
import os

import pytest
import torch

from charlm import load_model
from charlm.inference.sampling import sample_text
from helpers import TINY, run_cli, small_text


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and "\n" not in err, err
    for w in words:
        assert w in err, err


@pytest.fixture
def work(tmp_path, text_file):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_text("too short to train on\n")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    return tmp_path


TRAIN_CASES = {
    "missing file": (["data=text", "data.path=nope.txt"], ["nope.txt", "does not exist"]),
    "empty file": (["data=text", "data.path=empty.txt"], ["empty.txt", "empty"]),
    "shorter than a window": (["data=text", "data.path=short.txt"], ["too short", "train.batch_size"]),
    "directory": (["data=text", "data.path=a_dir"], ["a_dir", "holds no text files"]),
    "text without path": (["data=text"], ["data.path"]),
    "unknown corpus": (["data.name=wiki"], ["wiki", "timemachine"]),
    "unknown key": (["train.lrr=0.1"], ["train.lrr"]),
    "unknown group option": (["model=huge"], ["model", "huge"]),
    "unknown recipe": (["recipe=fast"], ["recipe=fast is not a config", "tinyshakespeare"]),
    "train as a choice": (["train=tinyshakespeare"], ["train.lr=", "recipe=<corpus>"]),
    "unknown option in a sweep": (["-m", "model=tiny,huge"], ["model=huge is not a config"]),
    "wrong type": (["train.lr=fast"], ["train.lr", "fast"]),
    "lr zero": (["train.lr=0"], ["train.lr"]),
    "lr negative": (["train.lr=-1"], ["train.lr"]),
    "batch size zero": (["train.batch_size=0"], ["train.batch_size"]),
    "seq len zero": (["train.seq_len=0"], ["train.seq_len"]),
    "dropout one": (["model.dropout=1"], ["model.dropout"]),
    "fractions over one": (["data.train_frac=0.9", "data.val_frac=0.2"], ["data.train_frac", "over 1"]),
    "no val text": (["data=text", "data.path=notes.txt", "data.val_frac=0.00001"], ["no validation text"]),
    "out_dir is a file": (["data=text", "data.path=notes.txt", "out_dir=a_file"], ["out_dir", "is a file"]),
    "out_dir not writable": (["data=text", "data.path=notes.txt", "out_dir=/proc/charlm-run"],
                             ["out_dir", "cannot create"]),
    "device cuda without gpu": (["train.device=cuda"], ["no CUDA GPU", "device=auto"]),
    "bad device": (["train.device=tpu"], ["train.device"]),
    "bad device index": (["train.device=cuda:x"], ["train.device", "cuda:N"]),
    "bad precision": (["train.precision=fp16"], ["train.precision", "bf16"]),
    "resume missing": (["train.resume=runs/nothing"], ["runs/nothing", "does not exist"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input(work, case):
    if case == "device cuda without gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args, words = TRAIN_CASES[case]
    before = sorted(p.name for p in work.iterdir())
    proc = run_cli("train.py", *TINY, "train.max_steps=2", *args, cwd=work, check=False)
    assert_one_line_error(proc, *words)
    assert sorted(p.name for p in work.iterdir()) == before  # nothing written, nothing damaged
    assert (work / "a_file").read_text() == "x"


def test_unreadable_file(work):
    path = work / "secret.txt"
    path.write_text("hidden " * 1000)
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: every file is readable (test_unreadable_file_message covers it)")
    proc = run_cli("train.py", "data=text", "data.path=secret.txt", cwd=work, check=False)
    assert_one_line_error(proc, "not readable")


def test_unreadable_file_message(work, monkeypatch):
    """The same check where root can read everything: the permission test is made to say no."""
    import charlm.data.text as data
    from charlm.config import DataConfig
    from charlm.errors import CharlmError

    monkeypatch.setattr(data.os, "access", lambda p, mode: False)
    with pytest.raises(CharlmError, match="notes.txt is not readable; check its permissions"):
        data.corpus_path(DataConfig(name="text", path=str(work / "notes.txt")))


def test_binary_input_trains(work):
    (work / "blob.bin").write_bytes(bytes(range(256)) * 80 + os.urandom(4000))
    proc = run_cli("train.py", "data=text", "data.path=blob.bin", *TINY, "train.max_steps=4",
                   "train.eval_every=4", "out_dir=bin_run", cwd=work)
    assert (work / "bin_run" / "best.pt").is_file() and "best val loss" in proc.stdout


def test_cpu_fallback_is_announced(work):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_cli("train.py", "data=text", "data.path=notes.txt", *TINY, "train.max_steps=2",
                   "train.eval_every=2", "train.device=auto", "out_dir=r", cwd=work)
    assert "no CUDA GPU found" in proc.stdout


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    work = tmp_path_factory.mktemp("checkpoints")
    (work / "notes.txt").write_text(small_text(), encoding="utf-8")
    torch.save({"model": Evil()}, work / "evil.pt")
    (work / "notes.pt").write_text("just some text")
    torch.save({"weights": torch.ones(3)}, work / "other.pt")
    run_cli("train.py", "data=text", "data.path=notes.txt", *TINY, "train.max_steps=2",
            "train.eval_every=2", "out_dir=good", cwd=work)
    data = (work / "good" / "last.pt").read_bytes()
    (work / "truncated.pt").write_bytes(data[: len(data) // 2])
    state = torch.load(work / "good" / "last.pt", weights_only=True)
    (work / "page.pt").write_text("<!DOCTYPE html>\n<html><body>a saved web page</body></html>")
    edits = {  # plain data, wrong in every way a hand or a tool can make it
        "shapes.pt": lambda s: s["model"].update({"head.weight": torch.zeros(256, 3)}),
        "unknown.pt": lambda s: s["model_config"].update(colour="red"),
        "nokey.pt": lambda s: s["model_config"].pop("d_model"),
        "noweights.pt": lambda s: s.pop("model"),
        "absurd.pt": lambda s: s["model_config"].update(d_model=10**9),  # terabytes, if it were built
        "nan.pt": lambda s: s["model"]["head.bias"].fill_(float("nan")),
        "future.pt": lambda s: s.update(version=99),
    }
    for name, edit in edits.items():
        edited = {**state, "model_config": dict(state["model_config"]), "model": {k: v.clone() for k, v in
                                                                                 state["model"].items()}}
        edit(edited)
        torch.save(edited, work / name)
    return work


CHECKPOINT_CASES = {
    "evil.pt": ["evil.pt", "refused", "could run code"],
    "notes.pt": ["notes.pt", "not a checkpoint (it is text)"],
    "page.pt": ["page.pt", "not a checkpoint (it is an HTML page)"],
    "shapes.pt": ["shapes.pt", "damaged or edited", "head.weight should be (256, 32)", "(256, 3)"],
    "unknown.pt": ["unknown.pt", "damaged or edited", "names colour"],
    "nokey.pt": ["nokey.pt", "damaged or edited", "lacks d_model"],
    "noweights.pt": ["noweights.pt", "damaged or edited", "no 'model' entry"],
    "absurd.pt": ["absurd.pt", "damaged or edited", "d_model=1000000000", "embed.weight of shape (256, 32)"],
    "nan.pt": ["nan.pt", "non-finite weights", "head.bias", "earlier checkpoint"],
    "truncated.pt": ["truncated.pt", "not a readable checkpoint"],
    "other.pt": ["other.pt", "not a charlm checkpoint"],
    "future.pt": ["future.pt", "version 99"],
    "missing.pt": ["missing.pt", "does not exist"],
}


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_bad_checkpoints_are_named(bad_checkpoints, name):
    procs = [run_cli("sample.py", f"checkpoint={name}", cwd=bad_checkpoints, check=False)]
    if name in ("evil.pt", "truncated.pt", "absurd.pt"):  # resuming reads checkpoints the same way
        procs.append(run_cli("train.py", f"train.resume={name}", cwd=bad_checkpoints, check=False))
    for proc in procs:
        assert_one_line_error(proc, *CHECKPOINT_CASES[name])
    assert not (bad_checkpoints / "pwned").exists()  # nothing from the pickle ran
    assert "could run code" not in procs[0].stderr or name == "evil.pt"  # only code is called code


def test_sample_long_and_non_ascii_prompts(bad_checkpoints):
    prompt = "Zeitmaschine — 時間 " * 40  # far longer than the 32-byte training windows
    proc = run_cli("sample.py", "checkpoint=good", f"prompt={prompt}", "length=8", "temperature=0",
                   cwd=bad_checkpoints)
    assert proc.stdout.startswith(prompt)
    expected = sample_text(load_model(bad_checkpoints / "good"), prompt, 8, temperature=0)[0]
    assert proc.stdout[:-1] == expected  # the whole prompt was read: the same continuation


def test_sample_bad_override_key(bad_checkpoints):
    proc = run_cli("sample.py", "checkpoint=good", "lenght=5", cwd=bad_checkpoints, check=False)
    assert_one_line_error(proc, "lenght")


OTHER_CASES = {
    "sample on a tpu": (["sample.py", "checkpoint=good", "device=tpu"], ["device", "auto, cpu, cuda"]),
    "evaluate on a tpu": (["evaluate.py", "checkpoint=good", "device=tpu"], ["device", "auto, cpu, cuda"]),
    "sample on a missing GPU": (["sample.py", "checkpoint=good", "device=cuda"], ["no CUDA GPU", "device=cpu"]),
    "evaluate on a missing GPU": (["evaluate.py", "checkpoint=good", "device=cuda:1"], ["no CUDA GPU"]),
    "evaluate an empty split": (["evaluate.py", "checkpoint=good", "data=text", "data.path=notes.txt",
                                 "data.train_frac=0.8", "data.val_frac=0.2", "split=test"], ["split=test", "empty"]),
    "evaluate a missing file": (["evaluate.py", "checkpoint=good", "data=text", "data.path=nope.txt"], ["nope.txt"]),
    "resume on other text": (["train.py", "train.resume=good", "data=timemachine"],
                             ["data.name", "text", "timemachine"]),
    "resume another size": (["train.py", "train.resume=good", "model.d_model=64"], ["model.d_model", "32", "64"]),
    "resume another model group": (["train.py", "train.resume=good", "model=reference"], ["model.d_model", "512"]),
    "resume another recipe": (["train.py", "train.resume=good", "recipe=tinyshakespeare"],
                              ["recipe=tinyshakespeare would change model.d_model"]),
    "resume another cell": (["train.py", "train.resume=good", "model.cell=reset_before"], ["model.cell"]),
    "resume another split": (["train.py", "train.resume=good", "data.train_frac=0.5"], ["data.train_frac"]),
    "resume a typo": (["train.py", "train.resume=good", "train.lrr=1"], ["train.lrr"]),
    "resume a bad value": (["train.py", "train.resume=good", "train.lr=-1"], ["train.lr"]),
    "resume on a missing GPU": (["train.py", "train.resume=good", "train.device=cuda"], ["no CUDA GPU"]),
    "doctor with arguments": (["-m", "charlm.doctor", "fast=true"], ["fast is not a setting", "--help"]),
}


@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_other_commands_bad_input(bad_checkpoints, case):
    if "GPU" in case and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args, words = OTHER_CASES[case]
    before = {p: p.stat().st_mtime_ns for p in bad_checkpoints.rglob("*")}
    proc = run_cli(*args, cwd=bad_checkpoints, check=False)
    assert_one_line_error(proc, *words)
    assert {p: p.stat().st_mtime_ns for p in bad_checkpoints.rglob("*")} == before  # nothing written


# NaN, inf and numbers past 64 bits, for every command (one rule: charlm.config.check_numbers)
NUMBER_CASES = [
    ("sample.py", "temperature=nan", "temperature must be a finite number, got nan"),
    ("sample.py", "seed=123456789012345678901234567890", "seed must fit in 64 bits"),
    ("sample.py", "top_p=inf", "top_p must be a finite number, got inf"),
    ("train.py", "train.lr=nan", "train.lr must be a finite number, got nan"),
    ("train.py", "model.dropout=-inf", "model.dropout must be a finite number, got -inf"),
    ("train.py", "seed=99999999999999999999", "seed must fit in 64 bits"),
    ("train.py", "data.val_frac=nan", "data.val_frac must be a finite number"),
    ("evaluate.py", "dynamic_lr=inf", "dynamic_lr must be a finite number, got inf"),
]


@pytest.mark.parametrize("script,setting,words", NUMBER_CASES, ids=[c[1] for c in NUMBER_CASES])
def test_a_number_that_is_not_finite_or_too_large_is_one_line(tmp_path, script, setting, words):
    extra = {"train.py": "out_dir=run", "sample.py": "length=1", "evaluate.py": "split=val"}[script]
    proc = run_cli(script, setting, extra, cwd=tmp_path, check=False)
    assert_one_line_error(proc, words)
    assert not (tmp_path / "run").exists()  # refused before anything was written
