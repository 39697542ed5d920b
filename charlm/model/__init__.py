"""The model: the network (CharLM), its GRU cells, the fast CPU training path, the NumPy reference."""
from charlm.model.network import VOCAB_SIZE, CharLM

__all__ = ["CharLM", "VOCAB_SIZE"]
