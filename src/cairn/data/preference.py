"""Preference pairs for reward models and DPO: reading, tokenising and batching.

The file format is TRL's (explicit prompt): JSON Lines, one pair per line,

    {"prompt": "...", "chosen": "...", "rejected": "...", "p_chosen": 0.8}

``prompt`` is a string (one user turn) or a list of messages ``[{"role", "content"}, ...]`` ending with a user turn;
``chosen`` / ``rejected`` are strings or a one-message list ``[{"role": "assistant", "content": "..."}]``;
``p_chosen`` (optional, default 1) is a soft label: the probability that ``chosen`` is the better reply. Other keys
are ignored (e.g. ones recording where a label came from).

Each sequence is the prompt rendered with the model's chat template (with the assistant header) followed by the
reply's tokens through the end-of-turn token: exactly what the model would see and then produce in a chat. The
reply's tokens are the only targets. A micro-batch holds pairs: rows ``2i`` (chosen) and ``2i + 1`` (rejected),
right-padded to the longest row.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from cairn.data.jsonl import read_jsonl
from cairn.data.loader import PackedBatches
from cairn.errors import CairnError
from cairn.train.objectives import IGNORE, Batch

ROLES = ("system", "user", "assistant")
FORMAT_HINT = ('each line is a JSON object {"prompt": ..., "chosen": ..., "rejected": ...} with an optional '
               '"p_chosen" in [0, 1]')


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict[str, str]]  # the conversation so far, ending with a user turn
    chosen: str
    rejected: str
    p_chosen: float = 1.0  # probability that ``chosen`` is the better reply (1: a hard label)
    where: str = ""  # FILE:LINE, for error messages


def as_messages(prompt: str | list[dict[str, Any]], where: str = "prompt") -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user turn; a list is checked (roles, string contents, ending
    with a user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise CairnError(f'{where}: "prompt" must be a string or a non-empty list of messages '
                         '[{"role": "user", "content": "..."}, ...]')
    msgs = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise CairnError(f'{where}: prompt message {i} must be {{"role": one of {", ".join(ROLES)}, '
                             f'"content": a string}}, not {json.dumps(m)[:80]}')
        msgs.append({"role": m["role"], "content": m["content"]})
    if msgs[-1]["role"] != "user":
        raise CairnError(f'{where}: the prompt ends with a {msgs[-1]["role"]!r} message: it must end with the '
                         'user turn the replies answer (put earlier assistant turns before it)')
    return msgs


def _reply(value: Any, key: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise CairnError(f'{where}: "{key}" must be a string or [{{"role": "assistant", "content": "..."}}] (one '
                     f'assistant message), not {json.dumps(value)[:80]}')


def parse_pair(obj: Any, where: str) -> PreferencePair:
    """One record of a preference file, validated (``where`` names it in errors)."""
    if not isinstance(obj, dict):
        raise CairnError(f"{where}: not a JSON object: {FORMAT_HINT}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        extra = ""
        if "prompt" in missing and "chosen" in obj:
            extra = " (the implicit-prompt form, where chosen/rejected hold whole conversations, is not read: " \
                    "move the shared turns into \"prompt\")"
        raise CairnError(f"{where}: missing {', '.join(repr(k) for k in missing)}{extra}: {FORMAT_HINT}")
    p = obj.get("p_chosen", 1.0)
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= float(p) <= 1.0:
        raise CairnError(f'{where}: "p_chosen" must be a number from 0 to 1 (the probability that "chosen" is '
                         f"the better reply), not {json.dumps(p)}")
    prompt = as_messages(obj["prompt"], where)
    chosen, rejected = _reply(obj["chosen"], "chosen", where), _reply(obj["rejected"], "rejected", where)
    from cairn.data.chat import check_messages  # the rules SFT conversations follow (system first, no empty text)

    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        try:
            check_messages([*prompt, {"role": "assistant", "content": reply}], where)
        except CairnError as e:
            msg = str(e).replace(f"message {len(prompt)} (assistant)", f'the "{key}" reply')
            raise CairnError(re.sub(r"\bmessage (\d+)", r"prompt message \1", msg)) from None
    return PreferencePair(prompt, chosen, rejected, float(p), where)


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Every pair of a JSONL preference file (blank lines skipped), with errors naming the file and line."""
    path = Path(path)
    pairs = [parse_pair(obj, where) for obj, where in read_jsonl(path, f"{FORMAT_HINT}, one per line",
                                                                   "no such preference file")]
    if not pairs:
        raise CairnError(f"{path}: no preference pairs in the file: {FORMAT_HINT}")
    return pairs


