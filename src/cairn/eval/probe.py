"""``cairn eval probe``: linear probes on each layer's hidden states for a labelled property of texts.

For every text of a JSONL file (``{"text": ..., "label": ...}``), the hidden state after each layer (index 0: the
token embeddings, index i: the output of block i, as HF's ``output_hidden_states``) is pooled over the text's tokens
(``mean``, or the ``last`` token's), taken by forward hooks on the model's blocks (no eval code in the model). Per
layer, a multinomial logistic regression (torch, L2-regularised, fitted by L-BFGS on standardised features) is
trained on a stratified split and scored on the held-out texts. A layer whose held-out accuracy stands well above the
majority-class baseline holds the property linearly.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

from cairn.data.jsonl import read_jsonl
from cairn.errors import CairnError

POOLS = ("mean", "last")
BATCH = 16  # texts per forward pass
HINT = 'one {"text": "...", "label": "..."} object per line'


@dataclass
class Example:
    text: str
    label: str


def read_examples(path) -> list[Example]:
    """The labelled texts of ``path`` (labels are compared as strings: ``1`` and ``"1"`` are one class)."""
    out = []
    for obj, where in read_jsonl(path, HINT):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise CairnError(f"{where}: needs a non-empty string \"text\" ({HINT})")
        label = obj.get("label")
        if label is None or isinstance(label, dict | list):
            raise CairnError(f"{where}: needs a \"label\" (a string, number or boolean) ({HINT})")
        out.append(Example(obj["text"], str(label).lower() if isinstance(label, bool) else str(label)))
    classes = Counter(e.label for e in out)
    if len(classes) < 2:
        raise CairnError(f"{path}: a probe needs at least two labels, found {sorted(classes) or 'none'}")
    if min(classes.values()) < 2:
        raise CairnError(f"{path}: every label needs at least two texts (one to train on, one to test on); "
                         f"counts: {dict(classes)}")
    return out


@torch.no_grad()
def hidden_states(model, texts: list[list[int]], pool: str = "mean") -> torch.Tensor:
    """[len(texts), n_layers + 1, d_model] (fp32): each text's pooled embeddings and the output of every block.

    The texts run as one right-padded batch: attention is causal, so padding after a text never reaches its tokens,
    and pooling reads each text's own positions only."""
    if pool not in POOLS:
        raise CairnError(f"unknown pooling {pool!r}: use {' or '.join(POOLS)}")
    lengths = torch.tensor([len(t) for t in texts])
    if int(lengths.min()) < 1:
        raise CairnError("a text encodes to no tokens")
    batch = torch.zeros(len(texts), int(lengths.max()), dtype=torch.long)
    for i, t in enumerate(texts):
        batch[i, :len(t)] = torch.tensor(t)
    states: list[torch.Tensor] = []

    def keep(_module, _inputs, output) -> None:
        states.append(output.float())

    hooks = [model.embed.register_forward_hook(keep)]
    hooks += [block.register_forward_hook(keep) for block in model.layers]
    try:
        model.hidden(batch)  # (no output head: its weights need not be loaded)
    finally:
        for h in hooks:
            h.remove()
    stacked = torch.stack(states, dim=1)  # [B, L + 1, T, d]
    if pool == "last":
        return stacked[torch.arange(len(texts)), :, lengths - 1]
    real = (torch.arange(batch.shape[1])[None, :] < lengths[:, None]).float()  # [B, T]
    return (stacked * real[:, None, :, None]).sum(2) / lengths[:, None, None]


def split(labels: list[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A stratified split of indices: ``test_fraction`` of each class held out (at least one, leaving one)."""
    if not 0 < test_fraction < 1:
        raise CairnError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    rng = random.Random(seed)
    train, test = [], []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(idx)
        k = min(len(idx) - 1, max(1, round(len(idx) * test_fraction)))
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, steps: int = 100):
    """A logistic-regression probe on features ``x`` [N, D] for labels ``y`` [N]; returns ``predict(x) -> labels``.

    Features are standardised with the training set's mean and deviation; the loss is cross-entropy plus
    ``l2 · ‖W‖²``, minimised by L-BFGS (full batch)."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()

    def predict(xs: torch.Tensor) -> torch.Tensor:
        return (((xs.double() - mean) / std) @ w + b).argmax(dim=-1)

    return predict


def probe_layers(features: torch.Tensor, labels: list[int], n_classes: int, test_fraction: float, seed: int,
                 l2: float, progress=None) -> dict:
    """Held-out and training accuracy of a probe per layer; ``features`` [N, n_layers + 1, D]."""
    train, test = split(labels, test_fraction, seed)
    y = torch.tensor(labels)
    layers = []
    rows = range(features.shape[1])
    for li in (progress(rows, "probing layers") if progress else rows):
        predict = fit_probe(features[train, li], y[train], n_classes, l2)
        layers.append({
            "layer": li,
            "test_accuracy": round(float((predict(features[test, li]) == y[test]).double().mean()), 6),
            "train_accuracy": round(float((predict(features[train, li]) == y[train]).double().mean()), 6),
        })
    majority = Counter(labels[i] for i in train).most_common(1)[0][0]
    baseline = sum(1 for i in test if labels[i] == majority) / len(test)
    best = max(layers, key=lambda r: r["test_accuracy"])
    return {"layers": layers, "n_train": len(train), "n_test": len(test), "majority_baseline": round(baseline, 6),
            "best_layer": best["layer"], "best_test_accuracy": best["test_accuracy"]}


def plot(report: dict, title: str, plt):
    """Held-out (and training) accuracy against layer, the majority-class baseline dashed."""
    xs = [r["layer"] for r in report["layers"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(xs) + 2), 3.8))
    ax.plot(xs, [r["test_accuracy"] for r in report["layers"]], "o-", label="held-out accuracy")
    ax.plot(xs, [r["train_accuracy"] for r in report["layers"]], ".:", color="gray", label="training accuracy")
    ax.axhline(report["majority_baseline"], ls="--", color="tab:red", label="majority-class baseline")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
