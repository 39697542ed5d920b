"""python -m charlm.export: a trained model for other runtimes.

    python -m charlm.export checkpoint=RUN_DIR|FILE.pt [format=onnx|keras|html|hf] [out=FILE|DIR]

format=html writes the model as one self-contained web page (float16 weights, the step in plain
JavaScript): open it from disk, type a prompt and watch it write; page.html?prompt=...&length=120
&temperature=0 writes that continuation into the element with id `output`. format=keras writes an
.npz of the arrays Keras's model.get_weights() holds for the same model (see python -m
charlm.convert for the other way). format=onnx's graph is one decoding step,
the shape incremental decoding needs:

    byte (N,) int64, hidden (n_layers, N, d_model) float32
        -> log_probs (N, 256) float32, hidden_out (n_layers, N, d_model) float32

N (the batch) is dynamic. Start with byte 0 (start of text) and a zero hidden state, feed the
prompt one byte at a time, then feed back each chosen byte with hidden_out.

format=hf writes a folder as the Hugging Face Hub shares small models: model.safetensors
(float32), config.json and a README.md model card; charlm.load_model(DIR), checkpoint=DIR and,
once uploaded (huggingface-cli upload OWNER/NAME DIR .), checkpoint=hf:OWNER/NAME read it.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

from charlm.config import ExportConfig
from charlm.files import output_file, write_file

DEFAULT_NAMES = {"onnx": "model.onnx", "keras": "keras_weights.npz", "html": "model.html", "hf": "hf"}


def main(argv: list[str]) -> int:
    """`python -m charlm.export checkpoint=... [format=onnx|keras] [out=...]`: the exit status."""
    from charlm.commands import run_tool

    return run_tool(ExportConfig, argv, __doc__, _export_command)


def _export_command(cfg: ExportConfig) -> None:
    import numpy as np

    from charlm.checkpoint import load_checkpoint, locate_checkpoint, model_from_state, model_settings
    from charlm.errors import CharlmError
    from charlm.interop.convert import to_keras

    path = locate_checkpoint(cfg.checkpoint)
    name = DEFAULT_NAMES[cfg.format]
    if cfg.format == "hf":
        return _export_folder(cfg, path)
    out = output_file(cfg.out or path.parent / name, "out", name, inputs=[path])
    state = load_checkpoint(path)
    mc = model_settings(state)
    if cfg.format == "html":
        from charlm.interop.page import write_page

        write_page(state, out, title=str(path))
        print(f"wrote {out}: {mc['d_model']}x{mc['n_layers']} {_cell(mc['cell'])} in one page,"
              f" {out.stat().st_size:,} bytes; open it in a browser (no server, no network)")
        return
    if cfg.format == "keras" and mc["cell"] == "lstm":
        raise CharlmError(f"{path} is an LSTM; format=keras writes Keras GRU weights: use format=onnx or format=html")
    if cfg.format == "keras":
        buffer = io.BytesIO()
        np.savez(buffer, *to_keras(state))  # to the name given, which np.savez would suffix with .npz
        write_file(out, buffer.getbuffer(), "out")
        print(f"wrote {out}: Keras get_weights() for Embedding -> GRU(reset_after={mc['cell'] == 'reset_after'})"
              f" x {mc['n_layers']} -> Dense, {mc['d_model']} wide")
        return
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise CharlmError("ONNX export needs the onnx package: pip install -e '.[export]'") from None
    from charlm.interop.onnx import export_onnx

    export_onnx(model_from_state(state), out)
    state_size = 2 * mc["d_model"] if mc["cell"] == "lstm" else mc["d_model"]  # the LSTM's [h, c] side by side
    print(f"wrote {out}: one decoding step of {path} ({mc['d_model']}x{mc['n_layers']} {_cell(mc['cell'])})\n"
          f"inputs  byte (N,) int64, hidden ({mc['n_layers']}, N, {state_size}) float32\n"
          f"outputs log_probs (N, 256) float32, hidden_out ({mc['n_layers']}, N, {state_size}) float32")


def _export_folder(cfg: ExportConfig, path: Path) -> None:
    """format=hf: model.safetensors, config.json and a README.md model card in the folder out=."""
    import torch

    from charlm.checkpoint import load_checkpoint, model_from_state, model_settings
    from charlm.errors import CharlmError
    from charlm.inference.sampling import sample_text
    from charlm.interop import hf

    out = Path(cfg.out) if cfg.out else (path if path.is_dir() else path.parent) / "hf"
    if out.exists() and not out.is_dir():
        raise CharlmError(f"out={out} is a file; format=hf writes a folder: give a folder's name")
    if not out.parent.is_dir():
        raise CharlmError(f"out={out}: the directory {out.parent} does not exist; create it, or choose another place")
    held = [p.name for p in out.glob("*.pt")] if out.is_dir() else []
    if held or (out.is_dir() and out.resolve() == (path if path.is_dir() else path.parent).resolve()):
        raise CharlmError(f"out={out} holds a run ({', '.join(held) or 'the checkpoint read'}); format=hf writes its"
                          " three files into a folder of its own: choose another, such as out=" + str(out / "hf"))
    state = load_checkpoint(path)
    mc = model_settings(state)
    model = model_from_state(state).eval()
    sample = sample_text(model, "", 200, temperature=0.8, generator=torch.Generator().manual_seed(0))[0]
    written = hf.write_folder(state, out, str(path), sample)
    print(f"wrote {out}/: {', '.join(p.name for p in written)} ({mc['d_model']}x{mc['n_layers']} {_cell(mc['cell'])},"
          f" float32); load it with charlm.load_model({str(out)!r}) or checkpoint={out}, or share it:"
          f" huggingface-cli upload OWNER/NAME {out} .")


def _cell(cell: str) -> str:
    return "LSTM" if cell == "lstm" else f"GRU ({cell})"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
