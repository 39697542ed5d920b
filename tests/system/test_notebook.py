"""examples/timemachine.ipynb, executed in a real Jupyter kernel: every cell runs, it trains,
plots, samples and shows the evaluate page."""
import os

import pytest

from helpers import ROOT


@pytest.mark.system
@pytest.mark.slow
def test_the_example_notebook_runs_in_a_jupyter_kernel(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "examples" / "timemachine.ipynb", as_version=4)
    os.environ["CHARLM_NOTEBOOK_SECONDS"] = "15"  # the kernel inherits it: a shorter minute
    try:
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        del os.environ["CHARLM_NOTEBOOK_SECONDS"]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o.text for o in outputs if o.output_type == "stream" and "Warning" in o.text]  # a quiet notebook
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "Run(out_dir=PosixPath('runs/notebook')" in text and "the time traveller" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss curves
    assert any("<iframe srcdoc=" in o.get("data", {}).get("text/html", "") for o in outputs)  # the page, inline
    assert (tmp_path / "runs" / "notebook" / "best.pt").is_file() and (tmp_path / "page.html").is_file()
