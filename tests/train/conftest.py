"""Shared fixtures of the training tests: a few KB of prose, its tokenizer and prepared shards."""

from __future__ import annotations

import random

import pytest

from cairn.data.curate import prepare
from cairn.data.shards import load_prepared
from cairn.data.tokenizer_train import train_tokenizer
from cairn.tokenizer import Tokenizer
from tests.data_pipeline.test_data_pipeline import prose


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    rng = random.Random(7)
    src = tmp_path_factory.mktemp("text")
    for i in range(12):
        (src / f"doc{i}.txt").write_text(prose(rng, 400))
    tok = tmp_path_factory.mktemp("tok")
    train_tokenizer([src], 384, tok)
    out = tmp_path_factory.mktemp("prep")
    prepare([src], tok, out, val_fraction=0.2, seed=0, progress=False)
    return load_prepared(out)


@pytest.fixture(scope="session")
def tokenizer(prepared):
    return Tokenizer.from_hf_dir(prepared.tokenizer_dir)


