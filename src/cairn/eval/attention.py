"""``cairn eval attention``: the attention weights of every layer and head on one text, and the heads that park their
attention on the first token (the "attention sink").

The weights come from the model's own forward pass through its ``attn_probe`` hook (``cairn.model.layers.Attention``
hands each layer's rotated queries, keys and mask to it), so no eval code lives in the model and the fused SDPA
path it runs is unchanged: the probe recomputes ``softmax(q kᵀ / √d_head)`` under the same mask, which is what an
eager attention implementation (HF ``output_attentions=True``) returns.

Sink mass of a head: the mean, over query positions 1..T-1, of the weight on key 0 (position 0 can only attend to
itself, so it is left out). A head whose sink mass is at least ``threshold`` is listed as a sink head.
"""

from __future__ import annotations

import math

import torch

from cairn.errors import CairnError

DEFAULT_THRESHOLD = 0.5


@torch.no_grad()
def attention_maps(model, ids: list[int]) -> torch.Tensor:
    """Attention weights [n_layers, n_heads, T, T] (fp32; row i: query i over keys 0..T-1) of ``model`` on ``ids``."""
    if len(ids) < 2:
        raise CairnError("the text is shorter than two tokens: give a longer -p TEXT to see attention")
    maps: dict[int, torch.Tensor] = {}

    def probe(layer: int, q: torch.Tensor, k: torch.Tensor, mask) -> None:
        q, k = q.float(), k.float()
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each KV head serves n_heads / n_kv_heads queries
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        t, s = scores.shape[-2:]
        if isinstance(mask, str):  # "causal"
            mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        maps[layer] = torch.softmax(scores, dim=-1)[0]

    model.hidden(torch.tensor([ids]), attn_probe=probe)  # (no output head: its weights need not be loaded)
    return torch.stack([maps[i] for i in sorted(maps)])


def sink_mass(maps: torch.Tensor) -> torch.Tensor:
    """[n_layers, n_heads]: each head's mean attention on key 0 over query positions 1..T-1."""
    return maps[:, :, 1:, 0].mean(dim=-1)


def sink_heads(mass: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    """The heads whose sink mass is at least ``threshold``, the heaviest first."""
    found = [{"layer": int(li), "head": int(h), "sink_mass": round(float(mass[li, h]), 6)}
             for li, h in (mass >= threshold).nonzero().tolist()]
    return sorted(found, key=lambda d: -d["sink_mass"])


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """``--layers``: ``"0,3,5-7"`` (ranges inclusive; negative numbers count from the end); None: every layer."""
    if spec is None:
        return list(range(n_layers))
    out: list[int] = []
    try:
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            lo, sep, hi = part[1:].partition("-")  # a leading "-" is a negative number, not a range
            if sep:
                out += range(int(part[0] + lo), int(hi) + 1)
            else:
                i = int(part)
                out.append(i + n_layers if i < 0 else i)
    except ValueError:
        raise CairnError(f"--layers {spec!r}: give layer numbers and ranges such as 0,3,5-7") from None
    bad = [i for i in out if not 0 <= i < n_layers]
    if not out or bad:
        raise CairnError(f"--layers {spec!r}: the model has layers 0..{n_layers - 1}"
                         + (f" (got {bad})" if bad else ""))
    return sorted(set(out))


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """A short printable label per token (its text, whitespace made visible)."""
    out = []
    for t in ids:
        piece = tokenizer.decode([t], skip_special=False) if tokenizer is not None else str(t)
        piece = piece.replace("\n", "\\n").replace(" ", "·") or f"<{t}>"
        out.append(piece if len(piece) <= 12 else piece[:11] + "…")
    return out


def plot_grid(maps: torch.Tensor, layers: list[int], labels: list[str], title: str, plt):
    """A grid of heat maps, one row per layer in ``layers`` and one column per head; tokens on the outer axes."""
    n_heads, t = maps.shape[1], maps.shape[-1]
    cell = max(1.6, min(4.0, 0.16 * t))
    fig, axes = plt.subplots(len(layers), n_heads, figsize=(cell * n_heads + 1, cell * len(layers) + 1),
                             squeeze=False)
    for r, layer in enumerate(layers):
        for h in range(n_heads):
            ax = axes[r][h]
            ax.imshow(maps[layer, h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=9)
            if h == 0:
                ax.set_ylabel(f"layer {layer}\nquery", fontsize=8)
                ax.set_yticks(range(t), labels, fontsize=max(3, 7 - t // 16))
            if r == len(layers) - 1:
                ax.set_xlabel("key", fontsize=8)
                ax.set_xticks(range(t), labels, rotation=90, fontsize=max(3, 7 - t // 16))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_sinks(mass: torch.Tensor, threshold: float, title: str, plt):
    """Layers × heads heat map of sink mass, the sink heads outlined."""
    n_layers, n_heads = mass.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n_heads, 1.2 + 0.3 * n_layers))
    im = ax.imshow(mass.numpy(), cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    for li, h in (mass >= threshold).nonzero().tolist():
        ax.add_patch(plt.Rectangle((h - 0.5, li - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.5))
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="mean attention on the first token")
    fig.tight_layout()
    return fig
