"""Checkpoints: plain data only, written atomically, loaded with weights_only=True."""
from __future__ import annotations

import codecs
import io
import pickle
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from charlm.config import check_model
from charlm.errors import CharlmError
from charlm.files import atomic_write
from charlm.model.network import VOCAB_SIZE, CharLM, ModelConfig, weight_shapes

FORMAT = "charlm-checkpoint"
VERSION = 1
RUNS_DIR = "runs"
TRAIN_COMMAND = "python train.py data=timemachine"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write state to path so that a crash or a failed write at any moment leaves the old file or
    the new one (charlm.files.atomic_write); an OSError says why the write failed."""
    buffer = io.BytesIO()  # serialized first: a full disk then fails as an OSError, in one place
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    atomic_write(path, buffer.getbuffer())


def describe_saved(out_dir: Path) -> str:
    """What out_dir's checkpoints hold now, read back from disk: "last.pt holds step 300, best.pt step 200"."""
    held = []
    for name in ("last.pt", "best.pt"):
        if (out_dir / name).exists():
            try:
                held.append(f"{name} step {load_checkpoint(out_dir / name)['step']}")
            except CharlmError:
                held.append(f"{name} unreadable")
    if not held:
        return f"{out_dir} holds no checkpoint"
    return "saved so far: " + ", ".join(held).replace(" step", " holds step", 1)


def model_state(model: CharLM) -> dict[str, Any]:
    """The part of a checkpoint that rebuilds the model: its config and weights."""
    # Unwrap torch.compile / DDP so the keys carry no '_orig_mod.' or 'module.' prefix.
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return {"model_config": asdict(model.config), "model": model.state_dict()}


def resolve_checkpoint(path: str | Path, prefer: str = "best.pt") -> Path:
    """A .pt file, the checkpoint inside a run directory (prefer, else the other one), a model
    folder (python -m charlm.export format=hf), or hf:OWNER/NAME, that folder from the Hub."""
    from charlm.interop import hf

    if str(path).startswith(hf.HUB_PREFIX):
        return hf.download(str(path))
    path = Path(path)
    if hf.is_folder(path):
        return path
    if path.is_dir():
        for name in (prefer, "last.pt" if prefer == "best.pt" else "best.pt"):
            if (path / name).is_file():
                return path / name
        raise CharlmError(f"{path} holds no best.pt or last.pt, nor a model.safetensors and config.json; is it a"
                          " charlm run directory or model folder?")
    if not path.exists():
        raise CharlmError(f"checkpoint {path} does not exist; give a run directory or a .pt file")
    return path


def latest_run(root: str | Path = RUNS_DIR) -> Path:
    """The most recently written run directory under root that holds a checkpoint."""
    candidates = [p.parent for p in Path(root).glob("**/*.pt") if p.name in ("best.pt", "last.pt")]
    if not candidates:
        raise CharlmError(f"no trained model under {root}/ yet; train one first: {TRAIN_COMMAND}")
    return max(candidates, key=lambda d: max(f.stat().st_mtime for f in d.glob("*.pt")))


def locate_checkpoint(path: str | Path | None) -> Path:
    """The checkpoint a user named (run directory or .pt), or else the newest run's."""
    return resolve_checkpoint(path if path else latest_run())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU without running any code from the file (a model folder's
    safetensors and config.json too)."""
    path = Path(path)
    from charlm.interop import hf

    if hf.is_folder(path):
        state = hf.read_folder(path)
        check_model_state(state, path)
        return state
    _check_container(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(e))
        what = f"it names the Python object {found.group(1)}" if found else "it holds more than plain data"
        raise CharlmError(
            f"{path} was refused: {what}, so loading it could run code; nothing from it was run"
            " (charlm reads plain-data checkpoints only)"
        ) from None
    except IsADirectoryError:
        raise CharlmError(f"{path} is a directory; give a run directory or a .pt file") from None
    except Exception as e:  # torch.load fails in many ways on a damaged or foreign file
        detail = f"{type(e).__name__}: {str(e).splitlines()[0].split('. ')[0]}"[:100]
        raise CharlmError(f"{path} is not a readable checkpoint (truncated or not a .pt file; {detail})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CharlmError(f"{path} is not a charlm checkpoint")
    if state.get("version") != VERSION:
        raise CharlmError(
            f"{path} is a charlm checkpoint of format version {state.get('version')}; this charlm"
            f" reads version {VERSION}"
        )
    check_model_state(state, path)
    return state


def _check_container(path: Path) -> None:
    """A file that is not in torch.save's format at all (an HTML page, a text) is named for what it
    is, before torch.load reads it as a pickle and calls it code."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except IsADirectoryError:
        raise CharlmError(f"{path} is a directory; give a run directory or a .pt file") from None
    except OSError as e:
        raise CharlmError(f"cannot read {path} ({e.strerror}); check that it is a readable file") from None
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # torch.save's zip, or its older pickle
        return
    start = head.lstrip()[:15].lower()
    if start.startswith((b"<!doctype html", b"<html")):
        what = "an HTML page"
    elif not head:
        what = "empty"
    else:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at byte 512 is fine
            what = "text"
        except UnicodeDecodeError:
            what = "in another format"
    raise CharlmError(f"{path} is not a checkpoint (it is {what}); give a run directory or a .pt file"
                      " written by charlm")


