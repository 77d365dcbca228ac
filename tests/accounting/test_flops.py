"""FLOPs per token against PyTorch's own FLOP counter running cairn's model (an independent count)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cairn.accounting import account
from cairn.config import ModelConfig
from cairn.model import build_model
from tests.accounting.test_exact import configs


def _counted(cfg: ModelConfig, tokens: int) -> tuple[int, int]:
    """(matmul FLOPs, attention FLOPs) that torch counts for one forward pass of ``tokens`` tokens."""
    model = build_model(cfg).init_weights(seed=0)
    x = torch.randint(0, cfg.vocab_size, (1, tokens))
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = counts.pop("aten.bmm", 0)  # the math SDPA path: QKᵀ and AV for every (query, key) pair
    return sum(counts.values()), attention


@settings(max_examples=25, deadline=None)
@given(configs())
def test_forward_flops_match_torch_flop_counter(cfg: ModelConfig) -> None:
    tokens = 5
    matmul, attention = _counted(cfg, tokens)
    acc = account(cfg)
    # every token is routed to exactly k experts, so the routed-expert FLOPs are exactly tokens × k/E × all experts
    assert matmul == tokens * acc.forward_matmul_flops_per_token
    # the math path scores all T x T pairs (the mask only hides them): T queries x T keys
    assert attention == tokens * acc.attention_flops_per_token(tokens)
