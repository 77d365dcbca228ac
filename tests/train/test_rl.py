"""RL from feedback (``cairn train rl``): the clipped policy-gradient loss and its gradient against a hand
computation, group advantages, the rewards, learning a toy task through the engine with the KL to the reference
bounded, a bit-exact resume, clear errors, the command end to end (LoRA, the constitution's glue)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from cairn.config import ModelConfig
from cairn.data.tokenizer_train import train_tokenizer
from cairn.errors import CairnError
from cairn.model import build_model
from cairn.train.loop import TrainConfig, Trainer
from cairn.train.metrics import read_metrics
from cairn.train.objectives import IGNORE
from cairn.train.rewards import build_reward, contains_reward, exact_reward, normalize
from cairn.train.rl import (
    PolicyGradient,
    PolicySampler,
    RLBatch,
    Rollouts,
    encode_prompts,
    group_advantages,
    parse_prompt,
    read_prompts,
    token_logps,
)

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["red", "green", "blue", "tree", "see", "bee", "free", "cat", "dog", "sun", "moon", "star", "keep", "seven"]


def e_share(prompt, completion, **fields) -> float:
    """The toy task's reward: the share of the completion's characters that are the letter e."""
    return completion.count("e") / max(1, len(completion))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("rltok")
    text = "\n".join(f"Say {a} and {b}. The {a} {b} is {c}." for a in WORDS for b in WORDS for c in WORDS[:3])
    (d / "text.txt").write_text(text)
    return train_tokenizer([d / "text.txt"], 300, d / "tok", progress=False)


def tiny(tok, seed=0):
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=96, tie_embeddings=True, arch="llama", name="tiny")
    torch.manual_seed(seed)
    return cfg, build_model(cfg).init_weights(seed=seed)


def prompts_file(path: Path, n: int = 16) -> Path:
    rows = [{"prompt": f"Say {WORDS[i % len(WORDS)]} and {WORDS[(3 * i + 1) % len(WORDS)]}.",
             "answer": WORDS[i % len(WORDS)]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ the maths
def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 0.0]])
    a = group_advantages(r, "grpo")
    for i in range(3):
        row = r[i].tolist()
        mean = sum(row) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / 3)  # sample standard deviation
        for j in range(4):
            assert a[i, j].item() == pytest.approx((row[j] - mean) / (std + 1e-4), rel=1e-6, abs=1e-7)
    assert torch.equal(a[1], torch.zeros(4))  # a group that agrees teaches nothing
    b = group_advantages(r, "rloo")
    for i in range(3):
        row = r[i].tolist()
        for j in range(4):
            others = [x for k, x in enumerate(row) if k != j]
            assert b[i, j].item() == pytest.approx(row[j] - sum(others) / 3, rel=1e-6)
    with pytest.raises(CairnError, match="at least 2"):
        group_advantages(torch.zeros(2, 1), "rloo")
    with pytest.raises(CairnError, match="grpo or rloo"):
        group_advantages(r, "ppo")


def _hand_loss(model, rows, starts, adv, old_shift, ref_shift, clip, beta, temperature):
    """The objective written out token by token over unpadded rows: returns (loss summed over tokens, n tokens,
    KL sum, clipped count)."""
    total, n, kl_sum, clipped = 0.0, 0, 0.0, 0
    for i, (row, s) in enumerate(zip(rows, starts, strict=True)):
        logits = model(torch.tensor([row[:-1]]))[0].double() / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        for t in range(s - 1, len(row) - 1):
            lp = logp_all[t, row[t + 1]]
            old = lp.detach() + old_shift[i][t]
            ref = lp.detach() + ref_shift[i][t]
            ratio = torch.exp(lp - old)
            a = adv[i]
            unclipped, c = ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a
            pg = -(unclipped if unclipped.item() <= c.item() else c)
            d = ref - lp
            kl = torch.exp(d) - d - 1
            total = total + pg + beta * kl
            kl_sum += kl.item()
            clipped += abs(ratio.item() - 1) > clip
            n += 1
    return total, n, kl_sum, clipped


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_loss_and_gradient_equal_a_hand_computation(tok, temperature):
    cfg, model = tiny(tok, seed=3)
    model = model.double()
    g = torch.Generator().manual_seed(0)
    # two prompts, three completions each, of different lengths; right-padded into one batch
    rows, starts = [], []
    for p in range(2):
        prompt = torch.randint(4, cfg.vocab_size, (3 + p,), generator=g).tolist()
        for k in range(3):
            rows.append(prompt + torch.randint(4, cfg.vocab_size, (2 + k + p,), generator=g).tolist())
            starts.append(len(prompt))
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 2.0]])
    adv = group_advantages(rewards, "grpo").view(-1).double()
    # log π_old and log π_ref as shifts from log π: some ratios land outside [0.8, 1.2] on both sides
    width = max(len(r) for r in rows) - 1
    old_shift = (torch.rand(6, width, generator=g, dtype=torch.float64) - 0.5) * 0.8
    ref_shift = (torch.rand(6, width, generator=g, dtype=torch.float64) - 0.5) * 2.0
    inputs = torch.zeros(6, width, dtype=torch.long)
    targets = torch.full((6, width), IGNORE)
    for i, (r, s) in enumerate(zip(rows, starts, strict=True)):
        inputs[i, :len(r) - 1] = torch.tensor(r[:-1])
        targets[i, s - 1:len(r) - 1] = torch.tensor(r[s:])
    with torch.no_grad():
        lp = token_logps(model(inputs), targets, temperature).double()
    obj = PolicyGradient(clip=0.2, kl=0.3, temperature=temperature)
    batch = RLBatch(inputs, targets, advantages=adv, old_logps=lp + old_shift, ref_logps=lp + ref_shift,
                    stats={"reward": 0.25}, window_units=int((targets != IGNORE).sum()))
    out = obj.loss(model, batch)
    out.loss_sum.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want, n, kl_sum, clipped = _hand_loss(model, rows, starts, adv, old_shift, ref_shift, 0.2, 0.3, temperature)
    want.backward()
    assert out.n_tokens == n == obj.units(batch)
    assert 0 < clipped < n  # the test exercises both branches
    assert out.loss_sum.item() == pytest.approx(want.item(), rel=1e-9)
    assert out.metrics["kl"].item() == pytest.approx(kl_sum, rel=1e-9)
    assert out.metrics["kl_k1"].item() == pytest.approx(-float(ref_shift[targets != IGNORE].sum()), rel=1e-9)
    assert out.metrics["clip_frac"].item() == clipped
    assert out.metrics["reward"].item() == pytest.approx(0.25 * n)  # the loop divides by the window's tokens
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-8, atol=1e-12, msg=name)
    # on-policy (no stored old log-probs): the ratio is 1, nothing clips, the gradient is the policy gradient
    on = obj.loss(model, RLBatch(inputs, targets, advantages=adv, ref_logps=lp))
    assert on.metrics["clip_frac"].item() == 0 and on.metrics["kl"].item() == pytest.approx(0, abs=1e-12)
    assert on.loss_sum.item() == pytest.approx(-float((adv[:, None] * (targets != IGNORE)).sum()), rel=1e-9)


# --------------------------------------------------------------------------------------------- rewards
def test_verifiable_rewards_and_sums(tmp_path):
    assert normalize("  The  Answer:\n7. ") == "the answer: 7"
    ex = [{"messages": [], "answer": "7"}, {"messages": [], "answer": 7}, {"messages": [], "answer": "Paris"}]
    assert exact_reward(ex, ["7.", " 7 ", "paris!"]) == [1.0, 1.0, 1.0]
    assert exact_reward(ex, ["it is 7", "17", "Paris, France"]) == [0.0, 0.0, 0.0]
    assert contains_reward(ex, ["It is 7.", "17 or 71", "I think PARIS"]) == [1.0, 0.0, 1.0]
    nums = [{"messages": [], "answer": a} for a in ("7", 7, "1,250", "-0.5")]
    assert build_reward(["number"])(nums, ["3 + 4 = 7.", "it is 7, not 8", "1,250 apples", "x = -0.50"]) == \
        [1.0, 0.0, 1.0, 1.0]
    assert build_reward(["number"])(nums[:2], ["no number", "17"]) == [0.0, 0.0]
    with pytest.raises(CairnError, match="not a number"):
        build_reward(["number"])([{"messages": [], "answer": "Paris"}], ["7"])
    f = tmp_path / "my_reward.py"
    f.write_text("def score(prompt, completion, answer, **rest):\n    return len(completion) + (prompt == 'q')\n")
    r = build_reward(["exact", f"0.5*python:{f}:score", "-2*contains"])
    assert r.needs == ("answer",)
    got = r([{"messages": [], "prompt": "q", "answer": "7"}], ["7"])
    assert got == [1.0 + 0.5 * 2 - 2.0]
    assert r.last == {"reward_exact": 1.0, "reward_python": 2.0, "reward_contains": 1.0}
    # MODULE:FN
    assert build_reward(["tests.train.test_rl:e_share"])([{"messages": []}], ["ee"]) == [1.0]


def test_reward_model_spec(tmp_path, tok):
    from cairn.train.preference import RewardModel, load_reward_model, save_reward_model

    cfg, model = tiny(tok, seed=1)
    rm = RewardModel(model, tokenizer=tok, seed=2)
    save_reward_model(tmp_path / "rm", rm, cfg, tok)
    msgs = [{"role": "user", "content": "Say red."}]
    r = build_reward([f"rm:{tmp_path / 'rm'}"])([{"messages": msgs}], ["red"])
    assert r == [pytest.approx(load_reward_model(tmp_path / "rm").score(msgs, "red"))]
    assert build_reward([str(tmp_path / "rm")])([{"messages": msgs}], ["red"]) == r  # a bare directory too


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "not a reward source"),
    ("python:nowhere.py:fn", "no such file"),
    ("no_such_module_xyz:fn", "cannot import module"),
    ("tests.train.test_rl:missing", "has no function 'missing'"),
    ("rm:/nonexistent/dir", "not a reward model"),
])
def test_bad_reward_specs(spec, message):
    with pytest.raises(CairnError, match=message):
        build_reward([spec])


def test_a_reward_that_returns_no_number(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def fn(prompt, completion, **k):\n    return 'good'\n")
    with pytest.raises(CairnError, match="finite number"):
        build_reward([f"python:{f}:fn"])([{"messages": []}], ["x"])


def test_constitution_glue(monkeypatch, tok):
    from cairn.train import cai

    seen = {}

    def fake(judge, constitution, human, lam):
        seen.update(judge=judge, constitution=constitution, human=human, lam=lam)
        return lambda prompts, completions: [-lam * len(c) + (p[-1]["content"] == "Say red.")
                                             for p, c in zip(prompts, completions, strict=True)]

    monkeypatch.setattr(cai, "constitution_reward", fake, raising=False)
    r = build_reward(["exact", "constitution"], lambda: "JUDGE", "CONST", 0.5)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "Say red."}]
    assert r([{"messages": msgs, "answer": "red"}], ["red"]) == [1.0 + (-0.5 * 3 + 1)]
    assert seen == {"judge": "JUDGE", "constitution": "CONST", "human": None, "lam": 0.5}


# ------------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "answer": "1"}', "not json"], ":2: not valid JSON"),
    (['["a"]'], ":1: not a JSON object"),
    (['{"answer": "1"}'], ':1: has neither of "prompt" and "messages"'),
    (['{"prompt": "a", "messages": [{"role": "user", "content": "a"}], "answer": "1"}'], "has both"),
    (['{"prompt": "", "answer": "1"}'], '"prompt" is empty'),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "answer": "1"}'],
     "must end with the user turn"),
    (['{"prompt": "a"}'], ":1: missing 'answer', which the reward reads"),
    (['{"prompt": "a", "answer": [1]}'], '"answer" must be a string or a number'),
])
def test_bad_prompt_files(tmp_path, lines, message):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(CairnError, match=message):
        read_prompts(f, needs=("answer",))


def test_prompts_read_and_rendered(tmp_path, tok):
    p = parse_prompt({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                      "answer": 3, "level": "easy"}, "x:1", ("answer",))
    assert p.as_example() == {"messages": p.messages, "answer": 3, "level": "easy"}
    kept, ids, dropped = encode_prompts(tok, [p, parse_prompt({"prompt": "red " * 50}, "x:2")], 40)
    assert kept == [p] and dropped == 1 and list(ids[0]) == tok.encode_chat(p.messages)
    with pytest.raises(CairnError, match="no such prompt file"):
        read_prompts(tmp_path / "missing.jsonl")


# -------------------------------------------------------------------------------- learning a toy task
def _toy_run(tok, out: Path, kl: float, steps: int = 40) -> list[dict]:
    cfg, model = tiny(tok, seed=0)
    examples = read_prompts(prompts_file(out.parent / "p.jsonl"))
    examples, ids, _ = encode_prompts(tok, examples, 40)
    reward = build_reward(["tests.train.test_rl:e_share"])
    sampler = PolicySampler(model, tok, cfg, 32, 64)
    tc = TrainConfig(out=str(out), steps=steps, seq_len=64, batch_size=4, lr=1e-2, warmup=2, dtype="fp32",
                     compile="off", val_every=0, ckpt_every=0, progress=False)
    try:
        reference = build_model(cfg).init_weights(seed=0).eval().requires_grad_(False)
        src = Rollouts(examples, ids, sampler, reward, group_size=8, batch_size=4, seed=0, max_new_tokens=8,
                       pad_id=tok.eos_id)
        trainer = Trainer(tc, model, cfg, PolicyGradient(clip=0.2, kl=kl), src, log=lambda *a, **k: None)
        src.bind(trainer.model, reference, trainer.device, trainer.compute_dtype)
        trainer.run()
    finally:
        sampler.close()
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    return recs


def test_rl_raises_the_reward_and_keeps_close_to_the_reference(tok, tmp_path):
    """A random tiny model learns to say words full of e's (reward: the share of e among the completion's
    characters), sampling through the engine; with the KL penalty the k3 KL to the initial model stays bounded,
    without it the policy drifts several times further."""
    torch.set_num_threads(1)
    recs = _toy_run(tok, tmp_path / "kl", kl=0.3)
    first = sum(r["reward"] for r in recs[:5]) / 5
    last = sum(r["reward"] for r in recs[-5:]) / 5
    assert first < 0.12 and last > 3 * first and last > first + 0.15, (first, last)  # measured: 0.09 -> 0.34
    assert max(r["kl"] for r in recs) < 1.2  # measured: at most ~0.8, flat over the last 15 steps
    assert all(r["clip_frac"] == 0 for r in recs)  # one PPO epoch: on-policy
    assert all(0 < r["length"] <= 8 and r["sample_tok_per_s"] > 0 for r in recs)
    free = _toy_run(tok, tmp_path / "free", kl=0.0)
    assert sum(r["reward"] for r in free[-5:]) / 5 > last  # unpenalised, it chases the reward further ...
    assert free[-1]["kl"] > 2.5 * recs[-1]["kl"]  # ... and drifts from the reference (measured: 3.2 vs 0.76)


# --------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    from cairn.weights.native import save_checkpoint

    cfg, model = tiny(tok, seed=0)
    return save_checkpoint(tmp_path_factory.mktemp("rlmodel") / "tiny", model, cfg, tok)


def _cmd(model_dir, data, out, *extra):
    return ["train", "rl", str(model_dir), "--data", str(data), "--reward", "tests.train.test_rl:e_share",
            "--reward", "0.5*contains", "--out", str(out), "--group-size", "4", "--batch-size", "2",
            "--max-new-tokens", "6", "--seq-len", "48", "--lr", "3e-3", "--warmup", "1", "--dtype", "fp32",
            "--no-progress", "--threads", "1", *extra]


def test_command_resumes_bit_exactly(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from cairn.cli import main

    data = prompts_file(tmp_path / "p.jsonl")
    a = tmp_path / "a"
    flags = ["--steps", "4", "--ckpt-every", "1", "--keep", "10", "--val-fraction", "0.25", "--val-every", "2",
             "--ppo-epochs", "2", "--grad-accum", "2"]
    assert main(_cmd(model_dir, data, a, *flags)) == 0
    assert "held-out reward before training" in capsys.readouterr().out
    # resume a copy from its step-1 checkpoint, taken in the middle of a rollout's two epochs
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for step in (2, 3, 4):
        shutil.rmtree(b / "checkpoints" / f"step-{step:08d}")
    assert main(_cmd(model_dir, data, b, *flags, "--resume")) == 0
    assert "resumed from" in capsys.readouterr().out

    keys = ("step", "loss", "grad_norm", "reward", "reward_std", "kl", "clip_frac", "ratio", "length",
            "reward_python", "reward_contains", "val_loss", "val_reward")

    def trajectory(out):
        return [tuple(r.get(k) for k in keys) for r in read_metrics(out / "metrics.jsonl")]

    want = trajectory(a)
    assert [t[0] for t in want] == [1, 2, 3, 4] and want[1][-1] is not None
    # each rollout's first step is on-policy (ratio 1), its second, after an update, is not
    assert abs(want[0][7] - 1) < 1e-6 and abs(want[1][7] - 1) > 1e-6
    assert trajectory(b) == want  # exact float equality, step by step
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # the objective's settings are fixed on resume
    assert main(_cmd(model_dir, data, b, *flags, "--resume", "--kl", "0.5")) == 2
    assert "kl" in capsys.readouterr().err


def test_command_with_lora_writes_an_adapter(model_dir, tmp_path, capsys):
    from cairn.cli import main
    from cairn.train.lora import is_adapter_dir

    out = tmp_path / "lora"
    assert main(_cmd(model_dir, prompts_file(tmp_path / "p.jsonl"), out, "--steps", "2", "--lora",
                     "--baseline", "rloo")) == 0
    assert "LoRA adapter" in capsys.readouterr().out and is_adapter_dir(out)
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2] and all(math.isfinite(r["loss"]) for r in recs)


@pytest.mark.parametrize("extra, message", [
    (["--judge", "x"], "--judge given without --reward constitution"),
    (["--max-new-tokens", "48"], "leaves no room for the prompt"),
    (["--clip", "1.5"], "--clip 1.5"),
    (["--kl", "-1"], "--kl -1"),
    (["--baseline", "rloo", "--group-size", "1"], "at least 2"),
    (["--parallel", "ddp"], "runs in one process"),
])
def test_command_refuses_bad_flags(model_dir, tmp_path, capsys, extra, message):
    from cairn.cli import main

    data = prompts_file(tmp_path / "p.jsonl")
    assert main(_cmd(model_dir, data, tmp_path / "o", "--steps", "1", *extra)) == 2
    assert message in capsys.readouterr().err


def test_command_with_the_constitution_reward(model_dir, tmp_path, monkeypatch, capsys):
    from cairn.cli import main
    from cairn.train import cai
    from cairn.weights import LoadedModel

    seen = {}

    def fake(judge, constitution, human, lam):
        seen.update(judge=judge, constitution=constitution, human=human, lam=lam)
        return lambda prompts, completions: [-lam * c.count("e") for c in completions]

    monkeypatch.setattr(cai, "constitution_reward", fake, raising=False)
    out = tmp_path / "cai"
    args = ["train", "rl", str(model_dir), "--data", str(prompts_file(tmp_path / "p.jsonl")), "--reward",
            "constitution", "--reward", "exact", "--judge", str(model_dir), "--lambda", "0.5", "--out", str(out),
            "--group-size", "2", "--batch-size", "2", "--max-new-tokens", "6", "--seq-len", "48", "--steps", "1",
            "--dtype", "fp32", "--no-progress"]
    assert main(args) == 0
    assert isinstance(seen["judge"], LoadedModel) and isinstance(seen["constitution"], cai.Constitution)
    assert seen["human"] is None and seen["lam"] == 0.5
    rec = read_metrics(out / "metrics.jsonl")[0]
    assert rec["reward_constitution"] <= 0 and rec["reward"] == pytest.approx(rec["reward_constitution"]
                                                                               + rec["reward_exact"])
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "x"), "--lambda", "-1"]) == 2
    assert "--lambda -1" in capsys.readouterr().err