def split_pairs(pairs: list[PreferencePair], val_fraction: float, seed: int = 0
                ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """A seeded random ``val_fraction`` of the pairs held out (at least one when the fraction is above 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise CairnError(f"--val-fraction {val_fraction}: use a number from 0 (no validation) to below 1")
    if val_fraction == 0:
        return list(pairs), []
    n_val = max(1, round(val_fraction * len(pairs)))
    if n_val >= len(pairs):
        raise CairnError(f"{len(pairs)} pair(s) are too few to hold out {val_fraction:.0%} for validation: give "
                         "more pairs, a --val-data file, or --val-fraction 0")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [p for i, p in enumerate(pairs) if i not in val], [p for i, p in enumerate(pairs) if i in val]


# ------------------------------------------------------------------------------------------- tokenising
@dataclass(frozen=True)
class EncodedPair:
    prompt: tuple[int, ...]  # the rendered prompt, through the assistant header
    chosen: tuple[int, ...]  # the chosen reply's tokens, through the end-of-turn token
    rejected: tuple[int, ...]
    p_chosen: float = 1.0

    def __len__(self) -> int:  # tokens of the longer sequence
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def _check_template(tokenizer) -> None:
    if tokenizer is None or not tokenizer.chat_template:
        raise CairnError("the model has no chat template, which preference data is rendered with: use a chat "
                         "model, or add a chat_template to its tokenizer_config.json")


def encode_prompt_reply(tokenizer, messages: list[dict[str, str]], reply: str, where: str = "pair"
                        ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(prompt tokens, reply tokens)``: the conversation ``messages`` + the assistant's ``reply`` tokenised as
    SFT tokenises conversations (``cairn.data.chat.tokenize_conversation``); the prompt runs through the assistant
    header, the reply through its end-of-turn token (what the template writes after that is left out)."""
    from cairn.data.chat import tokenize_conversation

    _check_template(tokenizer)
    ex = tokenize_conversation(tokenizer, [*messages, {"role": "assistant", "content": reply}], where)
    end = len(ex.mask)
    while end > 0 and not ex.mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and ex.mask[start - 1]:
        start -= 1
    if end == 0 or start == 0:
        raise CairnError(f"{where}: the chat template renders no prompt or no reply tokens: use a chat model whose "
                         "template writes both turns")
    ids = ex.ids.tolist()
    return tuple(ids[:start]), tuple(ids[start:end])


def encode_pair(tokenizer, pair: PreferencePair) -> EncodedPair:
    where = pair.where or "pair"
    prompt, chosen = encode_prompt_reply(tokenizer, pair.prompt, pair.chosen, where)
    prompt_r, rejected = encode_prompt_reply(tokenizer, pair.prompt, pair.rejected, where)
    if prompt_r != prompt:
        raise CairnError(f"{where}: the chat template renders the prompt differently before the two replies: use "
                         "a model whose template does not depend on the reply")
    return EncodedPair(prompt, chosen, rejected, pair.p_chosen)


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_len: int | None = None, progress: bool = False
                 ) -> tuple[list[EncodedPair], int]:
    """Tokenised pairs, and how many were left out because a sequence is longer than ``max_len`` tokens."""
    from tqdm import tqdm

    out, dropped = [], 0
    for pair in tqdm(pairs, desc="tokenising pairs", unit="pair", disable=not progress or len(pairs) < 1000):
        enc = encode_pair(tokenizer, pair)
        if max_len is not None and len(enc) > max_len:
            dropped += 1
            continue
        out.append(enc)
    return out, dropped