def check_model_state(state: dict[str, Any], path: str | Path) -> None:
    """The model a checkpoint describes, checked before anything is built from it: its keys, its
    model_config, every tensor's name and shape against that config, and its weights finite. The
    config is checked against the tensors in the file, whose sizes are real, before any model is
    allocated: an edited d_model cannot ask for terabytes. One line names what is wrong."""
    bad = f"{path} is a damaged or edited checkpoint:"
    for key in ("model_config", "model", "step", "best_val_loss"):
        if key not in state:
            raise CharlmError(f"{bad} it has no {key!r} entry; use another checkpoint")
    mc, weights = state["model_config"], state["model"]
    if not isinstance(mc, dict) or not isinstance(weights, dict) or not all(
            isinstance(t, torch.Tensor) for t in weights.values()):
        raise CharlmError(f"{bad} its model_config or model entry is not what charlm writes; use another checkpoint")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(mc) - known)
    if unknown:
        raise CharlmError(f"{bad} its model_config names {', '.join(unknown)}, which this charlm does not know"
                          " (a newer charlm's checkpoint?); use the charlm that wrote it")
    missing = [k for k in ("d_model", "n_layers", "cell") if k not in mc]
    if missing:
        raise CharlmError(f"{bad} its model_config lacks {', '.join(missing)}; use another checkpoint")
    try:
        config = ModelConfig(**mc)
        check_model(config)
    except CharlmError as e:
        raise CharlmError(f"{bad} {e}") from None
    d, n = config.d_model, config.n_layers
    embed = weights.get("embed.weight")
    if not isinstance(d, int) or not isinstance(n, int) or embed is None or tuple(embed.shape) != (VOCAB_SIZE, d) \
            or len(weights) != 3 + 4 * n:
        held = "no embed.weight" if embed is None else f"embed.weight of shape {tuple(embed.shape)}"
        raise CharlmError(f"{bad} its model_config says d_model={d}, n_layers={n}, but it holds {len(weights)}"
                          f" tensors and {held}; use another checkpoint")
    expected = weight_shapes(config)  # names and shapes, nothing allocated
    for name in sorted(set(expected) | set(weights)):
        if name not in weights or name not in expected or tuple(weights[name].shape) != expected[name]:
            found = tuple(weights[name].shape) if name in weights else "nothing"
            raise CharlmError(f"{bad} {name} should be {expected.get(name, 'absent')} for a {d}x{n} {config.cell}"
                              f" model, and it holds {found}; use another checkpoint")
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CharlmError(f"{path} holds non-finite weights (NaN or inf) in {name}: its model cannot write"
                              " text; use an earlier checkpoint (a run's best.pt holds its best weights)")


# The keys every checkpoint holds, a converted one's too, are read here; a training run's own
# (optimizer, schedule, counters, random states, carried state) in charlm.training.state.


def model_settings(state: dict[str, Any]) -> dict[str, Any]:
    """The model's settings (ModelConfig's fields): its size and cell."""
    return state["model_config"]


def run_settings(state: dict[str, Any]) -> dict[str, Any]:
    """The settings of the run that wrote it (RunConfig's fields, nested; empty for a converted model)."""
    return state.get("config", {})


def held(state: dict[str, Any]) -> str:
    """What it holds, for a header line: "step 200 | val loss 1.7409"."""
    return f"step {state['step']} | val loss {state['best_val_loss']:.4f}"


def model_from_state(state: dict[str, Any]) -> CharLM:
    """The model a checkpoint describes, with its own architecture and weights."""
    model = CharLM(ModelConfig(**model_settings(state)))
    model.load_state_dict(state["model"])
    return model


def load_model(path: str | Path) -> CharLM:
    """A trained model from a checkpoint file or run directory, on the CPU, in eval mode."""
    model = model_from_state(load_checkpoint(resolve_checkpoint(path)))
    return model.eval()
