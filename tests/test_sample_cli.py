"""python sample.py, end to end against a tiny trained run."""
import pytest

from charlm import load_model
from charlm.sampling import sample_text
from conftest import TINY, run_cli, small_text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    (tmp / "notes.txt").write_text(small_text(), encoding="utf-8")
    run_cli("train.py", "data=text", "data.path=notes.txt", *TINY, "train.max_steps=20",
            "train.eval_every=20", "out_dir=runs/text/first", cwd=tmp)
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
                                      ("top_k=0", "top_k"), ("top_k=300", "top_k")])
def test_bad_values_get_one_line(workdir, arg, word):
    proc = run_cli("sample.py", arg, cwd=workdir, check=False)
    assert proc.returncode == 1 and word in proc.stderr and "Traceback" not in proc.stderr
