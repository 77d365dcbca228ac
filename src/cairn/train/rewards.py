r"""Rewards for ``cairn train rl``: every source behind one signature, ``(examples, completions) -> rewards``.

An example is one prompt record as read from the prompt file: ``{"messages": [...], "prompt": ..., **fields}``
(``messages`` always there, the chat the completion answers; ``prompt`` when the line gave one; any other field,
e.g. ``answer``, as it was written). ``--reward`` specs:

- ``exact``: 1.0 when the normalised completion equals the normalised ``answer`` field, else 0.0;
- ``contains``: 1.0 when the normalised ``answer`` occurs in the normalised completion as a whole word (not
  inside a longer word or number: ``7`` is in ``"it is 7."`` but not in ``"17"``), else 0.0.
  Normalisation (``normalize``): Unicode NFKC, case-folded, runs of whitespace made one space, leading and trailing
  whitespace removed, then trailing ``.``, ``!``, ``?``, ``,``, ``;`` and ``:`` removed (and whitespace again);
- ``number``: 1.0 when the last number in the completion (``[-+]?\d+(\.\d+)?``, thousands commas ignored) equals
  the ``answer`` (a number, or a string holding one) numerically, else 0.0 (``"3 + 4 = 7."`` scores 1 for 7,
  ``"7, not 8"`` scores 0);
- ``python:FILE.py:FN`` or ``MODULE:FN``: ``FN(prompt=..., completion=..., **fields)`` per example, a number
  (``prompt``: the line's ``prompt`` string, or its messages when it gave ``messages``);
- ``rm:DIR`` (or a directory holding ``reward_model.json``): a reward model made by ``cairn train reward``,
  scoring the completion as the reply to the example's messages;
- ``constitution``: ``cairn.train.cai.constitution_reward``: ``-λ · L_viol``, the violation penalty a judge model
  gives the completion under each principle of the constitution (``--constitution``, ``--judge``, ``--lambda``).

Several specs are summed, each with an optional weight: ``--reward 0.5*exact --reward rm:out/reward``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cairn.errors import CairnError

RewardFn = Callable[[list[dict], list[str]], list[float]]

SPEC_HELP = ("exact | contains | number | python:FILE.py:FN | MODULE:FN | rm:DIR | constitution, optionally "
             "weighted as W*SPEC (e.g. 0.5*exact)")


# ------------------------------------------------------------------------------------------- verifiable
def normalize(text: str) -> str:
    """How ``exact`` and ``contains`` compare text: NFKC, case-folded, whitespace runs made one space, stripped,
    trailing ``.!?,;:`` removed."""
    t = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", str(text)).casefold()).strip()
    return t.rstrip(".!?,;:").strip()


def exact_reward(examples: list[dict], completions: list[str]) -> list[float]:
    return [float(normalize(c) == normalize(ex["answer"])) for ex, c in zip(examples, completions, strict=True)]


def contains_reward(examples: list[dict], completions: list[str]) -> list[float]:
    out = []
    for ex, c in zip(examples, completions, strict=True):
        want = normalize(ex["answer"])
        out.append(float(bool(want) and re.search(rf"(?<!\w){re.escape(want)}(?!\w)", normalize(c)) is not None))
    return out


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (digits, optional sign and decimals; thousands commas ignored)."""
    found = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", str(text)))
    return float(found[-1]) if found else None


def _numeric(answer) -> float:
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        return float(answer)
    text = normalize(answer).replace(",", "")
    if not _NUMBER.fullmatch(text):
        raise CairnError(f"--reward number: the answer {answer!r} is not a number: write numeric answers, or use "
                         "--reward exact or contains")
    return float(text)


def number_reward(examples: list[dict], completions: list[str]) -> list[float]:
    out = []
    for ex, c in zip(examples, completions, strict=True):
        want, got = _numeric(ex["answer"]), last_number(c)
        out.append(float(got is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)))
    return out


# ---------------------------------------------------------------------------------------------- python
def load_function(target: str, spec: str) -> Callable:
    """``FILE.py:FN`` (a file, loaded as a module) or ``MODULE:FN`` (importable)."""
    path_part, sep, name = target.rpartition(":")
    if not sep or not path_part or not name.isidentifier():
        raise CairnError(f"--reward {spec}: name a function as python:FILE.py:FN or MODULE:FN")
    if path_part.endswith(".py"):
        path = Path(path_part).expanduser()
        if not path.is_file():
            raise CairnError(f"--reward {spec}: {path}: no such file")
        mod_name = f"cairn_reward_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise CairnError(f"--reward {spec}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(path_part)
        except Exception as e:
            raise CairnError(f"--reward {spec}: cannot import module {path_part!r} ({type(e).__name__}: {e}): give "
                             "an importable module or a .py file") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise CairnError(f"--reward {spec}: {path_part} has no function {name!r}")
    return fn


