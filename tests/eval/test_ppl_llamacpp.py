"""``cairn eval ppl --method llama-cpp``: llama.cpp's ``llama-perplexity`` rules, checked by hand.

The rules, from llama.cpp's tools/perplexity/perplexity.cpp (``perplexity()``) and common/arg.cpp (``-f``): the
file's bytes less one trailing newline are tokenised with BOS first when the model adds one; ``n_chunk = tokens //
n_ctx`` disjoint chunks (the remainder dropped; at least ``2 · n_ctx`` tokens or it refuses); each chunk's first token
is replaced by BOS when the model adds one; only the tokens at chunk positions ``n_ctx // 2 + 1 … n_ctx − 1`` are
counted; ``ppl = exp(Σ nll / count)``, "±" ``= ppl · sqrt((mean(nll²) − mean(nll)²) / (count − 1))``. Here they are
written out again over HF transformers' logits of a tiny Llama, tokenised by HF ``tokenizers`` straight from its
``tokenizer.json``.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import tokenizers
import torch

from cairn.cli import main
from cairn.errors import CairnError
from cairn.eval import ppl
from tests.eval.test_long_context import WORDS, save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random HF Llama whose tokenizer adds BOS, saved as an HF directory, and a text of ~100 tokens."""
    d = tmp_path_factory.mktemp("tiny_llamacpp_ppl")
    out, model, rng = save_tiny_llama(d, 1)
    (d / "text.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(80)) + "\n")
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


def _by_hand(model, ids: list[int], bos: int | None, n_ctx: int, n_chunks: int | None) -> tuple[float, float, int,
                                                                                                   list[int]]:
    """Σ nll, Σ nll² and the count over llama-perplexity's chunks, and the counted token ids."""
    n_chunk = len(ids) // n_ctx if n_chunks is None else min(n_chunks, len(ids) // n_ctx)
    first = n_ctx // 2
    nll = nll2 = 0.0
    count, counted = 0, []
    for i in range(n_chunk):
        chunk = ids[i * n_ctx:(i + 1) * n_ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), -1)
        for j in range(first, n_ctx - 1):  # the logits at position j predict the token at j + 1
            v = -float(lp[j, chunk[j + 1]])
            nll, nll2, count = nll + v, nll2 + v * v, count + 1
            counted.append(chunk[j + 1])
    return nll, nll2, count, counted


