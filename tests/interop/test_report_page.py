"""evaluate.py html=FILE: the page's numbers are the evaluator's and the reference's, and it renders."""
import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from charlm.checkpoint import load_checkpoint
from charlm.model.reference import gru_step, language_model, lstm_step
from helpers import TINY, copy_run, run_cli, small_text

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# a quotation, a line break, a tab, a bell (control byte), an invalid byte, a two-byte character
ODD = b'he said "a bell\x07 rang" (twice)\n\tthen \xff caf\xc3\xa9.\n'


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run):
    work = tmp_path_factory.mktemp("page")
    copy_run(tiny_run, work, "run")
    (work / "odd.txt").write_bytes(ODD * 3)
    return work


def page_data(path):
    blob = re.search(r'<script id="data" type="application/json">(.*?)</script>', path.read_text(), re.S).group(1)
    return json.loads(blob.replace("<\\/", "</"))


def test_page_mean_surprisal_is_evaluates_bits_per_byte(trained):
    out = run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=odd.txt", "html=odd.html",
                  "format=json", cwd=trained)
    result = json.loads(out.stdout)
    data = page_data(trained / "odd.html")
    assert data["bytes"] == list(ODD * 3) and result["html"] == "odd.html"
    assert abs(np.mean(data["surprisal"]) - result["bpb"]) < 1e-4
    head = (trained / "odd.html").read_text().split("<body>")[0]
    assert data["total"] == len(ODD) * 3 and not re.search(r"https?://", head)
    # only the page's own script may run, named by its hash; nothing may be loaded
    assert re.search(r"default-src 'none'; script-src 'sha256-[A-Za-z0-9+/=]{44}';", head), head[:600]


def test_page_gates_and_units_are_the_reference_numbers(trained):
    run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=odd.txt", "html=odd.html", cwd=trained)
    data = page_data(trained / "odd.html")
    state = load_checkpoint(trained / "run" / "best.pt")
    params = {k: v.double().numpy() for k, v in state["model"].items()}
    tokens = np.array([[0, *ODD]])
    # the surprisal of each byte: the reference model's log-probability of it, in bits
    ref = language_model(tokens, params, 2)[0, np.arange(len(ODD)), list(ODD)]
    np.testing.assert_allclose(data["surprisal"][: len(ODD)], -ref / np.log(2), atol=1e-4)
    units = np.frombuffer(base64.b64decode(data["units"]), dtype=np.int8).reshape(2, -1, 32) / 127
    x = params["embed.weight"][tokens[0]]
    for k in range(2):
        w = {n: params[f"gru.{n.replace('w_', 'weight_').replace('b_', 'bias_')}_l{k}"]
             for n in ("w_ih", "w_hh", "b_ih", "b_hh")}
        h, outs = np.zeros((1, 32)), []
        for t in range(len(ODD) + 1):
            g = gru_step(x[t : t + 1], h, w)
            h = g["h"]
            outs.append(h[0])
            if t:  # the step that reads byte t-1
                assert abs(data["z_mean"][k][t - 1] - g["z"].mean()) < 1e-4
                assert abs(data["r_mean"][k][t - 1] - g["r"].mean()) < 1e-4
                assert np.abs(units[k, t - 1] - h[0]).max() < 0.5 / 127 + 1e-5
        x = np.stack(outs)


def test_long_text_is_cut_and_says_so(trained):
    run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=notes.txt", "html=cut.html",
            "html_bytes=300", cwd=trained)
    data = page_data(trained / "cut.html")
    assert len(data["bytes"]) == 300 and data["total"] == len(small_text().encode())
    names = {row["feature"] for row in data["correlated"]}
    assert "position in line" in names and all(len(row["units"]) == 3 for row in data["correlated"])
    bad = run_cli("evaluate.py", "checkpoint=run", "html=nowhere/x.html", cwd=trained, check=False)
    assert bad.returncode == 1 and "html=nowhere/x.html" in bad.stderr and not (trained / "nowhere").exists()


