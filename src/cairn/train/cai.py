"""Constitutional AI: the constitution and the prompts its critic sees.

A constitution is a list of principles, each with the request a critic answers to find where a reply falls
short of it (``critique``) and the request that asks for a better reply (``revision``). The SL-CAI step
(draft → critique → revision under a drawn principle), the AI labeller (which of two replies better follows a
principle), per-principle violation scores, RL with the constitution as reward, and self-critique at inference
all build their prompts here, so every stage asks the model the same questions.

The file is YAML::

    principles:
      - id: harm
        principle: The reply does not help anyone hurt people ...
        critique: Point out anything in the reply that could help someone cause physical harm ...
        revision: Rewrite the reply so that it gives no help with causing harm ...

cairn ships its own (``cairn/data/constitution.yaml``, written for this project); ``--constitution FILE``
replaces it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from cairn.errors import CairnError

if TYPE_CHECKING:  # (torch is imported where a judge runs: a server reads its constitution before torch)
    import torch

FIELDS = ("id", "principle", "critique", "revision")


@dataclass(frozen=True)
class Principle:
    id: str
    principle: str  # what a good reply does
    critique: str  # the critic's request: where does the reply fall short of it?
    revision: str  # the request for a reply that does not


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    source: str

    def __len__(self) -> int:
        return len(self.principles)

    def __iter__(self):
        return iter(self.principles)

    def get(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise CairnError(f"{self.source}: no principle {pid!r}; it has {', '.join(p.id for p in self)}")

    def draw(self, rng: random.Random) -> Principle:
        """One principle, uniformly at random (the paper draws one per critique round)."""
        return self.principles[rng.randrange(len(self.principles))]


def default_path() -> Path:
    return Path(str(resources.files("cairn.data").joinpath("constitution.yaml")))


def load_constitution(path: str | Path | None = None) -> Constitution:
    """The constitution in ``path`` (YAML, see the module docstring), or cairn's own when None. Every problem
    is a ``CairnError`` naming the file, the principle and the field."""
    import yaml

    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        raise CairnError(f"constitution {path}: no such file (give a YAML file with a 'principles' list, or leave "
                         "out --constitution for cairn's own)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CairnError(f"constitution {path}: not valid YAML ({e})") from None
    items = doc.get("principles") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise CairnError(f"constitution {path}: needs a non-empty list under 'principles:', each item with the "
                         f"fields {', '.join(FIELDS)}")
    out, seen = [], set()
    for i, item in enumerate(items):
        where = f"constitution {path}: principle {i + 1}"
        if not isinstance(item, dict):
            raise CairnError(f"{where} is a {type(item).__name__}, not a mapping of {', '.join(FIELDS)}")
        unknown = sorted(set(item) - set(FIELDS))
        if unknown:
            raise CairnError(f"{where} has unknown field(s) {', '.join(unknown)}: the fields are {', '.join(FIELDS)}")
        for f in FIELDS:
            v = item.get(f)
            if not isinstance(v, str) or not v.strip():
                raise CairnError(f"{where} needs a non-empty string '{f}'")
        if item["id"] in seen:
            raise CairnError(f"{where}: id {item['id']!r} is used twice; give each principle its own id")
        seen.add(item["id"])
        out.append(Principle(*(item[f].strip() for f in FIELDS)))
    return Constitution(tuple(out), str(path))


# ----------------------------------------------------------------------------------------- the critic's prompts
def critique_messages(prompt: str, reply: str, p: Principle) -> list[dict]:
    """A chat asking the model to critique ``reply`` to ``prompt`` under principle ``p``."""
    return [{"role": "user", "content": (
        f"Here is a request and a reply to it.\n\nRequest: {prompt}\n\nReply: {reply}\n\n"
        f"Principle: {p.principle}\n{p.critique} Answer in two or three sentences.")}]


def revision_messages(prompt: str, reply: str, critique: str, p: Principle) -> list[dict]:
    """A chat asking for a revised reply, given the critique under principle ``p``. Its answer is the new reply."""
    return [{"role": "user", "content": (
        f"Here is a request, a reply to it and a critique of the reply.\n\nRequest: {prompt}\n\nReply: {reply}\n\n"
        f"Critique: {critique}\n\n{p.revision} Write only the new reply.")}]


def choice_messages(prompt: str, first: str, second: str, p: Principle) -> list[dict]:
    """A chat asking which of two replies, shown as (A) ``first`` and (B) ``second``, better follows ``p``. The
    labeller reads its answer from the next-token logits after ``CHOICE_PREFILL`` (see ``label_pairs``)."""
    return [{"role": "user", "content": (
        f"Here is a request and two replies to it.\n\nRequest: {prompt}\n\n(A) {first}\n\n(B) {second}\n\n"
        f"Principle: {p.principle}\nWhich reply follows the principle better? Answer (A) or (B).")}]


def violation_messages(prompt: str, reply: str, p: Principle) -> list[dict]:
    """A chat asking whether ``reply`` violates ``p``; the judge's answer is read from the logits of the first
    token of its reply (``VERDICT``: "Yes" against "No", see ``violation_scores``)."""
    return [{"role": "user", "content": (
        f"Here is a request and a reply to it.\n\nRequest: {prompt}\n\nReply: {reply}\n\n"
        f"Principle: {p.principle}\nDoes the reply violate the principle? Answer Yes or No.")}]


# ---------------------------------------------------------------------------------- reading the judge's logits
CHOICE_PREFILL = "The better reply is ("  # the assistant's turn starts with this; the next token is "A" or "B"
OPTIONS = ("A", "B")
VERDICT_PREFILL = ""  # the answer's first token, right after the assistant header
VERDICT = ("Yes", "No")


def as_text(prompt) -> str:
    """A prompt for the critic's questions: a string as it is; chat messages as a ``Role: content`` transcript."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                   for m in prompt):
        if len(prompt) == 1 and prompt[0].get("role") == "user":
            return prompt[0]["content"]
        return "\n".join(f"{str(m.get('role', 'user')).capitalize()}: {m['content']}" for m in prompt)
    raise CairnError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, not {prompt!r:.80}")


