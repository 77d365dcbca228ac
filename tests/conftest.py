import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Converted-GGUF cache inside the checkout (ignored by git), so tests never write to the user's home.
os.environ.setdefault("CAIRN_CACHE_DIR", str(ROOT / ".cache" / "cairn"))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def default_model():
    """The bundled SmolLM2-135M-Instruct, loaded once for the whole session."""
    from cairn.weights import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def default_engine(default_model):
    from cairn.engine import Engine

    engine = Engine(default_model, quantize="none")  # the fp32 reference
    yield engine
    engine.close()
