"""Tiny random models for engine tests (the default model only where its weights matter)."""

from pathlib import Path

import pytest

from cairn.config import ModelConfig
from cairn.model import build_model
from cairn.weights import LoadedModel


def tiny(seed: int = 0, **kw) -> LoadedModel:
    args = dict(vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=512)
    args.update(kw)
    cfg = ModelConfig(**args)
    model = build_model(cfg).init_weights(std=0.1, seed=seed).eval().requires_grad_(False)
    return LoadedModel(model, None, cfg, Path("tiny"), "tiny")


@pytest.fixture()
def tiny_model() -> LoadedModel:
    return tiny()
