"""Perplexity and bits per byte of texts, scored through the engine (``Engine.score``).

A text longer than the context is scored in windows of ``context`` tokens that start every ``stride`` tokens (the
strided evaluation of HF's perplexity guide): each window scores only the tokens no earlier window scored, so with
``stride < context`` every token after the first is counted once and, past the first window, sees at least
``context - stride`` tokens before it. ``stride == context`` gives disjoint windows, whose first tokens are context
only (not scored). Each file is scored on its own (no window crosses files).

``method="llama-cpp"`` scores as llama.cpp's ``llama-perplexity`` does by default (tools/perplexity/perplexity.cpp,
``perplexity()``), so the two numbers compare. The file is read as its ``-f`` reads it (common/arg.cpp): the bytes as
they are, one trailing newline dropped. The tokens (BOS first when the model adds one, as both tokenize) are cut into
``len // context`` disjoint chunks of ``context`` tokens, the remainder dropped (at most ``chunks`` of them, its
``--chunks``); a text under ``2 × context`` tokens is refused, as llama.cpp refuses it. When the model adds BOS, each
chunk's first token is replaced by BOS (not prepended: the chunk stays ``context`` long). In each chunk only the tokens
after position ``first = context // 2`` are counted: positions ``first + 1 … context − 1``, ``context − 1 − first``
tokens a chunk, each predicted from at least ``first`` tokens before it. One difference stays: llama.cpp tokenizes
special-token text in the file (``<|im_start|>``) as plain text, cairn's tokenizer as the special token.

``ppl = exp(Σ nll / tokens)``; bits per byte ``= Σ nll / ln 2 / bytes``, ``bytes`` being the UTF-8 bytes the scored
tokens stand for (as the training loop's validation counts them). ``ppl_stderr`` is llama.cpp's "±":
``ppl · sqrt((mean(nll²) − mean(nll)²) / (tokens − 1))`` over the counted tokens.
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


def llama_cpp_chunks(n: int, context: int, chunks: int | None = None) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` of each of llama-perplexity's chunks of ``n`` tokens: tokens ``[begin, end)`` go in
    (the first replaced by BOS when the model adds one), tokens ``[first, end)`` are scored."""
    if context < 3:
        raise CairnError(f"--context must be at least 3 tokens with --method llama-cpp (each chunk counts the tokens "
                         f"after its first half), got {context}")
    if chunks is not None and chunks < 1:
        raise CairnError(f"--chunks must be a positive integer, got {chunks}")
    if n < 2 * context:
        raise CairnError(f"{n:,} tokens, but --method llama-cpp needs at least 2 x --context = {2 * context:,} (as "
                         "llama-perplexity does): give a longer text or a smaller --context")
    count = n // context if chunks is None else min(chunks, n // context)
    half = context // 2
    return [(k * context, (k + 1) * context, k * context + half + 1) for k in range(count)]


def read_texts(paths: list[str], as_llama_cpp: bool = False) -> list[tuple[str, str]]:
    """``(name, text)`` of each ``--data`` file: UTF-8 text, not empty. ``as_llama_cpp``: as llama-perplexity's ``-f``
    reads it, its bytes as they are (no newline translation) less one trailing newline."""
    if not paths:
        raise CairnError("eval ppl needs text: pass --data FILE (one or more)")
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CairnError(f"--data {path}: no such file")
        try:
            text = path.read_bytes().decode("utf-8") if as_llama_cpp else path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CairnError(f"--data {path}: not UTF-8 text ({e})") from None
        if not text.strip():
            raise CairnError(f"--data {path}: the file is empty")
        if as_llama_cpp and text.endswith("\n"):
            text = text[:-1]
        out.append((str(path), text))
    return out


METHODS = ("strided", "llama-cpp")


