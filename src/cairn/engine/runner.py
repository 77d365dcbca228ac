"""One forward pass over a continuous batch, on the paged KV cache.

The engine does not call ``Transformer.forward`` for serving: a step mixes single decode tokens of many sequences
with prefill chunks of others, and padding them into one ``[B, T]`` tensor would multiply the matmul work by the
longest chunk. Instead the step is *packed*: all its tokens form one ``[N, d]`` matrix for every projection and
MLP (the expensive part), and only attention is done per group: one batched SDPA call for all decode tokens
(keys gathered from their block tables, padded with position −1) and one per prefill chunk.

The inference tricks are visible here, not hidden in the model: ``InferenceWeights`` holds fused QKV and
gate/up projections (and the quantized ones when asked); ``fuse_for_inference(model)`` makes the model's own
q/k/v and gate/up parameters views of those fused tensors, so nothing is stored twice and the model's state-dict
names are unchanged. Norms, RoPE tables, the attention mask and the embedding are the model's own code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cairn.engine.kv import KVPool, SequenceKV
from cairn.model.layers import RMSNorm, attention_mask
from cairn.weights.quant import check_mode, quantize_linear, uses_dynamic_activations


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> list[dict[str, torch.Tensor | None]]:
    """Fuse each layer's q/k/v and gate/up weights into one tensor each; the model's parameters become views.

    Returns per layer ``{"qkv_w", "qkv_b", "gate_up_w", "gate_up_b"}``. Idempotent: a fused model is reused.
    """
    fused = getattr(model, "_cairn_fused", None)
    if fused is not None:
        return fused
    fused = []
    for block in model.layers:
        a, m = block.attn, block.mlp
        entry: dict[str, torch.Tensor | None] = {}
        entry["qkv_w"], entry["qkv_b"] = _fuse(a, ("q", "k", "v"))
        if m.swiglu:
            entry["gate_up_w"], entry["gate_up_b"] = _fuse(m, ("gate", "up"))
        else:
            entry["gate_up_w"], entry["gate_up_b"] = m.up.weight, m.up.bias
        fused.append(entry)
    model._cairn_fused = fused
    return fused


def _fuse(parent: nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    mods = [getattr(parent, n) for n in names]
    w = torch.cat([m.weight.detach() for m in mods])
    b = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
    start = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(w[start:start + n], requires_grad=False)
        if b is not None:
            m.bias = nn.Parameter(b[start:start + n], requires_grad=False)
        start += n
    return w, b


CALIBRATION_TEXT = (
    "User: How do plants turn sunlight into food?\nAssistant: Plants use photosynthesis. Chlorophyll in their "
    "leaves absorbs light, which splits water into oxygen and hydrogen; the energy is stored as sugar made from "
    "carbon dioxide. def area(r):\n    return 3.14159 * r ** 2  # 1, 2, 3, 10, 100, 2024. "
    "Le chat dort sur le canapé. Ein Haus am See. The quick brown fox jumps over the lazy dog!"
)


@torch.no_grad()
def activation_ranges(model: nn.Module, tokens: list[int]) -> list[dict[str, torch.Tensor]]:
    """Per layer, the largest |activation| of each input channel of its projections (the last layer's entry also
    has ``"head"``, the output head's input)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in model.layers]
    hooks = []

    def track(i: int, key: str):
        def hook(mod, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            out[i][key] = torch.maximum(out[i][key], a) if key in out[i] else a
        return hook

    for i, block in enumerate(model.layers):
        hooks.append(block.attn.q.register_forward_pre_hook(track(i, "qkv")))
        hooks.append(block.attn.o.register_forward_pre_hook(track(i, "o")))
        hooks.append(block.mlp.up.register_forward_pre_hook(track(i, "gate_up")))
        hooks.append(block.mlp.down.register_forward_pre_hook(track(i, "down")))
    def head_hook(mod, args, output):
        out[-1]["head"] = output.detach().abs().reshape(-1, output.shape[-1]).amax(0)

    hooks.append(model.norm.register_forward_hook(head_hook))
    try:
        model(torch.tensor([tokens]))
    finally:
        for h in hooks:
            h.remove()
    return out


class InferenceWeights(nn.Module):
    """The model's weights arranged for serving: fused projections, optionally int8/int4, the output head too.

    With the FBGEMM int8 kernel, activations are quantized on the fly (one scale per matrix), which the few huge
    outlier channels of LLM activations (up to ~3000 in SmolLM2's down projection, median ~1) make coarse. As in
    LLM.int8(), the ``outliers`` input channels with the largest activations (calibrated once on
    ``CALIBRATION_TEXT``) bypass int8 and multiply fp32 weight columns.
    """

    def __init__(self, model: nn.Module, quantize: str | None = None, group_size: int = 32, kernel: str = "auto",
                 tokenizer=None, outliers: int | None = None):
        super().__init__()
        cfg = model.cfg
        self.cfg, self.model = cfg, model
        self.quantize = check_mode(quantize, group_size)
        fused = fuse_for_inference(model)
        self.qkv, self.o, self.gate_up, self.down = (nn.ModuleList() for _ in range(4))
        dynamic = uses_dynamic_activations(self.quantize, kernel)
        self.outliers = (32 if outliers is None else outliers) if dynamic else 0
        ranges = None
        if self.outliers:
            ids = tokenizer.encode(CALIBRATION_TEXT) if tokenizer is not None else \
                torch.randint(0, cfg.vocab_size, (128,), generator=torch.Generator().manual_seed(0)).tolist()
            ranges = activation_ranges(model, ids)

        def q(w, b, amax=None):
            top = None if amax is None else amax.topk(min(self.outliers, amax.numel())).indices
            return quantize_linear(w, b, self.quantize, group_size, kernel, top)

        for i, (block, f) in enumerate(zip(model.layers, fused, strict=True)):
            r = ranges[i] if ranges else {}
            self.qkv.append(q(f["qkv_w"], f["qkv_b"], r.get("qkv")))
            self.o.append(q(block.attn.o.weight, block.attn.o.bias, r.get("o")))
            self.gate_up.append(q(f["gate_up_w"], f["gate_up_b"], r.get("gate_up")))
            self.down.append(q(block.mlp.down.weight, block.mlp.down.bias, r.get("down")))
        self.head = q(model.output_weight(), None, ranges[-1].get("head") if ranges else None)

    def weight_bytes(self) -> int:
        total = 0
        for mod in [*self.qkv, *self.o, *self.gate_up, *self.down, self.head]:
            if getattr(mod, "outliers", None) is not None:
                total += mod.outliers[1].numel() * 4
            for t in (getattr(mod, "weight", None), getattr(mod, "q", None), getattr(mod, "packed", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


@dataclass
class Segment:
    """Tokens of one sequence computed in this step: ``tokens`` at positions ``start..``; ``slots`` where their KV
    goes; ``sample``: whether the logits of the last one are wanted."""

    kv: SequenceKV
    tokens: list[int]
    start: int
    slots: list[int]
    sample: bool


class _Group:
    """Rows of the packed batch that share one SDPA call: ``rows`` slice, ``[B, T]`` queries over ``[B, S]`` keys."""

    def __init__(self, rows: slice, b: int, t: int, hot: torch.Tensor, cold: torch.Tensor | None,
                 k_pos: torch.Tensor, q_pos: torch.Tensor):
        self.rows, self.b, self.t = rows, b, t
        self.hot, self.cold, self.k_pos, self.q_pos = hot, cold, k_pos, q_pos
        self.masks: dict[int | None, torch.Tensor | None] = {}


class Runner:
    """Runs packed steps of the model against a ``KVPool``."""

    def __init__(self, weights: InferenceWeights, pool: KVPool, window: int | None = None, sinks: int = 0):
        self.w, self.pool = weights, pool
        cfg = weights.cfg
        self.cfg = cfg
        self.model = weights.model
        # engine-level window (applies to every layer) or the model's own per-layer windows
        self.windows = [window if window is not None else cfg.window(i) for i in range(cfg.n_layers)]
        self.sinks = sinks
        self.h, self.hk, self.d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    # --------------------------------------------------------------- groups
    def _group(self, rows: slice, segs: list[Segment]) -> _Group:
        hot_l, cold_l, hpos_l, cpos_l = [], [], [], []
        for s in segs:
            h, hp, c, cp = s.kv.key_slots(s.start + len(s.tokens))
            hot_l.append(h)
            hpos_l.append(hp)
            cold_l.append(c)
            cpos_l.append(cp)
        b, t = len(segs), len(segs[0].tokens)
        sh, sc = max(map(len, hot_l)), max(map(len, cold_l))
        hot = torch.zeros(b, sh, dtype=torch.long)
        k_pos = torch.full((b, sc + sh), -1, dtype=torch.long)
        cold = torch.zeros(b, sc, dtype=torch.long) if sc else None
        for i in range(b):
            if hot_l[i]:
                hot[i, :len(hot_l[i])] = torch.tensor(hot_l[i])
                k_pos[i, sc:sc + len(hpos_l[i])] = torch.tensor(hpos_l[i])
            if sc and cold_l[i]:
                cold[i, :len(cold_l[i])] = torch.tensor(cold_l[i])
                k_pos[i, :len(cpos_l[i])] = torch.tensor(cpos_l[i])
        q_pos = torch.tensor([list(range(s.start, s.start + t)) for s in segs])
        if sc:
            self.pool.traffic["offload_blocks_read"] += sum(len(c) for c in cold_l) // self.pool.block_size
        return _Group(rows, b, t, hot, cold, k_pos, q_pos)

    def _mask(self, g: _Group, window: int | None):
        if window not in g.masks:
            full = bool((g.k_pos >= 0).all())
            if g.t == 1 and full and (window is None or g.k_pos.shape[1] <= window):
                # one query per row seeing every gathered key: no mask at all (the fastest SDPA path)
                m = None if bool((g.k_pos <= g.q_pos).all()) else attention_mask(g.q_pos, g.k_pos, 0, window,
                                                                                     self.sinks)
            else:
                m = attention_mask(g.q_pos, g.k_pos, g.k_pos.shape[1], window, self.sinks)
            g.masks[window] = m
        return g.masks[window]

    def _rotate_half_matrix(self, d: int, dtype: torch.dtype) -> torch.Tensor:
        """``R`` with ``x @ R == cat(-x[d/2:], x[:d/2])``: the model's rotate-half RoPE pairing (``apply_rope``) as
        one small matmul instead of slice/neg/cat per layer (exact: one ±1 per column)."""
        key = (d, dtype)
        if getattr(self, "_rot_key", None) != key:
            half = d // 2
            r = torch.zeros(d, d, dtype=dtype)
            r[torch.arange(half) + half, torch.arange(half)] = -1
            r[torch.arange(half), torch.arange(half) + half] = 1
            self._rot, self._rot_key = r, key
        return self._rot

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's norm; for fp32 RMSNorm one fused ``F.rms_norm`` call with its weight (same arithmetic)."""
        if isinstance(norm, RMSNorm) and x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
        return norm(x)

    # -------------------------------------------------------------- forward
    @torch.inference_mode()
    def score(self, tokens: list[int]) -> torch.Tensor:
        """Logits [T, V] at every position of ``tokens`` (perplexity), through these weights and a scratch KV."""
        kv = SequenceKV(self.pool)
        try:
            slots = kv.reserve(len(tokens))
            return self.forward([Segment(kv, tokens, 0, slots, True)], all_logits=True)
        finally:
            kv.release()

    @torch.inference_mode()
    def forward(self, segments: list[Segment], all_logits: bool = False) -> torch.Tensor:
        """Run one step; returns logits [n_sampled, V] for the segments with ``sample`` set, in order.

        ``segments`` must list all single-token (decode) segments first.
        """
        model, w, pool = self.model, self.w, self.pool
        h, hk, d = self.h, self.hk, self.d
        n_dec = 0
        while n_dec < len(segments) and len(segments[n_dec].tokens) == 1:
            n_dec += 1
        groups: list[_Group] = []
        if n_dec:
            groups.append(self._group(slice(0, n_dec), segments[:n_dec]))
        row = n_dec
        for s in segments[n_dec:]:
            groups.append(self._group(slice(row, row + len(s.tokens)), [s]))
            row += len(s.tokens)
        n = row
        tokens = torch.tensor([t for s in segments for t in s.tokens])
        positions = torch.tensor([p for s in segments for p in range(s.start, s.start + len(s.tokens))])
        slots = torch.tensor([x for s in segments for x in s.slots])
        x = model.embed(tokens)  # [N, d_model]
        cos, sin = model.rotary(positions[None], x.dtype)  # [1, N, D]: the model's own tables
        cos, sin = cos[0][:, None], sin[0][:, None]  # [N, 1, D], broadcast over heads
        rot = self._rotate_half_matrix(d, x.dtype)
        out = torch.empty(n, h * d, dtype=x.dtype) if len(groups) > 1 else None
        gqa = h != hk
        for i, block in enumerate(model.layers):
            qkv = w.qkv[i](self._norm(block.attn_norm, x))
            qk = qkv[:, :(h + hk) * d].view(n, h + hk, d)  # q and k rotated together
            qk = torch.addcmul(qk * cos, torch.matmul(qk, rot), sin)
            q, k = qk[:, :h], qk[:, h:]
            v = qkv[:, (h + hk) * d:].view(n, hk, d)
            pool.k[i].index_copy_(0, slots, k)
            pool.v[i].index_copy_(0, slots, v)
            window = self.windows[i]
            for g in groups:
                qg = q[g.rows].view(g.b, g.t, h, d).transpose(1, 2)
                flat = g.hot.view(-1)
                kg = pool.k[i].index_select(0, flat).view(g.b, -1, hk, d)  # [B, S, Hkv, D]
                vg = pool.v[i].index_select(0, flat).view(g.b, -1, hk, d)
                if g.cold is not None:
                    kv = pool.tier.kv
                    kg = torch.cat([kv[0][i][g.cold], kg], dim=1)
                    vg = torch.cat([kv[1][i][g.cold], vg], dim=1)
                mask = self._mask(g, window)
                y = F.scaled_dot_product_attention(qg, kg.transpose(1, 2), vg.transpose(1, 2), attn_mask=mask,
                                                   enable_gqa=gqa)
                y = y.transpose(1, 2).reshape(g.b * g.t, h * d)
                if out is None:
                    attn = y
                else:
                    out[g.rows] = y
                    attn = out
            x = x + w.o[i](attn)
            hmid = w.gate_up[i](self._norm(block.mlp_norm, x))
            if block.mlp.swiglu:
                gate, up = hmid.chunk(2, dim=-1)
                hmid = F.silu(gate) * up
            else:
                hmid = F.gelu(hmid, approximate="tanh")
            x = x + w.down[i](hmid)
        rows, row = [], 0
        for s in segments:
            row += len(s.tokens)
            if s.sample:
                rows.append(row - 1)
        if all_logits:
            rows = list(range(n))
        if not rows:
            return torch.empty(0, self.cfg.vocab_size)
        x = self._norm(model.norm, x[rows] if len(rows) < n else x)
        return w.head(x).float()
