"""python sample.py, end to end against a tiny trained run."""
import os
import subprocess
import sys

import pytest

from charlm import load_model
from charlm.inference.sampling import sample_text
from helpers import ROOT, copy_run, run_cli


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_run):
    tmp = tmp_path_factory.mktemp("sample")
    (tmp / "runs" / "text").mkdir(parents=True)
    copy_run(tiny_run, tmp, "runs/text/first")
    return tmp


def new_bytes(stdout: str, prompt: str) -> bytes:
    assert stdout.startswith(prompt) and stdout.endswith("\n")
    return stdout[len(prompt):-1].encode("utf-8")


def test_prompt_plus_exactly_length_bytes(workdir):
    proc = run_cli("sample.py", "prompt=t", "length=32", "temperature=0", cwd=workdir)
    text = proc.stdout[len("t"):-1]
    # length counts bytes; invalid UTF-8 would show as U+FFFD (3 bytes for 1), so allow for it
    n = len(text.encode("utf-8")) - 2 * text.count("\ufffd")
    assert proc.stdout.startswith("t") and n == 32


def test_same_seed_same_text(workdir):
    a = run_cli("sample.py", "prompt=the", "length=40", "seed=3", "temperature=1.0", cwd=workdir).stdout
    b = run_cli("sample.py", "prompt=the", "length=40", "seed=3", "temperature=1.0", cwd=workdir).stdout
    c = run_cli("sample.py", "prompt=the", "length=40", "seed=4", "temperature=1.0", cwd=workdir).stdout
    assert a == b and a != c


def test_bf16_sampling_is_its_own_repeatable_text(workdir):
    """precision=bf16: the header says so, and the text is what the Python API writes with the same
    seed and precision (so the same seed gives it again)."""
    import torch

    proc = run_cli("sample.py", "prompt=the", "length=60", "seed=3", "temperature=1.0", "precision=bf16", cwd=workdir)
    assert "bf16" in proc.stderr
    api = sample_text(load_model(workdir / "runs/text/first"), "the", 60, temperature=1.0,
                      generator=torch.Generator().manual_seed(3), precision="bf16")[0]
    assert proc.stdout == api + "\n"


@pytest.mark.parametrize("num_samples", [1, 2])
def test_precision_reaches_the_decoder(workdir, monkeypatch, num_samples):
    """precision=bf16 is what the decoder is built with, for one sample (streamed) and for a batch:
    bf16 moves the probabilities by about a thousandth, too little to show in a short text."""
    from charlm.commands.sample import sample
    from charlm.config import SampleConfig
    from charlm.model.stepping import Stepper

    built = []
    real = Stepper.__init__
    monkeypatch.setattr(Stepper, "__init__", lambda self, model, precision="fp32": (
        built.append(precision), real(self, model, precision))[1])
    monkeypatch.chdir(workdir)
    sample(SampleConfig(checkpoint="runs/text/first", prompt="t", length=5, seed=1, num_samples=num_samples,
                        precision="bf16"))
    assert built == ["bf16"]


def greedy_continuation(run_dir, prompt: str, length: int) -> str:
    """What the Python API writes after prompt, greedily: the bytes sample.py must print."""
    return sample_text(load_model(run_dir), prompt, length, temperature=0)[0][len(prompt):]


@pytest.mark.parametrize("prompt", ["Hello, world", "it's", "[x]", "héllo", "a=b", "{y: 1}", "时间"])
def test_free_text_prompts_are_taken_exactly(workdir, prompt):
    proc = run_cli("sample.py", f"prompt={prompt}", "length=12", "temperature=0", cwd=workdir)
    assert proc.stdout.startswith(prompt)
    # the model read the prompt as typed: its continuation is the one that prompt gives
    assert proc.stdout[len(prompt):-1] == greedy_continuation(workdir / "runs/text/first", prompt, 12)


def test_prompt_file_and_num_samples(workdir):
    (workdir / "p.txt").write_text("the grey, swift", encoding="utf-8")
    proc = run_cli("sample.py", "prompt_file=p.txt", "length=10", "num_samples=3", "seed=1", cwd=workdir)
    samples = proc.stdout.strip().split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3 and all(s.startswith("the grey, swift") for s in samples)


