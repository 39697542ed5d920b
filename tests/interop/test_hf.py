"""format=hf: the folder the field shares models as (model.safetensors, config.json, a model card),
read back by load_model, sample.py and evaluate.py, from disk or as hf:OWNER/NAME."""
import json

import pytest
import torch

import charlm
from charlm.checkpoint import load_checkpoint, model_state, save_checkpoint
from helpers import copy_run, one_error_line, random_model, run_cli

CELLS = ["reset_after", "reset_before", "lstm"]


@pytest.mark.parametrize("cell", CELLS)
def test_a_folder_gives_the_checkpoints_log_probabilities(tmp_path, cell):
    model = random_model(cell, d=12, layers=2).float()
    save_checkpoint(tmp_path / "m.pt", {**model_state(model), "step": 7, "best_val_loss": 1.5})
    out = run_cli("-m", "charlm.export", "checkpoint=m.pt", "format=hf", "out=folder", cwd=tmp_path)
    assert "wrote folder/: model.safetensors, config.json, README.md" in out.stdout
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    loaded = charlm.load_model(tmp_path / "folder")
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model.eval()(x)[0])  # float32 weights: the same numbers exactly
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["model_config"]["cell"] == cell and config["vocabulary"]["size"] == 256
    assert config["charlm_version"] and config["trained"]["step"] == 7


def test_a_run_exports_with_its_card_and_every_command_reads_the_folder(tmp_path, tiny_run):
    copy_run(tiny_run, tmp_path, "run")
    run_cli("-m", "charlm.export", "checkpoint=run", "format=hf", cwd=tmp_path)
    folder = tmp_path / "run" / "hf"
    card = (folder / "README.md").read_text(encoding="utf-8")
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    assert card.startswith("---\nlibrary_name: charlm\n") and "pipeline_tag: text-generation" in card
    assert state["corpus"]["sha256"] in card and "python train.py data=text data.path=notes.txt" in card
    assert f"{state['best_val_loss'] / 0.6931471805599453:.4f} bits/byte" in card
    assert "charlm.load_model(" in card and "```\n" in card  # how to load it, and a sample
    sampled = run_cli("sample.py", "checkpoint=run/hf", "prompt=the", "length=12", "seed=1", cwd=tmp_path)
    assert sampled.stdout.startswith("the")
    scored = run_cli("evaluate.py", "checkpoint=run/hf", "format=json", cwd=tmp_path)  # the run's own text
    assert json.loads(scored.stdout)["bytes"] > 0
    one_error_line(run_cli("-m", "charlm.export", "checkpoint=run", "format=hf", "out=run", cwd=tmp_path,
                           check=False), "out=run holds a run")


def test_a_folder_with_wrong_shapes_or_an_unknown_cell_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    model = random_model("reset_after", d=12, layers=1).float()
    save_checkpoint(tmp_path / "m.pt", {**model_state(model), "step": 1, "best_val_loss": 2.0})
    run_cli("-m", "charlm.export", "checkpoint=m.pt", "format=hf", "out=good", cwd=tmp_path)
    for name in ("shapes", "cell"):
        run_cli("-m", "charlm.export", "checkpoint=m.pt", "format=hf", f"out={name}", cwd=tmp_path)
    weights = load_file(str(tmp_path / "shapes" / "model.safetensors"))
    weights["head.weight"] = torch.zeros(256, 5)
    save_file(weights, str(tmp_path / "shapes" / "model.safetensors"))
    config = json.loads((tmp_path / "cell" / "config.json").read_text())
    config["model_config"]["cell"] = "transformer"
    (tmp_path / "cell" / "config.json").write_text(json.dumps(config))
    one_error_line(run_cli("sample.py", "checkpoint=shapes", cwd=tmp_path, check=False),
                   "shapes is a damaged or edited checkpoint", "head.weight should be (256, 12)")
    one_error_line(run_cli("sample.py", "checkpoint=cell", cwd=tmp_path, check=False),
                   "cell is a damaged or edited checkpoint", "model.cell must be", "'transformer'")


def test_hf_names_load_from_the_hub_through_huggingface_hub(tmp_path, monkeypatch):
    """The Hub cannot be reached here: a local folder stands in for its download."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    model = random_model("lstm", d=8, layers=1).float()
    save_checkpoint(tmp_path / "m.pt", {**model_state(model), "step": 3, "best_val_loss": 2.0})
    run_cli("-m", "charlm.export", "checkpoint=m.pt", "format=hf", "out=downloaded", cwd=tmp_path)
    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **_):
        asked.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path / "downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert charlm.load_model("hf:someone/tiny-lstm").config.cell == "lstm"
    sampled = run_cli("sample.py", "checkpoint=hf:someone/tiny-lstm", "prompt=a", "length=4", cwd=tmp_path)
    assert sampled.stdout.startswith("a")
    assert asked[0] == ("someone/tiny-lstm", ("model.safetensors", "config.json", "README.md"))

    def offline(**_):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    one_error_line(run_cli("sample.py", "checkpoint=hf:someone/other", cwd=tmp_path, check=False),
                   "could not fetch someone/other from the Hugging Face Hub", "no network")
