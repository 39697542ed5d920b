"""python -m charlm.convert: Keras / Trax GRU language-model weights as a charlm checkpoint, exactly.

    python -m charlm.convert format=keras weights=model.weights.h5 out=imported.pt reset_after=true
    python -m charlm.convert format=trax weights=gru_lm.npz out=imported.pt [flip_update_gate=true]

The other way: python -m charlm.export checkpoint=RUN format=keras.

The weight layouts each library uses, and how they map to charlm's: charlm/interop/convert.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from charlm.checkpoint import model_settings, save_checkpoint
from charlm.config import ConvertConfig
from charlm.errors import CharlmError
from charlm.files import output_file, write_error
from charlm.interop.convert import NOT_EQUIVALENT, from_keras, from_trax, read_keras


def main(argv: list[str]) -> int:
    """`python -m charlm.convert format=keras|trax weights=FILE out=FILE.pt [reset_after=...]`: the exit status."""
    from charlm.commands import run_tool

    return run_tool(ConvertConfig, argv, __doc__, _convert_command)


def _convert_command(cfg: ConvertConfig) -> None:
    weights = Path(cfg.weights)
    if not weights.is_file():
        raise CharlmError(f"weights={weights} is not a file")
    out = output_file(cfg.out, "out", "imported.pt", inputs=[weights], overwrite=cfg.overwrite)
    if cfg.format == "keras":
        state = from_keras(read_keras(weights), cfg.reset_after, cfg.flip_update_gate)
    else:
        if cfg.reset_after:
            raise CharlmError(f"Trax's GRU is reset-before; {NOT_EQUIVALENT}")
        with np.load(weights) as f:
            state = from_trax({name: f[name] for name in f.files}, cfg.flip_update_gate)
    try:
        save_checkpoint(out, state)
    except OSError as e:
        raise CharlmError(write_error(f"out={out}", e)) from None
    mc = model_settings(state)
    print(f"wrote {out}: {mc['d_model']}x{mc['n_layers']} GRU, model.cell={mc['cell']}")
    if cfg.flip_update_gate:
        print("flipped the update gate: negated the z weights and biases, since sigmoid(-a) = 1 - sigmoid(a)"
              " turns h' = (1-z)*h + z*n into h' = z*h + (1-z)*n exactly")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