def perplexity(score: Callable[[list[int], int | None], list[float]], token_bytes: list[bytes],
               docs: list[tuple[str, list[int]]], context: int, stride: int | None,
               progress: Callable | None = None, decode: bool = False, method: str = "strided",
               bos: int | None = None, chunks: int | None = None) -> dict:
    """Perplexity of token sequences ``docs`` (``(name, ids)``) with ``score(ids, decode_from) -> log p(ids[i] |
    ids[:i]), i ≥ 1`` (``Engine.score``). ``decode``: each window's scored tokens go in as one-token decode steps
    after its context as a prompt (the kernels generation uses); otherwise the whole window is one prompt.
    ``method``: ``"strided"`` (windows of ``context`` every ``stride``) or ``"llama-cpp"`` (llama-perplexity's chunks,
    at most ``chunks``; ``bos``: the id each chunk starts with when the model adds BOS, else None; no ``stride``).
    The report holds totals and, per file, its tokens, nll and the mean nll of each window."""
    if method not in METHODS:
        raise CairnError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "llama-cpp" and stride is not None:
        raise CairnError("--stride does not apply to --method llama-cpp (its chunks are disjoint, each counting its "
                         "second half): leave --stride out")
    if method == "strided" and chunks is not None:
        raise CairnError("--chunks applies only to --method llama-cpp: leave it out or add --method llama-cpp")
    if method == "strided" and bos is not None:
        raise CairnError("a BOS at the start of each window is llama-perplexity's rule: only with method llama-cpp")
    plan = []
    for name, ids in docs:
        if len(ids) < 2:
            raise CairnError(f"{name}: {len(ids)} token(s); perplexity needs at least two")
        if method == "llama-cpp":
            try:
                wins = llama_cpp_chunks(len(ids), context, chunks)
            except CairnError as e:
                raise CairnError(f"{name}: {e}") from None
        else:
            wins = windows(len(ids), context, stride)
        plan.append((name, ids, wins))
    total = sum(len(w) for *_, w in plan)
    bar = progress(range(total), "scoring windows", total) if progress else range(total)
    steps = iter(bar)  # a tqdm bar is iterable, not an iterator: each next() moves it on
    files, nll, nll2, n_tok, n_bytes = [], 0.0, 0.0, 0, 0
    for name, ids, wins in plan:
        f_nll, f_bytes, per_window = 0.0, 0, []
        for begin, end, first in wins:
            window = ids[begin:end] if bos is None else [bos, *ids[begin + 1:end]]
            lps = score(window, first - begin if decode else None)[first - begin - 1:]  # [i]: begin + 1 + i
            w_nll = -math.fsum(lps)
            nll2 += math.fsum(lp * lp for lp in lps)
            f_nll += w_nll
            f_bytes += sum(len(token_bytes[t]) for t in ids[first:end])
            per_window.append({"begin": begin, "end": end, "scored": end - first, "nll": w_nll / (end - first)})
            next(steps, None)
        n = sum(w["scored"] for w in per_window)
        files.append({"file": name, "tokens": n, "bytes": f_bytes, "nll": f_nll / n, "ppl": math.exp(f_nll / n),
                      "bpb": f_nll / math.log(2) / f_bytes if f_bytes else None, "windows": per_window})
        nll += f_nll
        n_tok += n
        n_bytes += f_bytes
    if hasattr(bar, "close"):
        bar.close()
    mean = nll / n_tok
    var = nll2 / n_tok - mean * mean
    stderr = math.exp(mean) * math.sqrt(var / (n_tok - 1)) if n_tok > 1 and var > 0 else None
    return {"ppl": math.exp(mean), "ppl_stderr": stderr, "bpb": nll / math.log(2) / n_bytes if n_bytes else None,
            "tokens": n_tok, "bytes": n_bytes, "nll": mean, "method": method, "context": context, "stride": stride,
            "first": context // 2 if method == "llama-cpp" else None, "bos_first": bos is not None,
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
    if r.get("method") == "llama-cpp":
        how = (f"{r['windows']} chunk(s) of {r['context']} as llama-perplexity, each counting the tokens after "
               f"position {r['first']}")
    else:
        how = f"{r['windows']} window(s) of {r['context']}, stride {r['stride']}"
    err = f" +/- {r['ppl_stderr']:.4f}" if r.get("ppl_stderr") else ""
    lines = [f"perplexity {r['ppl']:.4f}{err}   bits/byte {r['bpb']:.4f}   nll {r['nll']:.4f} nats/token   "
             f"{r['tokens']:,} tokens ({r['bytes']:,} bytes) in {how}"]
    if len(r["files"]) > 1:
        for f in r["files"]:
            lines.append(f"  {f['file']}: ppl {f['ppl']:.4f}, {f['tokens']:,} tokens")
    return "\n".join(lines)