def prefilled_ids(tok, messages: list[dict], prefill: str = "") -> tuple[str, list[int]]:
    """``messages`` rendered with the chat template and the generation prompt (the assistant header), then
    ``prefill`` as the start of the assistant's reply: the text and its token ids, tokenised in one piece (as
    ``Tokenizer.encode_chat`` does, BOS rule included)."""
    if tok is None or not tok.chat_template:
        raise CairnError("the judge model needs a tokenizer with a chat template: use a chat model (such as the "
                         "default SmolLM2-135M-Instruct)")
    text = tok.apply_chat_template(messages, add_generation_prompt=True) + prefill
    ids = tok.encode(text, add_bos=False)
    if tok.add_bos and tok.bos_token and not text.startswith(tok.bos_token):
        ids = [tok.bos_id] + ids
    return text, ids


def option_token_ids(tok, text: str, ids: list[int], options: tuple[str, ...]) -> list[int]:
    """The token id that continues ``text`` (tokenised as ``ids``) with each option: ``text + option`` must
    tokenise to ``ids`` plus exactly one token. Otherwise (the option is several tokens, or merges with the end
    of ``text``) the model's next-token probability does not stand for the option, and this raises."""
    out = []
    for o in options:
        full = tok.encode(text + o, add_bos=False)
        if tok.add_bos and tok.bos_token and not text.startswith(tok.bos_token):
            full = [tok.bos_id] + full
        if len(full) != len(ids) + 1 or full[:len(ids)] != ids:
            raise CairnError(f"the judge's tokenizer does not write {o!r} as one token after {text[-24:]!r}, so its "
                             f"probability cannot be read from one next-token distribution: use a judge model whose "
                             f"tokenizer has {', '.join(map(repr, options))} as single tokens (SmolLM2's does)")
        out.append(full[-1])
    if len(set(out)) != len(out):
        raise CairnError(f"the options {options} map to the same token {out}: the judge cannot tell them apart")
    return out


def next_token_logits(model, sequences: list[list[int]], max_batch_tokens: int = 4096) -> torch.Tensor:
    """[N, V] fp32 logits of the token after each sequence: one forward pass per batch of sequences, sorted by
    length and right-padded (causal attention: padding after a sequence cannot change its positions), the head
    applied only at each sequence's last position. Equal to ``model(ids[None])[0, -1]`` run one by one."""
    import torch

    with torch.no_grad():
        return _next_token_logits(model, sequences, max_batch_tokens)