@pytest.mark.system
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")
def test_page_renders_in_chromium(trained):
    """What a user sees: the text built byte by byte, the evaluator's figure, odd bytes made visible."""
    result = json.loads(run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=odd.txt", "html=odd.html",
                                "format=json", cwd=trained).stdout)
    run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=odd.txt", "html=cut.html", "html_bytes=80",
            cwd=trained)
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={trained / 'profile'}", "--window-size=1200,900"]

    def dom(name):
        url = (trained / name).as_uri()
        return subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout

    whole, cut = dom("odd.html"), dom("cut.html")
    assert len(re.findall(r"<span[^>]*data-t=", whole)) == len(ODD) * 3  # one per byte, built by the script
    mean = float(re.search(r'<b id="mean">([0-9.]+)</b>', whole).group(1))
    assert abs(mean - result["bpb"]) <= 0.00006  # the page's 4 decimals of evaluate.py's figure
    for shown in ("\\x07", "\\xff", "é", "↵", "position in line"):
        assert shown in whole, shown
    assert f"first 80 of {len(ODD) * 3} bytes" in cut and len(re.findall(r"<span[^>]*data-t=", cut)) == 80
    shot = trained / "page.png"
    subprocess.run([*browser, f"--screenshot={shot}", (trained / "odd.html").as_uri() + "?colour=z1"],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000


@pytest.mark.system
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")
def test_markup_in_a_file_name_or_the_text_is_shown_not_parsed(trained):
    odd = "run <i>x</i><!--<script> & 'q'"  # `<!--<script>` in embedded data once stopped the page's script
    if not (trained / odd).exists():
        shutil.copytree(trained / "run", trained / odd)
    (trained / "markup.txt").write_text("a <b>bold</b> & <i>claim</i> <!--<script>\n" * 4)
    run_cli("evaluate.py", f"checkpoint={odd}", "data=text", "data.path=markup.txt", "html=markup <b>.html",
            cwd=trained)
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={trained / 'profile'}", "--dump-dom", (trained / "markup <b>.html").as_uri()]
    dom = subprocess.run(browser, capture_output=True, text=True, timeout=120).stdout
    summary = re.search(r'<p class="meta" id="summary">(.*?)</p>', dom, re.S).group(1)
    assert "run &lt;i&gt;x&lt;/i&gt;&lt;!--&lt;script&gt; &amp; 'q'" in summary and "<i>" not in summary
    assert len(re.findall(r"<span[^>]*data-t=", dom)) == len("a <b>bold</b> & <i>claim</i> <!--<script>\n") * 4
    assert "<b>bold</b>" not in dom  # the text's own markup is shown byte by byte, never parsed


def test_an_lstms_page_shows_its_input_forget_and_output_gates(tmp_path):
    (tmp_path / "notes.txt").write_text(small_text(), encoding="utf-8")
    run_cli("train.py", "data=text", "data.path=notes.txt", *TINY, "model.cell=lstm", "train.max_steps=10",
            "train.eval_every=10", "out_dir=lstm", cwd=tmp_path)
    (tmp_path / "odd.txt").write_bytes(ODD)
    run_cli("evaluate.py", "checkpoint=lstm", "data=text", "data.path=odd.txt", "html=lstm.html", cwd=tmp_path)
    data = page_data(tmp_path / "lstm.html")
    assert data["gates"] == ["i", "f", "o"] and "z_mean" not in data
    p = {k: v.double().numpy() for k, v in load_checkpoint(tmp_path / "lstm" / "best.pt")["model"].items()}
    w = {n: p[f"lstm.{n.replace('w_', 'weight_').replace('b_', 'bias_')}_l0"] for n in ("w_ih", "w_hh", "b_ih", "b_hh")}
    x, h, c = p["embed.weight"][[0, *ODD]], np.zeros((1, 32)), np.zeros((1, 32))
    for t in range(len(ODD) + 1):  # the first (and only) layer, step by step, by the NumPy equations
        s = lstm_step(x[t : t + 1], h, c, w)
        h, c = s["h"], s["c"]
        if t:
            for gate in ("i", "f", "o"):
                assert abs(data[f"{gate}_mean"][0][t - 1] - s[gate].mean()) < 1e-4
