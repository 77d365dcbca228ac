"""Learning from preference pairs: a reward model (Bradley–Terry) and DPO, both objectives of the one loop.

``cairn train reward [MODEL] --data FILE`` puts a scalar head on the transformer's final normed hidden state at
each sequence's last token (the reply's end-of-turn token) and trains both on pairs with the Bradley–Terry loss
``-[p·log σ(r_c − r_r) + (1 − p)·log σ(r_r − r_c)]`` (``p`` the soft label, 1 when absent). ``OUT/`` then holds
the transformer as a cairn checkpoint, the head in ``reward_head.safetensors`` and ``reward_model.json``;
``load_reward_model(OUT).score(prompt, response)`` scores replies (for RLHF).

``cairn train dpo [MODEL] --data FILE --beta 0.1`` trains the policy directly (Rafailov et al., 2023): with the
summed log-probabilities of each reply under the policy (π) and under the frozen initial model (π_ref),
``z = β[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]`` and the loss ``-[p·log σ(z) + (1 − p)·log σ(−z)]``
(for p < 1 the conservative / label-smoothed form). The reference log-probs are computed once before training
(``--ref-mode precompute``, stored in ``OUT/reference_logps.safetensors`` so a resumed run reads the same
numbers) or by a frozen copy of the model at every step (``--ref-mode copy``).

Both average the loss over pairs (the objectives' ``units``); the logged metrics are per pair. The commands are in
``cairn.train.preference_cli``, the data in ``cairn.data.preference``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cairn.errors import CairnError
from cairn.train.objectives import IGNORE, LossOut

if TYPE_CHECKING:
    from cairn.data.preference import PairBatch

REWARD_JSON, REWARD_HEAD = "reward_model.json", "reward_head.safetensors"
REFERENCE_FILE = "reference_logps.safetensors"
REWARD_FORMAT = 1


# ------------------------------------------------------------------------------------------ shared maths
def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] summed log-probabilities (fp32) of each row's target tokens (IGNORE positions count nothing)."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(targets.shape).sum(-1)


def preference_loss(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-pair ``-[p·log σ(z) + (1 − p)·log σ(−z)]``: the logistic loss of a score margin ``z`` (chosen minus
    rejected) against the probability ``p`` that chosen is better."""
    p = p.to(z.dtype)
    return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))


def agreement(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """1 where the margin's sign agrees with the label (chosen better when p ≥ 0.5), else 0 (a tie never agrees)."""
    return torch.where(p >= 0.5, z > 0, z < 0).float()


# ---------------------------------------------------------------------------------------------- reward
class RewardModel(nn.Module):
    """A transformer and a scalar head on its final normed hidden state at each row's last token."""

    def __init__(self, transformer: nn.Module, tokenizer=None, seed: int = 0):
        super().__init__()
        self.transformer = transformer
        d = transformer.cfg.d_model
        self.head = nn.Linear(d, 1, bias=False)  # a bias cancels in r_c - r_r: it could never learn
        w = torch.randn(1, d, generator=torch.Generator().manual_seed(seed)) / math.sqrt(d + 1)
        with torch.no_grad():
            self.head.weight.copy_(w.to(self.head.weight.dtype))
        self.tokenizer = tokenizer

    @property
    def cfg(self):
        return self.transformer.cfg

    @property
    def layers(self) -> nn.ModuleList:  # the blocks the loop compiles / checkpoints
        return self.transformer.layers

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """[B] rewards of right-padded rows ``tokens`` [B, T] holding ``lengths`` tokens each (None: all T)."""
        h = self.transformer.hidden(tokens, positions)
        b, t = tokens.shape
        last = lengths - 1 if lengths is not None else torch.full((b,), t - 1, device=tokens.device)
        pooled = h[torch.arange(b, device=tokens.device), last]
        return self.head(pooled).squeeze(-1).float()

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
        """Rewards of tokenised sequences (prompt + reply through its end-of-turn token, as in training)."""
        if any(len(s) == 0 for s in sequences):
            raise CairnError("score_ids: an empty sequence has no last token to score")
        was = self.training
        self.eval()
        device = self.head.weight.device
        out: list[float] = []
        for s in range(0, len(sequences), batch_size):
            chunk = sequences[s:s + batch_size]
            width = max(len(x) for x in chunk)
            rows = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, x in enumerate(chunk):
                rows[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            lengths = torch.tensor([len(x) for x in chunk], device=device)
            out += self(rows.to(device), lengths).tolist()
        self.train(was)
        return out

    def score(self, prompt, response, batch_size: int = 8):
        """The reward of ``response`` to ``prompt``: each a string (a user turn / the assistant's reply) or
        messages, as in preference data; lists of them (equally long) give a list of rewards."""
        from cairn.data.preference import as_messages, encode_prompt_reply

        if self.tokenizer is None:
            raise CairnError("this reward model has no tokenizer: score token ids with score_ids, or load it with "
                             "load_reward_model from a directory that holds one")
        one = isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict))
        prompts, responses = ([prompt], [response]) if one else (list(prompt), list(response))
        if len(prompts) != len(responses):
            raise CairnError(f"score: {len(prompts)} prompts but {len(responses)} responses: give one response "
                             "per prompt")
        seqs = []
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            if isinstance(r, list):
                r = r[0]["content"] if len(r) == 1 and isinstance(r[0], dict) else None
            if not isinstance(r, str):
                raise CairnError(f"score: response {i} must be a string or one assistant message")
            a, b = encode_prompt_reply(self.tokenizer, as_messages(p, f"prompt {i}"), r, f"response {i}")
            seqs.append(list(a + b))
        scores = self.score_ids(seqs, batch_size)
        return scores[0] if one else scores