def fingerprint(pairs: list[EncodedPair]) -> str:
    """A hash of tokenised pairs: a checkpoint or stored reference log-probs belong to exactly this data."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected, p.p_chosen]).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- batching
@dataclass(kw_only=True)
class PairBatch(Batch):
    """Pairs of sequences: row ``2i`` is pair i's chosen sequence, row ``2i + 1`` its rejected one, right-padded;
    targets are IGNORE except the reply tokens. Pair extras ride along."""

    lengths: torch.Tensor  # [2P] tokens in each row (the rest is padding)
    p_chosen: torch.Tensor  # [P] soft labels (1: chosen is better)
    pair_ids: torch.Tensor  # [P] each pair's index in its data set
    ref_logps: torch.Tensor | None = None  # [P, 2] reference log-probs of the (chosen, rejected) replies

    @property
    def n_pairs(self) -> int:
        return int(self.p_chosen.numel())

    def to(self, device: torch.device) -> PairBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def collate(pairs: list[EncodedPair], ids: list[int], pad_id: int = 0, ref: torch.Tensor | None = None
            ) -> PairBatch:
    """The pairs ``ids`` of ``pairs`` as one ``PairBatch`` (``ref``: the data set's [N, 2] reference table)."""
    seqs, starts = [], []
    for i in ids:
        p = pairs[i]
        seqs += [p.prompt + p.chosen, p.prompt + p.rejected]
        starts += [len(p.prompt)] * 2
    width = max(len(s) for s in seqs)
    inputs = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for r, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        row = torch.tensor(s, dtype=torch.long)
        inputs[r, :len(s)] = row
        targets[r, start - 1:len(s) - 1] = row[start:]  # position t predicts token t + 1: the reply's tokens
    idx = torch.tensor(ids, dtype=torch.long)
    return PairBatch(inputs, targets, lengths=torch.tensor([len(s) for s in seqs], dtype=torch.long),
                     p_chosen=torch.tensor([pairs[i].p_chosen for i in ids], dtype=torch.float32), pair_ids=idx,
                     ref_logps=None if ref is None else ref[idx])


def _check_ref(table: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if tuple(table.shape) != (n, 2):
        raise CairnError(f"reference log-probs for {name} have shape {tuple(table.shape)}, not ({n}, 2): they "
                         "were computed for other data; start a new run")
    return table


class PairBatches(PackedBatches):
    """The training ``DataSource`` of preference objectives: pairs in an order shuffled per epoch from
    ``(seed, epoch)``, ``batch_size`` pairs per micro-batch (split across data-parallel ranks by pairs, so a
    pair's two rows stay together), ``grad_accum`` micro-batches per step, a position checkpoints hold.

    It walks pairs the way ``PackedBatches`` walks token windows (the same order, epochs and rank split: a
    "window" here is a pair), so only the construction, the rows and the saved position differ."""

    def __init__(self, pairs: list[EncodedPair], batch_size: int, grad_accum: int = 1, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, pad_id: int = 0, name: str = "the training data"):
        if batch_size % dp_size:
            raise CairnError(f"--batch-size {batch_size} (pairs) is not a multiple of the {dp_size} data-parallel "
                             "ranks: each micro-batch is split evenly across them")
        if not pairs:
            raise CairnError(f"{name} has no preference pairs")
        self.pairs, self.pad_id = pairs, pad_id
        self.seq_len = max(len(p) for p in pairs)
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.n_windows = len(pairs)
        self.epoch, self.pos = 0, 0
        self._order = None
        self.fingerprint = fingerprint(pairs)
        self.ref: torch.Tensor | None = None

    def set_reference(self, table: torch.Tensor) -> None:
        """Reference log-probs [N, 2] of every pair's (chosen, rejected) reply, carried in each batch from now."""
        self.ref = _check_ref(table, len(self.pairs), "the training pairs")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n_pairs": len(self.pairs),
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint or state.get("seed") != self.seed:
            raise CairnError(
                f"the checkpoint was trained on other preference data or another --seed ({state.get('n_pairs')} "
                f"pairs, seed {state.get('seed')}; now {len(self.pairs)}, seed {self.seed}): resume with the run's "
                "original --data, --seq-len and --seed"
            )
        self.epoch, self.pos = state["epoch"], state["pos"]

    def _rows(self, ids: list[int]) -> PairBatch:
        return collate(self.pairs, ids, self.pad_id, self.ref)

    def next_global_window(self) -> Batch:
        raise CairnError("preference objectives do not run under pipeline parallelism: leave out --parallel pp")

    def ordered(self, batch_size: int) -> Iterator[PairBatch]:
        """Every pair once, in file order (for computing reference log-probs)."""
        yield from _ordered(self.pairs, batch_size, self.pad_id)


def _ordered(pairs: list[EncodedPair], batch_size: int, pad_id: int) -> Iterator[PairBatch]:
    for s in range(0, len(pairs), batch_size):
        yield collate(pairs, list(range(s, min(s + batch_size, len(pairs)))), pad_id)


class PairEval:
    """The ``ValSource`` of preference objectives: held-out pairs in file order, this rank's share, up to about
    ``max_tokens`` reply tokens (counted over all ranks' pairs, so every rank stops at the same pair)."""

    def __init__(self, pairs: list[EncodedPair], batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 pad_id: int = 0):
        if not pairs:
            raise CairnError("the validation data has no preference pairs: give a --val-data file with pairs, "
                             "or --val-fraction 0 for none")
        self.pairs, self.batch_size, self.pad_id = pairs, max(1, batch_size // dp_size), pad_id
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.fingerprint = fingerprint(pairs)
        self.ref: torch.Tensor | None = None

    def set_reference(self, table: torch.Tensor) -> None:
        self.ref = _check_ref(table, len(self.pairs), "the validation pairs")

    def batches(self, max_tokens: int | None) -> Iterator[PairBatch]:
        n, tokens = 0, 0
        for p in self.pairs:
            if max_tokens and tokens >= max_tokens:
                break
            n += 1
            tokens += len(p.chosen) + len(p.rejected)
        mine = list(range(n))[self.dp_rank::self.dp_size]
        for s in range(0, len(mine), self.batch_size):
            yield collate(self.pairs, mine[s:s + self.batch_size], self.pad_id, self.ref)

    def ordered(self, batch_size: int) -> Iterator[PairBatch]:
        yield from _ordered(self.pairs, batch_size, self.pad_id)
