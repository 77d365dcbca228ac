"""lm-evaluation-harness against a real ``cairn serve``: its ``local-completions`` model, unchanged, scores the shipped
offline task (examples/lm_eval/cairn_mc) with the same per-example log-likelihoods as its own ``hf`` backend on the
same model (a tiny random Llama saved by transformers, with a BPE tokenizer trained here); its
``local-chat-completions`` model gets the replies the engine itself gives to the same chat prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

lm_eval = pytest.importorskip("lm_eval")  # test-only dependency (the dev extra)
transformers = pytest.importorskip("transformers")

TASKS = ROOT / "examples" / "lm_eval"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from cairn.data.tokenizer_train import train_tokenizer

    d = tmp_path_factory.mktemp("lm_eval_tiny")
    rows = [json.loads(x) for x in (TASKS / "cairn_mc" / "cairn_mc.jsonl").read_text().splitlines() if x.strip()]
    words = " ".join(r["question"] + " " + " ".join(r["choices"]) for r in rows).split()
    rng = random.Random(0)
    (d / "text.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)))
    tok = train_tokenizer([d / "text.txt"], 400, d / "tok", progress=False)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                   max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6,
                                   initializer_range=0.2)  # large weights: answers' log-likelihoods far apart
    model = d / "model"
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(model)
    tok.save_hf(model)
    return model


@pytest.fixture(scope="module")
def server(hf_dir):
    from cairn.engine import Engine
    from cairn.serve.app import create_app
    from cairn.weights import load_model
    from tests.serve.conftest import ServerThread

    engine = Engine(load_model(hf_dir), quantize="none")
    with ServerThread(create_app(engine)) as s:
        yield s
    engine.close()


def run(model: str, model_args: dict, task: str, **kw) -> tuple[dict, list[dict]]:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], log_samples=True,
                                  task_manager=TaskManager(include_path=str(TASKS)), **kw)
    return out["results"][task], sorted(out["samples"][task], key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def hf_reference(hf_dir):
    """lm-eval's own hf backend on the model (no BOS: what the remote tokenizer's encode gives as well)."""
    return run("hf", {"pretrained": str(hf_dir), "dtype": "float32", "add_bos_token": False}, "cairn_mc",
               device="cpu", batch_size=8)


@pytest.mark.parametrize("tokenizer", ["huggingface", "remote"])
def test_local_completions_equals_the_hf_backend(server, hf_dir, hf_reference, tokenizer, monkeypatch):
    """``huggingface``: lm-eval tokenizes with the model's tokenizer files; ``remote`` (what it picks by itself when
    the server answers /tokenizer_info): through the server's /tokenize, no tokenizer files on the client."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ref, ref_samples = hf_reference
    args = {"model": "cairn", "base_url": f"{server.url}/v1/completions", "num_concurrent": 1, "max_retries": 1}
    if tokenizer == "huggingface":
        args.update(tokenizer=str(hf_dir), tokenizer_backend="huggingface", add_bos_token=False)
    got, samples = run("local-completions", args, "cairn_mc", batch_size=8)
    assert len(samples) == len(ref_samples) == 24
    spread = []
    for ours, theirs in zip(samples, ref_samples, strict=True):
        assert ours["doc_id"] == theirs["doc_id"] and len(ours["resps"]) == 4
        for (a, a_greedy), (b, b_greedy) in zip((r[0] for r in ours["resps"]), (r[0] for r in theirs["resps"]),
                                                strict=True):
            assert abs(float(a) - float(b)) <= 1e-3, (ours["doc_id"], a, b)
            assert str(a_greedy) == str(b_greedy)
            spread.append(float(b))
    assert max(spread) - min(spread) > 1.0  # the comparison is not between near-equal numbers
    assert got["acc,none"] == ref["acc,none"] and got["acc_norm,none"] == ref["acc_norm,none"]


def test_tokenizer_endpoints(server, hf_dir):
    from cairn.engine import Engine
    from cairn.serve.app import create_app
    from cairn.weights import load_model
    from tests.serve.conftest import ServerThread

    tok = server.state.tokenizer
    text = "What is the capital city of France?"
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode(text, add_bos=False) and r["count"] == len(r["tokens"])
    with_bos = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()["tokens"]
    assert with_bos == tok.encode(text) and with_bos[0] == tok.bos_id  # this tokenizer adds a BOS
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()
    assert chat["tokens"] == tok.encode_chat([{"role": "user", "content": text}])
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert back == text
    for bad in ({"prompt": text, "messages": []}, {"prompt": text, "extra": 1}, {}):
        assert httpx.post(f"{server.url}/tokenize", json=bad).status_code == 400
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]}).status_code == 400
    engine = Engine(load_model(hf_dir), quantize="none")
    try:  # with API keys, the tokenizer routes need one like the API's
        with ServerThread(create_app(engine, api_keys=["sk-test"])) as keyed:
            assert httpx.get(f"{keyed.url}/tokenizer_info").status_code == 401
            ok = httpx.post(f"{keyed.url}/tokenize", json={"prompt": text}, headers={"x-api-key": "sk-test"})
            assert ok.status_code == 200
    finally:
        engine.close()


def test_local_chat_completions_gets_the_engines_replies(server, hf_dir, monkeypatch):
    from cairn.engine import Request, SamplingParams

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, samples = run("local-chat-completions", {"model": "cairn", "base_url": f"{server.url}/v1/chat/completions",
                                                "num_concurrent": 1, "max_retries": 1}, "cairn_mc_gen", limit=3,
                     apply_chat_template=True)
    assert len(samples) == 3
    engine = server.state.engine
    tok = engine.tokenizer
    for s in samples:
        [((prompt,), gen_kwargs)] = s["arguments"]  # the chat history as JSON, as lm-eval sends it
        assert gen_kwargs["max_gen_toks"] == 16
        messages = json.loads(prompt)
        assert messages[-1]["role"] == "user" and "Answer with the letter" in messages[-1]["content"]
        ids = tok.encode_chat(messages)
        want = engine.generate(Request(ids, SamplingParams(max_tokens=16, temperature=0.0)))
        assert s["resps"][0][0] == want.text
