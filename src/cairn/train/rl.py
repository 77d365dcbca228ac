"""RL from feedback with group baselines (GRPO / RLOO): the objective, the rollout source, the prompt data.

Every optimizer step (every ``--ppo-epochs`` steps) the source ``Rollouts`` takes ``batch_size × grad_accum``
prompts, samples ``G`` (``--group-size``) completions of each from the *current* policy through cairn's engine
(continuous batching, paged KV cache) and scores them with the reward (``cairn.train.rewards``). Advantages come
from each prompt's group, no value network:

- ``grpo``: ``A_i = (r_i − mean(r)) / (std(r) + 1e-4)`` (``std`` the sample standard deviation, as TRL's);
- ``rloo``: ``A_i = r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean(r))`` (leave-one-out).

The objective (``PolicyGradient``), per completion token ``t`` of sequence ``i`` (the tokens the policy chose,
end-of-turn token included when the completion ended on one)::

    ρ_t = exp(log π(a_t) − log π_old(a_t))
    loss_t = −min(ρ_t A_i, clip(ρ_t, 1 − ε, 1 + ε) A_i) + β · (exp(d_t) − d_t − 1),  d_t = log π_ref(a_t) − log π(a_t)

the second term the k3 estimator of KL(π ‖ π_ref) (Schulman's; unbiased, always ≥ 0), ``ε`` = ``--clip``, ``β`` =
``--kl``. log-probs are of the temperature-scaled distribution the completions were sampled from
(``softmax(logits / T)``). The loss is summed over completion tokens and averaged over all completion tokens of
the step (the objective's ``units``; token-level normalisation as in DAPO, not GRPO's per-sequence mean).

``π_old`` is the policy that sampled: with one PPO epoch (the default) it is the policy being trained, so
``ρ ≡ 1`` (its gradient is the plain policy gradient) and no extra forward pass is made; with ``--ppo-epochs K`` a
rollout is trained on for ``K`` steps and its log-probs are computed once at sampling time, so later epochs are
clipped. ``π_ref`` is a frozen copy of the initial model, its log-probs computed once per rollout.

The engine samples from a separate copy of the model (the engine fuses q/k/v and gate/up weights in place, which
the trained model must not see); before each rollout the policy's weights, LoRA adapters merged in, are copied into
it in place (~0.1 s for SmolLM2-135M), with prefix caching off so no KV of older weights is reused.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cairn.data.jsonl import read_jsonl
from cairn.errors import CairnError
from cairn.train.objectives import IGNORE, Batch, LossOut

PROMPT_HINT = ('each line is a JSON object {"prompt": "..."} or {"messages": [{"role": "user", "content": '
               '"..."}, ...]} (ending with the user turn), plus any fields the reward reads, e.g. "answer"')
GRPO_EPS = 1e-4
MAX_RUNNING = 64  # sequences the sampling engine decodes together (its KV pool is sized for them)


# ---------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptExample:
    messages: list[dict[str, str]]  # the chat the completion answers (ends with a user turn)
    fields: dict[str, Any]  # the line's other fields ("prompt" included when it gave one)
    where: str  # FILE:LINE

    def as_example(self) -> dict[str, Any]:
        """What reward functions see: ``{"messages": ..., **fields}``."""
        return {"messages": self.messages, **self.fields}


def parse_prompt(obj: Any, where: str, needs: tuple[str, ...] = ()) -> PromptExample:
    from cairn.data.chat import check_messages
    from cairn.data.preference import as_messages

    if not isinstance(obj, dict):
        raise CairnError(f"{where}: not a JSON object: {PROMPT_HINT}")
    if ("prompt" in obj) == ("messages" in obj):
        which = "both" if "prompt" in obj else "neither"
        raise CairnError(f'{where}: has {which} of "prompt" and "messages": give exactly one ({PROMPT_HINT})')
    if "prompt" in obj:
        if isinstance(obj["prompt"], str) and not obj["prompt"].strip():
            raise CairnError(f'{where}: "prompt" is empty: write the prompt\'s text')
        messages = as_messages(obj["prompt"], where)
    else:
        messages = as_messages(obj["messages"], where)
    try:  # the rules every chat follows (system first, no empty text); the last turn is the user's
        check_messages([*messages, {"role": "assistant", "content": "x"}], where)
    except CairnError as e:
        raise CairnError(str(e).replace("SFT trains on", "")) from None
    missing = [f for f in needs if f not in obj]
    if missing:
        raise CairnError(f"{where}: missing {', '.join(repr(f) for f in missing)}, which the reward reads (e.g. "
                         '{"prompt": "What is 2 + 3?", "answer": "5"}): add it to every line or use another --reward')
    for f in needs:
        if not isinstance(obj[f], str | int | float) or isinstance(obj[f], bool):
            raise CairnError(f'{where}: "{f}" must be a string or a number, not {json.dumps(obj[f])[:60]}')
    return PromptExample(messages, {k: v for k, v in obj.items() if k != "messages"}, where)


def read_prompts(path: str | Path, needs: tuple[str, ...] = ()) -> list[PromptExample]:
    """Every prompt of a JSONL file (blank lines skipped), with errors naming the file and line."""
    path = Path(path)
    out = [parse_prompt(obj, where, needs) for obj, where in read_jsonl(path, PROMPT_HINT, "no such prompt file")]
    if not out:
        raise CairnError(f"{path}: no prompts in the file: {PROMPT_HINT}")
    return out


def split_prompts(prompts: list[PromptExample], fraction: float, seed: int = 0
                  ) -> tuple[list[PromptExample], list[PromptExample]]:
    """A seeded random ``fraction`` held out (at least one when above 0, at least one left to train on)."""
    if not 0 <= fraction < 1:
        raise CairnError(f"--val-fraction {fraction}: use a number from 0 to below 1")
    if fraction == 0:
        return prompts, []
    n_val = max(1, round(len(prompts) * fraction))
    if n_val >= len(prompts):
        raise CairnError(f"--val-fraction {fraction} of {len(prompts)} prompts leaves none to train on: give more "
                         "prompts or a smaller fraction")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [p for i, p in enumerate(prompts) if i not in val], [p for i, p in enumerate(prompts) if i in val]


def encode_prompts(tokenizer, prompts: list[PromptExample], max_len: int
                   ) -> tuple[list[PromptExample], list[tuple[int, ...]], int]:
    """``(kept prompts, their token ids, how many were dropped)``: each rendered with the chat template and its
    generation prompt; those longer than ``max_len`` tokens are dropped."""
    if tokenizer is None or not tokenizer.chat_template:
        raise CairnError("the model has no chat template, which prompts are rendered with: use a chat model, or add "
                         "a chat_template to its tokenizer_config.json")
    kept, ids, dropped = [], [], 0
    for p in prompts:
        x = tuple(tokenizer.encode_chat(p.messages, add_generation_prompt=True))
        if len(x) > max_len:
            dropped += 1
            continue
        kept.append(p)
        ids.append(x)
    return kept, ids, dropped


def fingerprint(ids: list[tuple[int, ...]], prompts: list[PromptExample]) -> str:
    h = hashlib.sha256()
    for x, p in zip(ids, prompts, strict=True):
        h.update(json.dumps([x, p.fields], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ maths
def group_advantages(rewards: torch.Tensor, baseline: str = "grpo") -> torch.Tensor:
    """[P, G] rewards (G completions of each of P prompts) -> [P, G] advantages (see the module docstring)."""
    r = rewards.double()
    g = r.shape[-1]
    if baseline == "grpo":
        std = r.std(dim=-1, keepdim=True) if g > 1 else torch.zeros_like(r[..., :1])
        return ((r - r.mean(dim=-1, keepdim=True)) / (std + GRPO_EPS)).float()
    if baseline == "rloo":
        if g < 2:
            raise CairnError("--baseline rloo needs --group-size of at least 2 (each completion's baseline is the "
                             "mean of the others)")
        return (r - (r.sum(dim=-1, keepdim=True) - r) / (g - 1)).float()
    raise CairnError(f"--baseline {baseline!r}: use grpo or rloo")


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, T] log-probabilities of each target under ``softmax(logits / temperature)`` (0 at IGNORE), in fp32
    (fp64 for fp64 logits)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    if temperature != 1.0:
        x = x / temperature
    nll = F.cross_entropy(x.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(targets.shape)


@dataclass(kw_only=True)
class RLBatch(Batch):
    """Rows of prompt + completion, right-padded; targets are the completion tokens (everything else IGNORE)."""

    advantages: torch.Tensor  # [N]
    ref_logps: torch.Tensor  # [N, T] log π_ref of each target (0 at IGNORE)
    old_logps: torch.Tensor | None = None  # [N, T] log π_old (None: on-policy, π_old = π detached)
    stats: dict[str, float] | None = None  # the rollout's statistics, on a window's first micro-batch
    window_units: int = 0  # completion tokens of the whole window (to turn ``stats`` into per-unit sums)

    def to(self, device: torch.device) -> RLBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


@dataclass(kw_only=True)
class RLEvalBatch(Batch):
    """Held-out completions already scored: validation reports their mean reward (``val_loss`` = −reward)."""

    rewards: torch.Tensor  # [N]
    lengths: torch.Tensor  # [N] completion tokens

    def to(self, device: torch.device) -> RLEvalBatch:
        return self


class PolicyGradient:
    """The clipped policy-gradient objective with a k3 KL penalty to the reference (module docstring)."""

    name = "rl"

    def __init__(self, clip: float = 0.2, kl: float = 0.04, temperature: float = 1.0):
        if not (math.isfinite(clip) and 0 < clip < 1):
            raise CairnError(f"--clip {clip}: use a number between 0 and 1 (0.2 is usual)")
        if not (math.isfinite(kl) and kl >= 0):
            raise CairnError(f"--kl {kl}: use 0 (no penalty) or a positive number (0.01-0.1 is usual)")
        if not (math.isfinite(temperature) and temperature > 0):
            raise CairnError(f"--temperature {temperature}: use a positive number (1.0 samples the policy itself)")
        self.clip, self.kl, self.temperature = float(clip), float(kl), float(temperature)

    def units(self, batch: Batch) -> int:
        return len(batch.rewards) if isinstance(batch, RLEvalBatch) else batch.n_targets()

    def loss(self, model: nn.Module, batch: Batch) -> LossOut:
        if isinstance(batch, RLEvalBatch):
            r = batch.rewards.double()
            return LossOut(-r.sum(), len(r), {"reward": r.sum(), "length": batch.lengths.double().sum()})
        mask = batch.targets != IGNORE
        logp = token_logps(model(batch.inputs, positions=batch.positions), batch.targets, self.temperature)
        old = logp.detach() if batch.old_logps is None else batch.old_logps
        ratio = torch.exp(logp - old)
        adv = batch.advantages[:, None].to(logp.dtype)
        clipped = torch.clamp(ratio, 1 - self.clip, 1 + self.clip)
        pg = -torch.minimum(ratio * adv, clipped * adv)
        d = batch.ref_logps - logp
        k3 = torch.exp(d) - d - 1
        loss = torch.where(mask, pg + self.kl * k3, 0.0).sum()
        n = int(mask.sum())
        with torch.no_grad():
            metrics = {"kl": torch.where(mask, k3, 0.0).sum(), "kl_k1": torch.where(mask, -d, 0.0).sum(),
                       "pg_loss": torch.where(mask, pg, 0.0).sum(),
                       "clip_frac": (mask & ((ratio - 1).abs() > self.clip)).sum().double(),
                       "ratio": torch.where(mask, ratio, 0.0).sum()}
            for k, v in (batch.stats or {}).items():  # rollout statistics: per-unit sums the loop divides back
                metrics[k] = torch.tensor(float(v) * batch.window_units, dtype=torch.float64)
        return LossOut(loss, n, metrics)


def _autocast(device: torch.device, dtype: torch.dtype):
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------- sampling
class PolicySampler:
    """cairn's engine over a copy of the policy, refreshed from the policy (LoRA merged) before each rollout."""

    def __init__(self, model: nn.Module, tokenizer, config, max_sequences: int, max_len: int,
                 prefix_caching: bool = True):
        from cairn.engine.engine import Engine
        from cairn.weights import LoadedModel

        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.tokenizer = tokenizer
        block, running = 16, max(1, min(max_sequences, MAX_RUNNING))  # more sequences wait their turn
        blocks = running * (-(-max_len // block) + 1) + 16
        loaded = LoadedModel(self.model, tokenizer, config, Path("policy"), "policy")
        self.engine = Engine(loaded, quantize="none", kv_dtype="float32", prefix_caching=prefix_caching,
                             block_size=block, kv_blocks=blocks, max_running=running, chunk_size=max(256, max_len))
        self.params = dict(self.model.named_parameters())
        self.sync_seconds = 0.0

    @torch.no_grad()
    def sync(self, policy: nn.Module) -> None:
        """Copy the policy's weights (adapters merged in) into the engine's model, in place."""
        from cairn.train.lora import merged_state_dict

        t = time.perf_counter()
        state = merged_state_dict(policy)
        missing = [k for k in self.params if k not in state]
        if missing:
            raise ValueError(f"the policy's state lacks {missing[:3]}")
        for name, p in self.params.items():
            p.copy_(state[name])
        # the prefix cache holds KV computed with the old weights: drop it (the engine is idle, so every cached
        # block is unreferenced and goes)
        with self.engine._lock:
            self.engine.pool.clear_cache()
            if self.engine.pool.cached:
                raise RuntimeError("the engine still holds KV of running sequences while its weights change")
        self.sync_seconds = time.perf_counter() - t

    def sample(self, prompts: list[tuple[int, ...]], seeds: list[int | None], max_new_tokens: int,
               temperature: float) -> tuple[list[list[int]], list[str], list[bool], float]:
        """``(completion ids, texts, ended on an end token, seconds)`` of each prompt."""
        from cairn.engine.types import Request, SamplingParams

        # the engine does not say which end token ended a sequence; with several, sample past them and cut at the
        # first, so the token trained on is the one the policy chose
        eos = set(self.tokenizer.eos_ids) if self.tokenizer is not None else set()
        several = len(eos) > 1
        reqs = [Request(list(p), SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=s,
                                                ignore_eos=several))
                for p, s in zip(prompts, seeds, strict=True)]
        t = time.perf_counter()
        done = self.engine.generate_many(reqs)
        dt = time.perf_counter() - t
        ids, ends = [], []
        for c in done:
            x = list(c.token_ids)
            cut = next((i for i, tok in enumerate(x) if tok in eos), None) if several else None
            if cut is not None:
                ids.append(x[:cut + 1])
                ends.append(True)
            else:
                ended = c.finish.reason == "eos"  # (on the one end token there is)
                ids.append(x + [min(eos)] if ended else x)
                ends.append(ended)
        texts = [self.tokenizer.decode(x) for x in ids]
        return ids, texts, ends, dt

    def close(self) -> None:
        self.engine.close()


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


class Rollouts:
    """The RL ``DataSource``: per step a window of scored, advantage-weighted completions from the current policy.

    ``bind(policy, reference, device, dtype)`` must be called before the first step (the trainer's model, a frozen
    copy of the initial one, and the compute dtype log-probs are taken in)."""

    def __init__(self, examples: list[PromptExample], prompt_ids: list[tuple[int, ...]], sampler: PolicySampler,
                 reward, *, group_size: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 baseline: str = "grpo", ppo_epochs: int = 1, max_new_tokens: int = 64, temperature: float = 1.0,
                 pad_id: int = 0):
        if group_size < 1 or (baseline == "rloo" and group_size < 2):
            raise CairnError(f"--group-size {group_size}: use at least {2 if baseline == 'rloo' else 1} (4-16 is "
                             "usual; the group is each prompt's baseline)")
        if ppo_epochs < 1:
            raise CairnError(f"--ppo-epochs {ppo_epochs}: use 1 or more")
        if not examples:
            raise CairnError("no prompts to train on")
        group_advantages(torch.zeros(1, group_size), baseline)  # checks the baseline's name
        self.examples, self.prompt_ids, self.sampler, self.reward = examples, prompt_ids, sampler, reward
        self.g, self.p, self.accum, self.seed = group_size, batch_size, grad_accum, seed
        self.baseline, self.ppo_epochs = baseline, ppo_epochs
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.pad_id = pad_id
        self.fingerprint = fingerprint(prompt_ids, examples)
        self.epoch = self.cursor = self.rollouts = 0
        self.pending: list[dict] | None = None  # the current rollout's micro-batches, while epochs are left
        self.left = 0
        self.policy = self.ref = None
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def bind(self, policy: nn.Module, reference: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.policy, self.ref, self.device, self.dtype = policy, reference, device, dtype

    # -------------------------------------------------------------- DataSource
    @property
    def epochs_done(self) -> float:
        return self.epoch + self.cursor / len(self.examples)

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "epoch": self.epoch, "cursor": self.cursor,
                "rollouts": self.rollouts, "left": self.left, "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise CairnError("the checkpoint was made on other prompts: resume with the run's original --data, "
                             "--val-fraction and --seq-len, or start a new run in another --out")
        self.epoch, self.cursor, self.rollouts = int(state["epoch"]), int(state["cursor"]), int(state["rollouts"])
        self.left, self.pending = int(state["left"]), state["pending"]

    def next_window(self) -> list[RLBatch]:
        if self.left == 0:
            self.pending = self._rollout()
            self.left = self.ppo_epochs
        self.left -= 1
        window = [self._batch(d) for d in self.pending]
        if self.left == 0:
            self.pending = None
        return window

    # ------------------------------------------------------------------ rollout
    def _take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
            k = min(n - len(out), len(order) - self.cursor)
            out += order[self.cursor:self.cursor + k].tolist()
            self.cursor += k
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    @torch.no_grad()
    def _logps(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        was = model.training
        model.eval()
        with _autocast(self.device, self.dtype):
            lp = token_logps(model(inputs.to(self.device)), targets.to(self.device), self.temperature)
        model.train(was)
        return lp.float().cpu()

    def _rollout(self) -> list[dict]:
        if self.policy is None:
            raise RuntimeError("Rollouts.bind(policy, reference, ...) was not called")
        idx = self._take(self.p * self.accum)
        r_id = self.rollouts
        self.rollouts += 1
        prompts = [self.prompt_ids[i] for i in idx for _ in range(self.g)]
        seeds = [_seed(self.seed, r_id, j) for j in range(len(prompts))]
        self.sampler.sync(self.policy)
        ids, texts, _, dt = self.sampler.sample(prompts, seeds, self.max_new_tokens, self.temperature)
        examples = [self.examples[i].as_example() for i in idx for _ in range(self.g)]
        rewards = torch.tensor(self.reward(examples, texts), dtype=torch.float64)
        adv = group_advantages(rewards.view(-1, self.g), self.baseline).view(-1)
        n_comp = sum(len(x) for x in ids)
        stats = {"reward": float(rewards.mean()),
                 "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                 "length": n_comp / len(ids), "sample_tok_per_s": n_comp / max(dt, 1e-9), "sample_s": dt,
                 **{k: float(v) for k, v in sorted(getattr(self.reward, "last", {}).items())}}
        rows = [list(p) + list(c) for p, c in zip(prompts, ids, strict=True)]
        starts = [len(p) for p in prompts]
        out = []
        per = self.p * self.g
        for m in range(self.accum):
            sl = slice(m * per, (m + 1) * per)
            inputs, targets = _collate(rows[sl], starts[sl], self.pad_id)
            d = {"inputs": inputs, "targets": targets, "advantages": adv[sl].clone(),
                 "ref_logps": self._logps(self.ref, inputs, targets),
                 "old_logps": self._logps(self.policy, inputs, targets) if self.ppo_epochs > 1 else None}
            out.append(d)
        units = sum(int((d["targets"] != IGNORE).sum()) for d in out)
        out[0]["stats"], out[0]["window_units"] = stats, units
        return out

    @staticmethod
    def _batch(d: dict) -> RLBatch:
        return RLBatch(d["inputs"], d["targets"], advantages=d["advantages"], ref_logps=d["ref_logps"],
                       old_logps=d["old_logps"], stats=d.get("stats"), window_units=d.get("window_units", 0))


def _collate(rows: list[list[int]], starts: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``inputs`` = row[:-1] and ``targets`` = row[1:], targets IGNORE before ``start`` (the prompt)
    and on padding."""
    width = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, starts, strict=True)):
        x = torch.tensor(r, dtype=torch.long)
        inputs[i, :len(r) - 1] = x[:-1]
        targets[i, s - 1:len(r) - 1] = x[s:]
    return inputs, targets


class HeldOut:
    """The RL ``ValSource``: greedy completions of held-out prompts from the current policy, scored; validation
    then reports ``val_reward`` (their mean reward), ``val_length`` and ``val_loss`` = −mean reward (so the best
    model exported is the one with the highest held-out reward)."""

    def __init__(self, examples: list[PromptExample], prompt_ids: list[tuple[int, ...]], sampler: PolicySampler,
                 reward, max_new_tokens: int):
        self.examples, self.prompt_ids, self.sampler, self.reward = examples, prompt_ids, sampler, reward
        self.max_new_tokens = max_new_tokens
        self.policy: nn.Module | None = None
        self.fingerprint = fingerprint(prompt_ids, examples)

    def bind(self, policy: nn.Module) -> None:
        self.policy = policy

    def evaluate(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """``(completions, rewards, lengths)`` of the current policy's greedy answers."""
        self.sampler.sync(self.policy)
        ids, texts, _, _ = self.sampler.sample(self.prompt_ids, [None] * len(self.prompt_ids), self.max_new_tokens,
                                               0.0)
        rewards = torch.tensor(self.reward([e.as_example() for e in self.examples], texts), dtype=torch.float64)
        return texts, rewards, torch.tensor([len(x) for x in ids], dtype=torch.float64)

    def batches(self, max_tokens: int | None):
        _, rewards, lengths = self.evaluate()
        empty = torch.zeros(len(rewards), 1, dtype=torch.long)
        yield RLEvalBatch(empty, torch.full_like(empty, IGNORE), rewards=rewards, lengths=lengths)
