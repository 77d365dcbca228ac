"""Conversations for supervised fine-tuning: read and check JSONL, tokenise with the model's chat template, mark
the assistant's tokens, and pack conversations into training rows.

The format is TRL's: one JSON object per line, ``{"messages": [{"role": "system"|"user"|"assistant", "content":
"..."}, ...]}``, an optional system message first, then the user's turn. Each conversation is tokenised once, as
the model's own chat template renders it; its loss mask is True on exactly the tokens of the assistant's turns: the
content and the end-of-turn token that ends it (ChatML's ``<|im_end|>``), not the ``<|im_start|>assistant\\n``
header, nor system or user tokens, nor what the template writes after the end-of-turn token.

Packing puts several conversations in one row of ``seq_len`` tokens with a segment id per token, so that the model
attends within a conversation only and its positions restart at each (``Transformer.forward(segments=...)``); the
targets are IGNORE outside assistant tokens, on padding and at each conversation's last token, so no loss crosses
a boundary. ``SFTBatches`` hands the loop its rows in a per-epoch shuffled order with a checkpointable position;
``SFTValBatches`` the held-out conversations.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cairn.data.jsonl import read_jsonl
from cairn.errors import CairnError
from cairn.train.objectives import IGNORE, Batch

ROLES = ("system", "user", "assistant")
_FORMAT = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


@dataclass
class Conversation:
    messages: list[dict[str, str]]  # {"role", "content"} each
    where: str  # "FILE:LINE", for messages about it


@dataclass
class Example:
    ids: np.ndarray  # [n] int64 token ids of the rendered conversation
    mask: np.ndarray  # [n] bool: True on the assistant's tokens (the ones the loss trains)
    where: str

    def n_targets(self) -> int:
        """Tokens the loss predicts: masked tokens after the first (the first has nothing before it)."""
        return int(self.mask[1:].sum())


# ------------------------------------------------------------------------------------------------ reading
def check_messages(messages: object, where: str) -> list[dict[str, str]]:
    """The conversation's messages as ``{"role", "content"}`` dicts, or a CairnError naming ``where`` and the
    problem."""
    if not isinstance(messages, list) or not messages:
        raise CairnError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise CairnError(f'{where}: message {i} must be an object with "role" and "content"')
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise CairnError(f"{where}: message {i} has role {role!r}: use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise CairnError(f"{where}: message {i} ({role}) has content of type {type(content).__name__}: "
                             "write it as a string")
        if not content.strip():
            raise CairnError(f"{where}: message {i} ({role}) has empty content: write its text or remove it")
        if role == "system" and i > 0:
            raise CairnError(f"{where}: message {i} is a system message: only the first message may be one")
        out.append({"role": role, "content": content})
    first = 1 if out[0]["role"] == "system" else 0
    if first >= len(out) or out[first]["role"] != "user":
        raise CairnError(f"{where}: the conversation must start with a user message (after an optional system "
                         "message)")
    if not any(m["role"] == "assistant" for m in out):
        raise CairnError(f"{where}: no assistant message: SFT trains on the assistant's turns, so each "
                         "conversation needs at least one")
    return out


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation of a JSONL file (blank lines skipped), each line checked."""
    path = Path(path)
    out = []
    for obj, where in read_jsonl(path, f"each line is one object {_FORMAT}"):
        if not isinstance(obj, dict) or "messages" not in obj:
            raise CairnError(f'{where}: no "messages" field: each line is one object {_FORMAT}')
        out.append(Conversation(check_messages(obj["messages"], where), where))
    if not out:
        raise CairnError(f"{path}: no conversations in the file: write one {_FORMAT} per line")
    return out


# ------------------------------------------------------------------------------------------ tokenising
def tokenize_conversation(tok, messages: list[dict[str, str]], where: str = "conversation") -> Example:
    """The conversation's token ids as the chat template renders it (tokenised once) and its assistant mask.

    Each assistant turn is located by rendering the messages before it with the generation prompt (where the
    assistant's tokens begin) and the messages up to it (where its turn ends): both must be token prefixes of
    the whole conversation. The turn's mask ends at its last end-of-turn token (an end-of-sequence or special
    token); what follows (ChatML's newline) belongs to no turn."""
    try:
        ids = tok.encode_chat(messages, add_generation_prompt=False)
        mask = np.zeros(len(ids), dtype=bool)
        ends = tok.eos_ids | tok.special_ids  # end-of-turn tokens: <|im_end|>, <|eot_id|>, <end_of_turn>, </s>
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = tok.encode_chat(messages[:i], add_generation_prompt=True)
            end = tok.encode_chat(messages[: i + 1], add_generation_prompt=False)
            if not (len(start) < len(end) <= len(ids) and ids[: len(end)] == end and end[: len(start)] == start):
                raise CairnError(
                    f"{where}: the chat template does not render message {i} (assistant) as a continuation of the "
                    "messages before it (the tokens up to it are not a prefix of the whole conversation's), so its "
                    "tokens cannot be located; this happens with templates that rewrite earlier turns or content "
                    "that starts with whitespace: strip the content, or use a model whose template appends turns"
                )
            span = end[len(start):]
            eot = [j for j, t in enumerate(span) if t in ends]
            stop = eot[-1] + 1 if eot else len(span)
            mask[len(start): len(start) + stop] = True
    except CairnError as e:
        if str(e).startswith(where):
            raise
        raise CairnError(f"{where}: {e}") from None
    return Example(np.asarray(ids, dtype=np.int64), mask, where)


