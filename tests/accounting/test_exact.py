"""For every config cairn can build, the accounting equals the numel of the model built on the meta device."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cairn.accounting.costs import account
from cairn.config import ModelConfig
from cairn.model import build_model


@st.composite
def configs(draw) -> ModelConfig:
    n_kv = draw(st.integers(1, 4))
    n_heads = n_kv * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(1, 8))
    n_layers = draw(st.integers(1, 6))
    kw: dict = dict(
        vocab_size=draw(st.integers(1, 300)),
        d_model=draw(st.integers(1, 48)),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_ff=draw(st.integers(1, 64)),
        mlp=draw(st.sampled_from(["swiglu", "gelu"])),
        norm=draw(st.sampled_from(["rmsnorm", "layernorm"])),
        attn_bias=draw(st.booleans()),
        attn_out_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
        ffn_share_group=draw(st.integers(1, 3)),
    )
    if draw(st.booleans()):  # mixture of experts
        e = draw(st.integers(1, 6))
        group = kw["ffn_share_group"]
        kw.update(
            n_experts=e,
            experts_per_token=draw(st.integers(1, e)),
            moe_d_ff=draw(st.integers(1, 32)),
            first_k_dense=group * draw(st.integers(0, n_layers // group)),
        )
        if draw(st.booleans()):
            kw.update(n_shared_experts=draw(st.integers(1, 2)), shared_expert_d_ff=draw(st.integers(1, 16)),
                      shared_expert_gate=draw(st.booleans()))
    return ModelConfig(**kw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_accounting_equals_meta_numel(cfg: ModelConfig) -> None:
    model = build_model(cfg, device="meta")
    acc = account(cfg)
    assert acc.total_params == sum(p.numel() for p in model.parameters())
    named = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    tied_head = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    assert acc.total_params_untied == named + tied_head
    # active: the routed experts of each MoE module count k of E; everything else counts fully
    experts = {id(m): m for m in model.modules() if type(m).__name__ == "Experts"}
    routed = sum(p.numel() for m in experts.values() for p in m.parameters())
    if cfg.n_experts:
        assert routed % cfg.n_experts == 0
        assert acc.active_params == acc.total_params - routed + routed // cfg.n_experts * cfg.experts_per_token
    else:
        assert acc.active_params == acc.total_params


@settings(max_examples=60, deadline=None)
@given(configs())
def test_components_by_module(cfg: ModelConfig) -> None:
    """The per-component counts match the model's own modules, component by component."""
    model = build_model(cfg, device="meta")
    comps = account(cfg).components()
    seen: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "embed":
            key = "token_embedding"
        elif parts[0] == "head":
            key = "head"
        elif parts[0] == "norm":
            key = "final_norm"
        elif parts[2] in ("attn_norm", "mlp_norm"):
            key = "norms"
        elif parts[2] == "attn":
            key = "attn." + parts[3] + (".bias" if parts[4] == "bias" else "")
        elif parts[3] == "router":
            key = "router"
        elif parts[3] == "experts":
            key = "routed_experts"
        elif parts[3] == "shared":
            key = "shared_experts" + (".bias" if parts[-1] == "bias" else "")
        elif parts[3] == "shared_gate":
            key = "shared_experts.gate"
        else:
            key = "mlp" + (".bias" if parts[-1] == "bias" else "")
        seen[key] = seen.get(key, 0) + p.numel()
    assert {k: v for k, v in comps.items() if v} == seen
