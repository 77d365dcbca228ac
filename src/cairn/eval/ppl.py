"""Perplexity and bits per byte of texts, scored through the engine (``Engine.score``).

A text longer than the context is scored in windows of ``context`` tokens that start every ``stride`` tokens (the
strided evaluation of HF's perplexity guide): each window scores only the tokens no earlier window scored, so with
``stride < context`` every token after the first is counted once and, past the first window, sees at least
``context - stride`` tokens before it. ``stride == context`` gives disjoint windows, whose first tokens are context
only (not scored). Each file is scored on its own (no window crosses files).

``ppl = exp(Σ nll / tokens)``; bits per byte ``= Σ nll / ln 2 / bytes``, ``bytes`` being the UTF-8 bytes the scored
tokens stand for (as the training loop's validation counts them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from cairn.errors import CairnError


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` for each window: tokens ``[begin, end)`` go in, tokens ``[first, end)`` are scored."""
    if context < 2:
        raise CairnError(f"--context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise CairnError(f"--stride must be between 1 and --context ({context}), got {stride}")
    out, prev_end = [], 1  # token 0 has no context: never scored
    for begin in range(0, n - 1, stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)  # a window's first token has no context inside it
        if end > first:
            out.append((begin, end, first))
            prev_end = end
        if prev_end >= n:
            break
    return out


def read_texts(paths: list[str]) -> list[tuple[str, str]]:
    """``(name, text)`` of each ``--data`` file: UTF-8 text, not empty."""
    if not paths:
        raise CairnError("eval ppl needs text: pass --data FILE (one or more)")
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CairnError(f"--data {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CairnError(f"--data {path}: not UTF-8 text ({e})") from None
        if not text.strip():
            raise CairnError(f"--data {path}: the file is empty")
        out.append((str(path), text))
    return out


def perplexity(score: Callable[[list[int], int | None], list[float]], token_bytes: list[bytes],
               docs: list[tuple[str, list[int]]], context: int, stride: int,
               progress: Callable | None = None, decode: bool = False) -> dict:
    """Perplexity of token sequences ``docs`` (``(name, ids)``) with ``score(ids, decode_from) -> log p(ids[i] |
    ids[:i]), i ≥ 1`` (``Engine.score``). ``decode``: each window's scored tokens go in as one-token decode steps
    after its context as a prompt (the kernels generation uses); otherwise the whole window is one prompt. The report
    holds totals and, per file, its tokens, nll and the mean nll of each window."""
    plan = []
    for name, ids in docs:
        if len(ids) < 2:
            raise CairnError(f"{name}: {len(ids)} token(s); perplexity needs at least two")
        plan.append((name, ids, windows(len(ids), context, stride)))
    total = sum(len(w) for *_, w in plan)
    steps = iter(range(total))
    bar = progress(steps, "scoring windows", total) if progress else steps
    files, nll, n_tok, n_bytes = [], 0.0, 0, 0
    for name, ids, wins in plan:
        f_nll, f_bytes, per_window = 0.0, 0, []
        for begin, end, first in wins:
            lps = score(ids[begin:end], first - begin if decode else None)[first - begin - 1:]  # [i]: begin + 1 + i
            w_nll = -math.fsum(lps)
            f_nll += w_nll
            f_bytes += sum(len(token_bytes[t]) for t in ids[first:end])
            per_window.append({"begin": begin, "end": end, "scored": end - first, "nll": w_nll / (end - first)})
            next(bar, None)
        n = sum(w["scored"] for w in per_window)
        files.append({"file": name, "tokens": n, "bytes": f_bytes, "nll": f_nll / n, "ppl": math.exp(f_nll / n),
                      "bpb": f_nll / math.log(2) / f_bytes if f_bytes else None, "windows": per_window})
        nll += f_nll
        n_tok += n
        n_bytes += f_bytes
    if hasattr(bar, "close"):
        bar.close()
    return {"ppl": math.exp(nll / n_tok), "bpb": nll / math.log(2) / n_bytes if n_bytes else None, "tokens": n_tok,
            "bytes": n_bytes, "nll": nll / n_tok, "context": context, "stride": stride,
            "scored_as": "decode steps" if decode else "prompt",
            "windows": sum(len(f["windows"]) for f in files), "files": files}


def plot(report: dict, title: str, plt):
    """Mean bits per token of each window along each file."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for f in report["files"]:
        xs = [w["end"] for w in f["windows"]]
        ax.plot(xs, [w["nll"] / math.log(2) for w in f["windows"]], marker="o" if len(xs) < 40 else None, lw=1,
                label=f"{Path(f['file']).name}: ppl {f['ppl']:.2f}")
    ax.set_xlabel("token position (end of window)")
    ax.set_ylabel("bits per token (window mean)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def format_report(r: dict) -> str:
    lines = [f"perplexity {r['ppl']:.4f}   bits/byte {r['bpb']:.4f}   nll {r['nll']:.4f} nats/token   "
             f"{r['tokens']:,} tokens ({r['bytes']:,} bytes) in {r['windows']} window(s) of {r['context']}, "
             f"stride {r['stride']}"]
    if len(r["files"]) > 1:
        for f in r["files"]:
            lines.append(f"  {f['file']}: ppl {f['ppl']:.4f}, {f['tokens']:,} tokens")
    return "\n".join(lines)