def tokenize_conversations(tok, conversations: Sequence[Conversation], seq_len: int, overlong: str = "truncate",
                           progress: bool = False) -> tuple[list[Example], dict[str, int]]:
    """Tokenise every conversation; those longer than ``seq_len`` tokens are cut to their first ``seq_len``
    (``overlong="truncate"``, dropped when no assistant token is left) or dropped (``"drop"``). Returns the
    examples and a report: conversations, tokens, assistant (target) tokens, truncated, dropped."""
    if overlong not in ("truncate", "drop"):
        raise CairnError(f"--overlong {overlong!r}: use truncate or drop")
    if not tok.chat_template:
        raise CairnError("the model's tokenizer has no chat template: fine-tune a chat model, or one whose "
                         "tokenizer_config.json has a chat_template")
    from tqdm import tqdm

    examples: list[Example] = []
    truncated = dropped = 0
    for c in tqdm(conversations, desc="tokenising", unit="conv", disable=not progress, leave=False):
        ex = tokenize_conversation(tok, c.messages, c.where)
        if len(ex.ids) > seq_len:
            if overlong == "drop":
                dropped += 1
                continue
            ex = Example(ex.ids[:seq_len], ex.mask[:seq_len], ex.where)
            if ex.n_targets() == 0:
                dropped += 1
                continue
            truncated += 1
        examples.append(ex)
    report = {"conversations": len(conversations), "kept": len(examples), "truncated": truncated,
              "dropped": dropped, "tokens": sum(len(e.ids) for e in examples),
              "assistant_tokens": sum(e.n_targets() for e in examples)}
    return examples, report


def split_conversations(conversations: list[Conversation], fraction: float, seed: int
                        ) -> tuple[list[Conversation], list[Conversation]]:
    """A seeded random ``fraction`` of the conversations (at least one) held out: ``(train, val)``."""
    if not 0 < fraction < 1:
        raise CairnError(f"--val-fraction {fraction}: give a fraction between 0 and 1")
    n_val = max(1, round(fraction * len(conversations)))
    if n_val >= len(conversations):
        raise CairnError(f"--val-fraction {fraction} of {len(conversations)} conversations leaves none to train "
                         "on: lower it or give more conversations")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


# --------------------------------------------------------------------------------------------- packing
def pack(lengths: Sequence[int], order: Sequence[int], seq_len: int) -> list[list[int]]:
    """Rows of conversation indices, best fit in ``order``: each conversation goes into the open row with the
    least room that still holds it, or starts a new row."""
    order = list(order)
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room, row), sorted
    smallest = min((lengths[i] for i in order), default=1)
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise CairnError(f"a conversation of {n} tokens does not fit a row of --seq-len {seq_len}")
        k = bisect.bisect_left(open_rows, (n, -1))
        if k == len(open_rows):
            rows.append([i])
            r, room = len(rows) - 1, seq_len - n
        else:
            room, r = open_rows.pop(k)
            rows[r].append(i)
            room -= n
        if room >= smallest:
            bisect.insort(open_rows, (room, r))
    return rows


def collate(examples: Sequence[Example], rows: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> Batch:
    """A batch of packed rows: inputs, targets (IGNORE outside assistant tokens, on padding and at each
    conversation's last token) and segment ids (padding is a segment of its own)."""
    b = len(rows)
    inputs = np.full((b, seq_len), pad_id, dtype=np.int64)
    targets = np.full((b, seq_len), IGNORE, dtype=np.int64)
    segments = np.zeros((b, seq_len), dtype=np.int64)
    for r, members in enumerate(rows):
        o = 0
        for s, i in enumerate(members):
            ex = examples[i]
            n = len(ex.ids)
            inputs[r, o:o + n] = ex.ids
            targets[r, o:o + n - 1] = np.where(ex.mask[1:], ex.ids[1:], IGNORE)
            segments[r, o:o + n] = s
            o += n
        segments[r, o:] = len(members)
    return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), segments=torch.from_numpy(segments))