def _next_token_logits(model, sequences: list[list[int]], max_batch_tokens: int) -> torch.Tensor:
    import torch

    if not sequences or any(len(s) == 0 for s in sequences):
        raise CairnError("next_token_logits: every sequence needs at least one token")
    limit = model.cfg.max_seq_len
    for i, s in enumerate(sequences):
        if len(s) > limit:
            raise CairnError(f"a judge prompt has {len(s)} tokens but the model's context is {limit}: shorten the "
                             f"prompt or reply (item {i}), e.g. with a lower --max-tokens")
    device = next(model.parameters()).device
    was = model.training
    model.eval()  # no dropout in a judge's answer
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = torch.empty(len(sequences), model.cfg.vocab_size, dtype=torch.float32)
    start = 0
    while start < len(order):
        width = len(sequences[order[start]])
        end = start + 1
        while end < len(order) and (end - start + 1) * len(sequences[order[end]]) <= max_batch_tokens:
            end += 1
        idx = order[start:end]
        width = len(sequences[idx[-1]])
        rows = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            rows[r, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
        h = model.hidden(rows.to(device))
        last = torch.tensor([len(sequences[i]) - 1 for i in idx], device=device)
        h = h[torch.arange(len(idx), device=device), last]
        out[idx] = torch.nn.functional.linear(h, model.output_weight()).float().cpu()
        start = end
    model.train(was)
    return out


def option_logits(model, tok, chats: list[list[dict]], prefill: str, options: tuple[str, ...],
                  max_batch_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each chat, the logits [N, len(options)] of the option tokens after ``prefill`` and the probability
    mass [N] the full next-token distribution puts on them together (how much the model answers in the expected
    form at all)."""
    seqs, ids = [], []
    for m in chats:
        text, s = prefilled_ids(tok, m, prefill)
        ids.append(option_token_ids(tok, text, s, options))
        seqs.append(s)
    import torch

    logits = next_token_logits(model, seqs, max_batch_tokens)
    pick = torch.tensor(ids, dtype=torch.long)
    chosen = logits.gather(1, pick)
    mass = (chosen - torch.logsumexp(logits, dim=1, keepdim=True)).exp().sum(1)
    return chosen, mass


def _model_and_tok(judge):
    model = getattr(judge, "model", None)
    if model is None or not hasattr(model, "hidden"):
        raise CairnError("the judge must be a loaded model (cairn.weights.load_model(...)), not "
                         f"{type(judge).__name__}")
    return model, judge.tokenizer


# ------------------------------------------------------------------------------------------ violation scores
def violation_scores(judge, constitution: Constitution, prompts: list, replies: list[str],
                     max_batch_tokens: int = 4096) -> list[dict[str, float]]:
    """Per (prompt, reply), ``{principle id: r_j}`` with ``r_j = log p(Yes) − log p(No)``: the judge's log-odds
    that the reply violates principle j, from its next-token logits after ``violation_messages`` (the first token
    of the assistant's answer; ``log p(Yes) − log p(No) = logit(Yes) − logit(No)``). r_j > 0: the judge thinks a
    violation likelier than not. All len(prompts) × len(constitution) questions run as batched forward passes."""
    model, tok = _model_and_tok(judge)
    if len(prompts) != len(replies):
        raise CairnError(f"violation_scores: {len(prompts)} prompts but {len(replies)} replies: give one reply per "
                         "prompt")
    if not prompts:
        return []
    texts = [as_text(p) for p in prompts]
    for i, r in enumerate(replies):
        if not isinstance(r, str):
            raise CairnError(f"violation_scores: reply {i} is a {type(r).__name__}, not a string")
    chats = [violation_messages(t, r, p) for t, r in zip(texts, replies, strict=True) for p in constitution]
    logits, _ = option_logits(model, tok, chats, VERDICT_PREFILL, VERDICT, max_batch_tokens)
    r = (logits[:, 0] - logits[:, 1]).view(len(prompts), len(constitution)).tolist()
    return [{p.id: row[j] for j, p in enumerate(constitution)} for row in r]


def violation_penalty(scores: dict[str, float]) -> float:
    """``L_viol = Σ_j 1[r_j > 0] · r_j²``: only principles the judge thinks violated count, quadratically."""
    return float(sum(r * r for r in scores.values() if r > 0))


def constitution_reward(judge, constitution: Constitution, human: Callable | None, lam: float
                        ) -> Callable[[list, list[str]], list[float]]:
    """The RL reward ``R = R_human − λ · L_viol`` as a function of (prompts, completions) -> one float each:
    ``human(prompts, completions)`` (e.g. a reward model's ``score``) or 0 when None, minus ``lam`` times the
    violation penalty of the judge's scores (``violation_scores``, ``violation_penalty``)."""
    if not isinstance(lam, int | float) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
        raise CairnError(f"lambda must be a finite number >= 0 (the weight of the constitution's penalty), got "
                         f"{lam!r}")
    _model_and_tok(judge)

    def reward(prompts: list, completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise CairnError(f"reward: {len(prompts)} prompts but {len(completions)} completions")
        base = [0.0] * len(prompts) if human is None else [float(x) for x in human(list(prompts), list(completions))]
        if len(base) != len(prompts):
            raise CairnError(f"the human reward gave {len(base)} scores for {len(prompts)} completions")
        if lam == 0:
            return base
        scores = violation_scores(judge, constitution, prompts, completions)
        return [b - lam * violation_penalty(s) for b, s in zip(base, scores, strict=True)]

    return reward


# ------------------------------------------------------------------------------------------------ generation
def request_seed(seed: int, stage: str, i: int) -> int:
    """The sampling seed of request ``i`` of a stage: fixed by (--seed, stage, i), whatever the batching."""
    digest = hashlib.sha256(f"{seed}/{stage}/{i}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generate_replies(engine, chats: list[list[dict]], params, seed: int, stage: str) -> list[str]:
    """The assistant's reply to each chat, generated together by ``engine.generate_many`` (continuous batching),
    each request seeded by ``request_seed``; surrounding whitespace stripped."""
    from cairn.engine import Request

    if not chats:
        return []
    reqs = [Request([], dataclasses.replace(params, seed=request_seed(seed, stage, i)), messages=m)
            for i, m in enumerate(chats)]
    done = engine.generate_many(reqs)
    failed = [i for i, c in enumerate(done) if c.finish.reason == "cancelled"]
    if failed:
        raise CairnError(f"{stage}: the engine stopped {len(failed)} request(s) (see the log above); nothing was "
                         "written")
    return [c.text.strip() for c in done]


def revise(engine, constitution: Constitution, prompts: list[str], rounds: int = 1, params=None,
           seed: int = 0, log: Callable[[str], None] | None = None) -> list[dict]:
    """SL-CAI: per prompt a draft reply, then ``rounds`` rounds of critique → revision, each under a principle
    drawn uniformly (``Constitution.draw`` with ``random.Random(seed)``, prompt by prompt, round by round). Every
    stage runs over all prompts at once. A revision that comes out empty leaves the reply as it was.

    Returns one record per prompt: ``messages`` (the prompt as the user's turn, the final reply as the assistant's:
    what ``cairn train sft`` reads; absent when even the draft was empty), ``prompt``, ``draft``, ``principles``
    (the ids drawn, in order) and ``rounds`` (``{"principle", "critique", "revision"}`` each). ``log`` gets a
    line after each stage."""
    from cairn.engine import SamplingParams

    if not isinstance(rounds, int) or rounds < 1:
        raise CairnError(f"--rounds must be a positive integer (critique → revision rounds), got {rounds!r}")
    prompts = _check_prompts(prompts)
    params = params or SamplingParams(max_tokens=192, temperature=0.7)
    log = log or (lambda msg: None)
    rng = random.Random(seed)
    drawn = [[constitution.draw(rng) for _ in range(rounds)] for _ in prompts]
    t0 = time.perf_counter()
    current = generate_replies(engine, [[{"role": "user", "content": p}] for p in prompts], params, seed, "draft")
    log(f"drafts: {len(prompts)} replies ({time.perf_counter() - t0:.1f} s)")
    records = [{"prompt": p, "draft": d, "principles": [q.id for q in ps], "rounds": []}
               for p, d, ps in zip(prompts, current, drawn, strict=True)]
    for k in range(rounds):
        crit = generate_replies(engine, [critique_messages(p, cur, ps[k])
                                         for p, cur, ps in zip(prompts, current, drawn, strict=True)],
                                params, seed, f"critique-{k}")
        rev = generate_replies(engine, [revision_messages(p, cur, c, ps[k])
                                        for p, cur, c, ps in zip(prompts, current, crit, drawn, strict=True)],
                               params, seed, f"revision-{k}")
        log(f"round {k + 1}/{rounds}: {len(prompts)} critiques and revisions ({time.perf_counter() - t0:.1f} s)")
        for i, rec in enumerate(records):
            rec["rounds"].append({"principle": drawn[i][k].id, "critique": crit[i], "revision": rev[i]})
            if rev[i]:
                current[i] = rev[i]
    for p, rec, final in zip(prompts, records, current, strict=True):
        if final:
            rec["messages"] = [{"role": "user", "content": p}, {"role": "assistant", "content": final}]
    return [{"messages": r.pop("messages"), **r} if "messages" in r else r for r in records]


def sample_pairs(engine, prompts: list[str], params, seed: int = 0) -> list[tuple[str, str]]:
    """Two sampled replies per prompt (all 2N requests in one batch, each seeded: they differ when
    temperature > 0)."""
    prompts = _check_prompts(prompts)
    if params.temperature == 0:
        raise CairnError("--temperature 0 (greedy) gives the same reply twice: sample with a temperature above 0, "
                         "or give the two responses in the prompts file")
    chats = [[{"role": "user", "content": p}] for p in prompts]
    out = generate_replies(engine, chats + chats, params, seed, "responses")
    return list(zip(out[:len(prompts)], out[len(prompts):], strict=True))


# ------------------------------------------------------------------------------------------------ the labeller
def label_pairs(judge, constitution: Constitution, prompts: list, pairs: list[tuple[str, str]], seed: int = 0,
                max_batch_tokens: int = 4096) -> list[dict]:
    """RL-CAI's AI feedback. For each prompt and its two replies (first, second) a principle is drawn
    (``random.Random(seed)``) and the judge is asked ``choice_messages`` twice, once with the first reply as (A)
    and once with it as (B); its answer is the next token after the prefilled ``CHOICE_PREFILL`` ("... is ("),
    one forward pass per question. With ``P(A) = e^{l_A} / (e^{l_A} + e^{l_B})`` (the two option tokens' logits,
    normalised over the two):

        p_first = ½ · [P(A | first shown as A) + (1 − P(A | first shown as B))]

    Averaging both orders cancels a preference for a position exactly. The better-judged reply becomes
    ``chosen``, with ``p_chosen = max(p_first, 1 − p_first)`` as the soft label.

    Returns preference records ``{"prompt", "chosen", "rejected", "p_chosen", "principle"}`` (the format ``cairn
    train dpo/reward`` read) plus ``chosen_index`` (0: the first reply), ``p_first``, ``p_first_as_a``,
    ``p_first_as_b`` and ``option_mass`` (the probability the full next-token distribution put on "A" and "B"
    together, per order: low values mean the judge hardly answers in the asked form)."""
    model, tok = _model_and_tok(judge)
    if len(prompts) != len(pairs):
        raise CairnError(f"label_pairs: {len(prompts)} prompts but {len(pairs)} pairs of replies")
    if not prompts:
        return []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(isinstance(r, str) for r in pair)):
            raise CairnError(f"label_pairs: item {i} must be two replies (strings), not {pair!r:.80}")
    rng = random.Random(seed)
    drawn = [constitution.draw(rng) for _ in prompts]
    texts = [as_text(p) for p in prompts]
    chats = []
    for t, (a, b), p in zip(texts, pairs, drawn, strict=True):
        chats += [choice_messages(t, a, b, p), choice_messages(t, b, a, p)]
    import torch

    logits, mass = option_logits(model, tok, chats, CHOICE_PREFILL, OPTIONS, max_batch_tokens)
    p_a = torch.softmax(logits.double(), dim=1)[:, 0]
    as_a, as_b = p_a[0::2], 1 - p_a[1::2]
    p_first = (as_a + as_b) / 2
    out = []
    for i, (prompt, (a, b), p) in enumerate(zip(prompts, pairs, drawn, strict=True)):
        pf = float(p_first[i])
        first_wins = pf >= 0.5
        out.append({"prompt": prompt, "chosen": a if first_wins else b, "rejected": b if first_wins else a,
                    "p_chosen": pf if first_wins else 1 - pf, "principle": p.id,
                    "chosen_index": 0 if first_wins else 1, "p_first": pf, "p_first_as_a": float(as_a[i]),
                    "p_first_as_b": float(as_b[i]),
                    "option_mass": [float(mass[2 * i]), float(mass[2 * i + 1])]})
    return out


def _check_prompts(prompts) -> list[str]:
    if not isinstance(prompts, list | tuple) or not prompts:
        raise CairnError("give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise CairnError(f"prompt {i} must be a non-empty string, not {p!r:.80}")
    return [p.strip() for p in prompts]
