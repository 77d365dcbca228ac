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

import ctypes
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cairn.engine.kv import KVPool, SequenceKV, key_index
from cairn.model.layers import RMSNorm, attention_mask
from cairn.model.moe import MoE
from cairn.weights.quant import ByStep, check_mode, linear_from_blocks, quantize_linear, uses_dynamic_activations

log = logging.getLogger("cairn.engine")


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
        if isinstance(m, MoE):  # the experts stay as the model has them (3-D stacks)
            entry["gate_up_w"], entry["gate_up_b"] = None, None
        elif m.swiglu:
            entry["gate_up_w"], entry["gate_up_b"] = _fuse(m, ("gate", "up"))
        else:
            entry["gate_up_w"], entry["gate_up_b"] = m.up.weight, m.up.bias
        fused.append(entry)
    model._cairn_fused = fused
    return fused


def _fuse(parent: nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    mods = [getattr(parent, n) for n in names]
    if mods[0].weight.is_meta:  # weights the engine runs from GGUF blocks: shapes only (a meta torch.cat imports
        # torch._dynamo, seconds)
        first = mods[0].weight
        w = torch.empty(sum(m.weight.shape[0] for m in mods), *first.shape[1:], dtype=first.dtype, device="meta")
    else:
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
        if not isinstance(block.mlp, MoE):
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

    With the FBGEMM int8 kernel, activations are quantized on the fly (7-bit, one scale per row), which the few huge
    outlier channels of LLM activations (up to ~3000 in SmolLM2's down projection, median ~1) make coarse. As in
    LLM.int8(), the ``outliers`` input channels with the largest activations (calibrated once on
    ``CALIBRATION_TEXT``) bypass int8 and multiply fp32 weight columns.

    ``blocks``: the weights a loader kept as GGUF blocks (``LoadedModel.quantized``, whose model has no fp32
    parameters for them): those the kernels asked for run as they are (Q4_1 matrices for int4 with groups of 32,
    a Q8_0 head for int4, the embedding's rows looked up from its blocks), with no fp32 copy made; the others get
    their fp32 parameters here and leave ``blocks``.
    """

    def __init__(self, model: nn.Module, quantize: str | None = None, group_size: int = 32, kernel: str = "auto",
                 tokenizer=None, outliers: int | None = None, blocks: dict | None = None):
        super().__init__()
        cfg = model.cfg
        self.cfg, self.model = cfg, model
        self.quantize = check_mode(quantize, group_size)
        codes = _block_plan(model, blocks, self.quantize, group_size, kernel)
        fused = fuse_for_inference(model)
        self.qkv, self.o, self.gate_up, self.down = (nn.ModuleList() for _ in range(4))
        dynamic = uses_dynamic_activations(self.quantize, kernel)
        self.outliers = (32 if outliers is None else outliers) if dynamic else 0
        self._tokenizer, self._ranges = tokenizer, None

        def q(w, b, i, key):
            names = _matrix_names(model, i, key)
            if names[0] in codes:
                return linear_from_blocks([codes[n] for n in names], b, kernel)
            return quantize_linear(w, b, self.quantize, group_size, kernel, self._channels(i, key))

        for i, (block, f) in enumerate(zip(model.layers, fused, strict=True)):
            self.qkv.append(q(f["qkv_w"], f["qkv_b"], i, "qkv"))
            self.o.append(q(block.attn.o.weight, block.attn.o.bias, i, "o"))
            if isinstance(block.mlp, MoE):  # routed experts run as the model's own module, unquantized
                self.gate_up.append(ModelFFN(block.mlp))
                self.down.append(nn.Identity())
                continue
            self.gate_up.append(q(f["gate_up_w"], f["gate_up_b"], i, "gate_up"))
            self.down.append(q(block.mlp.down.weight, block.mlp.down.bias, i, "down"))
        # int4 keeps the output head at 8 bits in groups of 32, as GGUF Q4 files do (llama.cpp stores it as Q8_0 or
        # Q6_K): the head is where 4-bit rounding costs the most accuracy, and it is a fifth of this model's weights
        int4 = self.quantize == "int4"
        head = _head_name(model)
        if head in codes and codes[head].kind == "Q8_0":
            self.head = linear_from_blocks([codes[head]], None, kernel)
        else:
            self.head = quantize_linear(model.output_weight(), None, "int8" if int4 else self.quantize, group_size,
                                        "auto" if int4 and kernel == "int4pack" else kernel,
                                        self._channels(len(model.layers) - 1, "head"), int8_groups=int4)

    def _channels(self, layer: int, key: str):
        """The outlier channels of one matrix, as a function: the calibration pass runs when an FBGEMM kernel is
        first built (and once for all of them)."""
        if not self.outliers:
            return None

        def channels() -> torch.Tensor | None:
            if self._ranges is None:
                ids = (self._tokenizer.encode(CALIBRATION_TEXT) if self._tokenizer is not None else
                       torch.randint(0, self.cfg.vocab_size, (128,),
                                     generator=torch.Generator().manual_seed(0)).tolist())
                self._ranges = activation_ranges(self.model, ids)
            return self._top(self._ranges[layer].get(key))

        return channels

    def build_batch_kernels(self) -> None:
        """Build now the kernels that are otherwise built at the first batched decode step (FBGEMM packing and
        outlier calibration: ~1.7 s on the default model): a server does this at start."""
        for mod in self._mods():
            if isinstance(mod, ByStep):
                mod.pick(mod.small_rows + 1)

    def _top(self, amax: torch.Tensor | None) -> torch.Tensor | None:
        return None if amax is None else amax.topk(min(self.outliers, amax.numel())).indices

    def weight_bytes(self) -> int:
        """Bytes of the weights the projections and head multiply by: every copy a quantized kernel keeps, or the
        model's own weights when unquantized (a quantized layer's fp32 prefill kernel reads those: not counted)."""
        return sum(mod.nbytes() for mod in self._mods())

    def decode_weight_bytes(self) -> int:
        """Bytes of weights a batch-1 decode step reads: those of the kernels it runs."""
        return sum((mod.small or mod.batch).nbytes() if isinstance(mod, ByStep) else mod.nbytes()
                   for mod in self._mods())

    def _mods(self) -> list[nn.Module]:
        return [m for m in (*self.qkv, *self.o, *self.gate_up, *self.down, self.head) if hasattr(m, "nbytes")]


def _head_name(model: nn.Module) -> str:
    return "embed.weight" if model.head is None else "head.weight"


def _matrix_names(model: nn.Module, layer: int, key: str) -> list[str]:
    """The model's weights that ``InferenceWeights`` fuses into matrix ``key`` of ``layer``."""
    mlp = model.layers[layer].mlp
    parts = {"qkv": ["attn.q", "attn.k", "attn.v"], "o": ["attn.o"], "down": ["mlp.down"],
             "gate_up": ["mlp.gate", "mlp.up"] if getattr(mlp, "swiglu", False) else ["mlp.up"]}[key]
    return [f"layers.{layer}.{p}.weight" for p in parts]


def _block_plan(model: nn.Module, blocks: dict | None, quantize: str, group_size: int, kernel: str) -> dict:
    """Which weights held as GGUF blocks (``blocks``, {name: ``gguf.Blocks``}) the engine runs as they are: the
    Q4_1 matrices of an int4 engine with groups of 32 on cairn's kernels (each fused matrix whole or not at all),
    its Q8_0 head, and the embedding (rows looked up from the blocks, exact) unless an fp32 head needs its
    weights. The rest get fp32 parameters in ``model`` and leave ``blocks``."""
    if not blocks:
        return {}
    from cairn.weights import dequantize_into

    use: dict = {}
    if quantize == "int4" and group_size == 32 and _native_kernels(kernel):
        for i, block in enumerate(model.layers):
            keys = ["qkv", "o"] if isinstance(block.mlp, MoE) else ["qkv", "o", "gate_up", "down"]
            for key in keys:
                names = _matrix_names(model, i, key)
                if all(getattr(blocks.get(n), "kind", None) == "Q4_1" for n in names):
                    use.update({n: blocks[n] for n in names})
        head = _head_name(model)
        if getattr(blocks.get(head), "kind", None) == "Q8_0":
            use[head] = blocks[head]
    if "embed.weight" in blocks and (model.head is not None or "embed.weight" in use):
        use["embed.weight"] = blocks["embed.weight"]
    rest = {k: v for k, v in blocks.items() if k not in use}
    if rest:
        dequantize_into(model, rest)
        for k in rest:
            del blocks[k]
    if "embed.weight" in use and not isinstance(model.embed, BlockEmbedding):
        model.embed = BlockEmbedding(model.embed.weight, use["embed.weight"])
    return use


def _native_kernels(kernel: str) -> bool:
    """Whether ``kernel`` runs the matrices on cairn's 4- and 8-bit kernels ("native" raises if they cannot be
    built; "auto" falls back, and ``quantize_linear`` warns)."""
    if kernel not in ("auto", "native"):
        return False
    from cairn.kernels import KernelUnavailable, q4_kernel, q8_kernel

    try:
        q4_kernel(), q8_kernel()
    except KernelUnavailable:
        if kernel == "native":
            raise
        return False
    return True


class BlockEmbedding(nn.Module):
    """The model's embedding with its rows looked up from the GGUF blocks they are stored in (dequantized per
    lookup: the values of the fp32 table, bit for bit). ``weight`` is the model's own parameter, which stays a meta
    tensor unless the full weights are made (``cairn.weights.full_weights``)."""

    def __init__(self, weight: torch.Tensor, blocks):
        super().__init__()
        self.weight, self.blocks = weight, blocks
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.blocks.dequantize(ids)


def _query_pad(t: int) -> int:
    """Rows of zeros to add to a sequence's chunk of ``t`` queries for its attention call (every group but the
    step's one-token decode rows), so that a prompt's logits do not depend on how much of it was cached. PyTorch's
    CPU flash attention works through the queries in blocks (32 rows under 192 queries, 64 under 768, then 256) and
    sums a block of 1-3 rows in another order than a bigger one. Padded so that no block holds 1-3 rows, the rows
    of a call over a prompt's tail equal, to the bit, the same rows of one call over the whole prompt (measured with
    torch 2.13: in all 742 cases of prompts of 2-300 tokens cut at several points, and 62 of 66 cuts of prompts of
    700-2,049 tokens; without padding, 335 and 18)."""
    u = t
    while u % (256 if u >= 768 else 64 if u >= 192 else 32) in (1, 2, 3):
        u += 1
    return u - t


def _pick(mod: nn.Module, rows: int, prefill: bool):
    """The kernel of ``mod`` for this step (``ByStep`` chooses; any other module has one)."""
    return mod.pick(rows, prefill) if isinstance(mod, ByStep) else mod.forward


class ModelFFN(nn.Module):
    """A layer's FFN run as the model's own module (a mixture of experts: router and 3-D expert stacks)."""

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.ffn.parameters())


def _ffn_kind(block: nn.Module) -> str:
    if isinstance(block.mlp, MoE):
        return "moe"
    return "swiglu" if block.mlp.swiglu else "gelu"


def _kind(mod: nn.Module, rows: int, prefill: bool) -> str:
    if not isinstance(mod, ByStep):
        return "one"
    return "prefill" if prefill else ("small" if rows <= mod.small_rows else "batch")


@dataclass
class Segment:
    """Tokens of one sequence computed in this step: ``tokens`` at positions ``start..``; ``slots`` where their KV
    goes; ``sample``: whether the logits of the last one are wanted; ``prefill``: prompt tokens, computed by the
    prompt's kernels even when there is one (what a prefix-cache hit leaves), so that a prompt's logits do not
    depend on how much of it was cached (a single token otherwise takes the decode step's kernels)."""

    kv: SequenceKV
    tokens: list[int]
    start: int
    slots: list[int]
    sample: bool
    prefill: bool = False


class _Group:
    """Rows of the packed batch that share one SDPA call: ``rows`` slice, ``[B, T]`` queries over ``[B, S]`` keys."""

    def __init__(self, rows: slice, b: int, t: int, hot: torch.Tensor, cold: torch.Tensor | None,
                 k_pos: torch.Tensor, q_pos: torch.Tensor, decode: bool):
        self.rows, self.b, self.t, self.decode = rows, b, t, decode  # decode: the step's one-token rows
        self.hot, self.cold, self.k_pos, self.q_pos = hot, cold, k_pos, q_pos
        self.flat = hot.view(-1)
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
        self.argmax: list[int] | None = None  # the last step's greedy tokens, when it found them (see forward)

    # --------------------------------------------------------------- groups
    def _group(self, rows: slice, segs: list[Segment], decode: bool = False) -> _Group:
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
        return _Group(rows, b, t, hot, cold, k_pos, q_pos, decode)

    def _mask(self, g: _Group, window: int | None):
        if window not in g.masks:
            full = bool((g.k_pos >= 0).all())
            n_keys = g.k_pos.shape[1]
            if g.b == 1 and g.t == n_keys and g.cold is None and bool(
                    (g.k_pos[0] == torch.arange(n_keys)).all()):
                # a prompt's first chunk over its own keys, 0..T-1: the model's mask, which is "causal" (SDPA's
                # is_causal skips the blocks above the diagonal: ~1.8x faster at 2,000 tokens) unless a window cuts
                m = attention_mask(g.q_pos, None, n_keys, window, self.sinks)
            elif g.t == 1 and full and (window is None or n_keys <= window):
                # one query per row seeing every gathered key: no mask at all (the fastest SDPA path)
                m = None if bool((g.k_pos <= g.q_pos).all()) else attention_mask(g.q_pos, g.k_pos, 0, window,
                                                                                     self.sinks)
            else:
                m = attention_mask(g.q_pos, g.k_pos, g.k_pos.shape[1], window, self.sinks)
            g.masks[window] = m
        return g.masks[window]

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's cos/sin tables at ``positions`` as [N, 1, D], with sin's first half negated: then RoPE is
        ``x·cos + roll(x, D/2)·sin±``, the model's rotate-half pairing (``apply_rope``) in three ops, exactly."""
        cos, sin = self.model.rotary(positions[None], dtype)  # [1, N, D]: the model's own tables
        half = self.d // 2
        if getattr(self, "_sign_key", None) != (self.d, dtype):
            self._sign = torch.cat([-torch.ones(half, dtype=dtype), torch.ones(half, dtype=dtype)])
            self._sign_key = (self.d, dtype)
        return cos[0][:, None], (sin[0] * self._sign)[:, None]

    def _layer_ops(self, rows: int, prefill: bool):
        """Per layer: the norms as functions and the four projections' kernels for a step of ``rows`` rows (with
        prompt chunks or not), as bound ``forward``s: no ``Module.__call__`` per step."""
        w = self.w
        if getattr(self, "_norms", None) is None:
            self._norms = [(self._norm_fn(b.attn_norm), self._norm_fn(b.mlp_norm)) for b in self.model.layers]
            self._final_norm = self._norm_fn(self.model.norm)
            self._ops: dict = {}
        key = (_kind(w.qkv[0], rows, prefill), prefill)  # every layer's matrices share their kernel tiers
        if key not in self._ops:
            self._ops[key] = [(n1, _pick(w.qkv[i], rows, prefill), _pick(w.o[i], rows, prefill), n2,
                               _pick(w.gate_up[i], rows, prefill), _pick(w.down[i], rows, prefill), _ffn_kind(b))
                              for i, ((n1, n2), b) in enumerate(zip(self._norms, self.model.layers, strict=True))]
        return self._ops[key]

    # ----------------------------------------------- decode steps, fused
    def _fast_ok(self) -> bool:
        """Whether decode steps can take the fused path: cairn's attention kernel built, an fp32 or fp16 KV pool,
        fp32 activations, RMSNorm and SwiGLU layers, at most 64 query heads per key head."""
        ok = getattr(self, "_fast", None)
        if ok is None:
            from cairn.kernels import KernelUnavailable, attention_kernel

            layers = self.model.layers
            ok = (self.pool.dtype in (torch.float32, torch.float16) and self.model.embed.weight.dtype == torch.float32
                  and self.h // self.hk <= 64  # the kernel's per-task arrays
                  and all(isinstance(b.attn_norm, RMSNorm) and isinstance(b.mlp_norm, RMSNorm)
                          and _ffn_kind(b) == "swiglu" for b in layers) and isinstance(self.model.norm, RMSNorm))
            if ok:
                try:
                    self._attention = attention_kernel()
                except KernelUnavailable as e:
                    log.warning("batch-1 decode uses PyTorch attention: %s", e)
                    ok = False
            if ok:
                self._kv_ptrs = [(self.pool.k[i].data_ptr(), self.pool.v[i].data_ptr()) for i in range(len(layers))]
                self._kv_half = int(self.pool.dtype == torch.float16)
                self._fused_cache: dict = {}
                self._norm_args = [((b.attn_norm.weight.detach(), b.attn_norm.eps),
                                    (b.mlp_norm.weight.detach(), b.mlp_norm.eps)) for b in layers]
                self._final_norm_args = (self.model.norm.weight.detach(), self.model.norm.eps)
            self._fast = ok
        return ok

    def _fused_mods(self, rows: int) -> list[tuple] | None:
        """Per layer the (qkv, o, gate_up, down) kernels of a decode step of ``rows`` rows when they all have the
        fused form (``Q4Linear``, ``Q8Linear``, ``Int8Linear``: norms, SwiGLU and residual adds inside their
        passes), else None."""
        w = self.w
        kind = "small" if isinstance(w.qkv[0], ByStep) and rows <= w.qkv[0].small_rows else "batch"
        if kind not in self._fused_cache:
            mods: list[tuple] | None = []
            for i in range(len(w.qkv)):
                row = [m.decode_module(rows) if isinstance(m, ByStep) else m
                       for m in (w.qkv[i], w.o[i], w.gate_up[i], w.down[i])]
                if not all(hasattr(m, "fused") for m in row):
                    mods = None
                    break
                mods.append(tuple(row))
            self._fused_cache[kind] = mods
        return self._fused_cache[kind]

    def _layers_call(self, fused: list[tuple]) -> tuple | None:
        """For a decode step whose matrices are all cairn's tiled kernels (``Q4Linear``, ``Q8Linear``: ``c_args``):
        the layer loop in C (``step.c``) and its per-layer arrays (kernel addresses, weights, sizes, norms, KV pools,
        windows), built once per set of kernels; else None, and the loop stays in Python."""
        cache = self.__dict__.setdefault("_layers_cache", {})
        key = id(fused)  # (the entry holds `fused` itself, so no other list can take this id while it is cached)
        if cache.get(key, (None,))[0] is not fused:
            cache[key] = (fused, None)
            mods = [m for row in fused for m in row]
            if all(hasattr(m, "c_args") for m in mods):
                from cairn.kernels import KernelUnavailable, layers_kernel, team_address

                try:
                    fn = layers_kernel()
                except KernelUnavailable as e:
                    log.warning("decode steps loop over the layers in Python: %s", e)
                else:
                    def array(kind, values):
                        return (kind * len(values))(*values)

                    p, i64 = ctypes.c_void_p, ctypes.c_int64
                    norms = [pair for layer in self._norm_args for pair in layer]
                    fns, tiles, bias, n, k = zip(*(m.c_args() for m in mods), strict=True)
                    cache[key] = (fused, (
                        fn, array(p, fns), array(p, tiles), array(p, bias), array(i64, n), array(i64, k),
                        array(p, [g.data_ptr() for g, _ in norms]), array(ctypes.c_float, [e for _, e in norms]),
                        team_address(self._attention), array(p, [k for k, _ in self._kv_ptrs]),
                        array(p, [v for _, v in self._kv_ptrs]), array(i64, [w or 0 for w in self.windows]),
                        fused[0][0].out_features, fused[0][2].out_features))
        return cache[key][1]

    # RoPE rows come from one table of every position up to this many (cos and sin, D floats each: 16 MiB at D = 64);
    # a step past it computes its own rows
    ROPE_TABLE_MAX = 32768

    def _rope_rows(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``(cos, sin, rows)``: fp32 tables [*, D] (``_rope_tables``' values, sin's first half negated) and, per
        position, its row in them. The tables cover positions 0.. and grow by doubling, so a decode step computes
        nothing; past ``ROPE_TABLE_MAX`` positions, or with a dynamic RoPE (its tables depend on the longest
        position), the step's own rows are computed."""
        top = max(positions)
        n = getattr(self, "_rope_n", 0)
        if top < n:
            return self._rope_cos, self._rope_sin, positions
        if top >= self.ROPE_TABLE_MAX or getattr(self.model.rotary, "dynamic", False):
            cos, sin = self._rope_tables(torch.tensor(positions), torch.float32)
            return cos.reshape(len(positions), self.d), sin.reshape(len(positions), self.d), list(range(len(positions)))
        n = min(max(2 * n, 1024, top + 1), self.ROPE_TABLE_MAX)
        cos, sin = self._rope_tables(torch.arange(n), torch.float32)
        self._rope_cos, self._rope_sin = cos.reshape(n, self.d).contiguous(), sin.reshape(n, self.d).contiguous()
        self._rope_n = n
        return self._rope_cos, self._rope_sin, positions

    def _step_call(self, fused: list[tuple], b: int) -> tuple | None:
        """For a decode step of ``b`` rows whose matrices and head are all cairn's tiled kernels: ``step.c``'s whole
        step (embedding rows, RoPE rows, the layer loop, the head with the final norm: one call) and its
        ``StepArgs``, built once per set of kernels; else None."""
        layers = self._layers_call(fused)
        head = self.w.head.decode_module(b) if isinstance(self.w.head, ByStep) else self.w.head
        if layers is None or not hasattr(head, "c_args"):
            return None
        cache = self.__dict__.setdefault("_step_cache", {})
        key = (id(fused), id(head))
        entry = cache.get(key, (None, None, None))
        if entry[0] is not layers or entry[1] is not head:  # (the entry holds the arrays StepArgs points into)
            from cairn.kernels import KernelUnavailable, StepArgs, step_kernel

            cache[key] = (layers, head, None)
            try:
                fn = step_kernel()
            except KernelUnavailable as e:
                log.warning("decode steps run their embedding and head from Python: %s", e)
                return None
            _, fns, tiles, bias, n, k, norms, eps, att, pool_k, pool_v, windows, n_qkv, n_gate_up = layers
            head_fn, head_tiles, head_bias, vocab, d_model = head.c_args()
            g, final_eps = self._final_norm_args
            kind, table = self._embed_source(head, d_model)
            args = StepArgs(L=len(self._kv_ptrs), H=self.h, HK=self.hk, D=self.d, d_model=d_model, n_qkv=n_qkv,
                            n_gate_up=n_gate_up, vocab=vocab, sinks=self.sinks, kv_half=self._kv_half,
                            embed_kind=kind, embed=table, fns=ctypes.addressof(fns), tiles=ctypes.addressof(tiles),
                            bias=ctypes.addressof(bias), n=ctypes.addressof(n), k=ctypes.addressof(k),
                            norms=ctypes.addressof(norms), eps=ctypes.addressof(eps), attention=att,
                            pool_k=ctypes.addressof(pool_k), pool_v=ctypes.addressof(pool_v),
                            windows=ctypes.addressof(windows), head_fn=head_fn, head_tiles=head_tiles,
                            head_bias=head_bias, final_g=g.data_ptr(), final_eps=final_eps)
            cache[key] = (layers, head, (fn, args, ctypes.byref(args), kind, vocab, d_model))
        return cache[key][2]

    def _embed_source(self, head, d_model: int) -> tuple[int, int | None]:
        """Where ``step.c`` reads a token's embedding row: ``(0, fp32 table)``; ``(1, the head's Q8 tiles)`` for a
        tied embedding held as the same Q8_0 blocks the head runs (checked on a few rows against the model's own
        lookup); ``(-1, None)``: the model's embedding runs in Python."""
        from cairn.kernels import q8_kernel, team_address, unpack_q8

        embed = self.model.embed
        if (isinstance(embed, nn.Embedding) and embed.weight.dtype == torch.float32 and not embed.weight.is_meta
                and embed.weight.is_contiguous()):
            return 0, embed.weight.data_ptr()
        if (isinstance(embed, BlockEmbedding) and self.model.head is None and getattr(head, "tiles", None) is not None
                and head.c_args()[0] == team_address(q8_kernel()) and head.in_features == d_model):
            rows = sorted({0, 1, 9, head.out_features // 2, head.out_features - 1})
            for r in rows:
                q, dq = unpack_q8(head.tiles[r // 8:r // 8 + 1], 8)
                mine = (q[r % 8].view(-1, 32).float() * dq[r % 8][:, None]).reshape(-1)
                if not torch.equal(mine, embed(torch.tensor([r]))[0]):
                    return -1, None
            return 1, head.tiles.data_ptr()
        return -1, None

    def _whole_step(self, step: tuple, segments: list[Segment], keys, greedy: bool) -> torch.Tensor:
        """A decode step in one call of ``step.c`` (see ``_step_call``): logits [B, V]; with ``greedy`` each row's
        argmax too, into ``self.argmax``."""
        import numpy as np

        fn, _, args_ref, kind, vocab, d_model = step
        b = len(segments)
        picks = np.empty(b, dtype=np.int64) if greedy else None
        positions = [s.start for s in segments]
        cos, sin, rope_rows = self._rope_rows(positions)
        tokens = [s.tokens[0] for s in segments]
        ints = np.array([tokens, positions, [s.slots[0] for s in segments], rope_rows], dtype=np.int64)
        p = ints.ctypes.data
        x = self.model.embed(torch.from_numpy(ints[0])).float().contiguous() if kind < 0 else torch.empty(b, d_model)
        logits = torch.empty(b, vocab)
        starts, key_slots, key_pos = keys
        if fn(args_ref, b, p, cos.data_ptr(), sin.data_ptr(), p + 24 * b, p + 16 * b, starts.ctypes.data,
              key_slots.ctypes.data, key_pos.ctypes.data, p + 8 * b, x.data_ptr(), logits.data_ptr(),
              None if picks is None else picks.ctypes.data, torch.get_num_threads()):
            raise MemoryError("a decode kernel could not allocate its scratch buffers")
        if picks is not None:
            self.argmax = picks.tolist()
        return logits

    def _decode(self, segments: list[Segment], greedy: bool = False) -> torch.Tensor | None:
        """A step of decode tokens only: per layer one call of cairn's attention kernel (RoPE, KV writes, each
        sequence's attention over its own keys, no padding), and with quantized weights the kernels' fused
        norm / SwiGLU / residual forms; when those are all cairn's tiled kernels, the loop over the layers runs in
        C (``step.c``, see ``_layers_call``). None when a sequence has offloaded keys (the PyTorch path reads those
        from the tier)."""
        keys = key_index([(s.kv, s.start + 1) for s in segments], self.pool.block_size)
        if keys is None:
            return None
        model, h, hk, d, b = self.model, self.h, self.hk, self.d, len(segments)
        fused = self._fused_mods(b)
        step = self._step_call(fused, b) if fused else None
        if step is not None:
            return self._whole_step(step, segments, keys, greedy)
        q_pos = torch.tensor([s.start for s in segments])
        x = model.embed(torch.tensor([s.tokens[0] for s in segments]))  # [B, d_model], fresh: updated in place
        cos, sin = self._rope_tables(q_pos, x.dtype)
        cos, sin = cos.reshape(b, d).contiguous(), sin.reshape(b, d).contiguous()
        index = [torch.tensor([s.slots[0] for s in segments]), *map(torch.from_numpy, keys), q_pos]
        attn = torch.empty(b, h * d)
        args = (cos.data_ptr(), sin.data_ptr())
        index_ptrs = tuple(t.data_ptr() for t in index)
        threads = torch.get_num_threads()
        ops = None if fused else self._layer_ops(b, False)
        layers = self._layers_call(fused) if fused else None
        if layers is not None:  # the loop below, in one call
            fn, fns, tiles, bias, n, k, norms, eps, att, pool_k, pool_v, windows, n_qkv, n_gate_up = layers
            qkv, mid = torch.empty(b, n_qkv), torch.empty(b, n_gate_up)
            if fn(len(self._kv_ptrs), b, x.data_ptr(), fns, tiles, bias, n, k, norms, eps, att, *args, pool_k,
                  pool_v, *index_ptrs, windows, self.sinks, h, hk, d, qkv.data_ptr(), attn.data_ptr(),
                  mid.data_ptr(), threads, self._kv_half):
                raise MemoryError("a decode kernel could not allocate its scratch buffers")
        else:
            for i, (kp, vp) in enumerate(self._kv_ptrs):
                if fused:
                    mq, mo, mgu, md = fused[i]
                    n1, n2 = self._norm_args[i]
                    qkv = mq.fused(x, norm=n1)
                else:
                    norm1, qkv_fn, o_fn, norm2, gate_up_fn, down_fn, _ = ops[i]
                    qkv = qkv_fn(norm1(x)).contiguous()
                if self._attention(qkv.data_ptr(), *args, kp, vp, *index_ptrs, b, self.windows[i] or 0, self.sinks, h,
                                   hk, d, attn.data_ptr(), threads, self._kv_half):
                    raise MemoryError("the attention kernel could not allocate its scratch buffers")
                if fused:
                    mo.fused(attn, out=x)
                    md.fused(mgu.fused(x, norm=n2), swiglu=True, out=x)
                else:
                    x = x + o_fn(attn)
                    hmid = gate_up_fn(norm2(x))
                    gate, up = hmid.chunk(2, dim=-1)
                    x = x + down_fn(F.silu(gate).mul_(up))
        head = self.w.head.decode_module(b) if isinstance(self.w.head, ByStep) else self.w.head
        if fused and hasattr(head, "fused"):  # the final norm inside the head's kernel
            return head.fused(x, norm=self._final_norm_args)
        return head(self._final_norm(x)).float()

    @staticmethod
    def _norm_fn(norm: nn.Module):
        """The model's norm as a function; an fp32 RMSNorm as ``x · rsqrt(Σx² + D·eps) · (g·√D)``: the same value
        as ``x / sqrt(mean(x²) + eps) · g`` in four ops (``F.rms_norm`` is slower on one row)."""
        if not isinstance(norm, RMSNorm):
            return norm.forward
        g = norm.weight.detach()
        dim = g.shape[0]
        g_root = (g.float() * dim ** 0.5).to(g.dtype)
        add = dim * norm.eps

        def rms(x: torch.Tensor) -> torch.Tensor:
            if x.dtype != torch.float32:
                return norm(x)
            r = torch.linalg.vecdot(x, x).add_(add).rsqrt_()
            return torch.mul(x, r.unsqueeze(-1)).mul_(g_root)

        return rms

    # -------------------------------------------------------------- forward
    @torch.inference_mode()
    def score(self, tokens: list[int], decode_from: int | None = None) -> torch.Tensor:
        """Logits [T, V] at every position of ``tokens`` (perplexity), through these weights and a scratch KV.

        By default the tokens go in as one prompt (the prefill kernels). With ``decode_from=p``, the first ``p``
        tokens are the prompt and each later one is fed as a one-token decode step, so that the logits come from
        the batch-1 decode kernels: teacher-forced generation.
        """
        kv = SequenceKV(self.pool)
        try:
            if decode_from is None:
                slots = kv.reserve(len(tokens))
                return self.forward([Segment(kv, tokens, 0, slots, True)], all_logits=True)
            if not 1 <= decode_from <= len(tokens):
                raise ValueError(f"decode_from must be in 1..{len(tokens)}, got {decode_from}")
            slots = kv.reserve(decode_from)
            out = [self.forward([Segment(kv, tokens[:decode_from], 0, slots, True)], all_logits=True)]
            kv.commit(tokens, decode_from)
            for pos in range(decode_from, len(tokens)):
                slots = kv.reserve(1)
                out.append(self.forward([Segment(kv, [tokens[pos]], pos, slots, True)]))
                kv.commit(tokens, 1)
            return torch.cat(out)
        finally:
            kv.release()

    @torch.inference_mode()
    def forward(self, segments: list[Segment], all_logits: bool = False, greedy: bool = False) -> torch.Tensor:
        """Run one step; returns logits [n_sampled, V] for the segments with ``sample`` set, in order.

        ``segments`` must list all single-token decode segments (``prefill`` unset) first. ``greedy``: the caller
        will take each row's argmax; a step that finds them beside its head (``step.c``: no second parallel region)
        leaves them in ``self.argmax`` (else None there).
        """
        self.argmax = None
        model, w, pool = self.model, self.w, self.pool
        h, hk, d = self.h, self.hk, self.d
        n_dec = 0
        while n_dec < len(segments) and len(segments[n_dec].tokens) == 1 and not segments[n_dec].prefill:
            n_dec += 1
        if n_dec == len(segments) and not all_logits and all(s.sample for s in segments) and self._fast_ok():
            logits = self._decode(segments, greedy)
            if logits is not None:
                return logits
        groups: list[_Group] = []
        if n_dec:
            groups.append(self._group(slice(0, n_dec), segments[:n_dec], decode=True))
        row = n_dec
        for s in segments[n_dec:]:
            groups.append(self._group(slice(row, row + len(s.tokens)), [s]))
            row += len(s.tokens)
        n = row
        tokens = torch.tensor([t for s in segments for t in s.tokens])
        positions = torch.tensor([p for s in segments for p in range(s.start, s.start + len(s.tokens))])
        slots = torch.tensor([x for s in segments for x in s.slots])
        x = model.embed(tokens)  # [N, d_model]
        cos, sin = self._rope_tables(positions, x.dtype)  # [N, 1, D]
        half = d // 2
        out = torch.empty(n, h * d, dtype=x.dtype) if len(groups) > 1 else None
        gqa = h != hk
        pool_k, pool_v = pool.k, pool.v
        prefill = n_dec < len(segments)
        for i, (norm1, qkv_fn, o_fn, norm2, gate_up_fn, down_fn, ffn) in enumerate(self._layer_ops(n, prefill)):
            qkv = qkv_fn(norm1(x))
            qk = qkv[:, :(h + hk) * d].view(n, h + hk, d)  # q and k rotated together
            qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)
            q, k = qk[:, :h], qk[:, h:]
            v = qkv[:, (h + hk) * d:].view(n, hk, d)
            pool_k[i].index_copy_(0, slots, k.to(pool_k.dtype))  # (an fp16 pool rounds them here)
            pool_v[i].index_copy_(0, slots, v.to(pool_v.dtype))
            window = self.windows[i]
            for g in groups:
                qg = q[g.rows].view(g.b, g.t, h, d).transpose(1, 2)
                kg = pool_k[i].index_select(0, g.flat).view(g.b, -1, hk, d)  # [B, S, Hkv, D]
                vg = pool_v[i].index_select(0, g.flat).view(g.b, -1, hk, d)
                if g.cold is not None:
                    kv = pool.tier.kv
                    kg = torch.cat([kv[0][i][g.cold], kg], dim=1)
                    vg = torch.cat([kv[1][i][g.cold], vg], dim=1)
                kg, vg = kg.to(qg.dtype), vg.to(qg.dtype)
                mask = self._mask(g, window)
                causal = isinstance(mask, str)
                pad = 0 if g.decode else _query_pad(g.t)
                if pad:  # (see _query_pad) rows of zeros, whose outputs are dropped
                    qg = F.pad(qg, (0, 0, 0, pad))
                    if mask is not None and not causal:
                        mask = F.pad(mask, (0, 0, 0, pad), value=True)
                y = F.scaled_dot_product_attention(qg, kg.transpose(1, 2), vg.transpose(1, 2),
                                                   attn_mask=None if causal else mask, is_causal=causal,
                                                   enable_gqa=gqa)
                if pad:
                    y = y[:, :, :g.t]
                y = y.transpose(1, 2).reshape(g.b * g.t, h * d)
                if out is None:
                    attn = y
                else:
                    out[g.rows] = y
                    attn = out
            x = x + o_fn(attn)
            hmid = gate_up_fn(norm2(x))
            if ffn == "moe":  # the whole FFN (router and experts) ran in gate_up_fn
                x = x + hmid
                continue
            if ffn == "swiglu":
                gate, up = hmid.chunk(2, dim=-1)
                hmid = F.silu(gate).mul_(up)
            else:
                hmid = F.gelu(hmid, approximate="tanh")
            x = x + down_fn(hmid)
        rows, row = [], 0
        for s in segments:
            row += len(s.tokens)
            if s.sample:
                rows.append(row - 1)
        if all_logits:
            rows = list(range(n))
        if not rows:
            return torch.empty(0, self.cfg.vocab_size)
        x = self._final_norm(x[rows] if len(rows) < n else x)
        return _pick(w.head, len(rows), prefill and all_logits)(x).float()
