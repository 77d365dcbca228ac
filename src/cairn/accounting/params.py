"""Every weight of a model, from its ``ModelConfig`` alone: no tensors are built, nothing is allocated.

``weights(cfg)`` lists the model's tensors as ``Weight`` records (a shape, how many copies exist per named
weight, how many of those copies are distinct tensors, and the fraction a token uses), aggregated by component.
Every count, byte size and FLOP figure in ``cairn.accounting`` is a sum over that one list.

Conventions (see docs/accounting.md):
- ``total`` counts each distinct tensor once (a tied head and the layers of an FFN-sharing group add nothing);
  ``untied`` counts every named weight (the tied head, each stack's embedding and each layer's shared FFN);
- ``active`` counts the distinct weights one token uses: routed experts scale by k/E, everything else counts;
- a weight is a *matmul* weight when a token is multiplied through it (projections, MLPs, experts, routers and
  the output head, tied or not); embedding lookups, norms, biases and BERT's pooler (first token only) are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from cairn.config import GATED_MLPS, ModelConfig


@dataclass(frozen=True)
class Weight:
    component: str  # e.g. "attn.q", "routed_experts", "decoder.cross_attn.k.bias"
    rows: int  # output features (1 for vectors)
    cols: int  # input features: quantization groups run along them
    copies: int = 1  # named weights of this shape (layers × experts …)
    unique: int = 1  # distinct tensors among the copies (tying and FFN sharing make it smaller)
    share: Fraction = Fraction(1)  # fraction of the copies one token uses (k/E for routed experts)
    matmul: bool = False  # a token is multiplied through it

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def matrix(self) -> bool:
        """A projection or a table (quantized), not a vector (norms, biases: kept in 16 bits)."""
        return self.matmul or self.rows > 1


@dataclass(frozen=True)
class LayerSummary:
    """Consecutive layers of one stack with the same parameter count (e.g. DeepSeek's dense first layers)."""

    stack: str
    first: int
    last: int
    kind: str
    params: int  # untied parameters of one such layer

    @property
    def label(self) -> str:
        span = f"layer {self.first}" if self.first == self.last else f"layers {self.first}-{self.last}"
        return f"{self.stack} {span} ({self.kind})"


def _norm(cfg: ModelConfig, dim: int) -> list[tuple[int, int]]:
    """The shapes of one norm over ``dim`` features: LayerNorm has a weight and a bias, RMSNorm a weight."""
    return [(1, dim), (1, dim)] if cfg.norm == "layernorm" else [(1, dim)]


class _Builder:
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.items: list[Weight] = []

    def add(self, component: str, rows: int, cols: int, *, copies: int = 1, unique: int = 1,
            share: Fraction = Fraction(1), matmul: bool = False) -> None:
        self.items.append(Weight(component, rows, cols, copies, unique, share, matmul))

    def linear(self, component: str, d_in: int, d_out: int, bias: bool, unique: int = 1, copies: int = 1,
               share: Fraction = Fraction(1)) -> None:
        self.add(component, d_out, d_in, copies=copies, unique=unique * copies, share=share, matmul=True)
        if bias:
            self.add(component + ".bias", 1, d_out, copies=copies, unique=unique * copies, share=share)

    def norm(self, component: str, dim: int, unique: int = 1) -> None:
        for rows, cols in _norm(self.cfg, dim):
            self.add(component, rows, cols, unique=unique)

    # ------------------------------------------------------------------ attention
    def attention(self, p: str) -> None:
        c = self.cfg
        d, h, kv, hd = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        if c.kv_lora_rank:  # multi-head latent attention (DeepSeek-V2/V3): RMSNorms on the latents
            qk = c.qk_nope_head_dim + c.qk_rope_head_dim
            if c.q_lora_rank:
                self.linear(p + "q_a", d, c.q_lora_rank, False)
                self.add(p + "q_a_norm", 1, c.q_lora_rank)
                self.linear(p + "q_b", c.q_lora_rank, h * qk, False)
            else:
                self.linear(p + "q", d, h * qk, False)
            self.linear(p + "kv_a", d, c.kv_lora_rank + c.qk_rope_head_dim, False)
            self.add(p + "kv_a_norm", 1, c.kv_lora_rank)
            self.linear(p + "kv_b", c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), False)
            self.linear(p + "o", h * c.v_head_dim, d, c.attn_out_bias)
            return
        self.linear(p + "q", d, h * hd, c.attn_bias)
        self.linear(p + "k", d, kv * hd, c.attn_bias)
        self.linear(p + "v", d, kv * hd, c.attn_bias)
        self.linear(p + "o", h * hd, d, c.attn_out_bias)
        if c.qk_norm:
            self.add(p + "qk_norm", 1, hd)
            self.add(p + "qk_norm", 1, hd)

    # ------------------------------------------------------------------------ FFN
    def mlp(self, component: str, d_ff: int, unique: int, bias: bool) -> None:
        d = self.cfg.d_model
        if self.cfg.mlp in GATED_MLPS:
            self.linear(component, d, d_ff, bias, unique)  # gate
        self.linear(component, d, d_ff, bias, unique)  # up
        self.linear(component, d_ff, d, bias, unique)  # down

    def ffn(self, p: str, layer: int, unique: int) -> None:
        c = self.cfg
        if not c.is_moe_layer(layer):
            self.mlp(p + "mlp", c.d_ff, unique, c.mlp_bias)
            return
        e, k, d, f = c.n_experts, c.experts_per_token, c.d_model, c.moe_d_ff
        self.linear(p + "router", d, e, False, unique)
        if c.router_bias:
            self.add(p + "router.bias", 1, e, unique=unique)
        share = Fraction(k, e)
        n_mats = 3 if c.mlp in GATED_MLPS else 2
        for i in range(n_mats):
            d_in, d_out = (f, d) if i == n_mats - 1 else (d, f)
            self.linear(p + "routed_experts", d_in, d_out, False, unique, copies=e, share=share)
        if c.n_shared_experts:
            self.mlp(p + "shared_experts", c.n_shared_experts * c.shared_expert_d_ff, unique, c.mlp_bias)
            if c.shared_expert_gate:
                self.linear(p + "shared_experts.gate", d, 1, False, unique)

    # --------------------------------------------------------------------- layers
    def layer(self, p: str, layer: int, cross: bool, ffn_unique: int) -> None:
        c = self.cfg
        self.attention(p + "attn.")
        if cross:
            self.attention(p + "cross_attn.")
        n_norms = 1 if c.parallel_residual and c.parallel_shared_norm else 2 + int(cross)
        for _ in range(n_norms):
            self.norm(p + "norms", c.d_model)
        self.ffn(p, layer, ffn_unique)


