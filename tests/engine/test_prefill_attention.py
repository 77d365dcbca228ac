"""A prompt's later chunks attend to the earlier keys and to their own causally, without a mask
(``runner.prefix_then_causal``): equal to the masked attention, and to the model's own forward pass."""

import pytest
import torch
import torch.nn.functional as F

from cairn.engine import runner
from cairn.engine.kv import KVPool, SequenceKV
from cairn.engine.runner import InferenceWeights, Runner, Segment, prefix_then_causal

from .conftest import tiny


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_it_equals_sdpa_with_the_boolean_mask(heads, kv_heads, dtype, tol):
    torch.manual_seed(0)
    t, keys, d = 37, 101, 64
    # laid out as the runner's are: [B, T, H, D] rows seen as [B, H, T, D]
    q = torch.randn(1, t, heads, d).to(dtype).transpose(1, 2)
    k = torch.randn(1, keys, kv_heads, d).to(dtype).transpose(1, 2)
    v = torch.randn(1, keys, kv_heads, d).to(dtype).transpose(1, 2)
    prefix = keys - t
    q_pos, k_pos = torch.arange(prefix, keys)[None], torch.arange(keys)[None]
    mask = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=heads != kv_heads)
    got = prefix_then_causal(q, k, v, prefix)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.allclose(got.float(), want, atol=tol, rtol=0), (got.float() - want).abs().max()


def test_later_chunks_take_it_and_give_the_models_logits(monkeypatch):
    """A 50-token prompt in chunks of 16: chunks 2-4 attend without a mask over 16, 32 and 48 earlier keys; every
    position's logits equal the model's own forward pass over the whole prompt."""
    lm = tiny(seed=3)
    cfg = lm.config
    prefixes = []
    real = runner.prefix_then_causal
    monkeypatch.setattr(runner, "prefix_then_causal", lambda q, k, v, p: prefixes.append(p) or real(q, k, v, p))
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 64, 4, torch.float32, 0, None, False)
    run = Runner(InferenceWeights(lm.model), pool)
    kv = SequenceKV(pool)
    tokens = [(7 * i + 3) % cfg.vocab_size for i in range(50)]
    out = []
    for start in range(0, 50, 16):
        chunk = tokens[start:start + 16]
        slots = kv.reserve(len(chunk))
        out.append(run.forward([Segment(kv, chunk, start, slots, True)], all_logits=True))
        kv.commit(tokens[:start + len(chunk)], len(chunk))
    kv.release()
    with torch.inference_mode():
        want = lm.model(torch.tensor([tokens]))[0]
    assert sorted(set(prefixes)) == [16, 32, 48] and len(prefixes) == 3 * cfg.n_layers
    assert torch.allclose(torch.cat(out), want, atol=1e-5, rtol=0)
