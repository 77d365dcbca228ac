"""``ModelConfig``: the one vocabulary for every architecture cairn builds or accounts for.

Nothing else in cairn parses architecture fields: HF ``config.json`` files and GGUF metadata are turned into a
``ModelConfig`` here, and a ``ModelConfig`` is turned back into an HF ``config.json`` here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cairn.errors import CairnError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# Fields each scaling type needs (beyond its type); optional ones have defaults in RopeScaling.
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("long_factor", "short_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
# HF model families whose decoder cairn runs.
HF_RUNNABLE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
MLP_KINDS = ("swiglu", "gelu", "geglu", "relu")  # cairn runs swiglu and gelu; geglu / relu are accounted only
GATED_MLPS = ("swiglu", "geglu")  # three matrices (gate, up, down) instead of two
STACKS = ("decoder", "encoder", "encoder-decoder")
POS_EMBEDDINGS = ("rope", "learned", "relative", "alibi", "none")


@dataclass
class RopeScaling:
    """RoPE long-context scaling, with the fields of HF's ``rope_scaling`` types of the same names."""

    type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    # yarn and longrope
    attention_factor: float | None = None
    # longrope
    long_factor: list[float] | None = None
    short_factor: list[float] | None = None

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise CairnError(
                f"unknown RoPE scaling type {self.type!r}: cairn supports {', '.join(ROPE_TYPES)}"
            )
        missing = [f for f in _ROPE_REQUIRED[self.type] if getattr(self, f) is None]
        if missing:
            raise CairnError(f"RoPE scaling type {self.type!r} needs the field(s) {', '.join(missing)}")

    def to_hf(self, theta: float) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.type, "rope_theta": theta}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "type" and v is not None:
                out[f.name] = v
        return out


# Upper bounds on a config's dimensions (several times the largest published models'): past them a header is
# corrupt, and sizing anything by it would exhaust memory.
_LIMITS = {
    "vocab_size": 1 << 24, "d_model": 1 << 18, "n_layers": 4096, "n_encoder_layers": 4096, "n_heads": 1 << 14,
    "n_kv_heads": 1 << 14, "head_dim": 1 << 14, "d_ff": 1 << 20, "moe_d_ff": 1 << 20, "shared_expert_d_ff": 1 << 20,
    "max_seq_len": 1 << 27, "pos_table_size": 1 << 27, "n_experts": 1 << 16, "experts_per_token": 1 << 16,
    "n_shared_experts": 1 << 16, "type_vocab_size": 1 << 16, "moe_every": 4096, "ffn_share_group": 4096,
}


