"""Packed rows (``segments``): each sequence's logits equal those of the sequence alone, with full attention
and with a sliding window; ``hidden`` is what the head reads."""

from __future__ import annotations

import pytest
import torch

from cairn.config import ModelConfig
from cairn.model import build_model
from cairn.model.layers import positions_in_segments


@pytest.mark.parametrize("window", [None, 3])
def test_packed_sequences_equal_each_alone(window):
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32,
                      sliding_window=window)
    model = build_model(cfg).init_weights(seed=1).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 50, (n,), generator=g) for n in (5, 7, 4)]
    row = torch.cat(seqs)[None]
    segments = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])[None]
    assert positions_in_segments(segments).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]]
    with torch.no_grad():
        packed = model(row, segments=segments)[0]
        alone = torch.cat([model(s[None])[0] for s in seqs])
        # without segments the later sequences would see the earlier ones
        assert not torch.allclose(model(row)[0][5:], alone[5:], atol=1e-3)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_hidden_is_what_the_head_reads():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32,
                      tie_embeddings=True)
    model = build_model(cfg).init_weights(seed=1).eval()
    x = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        h = model.hidden(x)
        assert h.shape == (2, 6, 32)
        torch.testing.assert_close(model(x), h @ model.embed.weight.T)
        torch.testing.assert_close(model(x, last_only=True), model(x)[:, -1:])
