"""Counts, memory, KV cache and FLOPs of a model, from its config alone (conventions: docs/accounting.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from cairn.accounting.params import LayerSummary, Weight, weights
from cairn.config import GATED_MLPS, ModelConfig
from cairn.errors import CairnError

# bits per stored weight
DTYPE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}
QUANTIZED = ("fp8", "int8", "int4")
SCALE_BYTES = 2  # one fp16 scale per group of a quantized matrix
ADAM_STATE_BYTES = 8  # AdamW's two fp32 moments per parameter


def dtype_bits(dtype: str) -> int:
    if dtype not in DTYPE_BITS:
        raise CairnError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_BITS)}")
    return DTYPE_BITS[dtype]


def _mean_window(context: int, window: int | None) -> Fraction:
    """Mean number of keys a query sees over positions 1..context (causal), capped by a sliding window."""
    if window is None or window >= context:
        return Fraction(context + 1, 2)
    # positions 1..W see 1..W keys, the rest see W keys
    return Fraction(window * (window + 1) // 2 + (context - window) * window, context)


@dataclass
class Accounting:
    cfg: ModelConfig
    items: list[Weight] = field(repr=False)
    layers: list[LayerSummary] = field(repr=False)

    # ------------------------------------------------------------------ counts
    @property
    def total_params(self) -> int:
        return sum(w.numel * w.unique for w in self.items)

    @property
    def total_params_untied(self) -> int:
        return sum(w.numel * w.copies for w in self.items)

    @property
    def active_params(self) -> int:
        return int(sum(w.numel * w.unique * w.share for w in self.items))

    def components(self, untied: bool = False) -> dict[str, int]:
        """Parameters by component (summed over layers), in model order."""
        out: dict[str, int] = {}
        for w in self.items:
            out[w.component] = out.get(w.component, 0) + w.numel * (w.copies if untied else w.unique)
        return out

    # ------------------------------------------------------------------ memory
    def weight_bytes(self, dtype: str, group_size: int = 128) -> int:
        """Bytes of the weights at ``dtype``. Quantized dtypes (fp8, int8, int4) quantize every matrix in groups of
        ``group_size`` along its input dimension with an fp16 scale per group and, for the integer types, a
        zero-point of the weight's own width; vectors (norms, biases) stay in bf16."""
        bits = dtype_bits(dtype)
        if group_size <= 0:
            raise CairnError(f"--group-size must be a positive integer, got {group_size}")
        total = 0
        for w in self.items:
            if not w.unique:
                continue
            if dtype in QUANTIZED and w.matrix:
                groups = w.rows * math.ceil(w.cols / group_size)
                zero_bits = bits if dtype != "fp8" else 0
                per_tensor = math.ceil((w.numel * bits + groups * (8 * SCALE_BYTES + zero_bits)) / 8)
            elif dtype in QUANTIZED:
                per_tensor = w.numel * 2
            else:
                per_tensor = w.numel * bits // 8
            total += per_tensor * w.unique
        return total

    def kv_layers(self) -> list[tuple[int, int | None]]:
        """(cached elements per token, sliding window) of every layer that keeps a KV cache."""
        c = self.cfg
        if c.stack == "encoder":
            return []
        per_token = c.kv_lora_rank + c.qk_rope_head_dim if c.kv_lora_rank else 2 * c.n_kv_heads * c.head_dim
        return [(per_token, c.window(i) if c.stack == "decoder" else None) for i in range(c.n_layers)]

    def kv_bytes_per_token(self, dtype: str = "bf16") -> int:
        """KV-cache bytes one token adds (self-attention; MLA caches its latent and rope key)."""
        return sum(n for n, _ in self.kv_layers()) * dtype_bits(dtype) // 8

    def kv_bytes(self, context: int, batch: int = 1, dtype: str = "bf16") -> int:
        """KV-cache bytes of ``batch`` sequences of ``context`` tokens; sliding-window layers keep W tokens."""
        elems = sum(n * (context if w is None else min(context, w)) for n, w in self.kv_layers())
        return batch * elems * dtype_bits(dtype) // 8

    # ------------------------------------------------------------------- FLOPs
    @property
    def forward_matmul_flops_per_token(self) -> int:
        """2 × the weights of every matmul a token passes through (routed experts × k/E, shared FFNs once per
        layer that uses them, the head even when tied)."""
        return int(2 * sum(w.numel * w.copies * w.share for w in self.items if w.matmul))

    def _attn_dims(self) -> tuple[int, int]:
        c = self.cfg
        if c.kv_lora_rank:
            return c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
        return c.head_dim, c.head_dim

    def _attention_flops(self, keys_per_layer: list[Fraction | int]) -> int:
        dqk, dv = self._attn_dims()
        return int(sum(2 * self.cfg.n_heads * (dqk + dv) * k for k in keys_per_layer))

    def _attention_layers(self, context: int, mean: bool) -> list[Fraction | int]:
        """Keys each attention layer's query sees: the last token of ``context`` (or the causal mean)."""
        c = self.cfg
        if c.stack == "encoder":
            return [context] * c.n_layers
        dec = []
        for i in range(c.n_layers):
            w = c.window(i) if c.stack == "decoder" else None
            dec.append(_mean_window(context, w) if mean else min(context, w or context))
        if c.stack == "encoder-decoder":  # encoder self-attention and decoder cross-attention see all tokens
            dec += [context] * (c.n_encoder_layers + c.n_layers)
        return dec

    def attention_flops_per_token(self, context: int) -> int:
        """Score (QKᵀ) and value (AV) FLOPs of one token that attends to ``context`` keys (window-capped)."""
        return self._attention_flops(self._attention_layers(context, mean=False))

    def train_flops_per_token(self, context: int, checkpointing: bool = False) -> int:
        """3 × forward (backward = 2 × forward) over a causal sequence of ``context`` tokens: the matmuls plus
        the attention at the mean context; activation checkpointing recomputes one more forward (4 ×)."""
        fwd = self.forward_matmul_flops_per_token + self._attention_flops(self._attention_layers(context, True))
        return (4 if checkpointing else 3) * fwd

    # ------------------------------------------------------------- training memory
    def activation_bytes_per_token_layer(self, layer: int, act_bytes: int = 2) -> int:
        """Activations one layer keeps for the backward pass, per token, with fused (flash) attention.

        Inputs of both norms and of every matmul, Q/K/V, the attention output, the MLP's hidden tensors (for
        a MoE layer: those of the k routed experts and the shared ones) and the router's probabilities."""
        c = self.cfg
        d, dqk, dv = c.d_model, *self._attn_dims()
        h, kv = c.n_heads, c.n_kv_heads if not c.kv_lora_rank else c.n_heads
        attn = 2 * d + 2 * d + h * dqk + kv * dqk + kv * dv + h * dv  # norm in, qkv in, q, k, v, o in
        if c.kv_lora_rank:
            attn += c.q_lora_rank + c.kv_lora_rank  # the two latents feed the up-projections

        def mlp(f: int) -> int:
            return d + (3 if c.mlp in GATED_MLPS else 2) * f  # input, hidden (gate, up, product)

        if c.is_moe_layer(layer):
            ffn = c.experts_per_token * mlp(c.moe_d_ff) + 2 * c.n_experts  # + router probabilities (fp32)
            if c.n_shared_experts:
                ffn += mlp(c.n_shared_experts * c.shared_expert_d_ff)
        else:
            ffn = mlp(c.d_ff)
        return act_bytes * (attn + d + ffn)

    def train_memory_bytes(self, batch: int = 1, context: int = 2048, dtype: str = "bf16",
                           checkpointing: bool = False) -> dict[str, int]:
        """Training memory with AdamW: weights and gradients at ``dtype``, an fp32 master copy when ``dtype``
        is not fp32, two fp32 moments, and activations (all of them, or with checkpointing only each layer's
        input plus one layer's full activations for its recomputation), plus fp32 logits."""
        bytes_per = dtype_bits(dtype) // 8
        if dtype in QUANTIZED:
            raise CairnError(f"training in {dtype} is not modelled: use fp32, bf16 or fp16")
        n = self.total_params
        tokens = batch * context
        c = self.cfg
        n_layers = c.n_layers + (c.n_encoder_layers if c.stack == "encoder-decoder" else 0)
        per_layer = [self.activation_bytes_per_token_layer(i % c.n_layers, bytes_per) for i in range(n_layers)]
        if checkpointing:
            acts = tokens * (n_layers * c.d_model * bytes_per + max(per_layer, default=0))
        else:
            acts = tokens * sum(per_layer)
        logits = 0 if c.stack == "encoder" else tokens * c.vocab_size * 4
        out = {
            "weights": n * bytes_per,
            "gradients": n * bytes_per,
            "master_weights": 0 if dtype == "fp32" else n * 4,
            "optimizer_states": n * ADAM_STATE_BYTES,
            "activations": acts,
            "logits": logits,
        }
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------------ report
    def to_json(self, context: int = 4096, batch: int = 1, dtype: str = "bf16", kv_dtype: str = "bf16",
                group_size: int = 128) -> dict[str, Any]:
        for name, v in (("--context", context), ("--batch", batch)):
            if v <= 0:
                raise CairnError(f"{name} must be a positive integer, got {v}")
        dtype_bits(dtype)
        return {
            "name": self.cfg.name or self.cfg.arch,
            "total_params": self.total_params,
            "total_params_untied": self.total_params_untied,
            "active_params": self.active_params,
            "components": self.components(),
            "components_untied": self.components(untied=True),
            "layers": [{"layers": s.label, "params_each": s.params} for s in self.layers],
            "weight_bytes": {dt: self.weight_bytes(dt, group_size) for dt in DTYPE_BITS},
            "group_size": group_size,
            "kv_dtype": kv_dtype,
            "kv_bytes_per_token": self.kv_bytes_per_token(kv_dtype),
            "context": context,
            "batch": batch,
            "kv_bytes": self.kv_bytes(context, batch, kv_dtype),
            "forward_matmul_flops_per_token": self.forward_matmul_flops_per_token,
            "attention_flops_per_token": self.attention_flops_per_token(context),
            "train_flops_per_token": self.train_flops_per_token(context),
            "train_flops_per_token_checkpointed": self.train_flops_per_token(context, checkpointing=True),
            "train_dtype": dtype,
            "train_memory_bytes": self.train_memory_bytes(batch, context, dtype)["total"],
            "train_memory": self.train_memory_bytes(batch, context, dtype),
            "train_memory_checkpointed": self.train_memory_bytes(batch, context, dtype, checkpointing=True),
        }


def account(cfg: ModelConfig) -> Accounting:
    """The accounting of ``cfg``: builds a list of shapes, never a tensor."""
    items, layers = weights(cfg)
    return Accounting(cfg, items, layers)
