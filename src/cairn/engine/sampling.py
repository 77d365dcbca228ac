"""Picking the next token from logits: greedy, or temperature + top-k + top-p sampling with a seed."""

from __future__ import annotations

import torch

from cairn.engine.types import SamplingParams

# Below this temperature, logits / T overflows to inf and the distribution is NaN: such a request is greedy.
MIN_TEMPERATURE = 1e-5


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < MIN_TEMPERATURE


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if is_greedy(params):
        return None
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample_row(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None,
               raw: torch.Tensor | None = None) -> tuple[int, float]:
    """One token from ``logits`` [V]; returns ``(token, log-probability under the unmodified distribution)``.
    ``raw``: the row before a constraint masked it (the log-probability is taken from it)."""
    logits = logits.float()
    if is_greedy(params):
        tok = int(torch.argmax(logits))
    else:
        x = logits / params.temperature
        if params.top_k and params.top_k < x.shape[-1]:
            kth = torch.topk(x, params.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_x, idx = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(0, idx, sorted_x)
        probs = torch.softmax(x, dim=-1)
        tok = int(torch.multinomial(probs, 1, generator=gen))
    if params.logprobs:
        logprob = float(torch.log_softmax(logits if raw is None else raw.float(), dim=-1)[tok])
    else:
        logprob = 0.0
    return tok, logprob


def takes_argmax(params: SamplingParams) -> bool:
    """Whether a row's token is its logits' argmax and nothing else is read from them."""
    return is_greedy(params) and not params.logprobs


def sample(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None],
           allowed: dict[int, torch.Tensor] | None = None, argmax: list[int] | None = None):
    """One token per row of ``logits`` [B, V]; greedy rows are taken together in one argmax.

    ``allowed``: for rows under a constraint, bool [V] of the tokens its grammar allows; the others are masked to
    -inf before the choice (rows without a constraint are untouched). ``argmax``: every row's argmax, found already
    (the decode step finds them beside its head, see ``Runner.forward``); used for the greedy rows when no row is
    masked."""
    raw = logits
    if allowed:
        logits = logits.clone()
        for i, ok in allowed.items():
            logits[i].masked_fill_(~ok, float("-inf"))
    greedy = [i for i, p in enumerate(params) if takes_argmax(p)]
    out: list[tuple[int, float]] = [(0, 0.0)] * len(params)
    if greedy:
        if argmax is not None and not allowed:
            toks = [argmax[i] for i in greedy]
        else:  # (all rows greedy, as a batch-1 chat usually is: no copy of the rows first)
            toks = torch.argmax(logits if len(greedy) == len(params) else logits[greedy], dim=-1).tolist()
        for i, t in zip(greedy, toks, strict=True):
            out[i] = (t, 0.0)
    for i, p in enumerate(params):
        if i not in greedy:
            out[i] = sample_row(logits[i], p, gens[i], raw[i] if allowed and i in allowed else None)
    return out
