"""Latency against context length: prefill time and per-token decode latency, measured through the engine.

For each length ``L`` one request with a prompt of ``L`` tokens (seeded random ids, so no two prompts share a
prefix) and ``decode`` greedy tokens goes through the engine alone, as a user's request would: the prefill time is
the time to the first token (chunked prefill included), the decode latency the mean gap between the later tokens.

Seed 003 §1.3 claims that going from 9k to 100k tokens of context costs ~4× latency "instead of 121×" (121 ≈
(100/9)², attention's quadratic cost). ``claim`` sets cairn's own figures beside it: each curve is fitted (prefill
``a + b·L + c·L²``, decode ``a + b·L``, least squares with no negative coefficient) and read at 9k and 100k. A
ratio whose end lies past the longest length measured is an extrapolation, and the report says so.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from cairn.errors import CairnError

CLAIM = {"from": 9_000, "to": 100_000, "claimed": 4.0, "quadratic": (100_000 / 9_000) ** 2}


def prompt_ids(length: int, vocab: int, special: set[int], seed: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + length)
    ids: list[int] = []
    while len(ids) < length:
        t = rng.randrange(vocab)
        if t not in special:
            ids.append(t)
    return ids


def fit_lengths(lengths: list[int], context: int, decode: int) -> dict[int, int]:
    """``{asked length: prompt length run}`` for the lengths an engine of ``context`` tokens can run with ``decode``
    tokens after the prompt: a length up to the context fills it, less the decoded tokens (so ``8k`` on an 8k model
    runs as 8,160 tokens with 32 decoded); a longer one is left out."""
    cap = context - decode  # the engine ends a request whose prompt and output reach the context
    return {n: min(n, cap) for n in lengths if n <= context and min(n, cap) >= 1}


def measure(engine, lengths: list[int], decode: int, repeats: int = 1, seed: int = 0,
            progress: Callable | None = None) -> list[dict]:
    """One row per length: ``prefill_s`` (time to the first token, best of ``repeats``), ``decode_ms`` (mean
    per-token latency of the following tokens, best of ``repeats``), ``tokens_per_s`` of the prefill, and the
    process's CPU time over the same spans (``prefill_cpu_s``, ``decode_cpu_ms``; every thread's, the engine's
    included): on a shared machine wall time counts the waits for a core, CPU time only the work."""
    from cairn.engine import FinishEvent, Request, SamplingParams, TokenEvent

    if decode < 2:
        raise CairnError(f"--decode must be at least 2 tokens (one to end the prefill, one to time), got {decode}")
    tok = engine.tokenizer
    special = set(tok.special_ids) | set(tok.eos_ids) if tok is not None else set()
    vocab = engine.config.vocab_size
    rows = []
    items = progress(lengths, "latency", len(lengths)) if progress else lengths
    for n in items:
        best_prefill, best_decode = float("inf"), float("inf")
        cpu_prefill, cpu_decode = float("inf"), float("inf")
        for r in range(repeats):
            ids = prompt_ids(n, vocab, special, seed + r)
            req = Request(ids, SamplingParams(max_tokens=decode, temperature=0, ignore_eos=True))
            stamps, cpu, finish = [], [], None
            c0, t0 = time.process_time(), time.perf_counter()
            for ev in engine.events(req):
                if isinstance(ev, TokenEvent):
                    stamps.append(time.perf_counter())
                    cpu.append(time.process_time())
                elif isinstance(ev, FinishEvent):
                    finish = ev
            if finish is None or finish.reason != "max_tokens" or len(stamps) < 2:
                raise CairnError(f"the {n}-token request ended with {finish.reason if finish else 'nothing'} after "
                                 f"{len(stamps)} tokens: raise kv_memory_mb or the context")
            best_prefill = min(best_prefill, stamps[0] - t0)
            best_decode = min(best_decode, (stamps[-1] - stamps[0]) / (len(stamps) - 1))
            cpu_prefill = min(cpu_prefill, cpu[0] - c0)
            cpu_decode = min(cpu_decode, (cpu[-1] - cpu[0]) / (len(cpu) - 1))
        rows.append({"length": n, "prefill_s": best_prefill, "decode_ms": best_decode * 1e3,
                     "prefill_tokens_per_s": n / best_prefill,
                     "prefill_cpu_s": cpu_prefill, "decode_cpu_ms": cpu_decode * 1e3})
    return rows


def _fit(xs: list[float], ys: list[float], degree: int) -> list[float]:
    """Least-squares polynomial coefficients (constant first), none negative (a cost never falls with length): the
    best fit over the subsets of terms whose unconstrained solution is non-negative."""
    import itertools

    import numpy as np

    a = np.vander(np.asarray(xs, dtype=float), degree + 1, increasing=True)
    y = np.asarray(ys, dtype=float)
    scale = a.max(axis=0)
    best, best_err = [0.0] * (degree + 1), float("inf")
    for k in range(1, degree + 2):
        for terms in itertools.combinations(range(degree + 1), k):
            cols = list(terms)
            coef, *_ = np.linalg.lstsq(a[:, cols] / scale[cols], y, rcond=None)
            if (coef < 0).any():
                continue
            err = float(((a[:, cols] / scale[cols] @ coef - y) ** 2).sum())
            if err < best_err:
                full = [0.0] * (degree + 1)
                for c, v in zip(cols, coef / scale[cols], strict=True):
                    full[c] = float(v)
                best, best_err = full, err
    return best


def _at(coef: list[float], x: float) -> float:
    return sum(c * x**i for i, c in enumerate(coef))


CLOCKS = {"wall": ("prefill_s", "decode_ms"), "cpu": ("prefill_cpu_s", "decode_cpu_ms")}


def claim(rows: list[dict], clock: str = "wall") -> dict:
    """Prefill and decode costs at 9k and 100k from fits of the measured rows, their ratios, and whether each end
    was measured (inside the lengths run) or extrapolated. ``clock``: fit the wall times (what a user waits) or the
    CPU times (the work, steadier on a shared machine)."""
    xs = [r["length"] for r in rows]
    if len(xs) < 3:
        raise CairnError("the 9k → 100k comparison fits a curve: measure at least three --lengths")
    lo, hi, top = CLAIM["from"], CLAIM["to"], max(xs)
    pre_key, dec_key = CLOCKS[clock]
    pre = _fit(xs, [r[pre_key] for r in rows], 2)
    dec = _fit(xs, [r[dec_key] for r in rows], 1)
    out = {"clock": clock, "from": lo, "to": hi, "claimed_ratio": CLAIM["claimed"],
           "quadratic_ratio": CLAIM["quadratic"], "measured_up_to": top, "extrapolated": hi > top or lo > top,
           "prefill_fit_s": pre, "decode_fit_ms": dec}
    for name, coef in (("prefill", pre), ("decode", dec)):
        a, b = _at(coef, lo), _at(coef, hi)
        out[f"{name}_at_from"], out[f"{name}_at_to"] = a, b
        out[f"{name}_ratio"] = b / a if a > 0 else None
    return out


def plot(series: dict[str, list[dict]], claims: dict[str, dict], title: str, plt,
         cpu_claims: dict[str, dict] | None = None):
    """Two panels: prefill time and decode latency against context length, measured points and fitted curves out to
    100k (dashed past the last measured length); with ``cpu_claims``, the CPU times too (hollow points, their fits
    dotted)."""
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for (label, rows), color in zip(series.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False):
        xs = [r["length"] for r in rows]
        clocks = [("wall", claims.get(label))]
        if cpu_claims is not None and all("prefill_cpu_s" in r for r in rows):
            clocks.append(("cpu", cpu_claims.get(label)))
        for clock, c in clocks:
            cpu = clock == "cpu"
            for ax, key, fit in zip((ax1, ax2), CLOCKS[clock], ("prefill_fit_s", "decode_fit_ms"), strict=True):
                ax.plot(xs, [r[key] for r in rows], "o", color=color, mfc="none" if cpu else color,
                        label=f"{label} ({'CPU time' if cpu else 'wall time'})")
                if c is not None:
                    grid = np.linspace(min(xs), CLAIM["to"], 200)
                    ys = [_at(c[fit], x) for x in grid]
                    inside = grid <= max(xs)
                    ax.plot(grid[inside], np.array(ys)[inside], ":" if cpu else "-", color=color, lw=1)
                    if (~inside).any():
                        ax.plot(grid[~inside], np.array(ys)[~inside], ":" if cpu else "--", color=color, lw=1,
                                label=None if cpu else f"{label} (fits, extrapolated)")
    for ax in (ax1, ax2):
        ax.axvline(CLAIM["from"], color="grey", lw=0.8, ls=":")
        ax.axvline(CLAIM["to"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel("context length (tokens)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax1.set_ylabel("prefill (time to first token), s")
    ax2.set_ylabel("decode latency per token, ms")
    fig.suptitle(title, fontsize=10)
    return fig


def format_table(series: dict[str, list[dict]], claims: dict[str, dict],
                 cpu_claims: dict[str, dict] | None = None) -> str:
    lines = [f"{'engine':<28}{'context':>9}{'prefill s':>11}{'prefill tok/s':>15}{'decode ms/tok':>15}"
             f"{'CPU: prefill s':>16}{'decode ms/tok':>15}"]
    for label, rows in series.items():
        for r in rows:
            cpu = (f"{r['prefill_cpu_s']:>16.3f}{r['decode_cpu_ms']:>15.2f}" if "prefill_cpu_s" in r else "")
            lines.append(f"{label:<28}{r['length']:>9,}{r['prefill_s']:>11.3f}{r['prefill_tokens_per_s']:>15,.0f}"
                         f"{r['decode_ms']:>15.2f}{cpu}")
    for clock, cs in (("wall", claims), ("CPU", cpu_claims or {})):
        for label, c in cs.items():
            how = f"extrapolated from <= {c['measured_up_to']:,} tokens" if c["extrapolated"] else "measured"
            lines.append(f"{label} ({clock} time): 9k -> 100k prefill x{_ratio(c['prefill_ratio'])}, decode per "
                         f"token x{_ratio(c['decode_ratio'])} ({how}); seed 003 claims x{c['claimed_ratio']:.0f} "
                         f"instead of x{c['quadratic_ratio']:.0f}")
    return "\n".join(lines)


def _ratio(r: float | None) -> str:
    return "?" if r is None else f"{r:.1f}"
