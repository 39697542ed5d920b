"""data.path as a folder or a glob: its text files, in sorted order, read as one text with
data.separator between them; hidden and binary files left out."""
from pathlib import Path

import numpy as np

from charlm.checkpoint import load_checkpoint
from charlm.data.text import load_bytes, text_files
from helpers import TINY, one_error_line, run_cli, small_text


def poems(root: Path) -> Path:
    folder = root / "poems"
    (folder / "b").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / "a.txt").write_text("first poem\n")
    (folder / "b" / "c.md").write_text("second, é\n")
    (folder / "b" / "d.txt").write_text(small_text())
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: left out
    (folder / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")  # binary: left out
    return folder


def test_a_folder_is_its_text_files_in_sorted_order_joined_by_the_separator(tmp_path, monkeypatch):
    folder = poems(tmp_path)
    files, binary = text_files(folder)
    assert [p.relative_to(folder).as_posix() for p in files] == ["a.txt", "b/c.md", "b/d.txt"] and binary == 1
    cache = tmp_path / "cache"
    joined = load_bytes(folder, cache_dir=cache)
    assert bytes(joined) == b"first poem\n" + b"\n\n" + "second, é\n".encode() + b"\n\n" + small_text().encode()
    assert isinstance(joined, np.memmap)  # read from the joined file, never copied whole into memory
    assert bytes(load_bytes(folder, r"\n---\n", cache)).startswith(b"first poem\n\n---\nsecond")
    assert bytes(load_bytes(folder, "", cache)).startswith(b"first poem\nsecond")
    monkeypatch.chdir(tmp_path)
    assert [p.as_posix() for p in text_files(Path("poems/**/*.md"))[0]] == ["poems/b/c.md"]


def test_train_and_evaluate_on_a_folder_and_a_changed_separator_is_a_change(tmp_path):
    poems(tmp_path)
    out = run_cli("train.py", "data=text", "data.path=poems", *TINY, "train.max_steps=4", "train.eval_every=4",
                  "out_dir=run", cwd=tmp_path)
    assert "data.path=poems: 3 text files, 1 binary file skipped" in out.stdout
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["corpus"]["bytes"] == len(load_bytes(tmp_path / "poems", cache_dir=tmp_path / "data"))
    assert [f["path"] for f in state["corpus"]["files"]] == ["a.txt", "b/c.md", "b/d.txt"]
    scored = run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=poems/**/*.txt", cwd=tmp_path)
    assert "bits/byte:" in scored.stdout
    one_error_line(run_cli("train.py", "train.resume=run", "data.separator=", "train.max_steps=6", cwd=tmp_path,
                           check=False), "would change data.separator")
    (tmp_path / "poems" / "b" / "c.md").write_text("second, changed\n")
    one_error_line(run_cli("train.py", "train.resume=run", "train.max_steps=6", cwd=tmp_path, check=False),
                   "has changed since this run started (b/c.md changed)")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"\0\1\2")
    one_error_line(run_cli("train.py", "data=text", "data.path=empty", cwd=tmp_path, check=False),
                   "data.path=empty holds no text files")
