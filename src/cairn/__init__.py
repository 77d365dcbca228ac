"""cairn: a compact, complete, open assistant-LLM stack."""

from cairn.config import ModelConfig, RopeScaling
from cairn.errors import CairnError

__all__ = ["CairnError", "ModelConfig", "RopeScaling"]
__version__ = "0.1.0"
