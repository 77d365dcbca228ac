"""``cairn eval ppl``, ``eval niah`` and ``eval latency`` (and ``Engine.score`` under them).

Perplexity is checked against HF transformers' logits on the same tiny model, tokenised by the HF ``tokenizers``
library straight from the saved ``tokenizer.json``, with the strided windows written out by hand; the NIAH scorer
against a fake reader with a known blind spot and against the default model, which copies a pass key; the latency
fits against curves whose ratios are known.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import tokenizers
import torch
import transformers

from cairn.cli import main
from cairn.engine import Engine
from cairn.errors import CairnError
from cairn.eval import latency as lat
from cairn.eval import niah, ppl
from cairn.weights import load_model

WORDS = "the cat dog sat ran on a mat log good bad happy sad day night é ü".split()
PNG = b"\x89PNG\r\n\x1a\n"


def save_tiny_llama(d, seed: int):
    """A tiny random HF Llama with a byte-level BPE tokenizer trained here (it adds BOS), saved as the HF directory
    ``d/model``; returns it, the model and the seeded word generator (for texts)."""
    from cairn.data.tokenizer_train import train_tokenizer

    rng = random.Random(seed)
    (d / "corpus.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(300)))
    tok = train_tokenizer([d / "corpus.txt"], 300, d / "tok", progress=False)
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(
        model_type="llama", vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-6)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # sharper than HF's init, so the perplexity is far from uniform's
            p.mul_(4)
    out = d / "model"
    model.save_pretrained(out)
    tok.save_hf(out)
    return out, model, rng


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random HF Llama with a trained byte-level BPE tokenizer, saved as an HF directory."""
    d = tmp_path_factory.mktemp("tiny_lc")
    out, model, rng = save_tiny_llama(d, 0)
    text = " ".join(rng.choice(WORDS) for _ in range(70)) + "\n"
    (d / "text.txt").write_text(text)
    (d / "text2.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(15)))
    return out, model, d


def _gpt2_bytes(piece: str) -> bytes:
    """The bytes a byte-level BPE token stands for (GPT-2's table: printable bytes as themselves, others at 256+)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    return bytes(table[ch] for ch in piece)


def _hf_reference(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """Σ −log p and the count over the strided windows, by hand: window k feeds ids[k·stride : k·stride + context]
    and scores the tokens after the last one an earlier window scored."""
    nll, scored, last = 0.0, 0, 0  # last: highest index scored so far (token 0 is never scored)
    for begin in range(0, len(ids), stride):
        chunk = ids[begin:begin + context]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), -1)
        for j in range(1, len(chunk)):
            if begin + j > last:
                nll -= float(lp[j - 1, chunk[j]])
                scored += 1
        last = max(last, begin + len(chunk) - 1)
        if begin + context >= len(ids):
            break
    return nll, scored


@pytest.mark.parametrize("context,stride", [(32, 8), (32, 32), (256, 256)])
def test_ppl_equals_hf_by_hand(tiny_dir, tmp_path, capsys, context, stride):
    path, model, d = tiny_dir
    text = (d / "text.txt").read_text()
    hf_tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    enc = hf_tok.encode(text, add_special_tokens=False)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"]  # the model's tokenizer starts every text with BOS, which is never scored
    ids = [hf_tok.token_to_id(tok_cfg["bos_token"])] + enc.ids
    assert len(ids) > 2 * context or context == 256
    out = tmp_path / "ppl"
    assert main(["eval", "ppl", str(path), "--data", str(d / "text.txt"), "--context", str(context), "--stride",
                 str(stride), "--quantize", "none", "--json", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    nll, n = _hf_reference(model, ids, context, stride)
    assert n == report["tokens"] == len(ids) - 1 - (len(ids) - 1) // context * (stride == context)
    assert report["nll"] == pytest.approx(nll / n, abs=1e-5)
    assert report["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    # bits per byte: the scored tokens stand for the whole text (BOS, unscored, stands for no bytes) but the first
    # token of each later window when the windows are disjoint
    skipped = [ids[i] for i in range(context, len(ids), context)] if stride == context else []
    n_bytes = len(text.encode("utf-8")) - sum(len(_gpt2_bytes(hf_tok.id_to_token(t))) for t in skipped)
    assert report["bytes"] == n_bytes
    assert report["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    saved = json.loads((out / "ppl.json").read_text())
    assert saved["ppl"] == pytest.approx(report["ppl"]) and saved["files"][0]["windows"]
    assert (out / "ppl.png").read_bytes()[:8] == PNG


def test_ppl_files_are_scored_alone_and_summed(tiny_dir, tmp_path, capsys):
    path, model, d = tiny_dir
    argv = ["eval", "ppl", str(path), "--context", "32", "--quantize", "none", "--json", "--out", str(tmp_path)]
    totals = []
    for f in ("text.txt", "text2.txt"):
        assert main([*argv, "--data", str(d / f)]) == 0
        totals.append(json.loads(capsys.readouterr().out))
    assert main([*argv, "--data", str(d / "text.txt"), str(d / "text2.txt")]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["tokens"] == sum(t["tokens"] for t in totals)
    assert both["nll"] * both["tokens"] == pytest.approx(sum(t["nll"] * t["tokens"] for t in totals), rel=1e-6)


def test_windows_cover_every_token_once():
    for n, context, stride in [(10, 4, 2), (100, 16, 5), (7, 16, 8), (33, 8, 7), (2, 2, 1)]:
        wins = ppl.windows(n, context, stride)
        scored = [t for _, end, first in wins for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - begin <= context and begin <= first - 1 for begin, end, first in wins)
    disjoint = ppl.windows(33, 8, 8)  # each window's first token is context only
    assert [t for _, end, first in disjoint for t in range(first, end)] == [t for t in range(1, 33) if t % 8]
    with pytest.raises(CairnError, match="--stride"):
        ppl.windows(10, 4, 5)


def test_engine_score_is_the_models_log_softmax():
    from tests.engine.conftest import tiny

    lm = tiny(seed=3)
    ids = [random.Random(1).randrange(101) for _ in range(40)]
    with Engine(lm, quantize="none") as engine:
        got = engine.score(ids)
        with pytest.raises(CairnError, match="at least two"):
            engine.score(ids[:1])
        with pytest.raises(CairnError, match="context"):
            engine.score(ids * 20)
    with torch.no_grad():
        want = torch.log_softmax(lm.model(torch.tensor([ids]))[0, :-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
    assert torch.allclose(torch.tensor(got), want[:, 0], atol=1e-4)


def test_ppl_errors_exit_2(tiny_dir, tmp_path, capsys):
    path, _, d = tiny_dir
    base = ["eval", "ppl", str(path), "--out", str(tmp_path)]
    assert main([*base, "--data", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([*base, "--data", str(d / "text.txt"), "--context", "100000"]) == 2
    assert "--rope-scaling" in capsys.readouterr().err
    assert main([*base, "--data", str(d / "text.txt"), "--context", "16", "--stride", "17"]) == 2
    assert "--stride" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- niah
def test_found_needs_the_whole_key():
    assert niah.found(" 71234.", "71234") and niah.found("it is 71234", "71234")
    assert not niah.found("712345", "71234") and not niah.found("171234", "71234") and not niah.found("7123", "71234")


def test_prompts_hold_the_needle_at_its_depth():
    tok = load_model(None).tokenizer
    hay = niah.Haystack(tok)
    for length in (300, 1000):
        for depth in (0.0, 0.5, 1.0):
            ids, at = hay.build(length, depth, "48213")
            text = tok.decode(ids)
            assert abs(len(ids) - length) <= 30  # a sentence either way
            assert text.count("48213") == 2 and text.endswith(niah.QUESTION)
            body = len(ids) - len(tok.encode(niah.INTRO)) - len(tok.encode(niah.QUESTION))
            assert abs((at - len(tok.encode(niah.INTRO))) / body - depth) < 0.1


def test_recall_grid_of_a_reader_with_a_blind_spot():
    """A fake reader that finds the key only in the last half of the prompt: recall 0 at shallow depths, 1 deep."""
    tok = load_model(None).tokenizer
    cells = niah.make_cells(niah.Haystack(tok), [400, 800], [0.0, 0.25, 0.75, 1.0], trials=2, seed=3)

    def reader(ids):
        half = tok.decode(ids[len(ids) // 2:])
        keys = [c.key for c in cells if c.key in half]
        return f" {keys[0]}." if keys else " I do not know."

    report = niah.evaluate(cells, reader)
    assert report["lengths"] == [400, 800] and report["depths"] == [0.0, 0.25, 0.75, 1.0]
    assert report["recall"] == [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert report["mean_recall"] == 0.5 and len(report["cells"]) == 16


def test_niah_default_model_copies_the_key_and_a_window_forgets_it(tmp_path, capsys):
    out = tmp_path / "niah"
    assert main(["eval", "niah", "--lengths", "256,512", "--depths", "0,1", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recall"] == [[1.0, 1.0], [1.0, 1.0]], report["cells"]
    assert (out / "niah.png").read_bytes()[:8] == PNG and json.loads((out / "niah.json").read_text())["cells"]
    # a 128-token window with 4 sinks cannot see a needle 450 tokens back, and still sees one next to the question
    assert main(["eval", "niah", "--lengths", "512", "--depths", "0,1", "--window", "128", "--sinks", "4",
                 "--out", str(out), "--json"]) == 0
    windowed = json.loads(capsys.readouterr().out)
    assert windowed["recall"] == [[0.0], [1.0]], windowed["cells"]
    assert windowed["setup"] == "window 128 + 4 sinks"


def test_niah_past_the_context_needs_scaling_or_a_window(tiny_dir, tmp_path, capsys):
    path, _, _ = tiny_dir
    assert main(["eval", "niah", str(path), "--lengths", "400", "--out", str(tmp_path)]) == 2
    assert "--rope-scaling" in capsys.readouterr().err
    assert main(["eval", "niah", str(path), "--lengths", "400", "--depths", "0.5", "--rope-scaling", "yarn",
                 "--rope-factor", "2", "--out", str(tmp_path), "--json", "--haystack",
                 str(path.parent / "corpus.txt")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["context"] == 512 and report["native_context"] == 256 and report["setup"].startswith("RoPE yarn")
    # a length equal to the context fills it, leaving room for the answer
    assert main(["eval", "niah", str(path), "--lengths", "1024", "--depths", "1", "--rope-scaling", "linear",
                 "--rope-factor", "4", "--out", str(tmp_path), "--json", "--haystack",
                 str(path.parent / "corpus.txt")]) == 0
    cell = json.loads(capsys.readouterr().out)["cells"][0]
    assert 900 < cell["tokens"] <= 1024 - 8
    assert main(["eval", "niah", str(path), "--depths", "2", "--out", str(tmp_path)]) == 2
    assert "--depths" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ latency
def test_claim_reads_the_fitted_curves():
    rows = [{"length": n, "prefill_s": 0.5 + 1e-4 * n + 2e-9 * n * n, "decode_ms": 5 + 1e-3 * n}
            for n in (1024, 2048, 4096, 8192)]
    c = lat.claim(rows)
    pre = lambda n: 0.5 + 1e-4 * n + 2e-9 * n * n  # noqa: E731
    assert c["prefill_ratio"] == pytest.approx(pre(100_000) / pre(9_000), rel=1e-6)
    assert c["decode_ratio"] == pytest.approx((5 + 100) / (5 + 9), rel=1e-6)
    assert c["extrapolated"] and c["measured_up_to"] == 8192 and c["quadratic_ratio"] == pytest.approx(123.46, 1e-3)
    flat = lat.claim([{"length": n, "prefill_s": 1e-4 * n, "decode_ms": 7.0} for n in (1000, 50_000, 120_000)])
    assert flat["decode_ratio"] == pytest.approx(1.0) and flat["prefill_ratio"] == pytest.approx(100 / 9)
    assert not flat["extrapolated"]
    assert min(lat._fit([1, 2, 3], [3.0, 2.0, 1.0], 1)) >= 0  # a falling cost is not fitted with a negative slope
    # the CPU clock fits the CPU columns
    cpu = lat.claim([{**r, "prefill_cpu_s": 2 * r["prefill_s"], "decode_cpu_ms": 3.0} for r in rows], "cpu")
    assert cpu["clock"] == "cpu" and cpu["decode_ratio"] == pytest.approx(1.0)
    assert cpu["prefill_ratio"] == pytest.approx(c["prefill_ratio"], rel=1e-6)


def test_lengths_fill_the_context_less_the_decoded_tokens():
    assert lat.fit_lengths([1024, 8192], 8192, 32) == {1024: 1024, 8192: 8160}
    assert lat.fit_lengths([1024, 16384], 8192, 32) == {1024: 1024}  # past the context: left out
    assert lat.fit_lengths([8192], 8192, 8192) == {}


def test_latency_command_with_and_without_a_window(tiny_dir, tmp_path, capsys):
    path, _, _ = tiny_dir
    out = tmp_path / "lat"
    assert main(["eval", "latency", str(path), "--lengths", "32,64,96,400", "--decode", "4", "--window", "16",
                 "--sinks", "2", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    full, windowed = report["series"]["full attention"], report["series"]["window 16 + 2 sinks"]
    assert [r["length"] for r in full] == [32, 64, 96]  # 400 is past the 256-token context: left out, and said
    assert "left out: 400" in captured.err
    assert [r["length"] for r in windowed] == [32, 64, 96, 400]
    assert all(r["prefill_s"] > 0 and r["decode_ms"] > 0 for r in full + windowed)
    assert all(r["prefill_cpu_s"] > 0 and r["decode_cpu_ms"] > 0 for r in full + windowed)
    assert set(report["claim"]) == set(report["claim_cpu"]) == {"full attention", "window 16 + 2 sinks"}
    assert report["claim"]["full attention"]["extrapolated"]
    assert (out / "latency.png").read_bytes()[:8] == PNG
    assert main(["eval", "latency", str(path), "--lengths", "1000", "--out", str(out)]) == 2
    assert "--window" in capsys.readouterr().err
    # a length equal to the 256-token context runs, filling it less the decoded tokens (a request to the engine of
    # exactly its context would end early with context_full)
    assert main(["eval", "latency", str(path), "--lengths", "64,128,256", "--decode", "4", "--out", str(out),
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert [r["length"] for r in json.loads(captured.out)["series"]["full attention"]] == [64, 128, 252]
    assert "256 tokens run as 252" in captured.err


def test_ppl_through_decode_steps_equals_the_prompt_path_in_fp32(tiny_dir, tmp_path, capsys):
    path, _, d = tiny_dir
    argv = ["eval", "ppl", str(path), "--data", str(d / "text.txt"), "--context", "32", "--stride", "16", "--json",
            "--out", str(tmp_path)]
    runs = {}
    for extra in ([], ["--decode-steps"], ["--decode-steps", "--quantize", "int8"]):
        assert main([*argv, "--quantize", "none", *extra] if "--quantize" not in extra else [*argv, *extra]) == 0
        runs[" ".join(extra)] = json.loads(capsys.readouterr().out)
    prompt, steps, int8 = runs[""], runs["--decode-steps"], runs["--decode-steps --quantize int8"]
    assert steps["scored_as"] == "decode steps" and prompt["scored_as"] == "prompt"
    assert steps["nll"] == pytest.approx(prompt["nll"], abs=1e-5)
    assert int8["weights"] == "int8" and 0 < abs(int8["nll"] - prompt["nll"]) < 0.05  # rounded weights, close
