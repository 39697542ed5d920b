"""TensorBoard as a user sees it, in headless Chromium: the curves lead the Time Series tab.

Needs Debian's chromium (apt-get install chromium); skipped where it is absent.
"""
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import TINY, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=15000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.system
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")
def test_time_series_tab_opens_on_the_training_curves(tmp_path, text_file):
    run_cli("train.py", "data=text", f"data.path={text_file}", *TINY, "train.max_steps=6", "train.eval_every=3",
            "out_dir=run", cwd=tmp_path)
    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "run"),
                              "--port", str(port), "--host", "127.0.0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        end = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                assert board.poll() is None and time.time() < end, "tensorboard did not start"
                time.sleep(0.5)
        browser = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"]
        dom = subprocess.run([*browser, "--dump-dom", url + "#timeseries"], capture_output=True, text=True,
                             timeout=120).stdout
        subprocess.run([*browser, f"--screenshot={tmp_path / 'timeseries.png'}", url + "#timeseries"],
                       capture_output=True, timeout=120)
    finally:
        board.terminate()
        board.wait(timeout=30)
    groups = [g for g in re.findall(r'class="group-title"(?: title="[^"]*")?>([^<]*)<', dom) if g != "Pinned"]
    assert groups[:2] == ["train", "val"], groups  # no single-point hparam/ cards above the curves
    assert not any(g.startswith("hparam") for g in groups)
    assert (tmp_path / "timeseries.png").stat().st_size > 10_000  # a rendered page, not a blank one
