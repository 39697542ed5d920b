"""A model in the folder the field shares small models as: `model.safetensors` (float32),
`config.json` and a `README.md` model card, as `python -m charlm.export format=hf` writes it and
as the Hugging Face Hub serves it.

    write_folder(state, out, source)      a checkpoint's model as such a folder
    is_folder(path), read_folder(path)    a folder back as a checkpoint's state (checked like one)
    download(name)                        checkpoint=hf:OWNER/NAME: the Hub's copy (its cache first)

config.json holds the model config, the vocabulary's meaning (the 256 byte values; byte 0 starts
a text), charlm's version, and what the run recorded (its settings, step, validation loss, text).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from charlm.errors import CharlmError

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
FORMAT = "charlm-hf"
HUB_PREFIX = "hf:"
VOCABULARY = ("UTF-8 bytes: token i is the byte value i (0-255), so any text in any language is 256 symbols and"
              " there is no vocabulary file; byte 0 starts every text (the model reads it first)")


def charlm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("charlm")
    except PackageNotFoundError:
        return "unknown"


def is_folder(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def write_folder(state: dict[str, Any], out: Path, source: str, sample: str) -> list[Path]:
    """Write the folder for a checkpoint's state into out (created); the files written."""
    from safetensors.torch import save

    from charlm.checkpoint import run_settings
    from charlm.files import write_file

    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state["model"].items()}
    config = {
        "format": FORMAT,
        "charlm_version": charlm_version(),
        "model_type": "charlm",
        "model_config": state["model_config"],
        "vocabulary": {"size": 256, "start_byte": 0, "meaning": VOCABULARY},
        "trained": {"step": state["step"], "best_val_loss": _finite(state["best_val_loss"]),
                    "best_val_bits_per_byte": _finite(state["best_val_loss"] / math.log(2)),
                    "corpus": state.get("corpus"), "source": source},
        "run_config": run_settings(state),
    }
    write_file(out / WEIGHTS, save(weights, metadata={"format": "pt"}), "out")
    write_file(out / CONFIG, (json.dumps(config, indent=2, allow_nan=False) + "\n").encode(), "out")
    write_file(out / CARD, model_card(config, sample).encode("utf-8"), "out")
    return [out / WEIGHTS, out / CONFIG, out / CARD]