@dataclass
class ModelConfig:
    """A decoder-only pre-norm transformer: ``x + Attn(Norm(x))`` then ``x + MLP(Norm(x))``."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA; otherwise GQA
    head_dim: int | None = None  # None: d_model // n_heads
    mlp: str = "swiglu"  # "swiglu" (SiLU(x W1) * x W3 -> W2), "gelu" (GELU(x W1) -> W2); also "geglu", "relu"
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    sliding_window: int | None = None
    # Per-layer attention kind: "full" or "sliding"; None means every layer is "sliding" when a window is set.
    layer_types: list[str] | None = None
    attn_bias: bool = False  # biases on q, k, v
    attn_out_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False
    tie_embeddings: bool = False
    arch: str = "llama"  # the family name, used for HF export ("llama", "mistral", "qwen2", ...)
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # family fields cairn keeps for export only
    # bits per weight of the source file's layer matrices (a GGUF's Q4_1 -> 4, Q8_0 -> 8, F16 -> 16); None when
    # the source does not say. Not architecture: the engine's quantize="auto" follows it.
    weight_bits: int | None = None

    # --- mixture of experts (n_experts = 0: every layer has a dense MLP) ---------------------------------
    n_experts: int = 0  # routed experts per MoE layer (E)
    experts_per_token: int = 0  # top-k experts each token is routed to (k)
    moe_d_ff: int | None = None  # hidden width of one routed expert (None: d_ff)
    n_shared_experts: int = 0  # experts every token passes through (fused into one MLP)
    shared_expert_d_ff: int | None = None  # hidden width of one shared expert (None: moe_d_ff)
    shared_expert_gate: bool = False  # sigmoid(x · w) gate on the shared experts' output (Qwen2-MoE)
    norm_topk_prob: bool = True  # renormalise the k routing weights to sum to 1 (Mixtral: yes)
    router_bias: bool = False  # per-expert routing bias (DeepSeek-V3's e_score_correction_bias)
    first_k_dense: int = 0  # the first k layers keep a dense MLP of width d_ff (DeepSeek-style)
    moe_every: int = 1  # after first_k_dense, layer i is MoE when (i + 1) % moe_every == 0
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss (the model reports it unweighted)

    # --- FFN weight sharing: consecutive groups of this many layers use one MLP (1: no sharing) -----------
    ffn_share_group: int = 1

    # --- architecture fields cairn accounts for but does not run ------------------------------------------
    stack: str = "decoder"  # "decoder", "encoder" (BERT) or "encoder-decoder" (T5: n_layers decoder layers)
    n_encoder_layers: int = 0  # encoder layers of an encoder-decoder model
    pos_embedding: str = "rope"  # "rope", "learned" (absolute table), "relative" (T5 buckets), "alibi", "none"
    pos_table_size: int | None = None  # rows of a learned position table (None: max_seq_len; OPT has +2)
    relative_buckets: int = 32  # T5 relative-attention buckets (one table per stack, in its first layer)
    type_vocab_size: int = 0  # BERT token-type embeddings
    embed_norm: bool = False  # a norm right after the embeddings (BERT, BLOOM)
    pooler: bool = False  # BERT's pooler: a d_model x d_model dense layer with bias on the first token
    final_norm: bool = True  # a norm before the output head (BERT, post-norm, has none)
    head_bias: bool = False  # a bias on the output head (GPT-J)
    parallel_residual: bool = False  # y = x + Attn(N1(x)) + MLP(N2(x)) (GPT-J, GPT-NeoX, Falcon)
    parallel_shared_norm: bool = False  # parallel blocks whose attention and MLP read one norm (GPT-J, Falcon-7B)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys (Qwen3, OLMo-2)
    # multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank > 0 switches it on
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # 0: queries come from a plain d_model -> heads projection
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.d_model // self.n_heads
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_experts and self.moe_d_ff is None:
            self.moe_d_ff = self.d_ff
        if self.n_shared_experts and self.shared_expert_d_ff is None:
            self.shared_expert_d_ff = self.moe_d_ff or self.d_ff
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        dims = {
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "d_ff": self.d_ff,
            "max_seq_len": self.max_seq_len,
        }
        optional = {  # zero means "not used"; negative is always wrong
            "n_experts": self.n_experts,
            "experts_per_token": self.experts_per_token,
            "n_shared_experts": self.n_shared_experts,
            "first_k_dense": self.first_k_dense,
            "n_encoder_layers": self.n_encoder_layers,
            "type_vocab_size": self.type_vocab_size,
            "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": self.q_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
        }
        if self.n_experts:
            dims["moe_d_ff"] = self.moe_d_ff
            dims["experts_per_token"] = self.experts_per_token
        if self.n_shared_experts:
            dims["shared_expert_d_ff"] = self.shared_expert_d_ff
        dims["moe_every"] = self.moe_every
        dims["ffn_share_group"] = self.ffn_share_group
        if self.pos_embedding == "learned":
            dims["pos_table_size"] = self.pos_table_size or self.max_seq_len
        if self.pos_embedding == "relative":
            dims["relative_buckets"] = self.relative_buckets
        if self.stack == "encoder-decoder":
            dims["n_encoder_layers"] = self.n_encoder_layers
        bad = [f"{k}={v}" for k, v in dims.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
        bad += [f"{k}={v}" for k, v in optional.items() if not isinstance(v, int) or v < 0]
        if bad:
            raise CairnError(f"model dimensions must be positive integers, got {', '.join(bad)}")
        # Checked before anything is sized by them (per-layer lists, modules): a corrupt header must not get to
        # allocate. The limits are far beyond any published model.
        huge = [f"{k}={v} (at most {_LIMITS[k]:,})" for k, v in {**dims, **optional}.items()
                if k in _LIMITS and v > _LIMITS[k]]
        if huge:
            raise CairnError(f"model dimensions out of range: {', '.join(huge)}; the file or config is corrupt or "
                             "not a model cairn can build")
        if self.n_experts and self.experts_per_token > self.n_experts:
            raise CairnError(
                f"experts_per_token={self.experts_per_token} exceeds n_experts={self.n_experts}: "
                "a token can be routed to at most every expert"
            )
        if not self.n_experts and (self.experts_per_token or self.n_shared_experts):
            raise CairnError("experts_per_token / n_shared_experts need n_experts > 0 (a mixture of experts)")
        if self.first_k_dense > self.n_layers:
            raise CairnError(f"first_k_dense={self.first_k_dense} exceeds n_layers={self.n_layers}")
        if self.stack not in STACKS:
            raise CairnError(f"unknown stack {self.stack!r}: use one of {', '.join(STACKS)}")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise CairnError(f"unknown pos_embedding {self.pos_embedding!r}: use one of {', '.join(POS_EMBEDDINGS)}")
        if self.kv_lora_rank and not (self.qk_nope_head_dim + self.qk_rope_head_dim and self.v_head_dim):
            raise CairnError(
                "multi-head latent attention (kv_lora_rank > 0) needs qk_nope_head_dim, qk_rope_head_dim and "
                "v_head_dim"
            )
        for layers in self.ffn_share_groups():
            kinds = {self.is_moe_layer(i) for i in layers}
            if len(kinds) > 1:
                raise CairnError(
                    f"FFN sharing group {layers} mixes dense and MoE layers: make first_k_dense a multiple of "
                    f"ffn_share_group={self.ffn_share_group}"
                )
        if self.n_heads % self.n_kv_heads:
            raise CairnError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: "
                "grouped-query attention shares each KV head among a whole number of query heads"
            )
        if self.pos_embedding == "rope" and not self.kv_lora_rank and self.head_dim % 2:
            raise CairnError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.mlp not in MLP_KINDS:
            raise CairnError(f"unknown MLP kind {self.mlp!r}: use one of {', '.join(MLP_KINDS)}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise CairnError(f"unknown norm kind {self.norm!r}: use 'rmsnorm' or 'layernorm'")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise CairnError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise CairnError(
                    f"layer_types has {len(self.layer_types)} entries but the model has {self.n_layers} layers"
                )
            unknown = sorted(set(self.layer_types) - {"full", "sliding"})
            if unknown:
                raise CairnError(f"unknown layer type(s) {unknown}: use 'full' or 'sliding'")

    # ------------------------------------------------------------ layer layout
    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has a mixture of experts instead of a dense MLP."""
        return bool(self.n_experts) and layer >= self.first_k_dense and (layer + 1) % self.moe_every == 0

    def ffn_share_groups(self) -> list[list[int]]:
        """The layers that use one FFN, in consecutive groups of ``ffn_share_group`` (the last may be shorter)."""
        g = self.ffn_share_group
        return [list(range(i, min(i + g, self.n_layers))) for i in range(0, self.n_layers, g)]

    def unsupported_by_model(self) -> list[str]:
        """The features of this config that cairn's model cannot run (empty: ``build_model`` can build it)."""
        problems = []
        if self.stack != "decoder":
            problems.append(f"stack={self.stack!r} (cairn runs decoder-only models)")
        if self.mlp not in ("swiglu", "gelu"):
            problems.append(f"mlp={self.mlp!r} (cairn runs swiglu and gelu MLPs)")
        if self.pos_embedding != "rope":
            problems.append(f"pos_embedding={self.pos_embedding!r} (cairn runs RoPE models)")
        for flag in ("embed_norm", "pooler", "head_bias", "parallel_residual", "qk_norm", "router_bias"):
            if getattr(self, flag):
                problems.append(f"{flag}=True")
        if not self.final_norm:
            problems.append("final_norm=False")
        if self.type_vocab_size:
            problems.append("token-type embeddings")
        if self.kv_lora_rank:
            problems.append("multi-head latent attention (kv_lora_rank > 0)")
        return problems

    def check_runnable(self) -> None:
        problems = self.unsupported_by_model()
        if problems:
            raise CairnError(
                f"cairn can account for {self.name or self.arch!r} but cannot run it: {'; '.join(problems)}. "
                "Use `cairn params` to inspect it, or pick a llama/mistral/qwen2/mixtral/qwen2_moe model to run"
            )

    def window(self, layer: int) -> int | None:
        """The attention window of a layer (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding":
            return None
        return self.sliding_window

    def original_context(self) -> int:
        """The context the model was trained at: its RoPE scaling's ``original_max_position_embeddings`` when it has
        one, else ``max_seq_len``."""
        s = self.rope_scaling
        return (s.original_max_position_embeddings if s is not None else None) or self.max_seq_len

    def with_rope_scaling(self, scaling: RopeScaling) -> ModelConfig:
        """This config with ``scaling`` in place of its own RoPE scaling (``--rope-scaling`` at load) and its usable
        context (``max_seq_len``) raised to ``original × factor``. The original context is the one ``scaling``
        names, else the model's own (``original_context``); it is written into the scaling, where every type that
        uses it (dynamic's threshold, yarn's correction range, llama3's wavelengths, longrope's switch) reads it."""
        if scaling.factor is None or not scaling.factor >= 1:
            raise CairnError(f"RoPE scaling factor must be a number >= 1 (it stretches the context), got "
                             f"{scaling.factor}")
        orig = scaling.original_max_position_embeddings or self.original_context()
        if orig < 1:
            raise CairnError(f"the original context must be a positive number of tokens, got {orig}")
        half = self.head_dim // 2
        for name in ("long_factor", "short_factor"):
            given = getattr(scaling, name)
            if given is not None and len(given) != half:
                raise CairnError(f"longrope {name} has {len(given)} entries; this model needs head_dim/2 = {half}")
        scaling = dataclasses.replace(scaling, original_max_position_embeddings=orig)
        return dataclasses.replace(self, rope_scaling=scaling, max_seq_len=int(orig * scaling.factor))

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CairnError(f"unknown ModelConfig field(s) {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from cairn.weights.native import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    # ---------------------------------------------------------------- HF import
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read an HF ``config.json`` (already parsed) of the Llama, Mistral, Qwen2 or SmolLM families."""
        model_type = hf.get("model_type")
        if model_type is None:
            raise CairnError(f"{source}: missing field 'model_type' (e.g. \"llama\")")
        if model_type not in HF_RUNNABLE:
            raise CairnError(
                f"{source}: unsupported architecture {model_type!r}; cairn runs {', '.join(sorted(HF_RUNNABLE))}"
            )

        def req(key: str) -> Any:
            if key not in hf or hf[key] is None:
                raise CairnError(f"{source}: missing field {key!r}, which a {model_type} config must have")
            return hf[key]

        n_layers = _typed(req("num_hidden_layers"), int, "num_hidden_layers", source, _LIMITS["n_layers"])
        rope_theta, scaling = _rope_from_hf(hf, source)
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise CairnError(f"{source}: hidden_act {act!r} is not supported for {model_type} (expected 'silu')")

        sliding_window = None
        layer_types = None
        if model_type in ("mistral", "mixtral"):
            sliding_window = hf.get("sliding_window")
        elif model_type in ("qwen2", "qwen2_moe"):
            if hf.get("use_sliding_window"):
                sliding_window = hf.get("sliding_window")
        if hf.get("layer_types") is not None:
            layer_types = ["sliding" if t == "sliding_attention" else "full" for t in hf["layer_types"]]
            if "sliding" not in layer_types:
                sliding_window, layer_types = None, None
        elif model_type in ("qwen2", "qwen2_moe") and sliding_window is not None:
            mwl = hf.get("max_window_layers", 28)
            layer_types = ["sliding" if i >= mwl else "full" for i in range(n_layers)]
        if layer_types is not None and all(t == "sliding" for t in layer_types):
            layer_types = None

        moe = _moe_from_hf(hf, model_type, n_layers, source)
        qkv_bias = bool(hf.get("qkv_bias", True))  # Qwen2-MoE's switch for its q/k/v biases

        attn_bias = bool(hf.get("attention_bias", False)) or model_type == "qwen2"
        extra = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
        return _build(
            cls, source,
            vocab_size=req("vocab_size"),
            d_model=req("hidden_size"),
            n_layers=n_layers,
            n_heads=req("num_attention_heads"),
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or None,
            d_ff=req("intermediate_size"),
            mlp="swiglu",
            norm="rmsnorm",
            norm_eps=_typed(hf.get("rms_norm_eps", 1e-6), float, "rms_norm_eps", source),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_seq_len=_typed(hf.get("max_position_embeddings", 2048), int, "max_position_embeddings", source),
            sliding_window=sliding_window,
            layer_types=layer_types,
            attn_bias=qkv_bias if model_type == "qwen2_moe" else attn_bias,
            attn_out_bias=bool(hf.get("attention_bias", False)) and model_type not in ("qwen2", "qwen2_moe"),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            arch=model_type,
            name=hf.get("_name_or_path", ""),
            extra=extra,
            **moe,
        )

    @classmethod
    def from_hf_file(cls, path: str | Path) -> ModelConfig:
        path = hf_config_path(path)
        return cls.from_hf(read_json_object(path), source=str(path))

    def to_hf(self, bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None) -> dict[str, Any]:
        """An HF ``config.json`` that ``transformers`` loads into the same network."""
        if self.arch not in HF_RUNNABLE:
            raise CairnError(f"cannot export architecture {self.arch!r} to HF: use one of {sorted(HF_RUNNABLE)}")
        if self.mlp != "swiglu" or self.norm != "rmsnorm":
            raise CairnError("HF export supports SwiGLU + RMSNorm models (the Llama family)")
        self.check_runnable()
        if self.ffn_share_group != 1:
            raise CairnError("HF has no FFN weight sharing: export a model with ffn_share_group=1")
        if self.n_experts and self.arch not in ("mixtral", "qwen2_moe"):
            raise CairnError(f"a mixture of experts exports as 'mixtral' or 'qwen2_moe', not {self.arch!r}")
        if self.arch in ("mixtral", "qwen2_moe") and not self.n_experts:
            raise CairnError(f"{self.arch!r} export needs n_experts > 0")
        hf: dict[str, Any] = {
            "architectures": [HF_RUNNABLE[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.d_ff,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": (self.rope_scaling or RopeScaling()).to_hf(self.rope_theta),
            "torch_dtype": "float32",
        }
        if self.rope_scaling is not None and self.rope_scaling.type != "default":
            hf["rope_scaling"] = {k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"}
            if self.rope_scaling.type == "dynamic":  # HF's dynamic NTK reads its threshold from here
                hf["max_position_embeddings"] = self.original_context()
        if self.arch == "llama":
            hf["attention_bias"] = self.attn_bias
            hf["mlp_bias"] = self.mlp_bias
            if self.attn_bias != self.attn_out_bias:
                raise CairnError("llama export needs attention biases on all of q, k, v, o or none")
        elif self.arch == "qwen2" and not self.attn_bias:
            raise CairnError("qwen2 export needs q/k/v biases (Qwen2 always has them)")
        elif self.arch == "mixtral":
            if self.first_k_dense or self.moe_every != 1 or self.n_shared_experts or not self.norm_topk_prob:
                raise CairnError("mixtral export needs every layer MoE, no shared experts and norm_topk_prob=True")
            hf.update(num_local_experts=self.n_experts, num_experts_per_tok=self.experts_per_token,
                      intermediate_size=self.moe_d_ff, router_aux_loss_coef=self.router_aux_loss_coef)
        elif self.arch == "qwen2_moe":
            if self.n_shared_experts > 1 or (self.n_shared_experts == 1) != self.shared_expert_gate:
                raise CairnError("qwen2_moe export needs at most one shared expert, gated (or none)")
            hf.update(num_experts=self.n_experts, num_experts_per_tok=self.experts_per_token,
                      moe_intermediate_size=self.moe_d_ff, norm_topk_prob=self.norm_topk_prob,
                      shared_expert_intermediate_size=self.shared_expert_d_ff or 0,
                      decoder_sparse_step=self.moe_every, mlp_only_layers=list(range(self.first_k_dense)),
                      qkv_bias=self.attn_bias, router_aux_loss_coef=self.router_aux_loss_coef)
        if self.sliding_window is not None:
            hf["sliding_window"] = self.sliding_window
            types = self.layer_types or ["sliding"] * self.n_layers
            hf["layer_types"] = ["sliding_attention" if t == "sliding" else "full_attention" for t in types]
            if self.arch in ("qwen2", "qwen2_moe"):
                hf["use_sliding_window"] = True
                hf["max_window_layers"] = types.index("sliding") if "sliding" in types else self.n_layers
            elif self.arch == "llama":
                raise CairnError("llama has no sliding window in HF: export as 'mistral' or 'qwen2'")
        elif self.arch in ("mistral", "mixtral"):
            hf["sliding_window"] = None
        for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
            if v is not None:
                hf[k] = v
            elif k in self.extra:
                hf[k] = self.extra[k]
        return hf


    # -------------------------------------------------------------- GGUF import
    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output: bool, source: str = "model.gguf") -> ModelConfig:
        """Read GGUF metadata (key -> value) for the llama-family architectures llama.cpp writes."""
        arch = meta.get("general.architecture")
        if arch is None:
            raise CairnError(f"{source}: GGUF metadata has no 'general.architecture'")
        if arch not in ("llama", "mistral", "qwen2"):
            raise CairnError(f"{source}: unsupported GGUF architecture {arch!r}; cairn runs llama, mistral, qwen2")

        def req(key: str) -> Any:
            full = f"{arch}.{key}"
            if full not in meta:
                raise CairnError(f"{source}: GGUF metadata is missing {full!r}")
            return meta[full]

        n_heads = int(req("attention.head_count"))
        d_model = int(req("embedding_length"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
        if not vocab:
            raise CairnError(f"{source}: GGUF metadata gives no vocabulary size")
        head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
        scaling = None
        stype = meta.get(f"{arch}.rope.scaling.type")
        if stype and stype != "none":
            factor = meta.get(f"{arch}.rope.scaling.factor")
            orig = meta.get(f"{arch}.rope.scaling.original_context_length")
            if stype not in ("linear", "yarn"):
                raise CairnError(f"{source}: unsupported GGUF rope scaling {stype!r} (cairn reads linear, yarn)")
            scaling = RopeScaling(type=stype, factor=float(factor), original_max_position_embeddings=orig)
        window = meta.get(f"{arch}.attention.sliding_window")
        moe: dict[str, Any] = {}
        n_experts = int(meta.get(f"{arch}.expert_count") or 0)
        if n_experts:  # llama.cpp writes Mixtral as a llama with experts
            moe = dict(n_experts=n_experts, experts_per_token=int(req("expert_used_count")),
                       moe_d_ff=int(meta.get(f"{arch}.expert_feed_forward_length") or req("feed_forward_length")))
        return _build(
            cls, source,
            vocab_size=int(vocab),
            d_model=d_model,
            n_layers=int(req("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=int(head_dim) if head_dim else None,
            d_ff=int(req("feed_forward_length")),
            norm_eps=float(req("attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=int(meta.get(f"{arch}.context_length", 2048)),
            sliding_window=int(window) if window else None,
            attn_bias=arch == "qwen2",
            tie_embeddings=not has_output,
            arch="mixtral" if n_experts and arch in ("llama", "mistral") else arch,
            name=str(meta.get("general.name", "")),
            **moe,
        )


def _typed(value: Any, kind: type, key: str, source: str, limit: int | None = None) -> Any:
    """``value`` as ``kind`` (int or float), or a CairnError naming the field; ints also within ``limit``."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        out = kind(value)
        if kind is int and out != float(value):
            raise ValueError
    except (ValueError, TypeError, OverflowError):
        raise CairnError(f"{source}: field {key!r} must be {'an integer' if kind is int else 'a number'}, got "
                         f"{value!r}") from None
    if limit is not None and out > limit:
        raise CairnError(f"{source}: field {key!r} is {out:,}, more than {limit:,}: the file is corrupt or not a "
                         "model cairn can build")
    return out


def _build(cls, source: str, **fields: Any):
    """``cls(**fields)`` with the source file named in any error its checks raise."""
    try:
        return cls(**fields)
    except CairnError as e:
        raise CairnError(f"{source}: {e}") from None
    except (ValueError, TypeError) as e:
        raise CairnError(f"{source}: a field has a value of the wrong type ({e})") from None


def _moe_from_hf(hf: dict[str, Any], model_type: str, n_layers: int, source: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a Mixtral or Qwen2-MoE ``config.json`` (empty for dense families)."""

    def req(key: str) -> Any:
        if hf.get(key) is None:
            raise CairnError(f"{source}: missing field {key!r}, which a {model_type} config must have")
        return hf[key]

    if model_type == "mixtral":
        return {
            "n_experts": int(req("num_local_experts")),
            "experts_per_token": int(req("num_experts_per_tok")),
            "moe_d_ff": int(req("intermediate_size")),
            "norm_topk_prob": True,
            "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.02)),
        }
    if model_type == "qwen2_moe":
        only = sorted(hf.get("mlp_only_layers") or [])
        first_k = len(only)
        if only != list(range(first_k)):
            raise CairnError(
                f"{source}: mlp_only_layers={only} is not a prefix of the layers; cairn supports dense first layers"
            )
        shared = int(hf.get("shared_expert_intermediate_size") or 0)
        return {
            "n_experts": int(req("num_experts")),
            "experts_per_token": int(req("num_experts_per_tok")),
            "moe_d_ff": int(req("moe_intermediate_size")),
            "n_shared_experts": 1 if shared else 0,
            "shared_expert_d_ff": shared or None,
            "shared_expert_gate": bool(shared),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
            "first_k_dense": first_k,
            "moe_every": int(hf.get("decoder_sparse_step", 1)),
            "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
        }
    return {}


def hf_config_path(path: str | Path) -> Path:
    """``path`` itself, or the ``config.json`` inside it when it is a directory; an error if there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CairnError(f"{path}: no such file (an HF model directory must contain config.json)")
    return path


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object, with errors that name the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CairnError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CairnError(f"{path}: expected a JSON object")
    return data


def _rope_from_hf(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling from either HF layout: ``rope_theta`` + ``rope_scaling`` or ``rope_parameters``."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    block: dict[str, Any] = {}
    if isinstance(params, dict):
        if any(isinstance(v, dict) for v in params.values()):
            raise CairnError(f"{source}: per-layer-type rope_parameters are not supported")
        block.update(params)
    if isinstance(scaling, dict):
        block.update(scaling)
    theta = float(block.pop("rope_theta", None) or theta or 10000.0)
    rtype = block.pop("rope_type", None) or block.pop("type", None) or "default"
    block.pop("type", None)
    if rtype == "su":  # the old name of longrope
        rtype = "longrope"
    if rtype not in ROPE_TYPES:
        raise CairnError(f"{source}: unknown rope type {rtype!r}; cairn supports {', '.join(ROPE_TYPES)}")
    block.pop("partial_rotary_factor", None)
    if rtype == "default":
        return theta, None
    known = {f.name for f in dataclasses.fields(RopeScaling)} - {"type"}
    kwargs = {k: v for k, v in block.items() if k in known}
    if rtype == "dynamic":  # HF's dynamic NTK grows θ past max_position_embeddings, whatever else the block says
        kwargs["original_max_position_embeddings"] = int(hf.get("max_position_embeddings", 2048))
    if rtype in ("yarn", "longrope", "llama3"):
        omp = hf.get("original_max_position_embeddings") if rtype == "longrope" else None
        kwargs["original_max_position_embeddings"] = int(
            omp or kwargs.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 2048)
        )
    try:
        return theta, RopeScaling(type=rtype, **kwargs)
    except CairnError as e:
        raise CairnError(f"{source}: {e}") from None