def _fingerprint(examples: Sequence[Example], seq_len: int) -> str:
    h = hashlib.sha256(str(seq_len).encode())
    for e in examples:
        h.update(e.ids.tobytes())
        h.update(e.mask.tobytes())
    return h.hexdigest()[:16]


def _check(examples: Sequence[Example], seq_len: int, batch_size: int, dp_size: int, name: str) -> None:
    if batch_size % dp_size:
        raise CairnError(f"--batch-size {batch_size} is not a multiple of the {dp_size} data-parallel ranks: each "
                         "micro-batch is split evenly across them")
    if not examples:
        raise CairnError(f"the {name} has no conversations left to train on: check the file and --seq-len")
    long = next((e for e in examples if len(e.ids) > seq_len), None)
    if long is not None:
        raise CairnError(f"{long.where}: {len(long.ids)} tokens, longer than --seq-len {seq_len}")


class SFTBatches:
    """Training rows of packed conversations for the loop (its ``DataSource``): each epoch shuffles the
    conversations from ``(seed, epoch)`` and packs them; each optimizer step takes ``batch_size × grad_accum``
    rows; each micro-batch's rows are split across data-parallel ranks (rank r takes rows r, r + dp, ...), so the
    global batch is the same at any world size. ``state_dict`` holds the position for a bit-exact resume."""

    def __init__(self, examples: Sequence[Example], seq_len: int, batch_size: int, grad_accum: int = 1,
                 seed: int = 0, dp_rank: int = 0, dp_size: int = 1, pad_id: int = 0):
        _check(examples, seq_len, batch_size, dp_size, "training data")
        self.examples, self.seq_len, self.pad_id = list(examples), seq_len, pad_id
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.lengths = [len(e.ids) for e in self.examples]
        self.fingerprint = _fingerprint(self.examples, seq_len)
        self.epoch, self.pos = 0, 0
        self._rows: tuple[int, list[list[int]]] | None = None

    def rows_of(self, epoch: int) -> list[list[int]]:
        """The packed rows (conversation indices) of an epoch, in the order they are trained."""
        if self._rows is None or self._rows[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.examples), generator=g).tolist()
            self._rows = (epoch, pack(self.lengths, order, self.seq_len))
        return self._rows[1]

    # --------------------------------------------------------------- position
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint or state.get("seed") != self.seed:
            raise CairnError("the checkpoint was trained on other conversations or another --seed / --seq-len / "
                             "--overlong / model tokenizer: resume with the run's original data and flags")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.pos / len(self.rows_of(self.epoch))

    # ---------------------------------------------------------------- batches
    def _take(self, n: int) -> list[list[int]]:
        taken: list[list[int]] = []
        while len(taken) < n:
            rows = self.rows_of(self.epoch)
            k = min(n - len(taken), len(rows) - self.pos)
            taken.extend(rows[self.pos:self.pos + k])
            self.pos += k
            if self.pos == len(rows):
                self.epoch, self.pos = self.epoch + 1, 0
        return taken

    def next_window(self) -> list[Batch]:
        """This rank's micro-batches of the next optimizer step (``grad_accum`` of ``batch_size / dp`` rows)."""
        rows = self._take(self.batch_size * self.grad_accum)
        out = []
        for m in range(self.grad_accum):
            micro = rows[m * self.batch_size:(m + 1) * self.batch_size]
            out.append(collate(self.examples, micro[self.dp_rank::self.dp_size], self.seq_len, self.pad_id))
        return out


class SFTValBatches:
    """Held-out conversations packed in file order (the loop's ``ValSource``); every rank gets the same number of
    batches (padded with empty rows), so sharded models run their collectives in step."""

    def __init__(self, examples: Sequence[Example], seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, pad_id: int = 0):
        _check(examples, seq_len, batch_size, dp_size, "validation data")
        self.examples, self.seq_len, self.pad_id = list(examples), seq_len, pad_id
        self.per_rank = max(1, batch_size // dp_size)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.rows = pack([len(e.ids) for e in self.examples], range(len(self.examples)), seq_len)
        self.row_targets = [sum(self.examples[i].n_targets() for i in r) for r in self.rows]

    def batches(self, max_tokens: int | None) -> Iterator[Batch]:
        """The first rows holding at least ``max_tokens`` target tokens (None: all rows), this rank's share."""
        n = len(self.rows)
        if max_tokens:
            n = min(n, int(np.searchsorted(np.cumsum(self.row_targets), max_tokens)) + 1)
        mine: list[list[int]] = self.rows[:n][self.dp_rank::self.dp_size]
        mine += [[] for _ in range(math.ceil(n / self.dp_size) - len(mine))]
        for s in range(0, len(mine), self.per_rank):
            yield collate(self.examples, mine[s:s + self.per_rank], self.seq_len, self.pad_id)