@pytest.mark.parametrize("n_ctx,n_chunks", [(16, None), (17, None), (32, None), (16, 2)])
def test_llama_cpp_method_equals_its_rules_by_hand(tiny, tmp_path, capsys, n_ctx, n_chunks):
    path, model, d = tiny
    hf_tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"]  # so each chunk's first token is replaced by BOS
    bos = hf_tok.token_to_id(tok_cfg["bos_token"])
    text = (d / "text.txt").read_bytes().decode()
    assert text.endswith("\n")  # llama-perplexity's -f drops it
    ids = [bos] + hf_tok.encode(text[:-1], add_special_tokens=False).ids
    assert len(ids) % n_ctx and len(ids) // n_ctx >= 3  # a remainder to drop, and chunks after the first
    argv = ["eval", "ppl", str(path), "--data", str(d / "text.txt"), "--method", "llama-cpp", "--context", str(n_ctx),
            "--quantize", "none", "--json", "--out", str(tmp_path)]
    assert main(argv + (["--chunks", str(n_chunks)] if n_chunks else [])) == 0
    report = json.loads(capsys.readouterr().out)
    nll, nll2, count, counted = _by_hand(model, ids, bos, n_ctx, n_chunks)
    assert count == report["tokens"] == (n_chunks or len(ids) // n_ctx) * (n_ctx - 1 - n_ctx // 2)
    assert report["windows"] == (n_chunks or len(ids) // n_ctx)
    assert report["method"] == "llama-cpp" and report["first"] == n_ctx // 2 and report["stride"] is None
    assert report["nll"] == pytest.approx(nll / count, abs=1e-5)
    assert report["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    mean = nll / count
    assert report["ppl_stderr"] == pytest.approx(math.exp(mean) * math.sqrt((nll2 / count - mean ** 2) / (count - 1)),
                                                 rel=1e-4)
    n_bytes = sum(len(_gpt2_bytes(hf_tok.id_to_token(t))) for t in counted)
    assert report["bytes"] == n_bytes


def test_llama_cpp_differs_from_strided_disjoint_windows(tiny, tmp_path, capsys):
    """The same disjoint windows counted two ways: all but the first token (strided) vs the second half (llama-cpp)."""
    path, _, d = tiny
    base = ["eval", "ppl", str(path), "--data", str(d / "text.txt"), "--context", "16", "--quantize", "none", "--json",
            "--out", str(tmp_path)]
    assert main([*base, "--method", "llama-cpp"]) == 0
    llama = json.loads(capsys.readouterr().out)
    assert main([*base, "--stride", "16"]) == 0
    strided = json.loads(capsys.readouterr().out)
    assert llama["tokens"] < strided["tokens"] and llama["nll"] != pytest.approx(strided["nll"], abs=1e-3)


def test_files_are_read_as_llama_perplexity_reads_them(tmp_path):
    (tmp_path / "crlf.txt").write_bytes("one\r\ntwo é\r\n\n".encode())
    assert ppl.read_texts([str(tmp_path / "crlf.txt")], as_llama_cpp=True)[0][1] == "one\r\ntwo é\r\n"
    assert ppl.read_texts([str(tmp_path / "crlf.txt")])[0][1] == "one\ntwo é\n\n"  # the strided method's reading


def test_chunks_follow_llama_perplexity():
    assert ppl.llama_cpp_chunks(100, 16) == [(16 * k, 16 * k + 16, 16 * k + 9) for k in range(6)]
    assert ppl.llama_cpp_chunks(100, 17) == [(17 * k, 17 * k + 17, 17 * k + 9) for k in range(5)]
    assert ppl.llama_cpp_chunks(100, 16, chunks=2) == [(0, 16, 9), (16, 32, 25)]
    assert len(ppl.llama_cpp_chunks(100, 16, chunks=50)) == 6
    assert ppl.llama_cpp_chunks(32, 16) == [(0, 16, 9), (16, 32, 25)]  # exactly 2 x n_ctx is enough
    with pytest.raises(CairnError, match="2 x --context"):
        ppl.llama_cpp_chunks(31, 16)
    with pytest.raises(CairnError, match="at least 3"):
        ppl.llama_cpp_chunks(100, 2)
    with pytest.raises(CairnError, match="--chunks"):
        ppl.llama_cpp_chunks(100, 16, chunks=0)


@pytest.mark.parametrize("bos", [None, 7])
def test_each_chunk_starts_with_bos_only_when_the_model_adds_it(bos):
    """What goes in: the chunk as it is (no BOS, as for SmolLM2's GGUF), or its first token replaced by BOS."""
    ids = list(range(100, 140))
    seen = []

    def score(window, decode_from):
        seen.append((window, decode_from))
        return [-1.0] * (len(window) - 1)

    report = ppl.perplexity(score, [b"x"] * 200, [("t", ids)], 10, None, method="llama-cpp", bos=bos)
    want = [ids[k * 10:(k + 1) * 10] if bos is None else [bos, *ids[k * 10 + 1:(k + 1) * 10]] for k in range(4)]
    assert [w for w, _ in seen] == want and all(f is None for _, f in seen)
    assert report["tokens"] == 4 * 4 and report["bytes"] == 16 and report["nll"] == pytest.approx(1.0)
    assert report["ppl_stderr"] is None  # every nll equal: no spread
    seen.clear()
    ppl.perplexity(score, [b"x"] * 200, [("t", ids)], 10, None, method="llama-cpp", bos=bos, decode=True)
    assert [f for _, f in seen] == [6] * 4  # the counted tokens (positions 6..9) as decode steps


def test_report_as_text_with_a_progress_bar(tiny, tmp_path, capsys):
    path, _, d = tiny
    assert main(["eval", "ppl", str(path), "--data", str(d / "text.txt"), "--method", "llama-cpp", "--context", "16",
                 "--quantize", "none", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "chunk(s) of 16 as llama-perplexity, each counting the tokens after position 8" in out
    assert re.search(r"perplexity [0-9.]+ \+/- [0-9.]+", out) and (tmp_path / "ppl.png").is_file()


def test_method_errors_exit_2(tiny, tmp_path, capsys):
    path, _, d = tiny
    base = ["eval", "ppl", str(path), "--data", str(d / "text.txt"), "--out", str(tmp_path)]
    assert main([*base, "--method", "llama-cpp", "--stride", "8"]) == 2
    assert "--stride does not apply to --method llama-cpp" in capsys.readouterr().err
    assert main([*base, "--chunks", "2"]) == 2
    assert "--chunks applies only to --method llama-cpp" in capsys.readouterr().err
    assert main([*base, "--method", "llama-cpp", "--context", "128"]) == 2  # ~100 tokens < 2 x 128
    assert "at least 2 x --context = 256" in capsys.readouterr().err
    with pytest.raises(CairnError, match="--stride does not apply"):
        ppl.perplexity(lambda w, f: [0.0] * (len(w) - 1), [b"x"] * 10, [("t", [1] * 40)], 8, 4, method="llama-cpp")