def read_folder(path: Path) -> dict[str, Any]:
    """A folder as a checkpoint's state (format, model_config, model, step, best_val_loss, config),
    which the caller checks as it checks any checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from charlm.checkpoint import FORMAT as CHECKPOINT_FORMAT
    from charlm.checkpoint import VERSION

    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CharlmError(f"{path / CONFIG} cannot be read ({str(e).splitlines()[0][:80]}); is {path} a folder"
                          " written by python -m charlm.export format=hf?") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("model_config"),
                                                                                       dict):
        raise CharlmError(f"{path / CONFIG} is not a charlm model's config.json (no \"format\": \"{FORMAT}\" and"
                          " model_config); give a folder written by python -m charlm.export format=hf")
    try:
        weights = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CharlmError(f"{path / WEIGHTS} is not a readable safetensors file ({str(e)[:80]})") from None
    trained = config.get("trained") or {}
    return {"format": CHECKPOINT_FORMAT, "version": VERSION, "model_config": config["model_config"],
            "model": weights, "step": int(trained.get("step", 0)),
            "best_val_loss": float(trained.get("best_val_loss") if trained.get("best_val_loss") is not None
                                   else math.nan),
            "config": config.get("run_config") or {}, "corpus": trained.get("corpus"), "source": str(path)}


def download(name: str) -> Path:
    """hf:OWNER/NAME: the folder from the Hugging Face Hub (its local cache first, so it works offline
    once downloaded), through huggingface_hub."""
    repo = name.removeprefix(HUB_PREFIX)
    try:
        import huggingface_hub
    except ImportError:
        raise CharlmError(f"checkpoint={name} needs huggingface_hub: pip install 'charlm[hub]'"
                          " (or pip install huggingface_hub)") from None
    try:
        folder = huggingface_hub.snapshot_download(repo_id=repo, allow_patterns=[WEIGHTS, CONFIG, CARD])
    except Exception as e:  # the Hub's errors: no network, no such repository, no access
        raise CharlmError(f"could not fetch {repo} from the Hugging Face Hub ({type(e).__name__}:"
                          f" {str(e).splitlines()[0][:120]})") from None
    return Path(folder)


def model_card(config: dict[str, Any], sample: str) -> str:
    """README.md: the Hub's metadata, then what the model is, how it was trained and how to load it."""
    mc, trained = config["model_config"], config["trained"]
    run = config.get("run_config") or {}
    cell = "LSTM" if mc["cell"] == "lstm" else f"GRU ({mc['cell']})"
    corpus = trained.get("corpus") or {}
    data = run.get("data", {})
    text = data.get("name", "an unknown text")
    if text == "text":
        text = Path(str(data.get("path") or corpus.get("path") or "a text file")).name
    command = _command(run)
    bpb = trained.get("best_val_bits_per_byte")
    lines = [
        "---",
        "library_name: charlm",
        "tags: [charlm, byte-level, character-level, gru, text-generation, pytorch]",
        "pipeline_tag: text-generation",
        "---",
        "",
        f"# A byte-level {cell} language model, {mc['d_model']}x{mc['n_layers']}, trained with charlm",
        "",
        f"Embedding -> {mc['n_layers']} stacked {cell} layers of {mc['d_model']} units -> Linear -> LogSoftmax over"
        " the 256 byte values. " + VOCABULARY + ".",
        "",
        "## Training",
        "",
        f"- text: {text}" + (f" ({corpus['bytes']:,} bytes, SHA-256 `{corpus['sha256']}`)" if corpus else ""),
        f"- command: `{command}`" if command else "- command: not recorded (a converted model)",
        f"- steps: {trained.get('step')}",
        f"- best validation loss: {_show(trained.get('best_val_loss'))} nats/byte"
        f" ({_show(bpb)} bits/byte)",
        f"- charlm {config['charlm_version']}",
        "",
        "## A sample",
        "",
        "```",
        sample,
        "```",
        "",
        "## How to use it",
        "",
        "```bash",
        "# charlm first: pip install git+URL of its repository (or pip install . in a clone);",
        "# pip install huggingface_hub too, to load it by name from the Hub",
        "charlm sample checkpoint=hf:OWNER/NAME prompt=\"the \" length=200",
        "charlm sample checkpoint=path/to/this/folder prompt=\"the \" length=200",
        "```",
        "",
        "```python",
        "import charlm",
        "model = charlm.load_model(\"path/to/this/folder\")   # or \"hf:OWNER/NAME\"",
        "print(charlm.sample_text(model, \"the \", 200, temperature=0.8)[0])",
        "```",
        "",
        "`model.safetensors` holds the weights in float32 under PyTorch's names (`embed.weight`,",
        "`gru.weight_ih_l0`, ... , `head.weight`); `config.json` holds the model config and the run's settings.",
        "",
    ]
    return "\n".join(lines)


def _command(run: dict[str, Any]) -> str:
    if not run:
        return ""
    data, model, train = run.get("data", {}), run.get("model", {}), run.get("train", {})
    parts = ["python train.py", f"data={data.get('name')}"]
    if data.get("name") == "text" and data.get("path"):
        parts.append(f"data.path={Path(str(data['path'])).name}")
    parts += [f"model.{k}={model[k]}" for k in ("d_model", "n_layers", "cell", "dropout") if k in model]
    if train.get("max_seconds"):
        parts.append(f"train.max_seconds={train['max_seconds']:g}")
    elif "max_steps" in train:
        parts.append(f"train.max_steps={train['max_steps']}")
    return " ".join(parts)


def _finite(x: Optional[float]) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def _show(x: Optional[float]) -> str:
    return "not recorded" if x is None else f"{x:.4f}"
