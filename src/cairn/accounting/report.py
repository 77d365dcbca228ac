"""`cairn params` output: the readable table, and the PNG of parameters by component and KV cache vs context."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from cairn.accounting.costs import DTYPE_BITS, Accounting
from cairn.errors import CairnError


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def text_report(acc: Accounting, report: dict[str, Any]) -> str:
    """The default `cairn params` output: components, layers, totals, memory, KV cache and FLOPs."""
    cfg = acc.cfg
    total = report["total_params"]
    lines = [f"{report['name']}  ({cfg.stack}, {cfg.n_layers + cfg.n_encoder_layers} layers, d_model={cfg.d_model}, "
             f"{cfg.n_heads} heads / {cfg.n_kv_heads} KV heads, vocab {cfg.vocab_size:,})", ""]
    untied = report["components_untied"]
    lines.append(f"{'component':34s} {'parameters':>20s} {'share':>7s}")
    for name, n in report["components"].items():
        note = "" if n == untied[name] else f"  (tied/shared; {untied[name]:,} untied)"
        lines.append(f"{name:34s} {n:>20,} {n / total:>7.1%}{note}")
    lines.append("")
    for layer in report["layers"]:
        lines.append(f"{layer['layers']:50s} {layer['params_each']:>20,} each")
    lines += [
        "",
        f"{'total (tied/shared tensors once)':50s} {total:>20,}  ({human_count(total)})",
        f"{'total, every named weight (untied)':50s} {report['total_params_untied']:>20,}",
        f"{'active per token':50s} {report['active_params']:>20,}  ({human_count(report['active_params'])})",
        "",
        f"weights (quantized: groups of {report['group_size']}, fp16 scale + zero-point; vectors in bf16):",
    ]
    for dt, b in report["weight_bytes"].items():
        lines.append(f"  {dt:6s} {human_bytes(b):>12s}  {8 * b / total:6.2f} bits/param")
    ctx, batch = report["context"], report["batch"]
    lines += [
        "",
        f"KV cache ({report['kv_dtype']}): {human_bytes(report['kv_bytes_per_token'])} per token; "
        f"{human_bytes(report['kv_bytes'])} at context {ctx:,} x batch {batch}",
        "",
        f"FLOPs per token: forward matmuls {report['forward_matmul_flops_per_token']:.4g}; "
        f"attention at context {ctx:,}: {report['attention_flops_per_token']:.4g}; "
        f"training {report['train_flops_per_token']:.4g} "
        f"({report['train_flops_per_token_checkpointed']:.4g} with activation checkpointing)",
        "",
        f"training memory ({report['train_dtype']} + AdamW, batch {batch} x {ctx:,} tokens):",
    ]
    plain, ckpt = report["train_memory"], report["train_memory_checkpointed"]
    for key in plain:
        lines.append(f"  {key:18s} {human_bytes(plain[key]):>12s}   checkpointed {human_bytes(ckpt[key]):>12s}")
    return "\n".join(lines)


def _component_group(name: str) -> str:
    base = name.split(".", 1)[1] if name.startswith(("encoder.", "decoder.")) else name
    if base.startswith(("attn", "cross_attn", "relative")):
        return "attention"
    if base.startswith(("mlp",)):
        return "MLP"
    if base.startswith(("router", "routed", "shared")):
        return base.split(".")[0].replace("_", " ")
    if "norm" in base:
        return "norms"
    if "embedding" in base:
        return "embeddings"
    return base.split(".")[0]


def write_plot(acc: Accounting, path: str, kv_dtype: str, context: int, batch: int) -> None:
    """A PNG: parameters by component (bar chart) and KV-cache memory against context length."""
    if not path.lower().endswith(".png"):
        raise CairnError(f"--plot writes a PNG: give a file name ending in .png, not {path!r}")
    if not Path(path).resolve().parent.is_dir():
        raise CairnError(f"--plot {path}: the directory {Path(path).resolve().parent} does not exist")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, int] = {}
    for name, n in acc.components().items():
        if n:
            groups[_component_group(name)] = groups.get(_component_group(name), 0) + n
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(groups)
    ax1.barh(names, [groups[n] for n in names], color="tab:blue")
    ax1.invert_yaxis()
    ax1.set_xlabel("parameters")
    ax1.set_title(f"{acc.cfg.name or acc.cfg.arch}: {human_count(acc.total_params)} parameters")
    for i, n in enumerate(names):
        ax1.text(groups[n], i, f" {human_count(groups[n])}", va="center", fontsize=8)
    top = max(context, acc.cfg.max_seq_len, 1024)
    xs = sorted({int(2 ** (k / 4)) for k in range(40, 4 * top.bit_length() + 1)} | {context})
    xs = [x for x in xs if x <= top]
    ax2.plot(xs, [acc.kv_bytes(x, batch, kv_dtype) / 2**30 for x in xs], color="tab:red")
    ax2.axvline(context, color="gray", linestyle=":", label=f"--context {context:,}")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("context length (tokens)")
    ax2.set_ylabel(f"KV cache, GiB ({kv_dtype}, batch {batch})")
    ax2.set_title("KV-cache memory vs context")
    ax2.legend()
    fig.tight_layout()
    target = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=target.resolve().parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a plot is an ordinary output file
        os.replace(tmp, target)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


__all__ = ["DTYPE_BITS", "human_bytes", "human_count", "text_report", "write_plot"]