class RewardObjective:
    """Bradley–Terry on pairs: per pair ``-[p·log σ(r_c − r_r) + (1 − p)·log σ(r_r − r_c)]``."""

    name = "reward"

    def units(self, batch: PairBatch) -> int:
        return batch.n_pairs

    def loss(self, model: nn.Module, batch: PairBatch) -> LossOut:
        r = model(batch.inputs, lengths=batch.lengths, positions=batch.positions)
        rc, rr = r[0::2], r[1::2]
        z = rc - rr
        loss = preference_loss(z, batch.p_chosen).sum()
        metrics = {"accuracy": agreement(z, batch.p_chosen).sum(), "margin": z.detach().sum(),
                   "reward_chosen": rc.detach().sum(), "reward_rejected": rr.detach().sum()}
        return LossOut(loss, batch.n_pairs, metrics)


def save_reward_model(out: str | Path, model: RewardModel, cfg, tokenizer=None, extra: dict | None = None) -> Path:
    """``out``: the transformer as a cairn checkpoint (LoRA adapters merged in), the head in
    ``reward_head.safetensors`` and ``reward_model.json`` saying what the directory is."""
    from cairn.train.lora import merged_state_dict
    from cairn.weights.native import atomic_write_text, save_state_checkpoint, save_tensors

    out = Path(out)
    # LoRA adapters, if any, merged in: the directory is a whole model either way
    save_state_checkpoint(out, merged_state_dict(model.transformer), cfg, tokenizer, extra)
    save_tensors(out / REWARD_HEAD, {"weight": model.head.weight.detach().float()}, {"format": "pt"})
    meta = {"kind": "reward_model", "format": REWARD_FORMAT, "head": REWARD_HEAD, "pooling": "last_token",
            "d_model": cfg.d_model,
            "input": "the prompt rendered with the chat template (generation prompt included), then the reply "
                     "through its end-of-turn token; the reward is read at that last token"}
    atomic_write_text(out / REWARD_JSON, json.dumps(meta, indent=2))
    return out


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                      ) -> RewardModel:
    """A reward model that ``cairn train reward`` exported, ready to ``score`` (eval mode, no gradients)."""
    from safetensors.torch import load_file

    from cairn.config import read_json_object
    from cairn.weights import load_model

    path = Path(path)
    meta_file = path / REWARD_JSON
    if not meta_file.is_file():
        raise CairnError(f"{path}: not a reward model (no {REWARD_JSON}): train one with `cairn train reward MODEL "
                         "--data PAIRS.jsonl --out DIR` and pass DIR")
    meta = read_json_object(meta_file)
    if meta.get("kind") != "reward_model" or meta.get("format") != REWARD_FORMAT:
        raise CairnError(f"{meta_file}: not a cairn reward model of format {REWARD_FORMAT} (kind "
                         f"{meta.get('kind')!r}, format {meta.get('format')!r}): re-export it with this cairn")
    lm = load_model(path, dtype=dtype)
    head_file = path / meta.get("head", REWARD_HEAD)
    try:
        w = load_file(str(head_file))["weight"]
    except Exception as e:  # a missing file, a bad safetensors file, a missing tensor
        raise CairnError(f"{head_file}: cannot read the reward head ({e}): re-export the reward model") from None
    if tuple(w.shape) != (1, lm.config.d_model):
        raise CairnError(f"{head_file}: head of shape {tuple(w.shape)}, not (1, {lm.config.d_model}) as the model's "
                         "d_model needs: the files are of different models")
    rm = RewardModel(lm.model, tokenizer=lm.tokenizer)
    with torch.no_grad():
        rm.head.weight.copy_(w)
    return rm.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------- DPO