def test_no_trained_model_says_what_to_run(tmp_path):
    proc = run_cli("sample.py", "prompt=t", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "python train.py" in proc.stderr


@pytest.mark.parametrize("arg,word", [("length=-1", "length"), ("temperature=-1", "temperature"),
                                      ("top_k=0", "top_k"), ("top_k=300", "top_k"),
                                      ("precision=fp16", "precision"), ("precision=bf16 explain=true", "precision")])
def test_bad_values_get_one_line(workdir, arg, word):
    proc = run_cli("sample.py", *arg.split(), cwd=workdir, check=False)
    assert proc.returncode == 1 and word in proc.stderr and "Traceback" not in proc.stderr


def interactive(workdir, typed: str, *args: str, in_process: bool = True):
    return run_cli("sample.py", "interactive=true", *args, cwd=workdir, check=False, stdin=typed,
                   in_process=in_process)


def interactive_all(workdir, runs: list) -> list:
    """`sample.py interactive=true` with typed lines through a pipe, once for each (typed, args) of runs."""
    return [run_cli("sample.py", "interactive=true", *args, cwd=workdir, check=False, stdin=typed)
            for typed, args in runs]


def test_interactive_writes_one_text_across_turns(workdir):
    """Through a pipe: a line in, `length` bytes out, the state carried; an empty line lets it go on."""
    proc = interactive(workdir, "the grey\n\nswift fox\n", "length=20", "temperature=0", in_process=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.encode("utf-8")
    turns = [out[i * 21 : i * 21 + 20] for i in range(3)]
    assert len(out) == 63 and out[20::21] == b"\n\n\n"  # nothing but the model's text, a line per turn
    run = workdir / "runs" / "text" / "first"
    text = "the grey"
    for typed, got in zip(["the grey", "", "swift fox"], turns):
        text = text if typed == "the grey" else text + typed
        assert got == greedy_continuation(run, text, 20).encode("utf-8"), (typed, got)
        text += got.decode("utf-8")
    assert "Type a line" not in proc.stderr and ">" not in proc.stdout


def test_interactive_sampling_settings_apply(workdir):
    settings = ("length=60", "temperature=1.0", "top_k=3", "seed=1")
    seeded = ("length=30", "temperature=1.0", "seed=5")
    one, two, other, first, empty, refused = interactive_all(workdir, [
        ("the\nthe\n", seeded), ("the\nthe\n", seeded), ("the\nthe\n", (*seeded[:2], "seed=6")),
        ("the\n\n", settings), ("", ("length=5",)), ("", ("num_samples=2",))])
    assert one.stdout == two.stdout and one.stdout != other.stdout
    free = first.stdout.split("\n")
    stop = next(c for c in free[0][3:] if c.isascii() and c.isalpha())  # written in the first turn: it ends there
    stopped = interactive(workdir, "the\n\n", *settings, f"stop={stop}").stdout
    turns = stopped.split("\n")
    assert turns[0] == free[0][: free[0].index(stop) + 1] and len(turns) == 3 and turns[2] == ""
    assert turns[1].count(stop) == 1 and turns[1].endswith(stop) or (len(turns[1]) == 60 and stop not in turns[1])
    assert empty.stdout == "" and empty.returncode == 0  # Ctrl-D at once: nothing written
    assert refused.returncode == 1 and "interactive=true writes one text" in refused.stderr


def _sample_in_a_shell(workdir, command: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], cwd=workdir, env=full, capture_output=True,
                          timeout=120)


@pytest.mark.system
def test_output_behaves_as_a_unix_tools_through_pipes_and_encodings(workdir):
    """A reader that goes away (`| head`) ends sample.py quietly with the shell's 141, and a prompt
    in bytes that are not UTF-8 (a Latin-1 terminal's) comes back as those bytes; a stdout that is
    not UTF-8 gets replacements, not a traceback."""
    sample = f"{sys.executable} {ROOT / 'sample.py'}"
    both = _sample_in_a_shell(
        workdir,
        f"{sample} $'prompt=caf\\xe9 ' length=100000 seed=0 | head -c 20 > head.out; echo \"head: $?\"; "
        f"PYTHONIOENCODING=ascii {sample} prompt=déjà length=8 seed=0 > ascii.out; echo \"ascii: $?\"")
    assert both.stdout.decode().split() == ["head:", "141", "ascii:", "0"], both.stderr
    assert b"Traceback" not in both.stderr and b"BrokenPipe" not in both.stderr, both.stderr
    out = (workdir / "head.out").read_bytes()
    assert len(out) == 20 and out.startswith(b"caf\xe9 ")  # the same byte back, not mangled
    assert (workdir / "ascii.out").read_bytes().startswith(b"d?j?")  # ASCII can't show é: replaced
