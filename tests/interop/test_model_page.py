"""python -m charlm.export format=html: the model in one web page, checked in headless Chromium as
a user would open it from disk (no server, no network)."""
import json
import re
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch

from charlm import load_model
from charlm.checkpoint import load_checkpoint, model_state
from charlm.config import ModelConfig
from charlm.inference.sampling import sample_text
from charlm.interop.page import half_weights, write_page
from charlm.model.network import CharLM
from helpers import TINY, copy_run, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# In Chromium, so in the slow set (python -m pytest -m slow, which CI runs): a browser per test
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")
PROMPT = "the grey "
CELLS = ["reset_after", "reset_before", "lstm"]


@pytest.fixture(scope="module")
def pages(tmp_path_factory, tiny_run):
    """A page for each cell: the session's tiny reset-after run, a reset-before one and an LSTM."""
    work = tmp_path_factory.mktemp("model_page")
    copy_run(tiny_run, work, "reset_after")
    for cell in CELLS[1:]:
        run_cli("train.py", "data=text", "data.path=notes.txt", *TINY, "model.n_layers=2", f"model.cell={cell}",
                "train.max_steps=40", "train.eval_every=20", f"out_dir={cell}", cwd=work)
    for cell in CELLS:
        out = run_cli("-m", "charlm.export", f"checkpoint={cell}", "format=html", f"out={cell}.html", cwd=work)
        assert f"wrote {cell}.html" in out.stdout
    return work


def dom(page, query: str) -> str:
    """The page's document after it ran, opened from disk with the query string, with no network."""
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={page.parent / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom",
               page.as_uri() + query]
    return subprocess.run(browser, capture_output=True, text=True, timeout=120).stdout


def written(document: str) -> bytes:
    found = re.search(r'<span id="output"[^>]*data-bytes="([^"]*)"', document)
    assert found, document[-2000:]
    return bytes(int(b) for b in found.group(1).split(",") if b)


@needs_chromium
@pytest.mark.system
@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_the_page_writes_what_sample_py_writes_greedily(pages, cell):
    query = "?prompt=" + PROMPT.replace(" ", "%20") + "&length=200&temperature=0"
    page_bytes = written(dom(pages / f"{cell}.html", query))
    printed = run_cli("sample.py", f"checkpoint={cell}", f"prompt={PROMPT}", "length=200", "temperature=0",
                      cwd=pages).stdout
    assert len(page_bytes) == 200
    assert page_bytes.decode("utf-8", errors="replace") == printed[len(PROMPT):-1]  # byte for byte, as text
    assert PROMPT + page_bytes.decode("utf-8", errors="replace") == sample_text(
        load_model(pages / cell), PROMPT, 200, temperature=0)[0]


@needs_chromium
@pytest.mark.system
@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_the_pages_log_probabilities_are_pytorchs(pages, cell):
    """50 steps along the page's own greedy path: within 1e-3 of PyTorch's, with the checkpoint's
    float32 weights and with the float16 weights the page holds."""
    document = dom(pages / f"{cell}.html", "?prompt=the&length=50&temperature=0&logprobs=1")
    page = np.array(json.loads(re.search(r'<pre id="logprobs"[^>]*>(.*?)</pre>', document, re.S).group(1)))
    path = list(b"the") + list(written(document))
    state = load_checkpoint(pages / cell / "best.pt")
    rounded = {**state, "model": {**state["model"], **{k: torch.from_numpy(v.astype(np.float32))
                                                       for k, v in half_weights(state).items()}}}
    for weights in (state, rounded):
        model = CharLM(ModelConfig(**state["model_config"])).eval()
        model.load_state_dict(weights["model"])
        with torch.no_grad():  # position 3 has read the start byte and "the": it predicts the first byte written
            ours = model(torch.tensor([[0, *path[:-1]]]))[0][0, 3:53].numpy()
        assert page.shape == (50, 256) and np.abs(page - ours).max() < 1e-3


@needs_chromium
@pytest.mark.system
@pytest.mark.slow
def test_seed_and_top_k_come_from_the_url(pages):
    page = pages / "reset_after.html"
    a = written(dom(page, "?prompt=the&length=40&temperature=1&seed=3&top_k=5"))
    b = written(dom(page, "?prompt=the&length=40&temperature=1&seed=3&top_k=5"))
    c = written(dom(page, "?prompt=the&length=40&temperature=1&seed=4&top_k=5"))
    assert a == b and a != c and len(a) == 40


@needs_chromium
@pytest.mark.system
@pytest.mark.slow
def test_a_huge_length_is_capped_and_written_in_frames_and_markup_in_a_title_is_inert(pages):
    """?length=1000000000 once wrote in one synchronous loop, freezing the tab (Stop could not run);
    a checkpoint's directory named `x<!--<script>` once stopped the page's script from running."""
    odd = pages / "x<!--<script>"
    if not odd.exists():
        shutil.copytree(pages / "reset_after", odd)
    run_cli("-m", "charlm.export", f"checkpoint={odd.name}", "format=html", "out=odd.html", cwd=pages)
    assert len(written(dom(pages / "odd.html", "?prompt=the&length=7&temperature=0"))) == 7  # its script ran
    t = time.perf_counter()
    document = dom(pages / "odd.html", "?prompt=the&length=1000000000&temperature=0")
    assert time.perf_counter() - t < 60 and '<span id="output"' in document  # the page answered at once
    assert 'data-done="1"' not in document  # still writing, a frame at a time, when the DOM was read
    text = (pages / "odd.html").read_text(encoding="utf-8")
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]{44}';", text) and "'unsafe-inline'; style" not in text


def test_the_page_is_one_file_with_no_network_and_fits_3_mb_for_the_default_model(tmp_path):
    torch.manual_seed(0)
    model = CharLM(ModelConfig())  # the default run's 256x2 model
    out = write_page({**model_state(model), "step": 0, "best_val_loss": 0.0}, tmp_path / "default.html", "default")
    text = out.read_text(encoding="utf-8")
    assert out.stat().st_size <= 3_000_000
    assert "default-src 'none'" in text  # the page may load nothing and connect nowhere
    for reached in ("http://", "https://", "fetch(", "XMLHttpRequest", "<link", " src="):
        assert reached not in text, reached