def weights(cfg: ModelConfig) -> tuple[list[Weight], list[LayerSummary]]:
    """Every tensor of the model described by ``cfg``, and a summary of its layers."""
    b = _Builder(cfg)
    d, enc_dec = cfg.d_model, cfg.stack == "encoder-decoder"
    n_stacks = 2 if enc_dec else 1
    b.add("token_embedding", cfg.vocab_size, d, copies=n_stacks)
    if cfg.pos_embedding == "learned":
        b.add("position_embedding", cfg.pos_table_size or cfg.max_seq_len, d)
    if cfg.type_vocab_size:
        b.add("token_type_embedding", cfg.type_vocab_size, d)
    if cfg.embed_norm:
        b.norm("embedding_norm", d)

    summaries: list[LayerSummary] = []
    stacks = [("encoder", cfg.n_encoder_layers, False), ("decoder", cfg.n_layers, True)] if enc_dec else [
        (cfg.stack, cfg.n_layers, False)
    ]
    share_first = {g[0] for g in cfg.ffn_share_groups()}
    for stack, n, cross in stacks:
        prefix = f"{stack}." if enc_dec else ""
        # layers with the same signature have the same tensors: build each signature's records once
        signatures: list[tuple[bool, int, bool]] = []
        for i in range(n):
            moe = cfg.is_moe_layer(i)  # the same rule in every stack (Switch-style encoder-decoders too)
            # FFN sharing applies to the decoder stack of a decoder-only model (the one cairn builds)
            ffn_unique = 1 if enc_dec or stack == "encoder" or i in share_first else 0
            relative = cfg.pos_embedding == "relative" and i == 0  # T5: one bias table per stack, in layer 0
            signatures.append((moe, ffn_unique, relative))
        built: dict[tuple[bool, int, bool], tuple[list[Weight], int]] = {}
        for i, sig in enumerate(signatures):
            if sig not in built:
                lb = _Builder(cfg)
                if sig[2]:
                    lb.add(prefix + "relative_position_bias", cfg.relative_buckets, cfg.n_heads)
                lb.layer(prefix, i, cross, sig[1])
                built[sig] = (lb.items, sum(w.numel * w.copies for w in lb.items))
            count = built[sig][1]
            kind = ("MoE" if sig[0] else "dense") + (", cross-attention" if cross else "")
            last = summaries[-1] if summaries else None
            if last and last.stack == stack and last.params == count and last.kind == kind:
                summaries[-1] = LayerSummary(stack, last.first, i, kind, count)
            else:
                summaries.append(LayerSummary(stack, i, i, kind, count))
        for sig, (items, _) in built.items():
            times = signatures.count(sig)
            b.items += [Weight(w.component, w.rows, w.cols, w.copies * times, w.unique * times, w.share, w.matmul)
                        for w in items]
        if cfg.final_norm:
            b.norm(prefix + "final_norm", d)

    if cfg.pooler:
        b.add("pooler", d, d)
        b.add("pooler.bias", 1, d)
    if cfg.stack != "encoder":  # encoder-only models (BertModel) have no LM head
        b.add("head", cfg.vocab_size, d, unique=0 if cfg.tie_embeddings else 1, matmul=True)
        if cfg.head_bias:
            b.add("head.bias", 1, cfg.vocab_size)
    return _merge(b.items), summaries


def _merge(items: list[Weight]) -> list[Weight]:
    """One record per distinct (component, shape, share, matmul): the same tensor in every layer becomes one
    record with ``copies = n_layers``, so every sum over the list is short (a few dozen records)."""
    merged: dict[tuple, Weight] = {}
    for w in items:
        key = (w.component, w.rows, w.cols, w.share, w.matmul)
        if key in merged:
            m = merged[key]
            merged[key] = Weight(w.component, w.rows, w.cols, m.copies + w.copies, m.unique + w.unique, w.share,
                                 w.matmul)
        else:
            merged[key] = w
    return list(merged.values())
