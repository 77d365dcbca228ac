"""The network only: norms, RoPE, attention, MLP, blocks, the transformer. No files, sampling or HTTP."""

from cairn.model.cache import DenseKVCache, KVCache
from cairn.model.transformer import Transformer, build_model

__all__ = ["DenseKVCache", "KVCache", "Transformer", "build_model"]
