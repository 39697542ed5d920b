"""charlm: byte-level GRU language models in PyTorch."""
from .checkpoint import load_model
from .model import CharLM, ModelConfig
from .sampling import generate, sample_text
from .tokenizer import decode, encode

__all__ = ["CharLM", "ModelConfig", "load_model", "generate", "sample_text", "encode", "decode"]