def python_reward(fn: Callable, spec: str) -> RewardFn:
    """``fn(prompt=..., completion=..., **fields)`` per example."""

    def reward(examples: list[dict], completions: list[str]) -> list[float]:
        out = []
        for ex, c in zip(examples, completions, strict=True):
            fields = {k: v for k, v in ex.items() if k not in ("prompt", "messages")}
            prompt = ex.get("prompt", ex["messages"])
            try:
                r = fn(prompt=prompt, completion=c, **fields)
            except Exception as e:
                raise CairnError(f"--reward {spec} raised {type(e).__name__}: {e} (prompt {json.dumps(prompt)[:80]})"
                                 ) from None
            out.append(_number(r, spec))
        return out

    return reward


def _number(r, spec: str) -> float:
    if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r):
        raise CairnError(f"--reward {spec} returned {r!r}: a reward must be a finite number (int or float)")
    return float(r)


# ---------------------------------------------------------------------------------------- reward model
def reward_model_reward(path: str, spec: str, batch_size: int = 8) -> RewardFn:
    from cairn.train.preference import load_reward_model

    rm = load_reward_model(path)

    def reward(examples: list[dict], completions: list[str]) -> list[float]:
        return [float(x) for x in rm.score([ex["messages"] for ex in examples], list(completions), batch_size)]

    return reward


# ---------------------------------------------------------------------------------------- constitution
def constitution_term(judge, constitution, lam: float) -> RewardFn:
    """``cai.constitution_reward(judge, constitution, None, lam)`` over the examples' chats: the constitution's
    term alone (``-λ · L_viol``, the judge's violation penalty); the other ``--reward`` terms are added next to it
    (the ``R_human`` of ``R = R_human − λ · L_viol``)."""
    from cairn.train import cai

    make = getattr(cai, "constitution_reward", None)
    if make is None:
        raise CairnError("--reward constitution needs cairn.train.cai.constitution_reward, which this cairn does not "
                         "have: use another --reward")
    fn = make(judge, constitution, None, lam)

    def reward(examples: list[dict], completions: list[str]) -> list[float]:
        return [_number(r, "constitution") for r in fn([ex["messages"] for ex in examples], list(completions))]

    return reward


# ------------------------------------------------------------------------------------------- combining
@dataclass
class Term:
    spec: str  # as given, e.g. "0.5*exact"
    name: str  # for metrics: exact, contains, python, rm, constitution
    weight: float
    fn: RewardFn
    needs: tuple[str, ...] = ()  # example fields it reads


@dataclass
class Reward:
    """The sum of weighted terms; ``last`` keeps each term's mean of the latest call (for metrics)."""

    terms: list[Term]
    last: dict[str, float] = field(default_factory=dict)

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(sorted({f for t in self.terms for f in t.needs}))

    def __call__(self, examples: list[dict], completions: list[str]) -> list[float]:
        total = [0.0] * len(completions)
        self.last = {}
        for t in self.terms:
            r = t.fn(examples, completions)
            if len(r) != len(completions):
                raise CairnError(f"--reward {t.spec} gave {len(r)} rewards for {len(completions)} completions")
            r = [_number(x, t.spec) for x in r]
            total = [a + t.weight * b for a, b in zip(total, r, strict=True)]
            key = f"reward_{t.name}"
            while key in self.last:
                key += "_"
            self.last[key] = sum(r) / max(1, len(r))
        return total


def parse_spec(spec: str) -> tuple[float, str]:
    m = re.fullmatch(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*(.+)", spec)
    if m:
        w = float(m.group(1))
        if not math.isfinite(w):
            raise CairnError(f"--reward {spec}: the weight must be a finite number")
        return w, m.group(2).strip()
    return 1.0, spec.strip()


def build_reward(specs: list[str], judge_loader: Callable[[], object] | None = None, constitution=None,
                 lam: float = 1.0) -> Reward:
    """The ``Reward`` of ``--reward`` specs. ``judge_loader()`` gives the judge (a ``LoadedModel``) when a spec
    is ``constitution``; ``constitution`` is a ``cai.Constitution``."""
    if not specs:
        raise CairnError(f"give at least one --reward: {SPEC_HELP}")
    terms = []
    for spec in specs:
        w, body = parse_spec(spec)
        if body == "exact":
            terms.append(Term(spec, "exact", w, exact_reward, ("answer",)))
        elif body == "contains":
            terms.append(Term(spec, "contains", w, contains_reward, ("answer",)))
        elif body == "number":
            terms.append(Term(spec, "number", w, number_reward, ("answer",)))
        elif body == "constitution":
            if judge_loader is None:
                raise CairnError("--reward constitution needs a judge model (--judge)")
            terms.append(Term(spec, "constitution", w, constitution_term(judge_loader(), constitution, lam)))
        elif body.startswith("python:"):
            terms.append(Term(spec, "python", w, python_reward(load_function(body[len("python:"):], spec), spec)))
        elif body.startswith("rm:") or (Path(body).expanduser().is_dir()):
            path = body[3:] if body.startswith("rm:") else body
            terms.append(Term(spec, "rm", w, reward_model_reward(path, spec)))
        elif ":" in body and not Path(body).exists():
            terms.append(Term(spec, "python", w, python_reward(load_function(body, spec), spec)))
        else:
            raise CairnError(f"--reward {spec}: not a reward source: use {SPEC_HELP}")
    return Reward(terms)
