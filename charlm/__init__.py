"""charlm: byte-level GRU language models in PyTorch."""
from importlib import import_module

# Loaded on first use, so that `import charlm.config` (and a mistyped setting) costs no torch import.
_EXPORTS = {
    "CharLM": "model.network", "ModelConfig": "config", "load_model": "checkpoint",
    "generate": "inference.sampling", "sample_text": "inference.sampling", "encode": "data.tokenizer",
    "decode": "data.tokenizer", "train": "commands.api", "Run": "commands.api", "CharlmError": "errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")