class DPO:
    """Direct preference optimisation, sigmoid loss: per pair ``-[p·log σ(z) + (1 − p)·log σ(−z)]`` with
    ``z = β[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]``, log-probs summed over the reply's tokens.
    The reference log-probs come with the batch (``PairBatch.ref_logps``) or from ``ref_model``."""

    name = "dpo"

    def __init__(self, beta: float = 0.1, ref_model: nn.Module | None = None):
        if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
            raise CairnError(f"--beta {beta}: use a positive number (0.1 is usual; larger keeps closer to the "
                             "reference)")
        self.beta, self.ref_model = float(beta), ref_model

    def units(self, batch: PairBatch) -> int:
        return batch.n_pairs

    def reference(self, batch: PairBatch) -> torch.Tensor:
        """[P, 2] reference log-probs of the (chosen, rejected) replies."""
        if batch.ref_logps is not None:
            return batch.ref_logps
        if self.ref_model is None:
            raise ValueError("DPO needs reference log-probs: precompute them into the data or give ref_model")
        with torch.no_grad():
            return sequence_logps(self.ref_model(batch.inputs, positions=batch.positions), batch.targets).view(-1, 2)

    def loss(self, model: nn.Module, batch: PairBatch) -> LossOut:
        lp = sequence_logps(model(batch.inputs, positions=batch.positions), batch.targets).view(-1, 2)
        ref = self.reference(batch).to(lp.dtype)
        chosen = self.beta * (lp[:, 0] - ref[:, 0])
        rejected = self.beta * (lp[:, 1] - ref[:, 1])
        z = chosen - rejected
        loss = preference_loss(z, batch.p_chosen).sum()
        metrics = {"accuracy": agreement(z, batch.p_chosen).sum(), "reward_chosen": chosen.detach().sum(),
                   "reward_rejected": rejected.detach().sum(), "margin": z.detach().sum(),
                   "logp_chosen": lp[:, 0].detach().sum(), "logp_rejected": lp[:, 1].detach().sum()}
        return LossOut(loss, batch.n_pairs, metrics)


def _autocast(device: torch.device, dtype: torch.dtype):
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def reference_logps(model: nn.Module, batches: Iterable[PairBatch], n_pairs: int, device: torch.device,
                    dtype: torch.dtype = torch.float32, progress: bool = False) -> torch.Tensor:
    """[n_pairs, 2] summed log-probs of every pair's (chosen, rejected) reply under ``model`` (in ``dtype``
    autocast, as training computes the policy's)."""
    from tqdm import tqdm

    table = torch.full((n_pairs, 2), math.nan)
    was = model.training
    model.eval()
    with tqdm(total=n_pairs, desc="reference log-probs", unit="pair", disable=not progress) as bar:
        for b in batches:
            b = b.to(device)
            with _autocast(device, dtype):
                lp = sequence_logps(model(b.inputs, positions=b.positions), b.targets)
            table[b.pair_ids.cpu()] = lp.view(-1, 2).float().cpu()
            bar.update(b.n_pairs)
    model.train(was)
    if torch.isnan(table).any():
        raise ValueError("reference_logps: the batches did not cover every pair")
    return table


def reference_tables(trainer, train, val, out: Path, resume: bool, progress: bool, log) -> None:
    """Give ``train`` / ``val`` their reference log-probs: read from ``OUT`` when resuming (the numbers the run
    started with), else computed with the initial model and stored there."""
    from safetensors import safe_open

    from cairn.weights.native import save_tensors

    path = out / REFERENCE_FILE
    fp = train.fingerprint + "/" + (val.fingerprint if val is not None else "-")
    if resume and path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tables = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        if meta.get("fingerprint") != fp:
            raise CairnError(f"{path} holds the reference log-probs of other pairs: resume with the run's original "
                             "--data / --val-data / --seq-len, or start a new run in another --out")
        log(f"reference log-probs from {path}")
    else:
        bs = trainer.tc.batch_size
        tables = {"train": reference_logps(trainer.model, train.ordered(bs), len(train.pairs), trainer.device,
                                           trainer.compute_dtype, progress)}
        if val is not None:
            tables["val"] = reference_logps(trainer.model, val.ordered(bs), len(val.pairs), trainer.device,
                                            trainer.compute_dtype, progress)
        save_tensors(path, tables, {"fingerprint": fp, "dtype": str(trainer.compute_dtype)})
    train.set_reference(tables["train"])
    if val is not None:
        val.set_reference(tables["val"])
