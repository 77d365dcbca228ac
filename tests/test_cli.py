"""The command line, run as a user runs it: a subprocess, its output and exit code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cairn.weights import default_model_path

CAIRN = [sys.executable, "-m", "cairn.cli"]


def run(*args, stdin=None, timeout=300):
    return subprocess.run([*CAIRN, *args], capture_output=True, text=True, input=stdin, timeout=timeout,
                          env=dict(os.environ))


def test_generate_chat_says_paris():
    r = run("generate", "--chat", "-p", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_generate_json_shape():
    r = run("generate", "--chat", "-p", "What is the capital of France?", "--json", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert set(obj) == {"text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason"}
    assert obj["completion_tokens"] == len(obj["token_ids"]) == 4 and obj["finish_reason"] == "length"
    assert obj["prompt_tokens"] == 37


def test_generate_stop_string_and_seeded_sampling():
    r = run("generate", "--chat", "-p", "What is the capital of France?", "--json", "--stop", "France is")
    obj = json.loads(r.stdout)
    assert obj["finish_reason"] == "stop_sequence" and obj["text"] == "The capital of "
    a = run("generate", "-p", "Once upon a time", "--temperature", "0.9", "--seed", "7", "--max-tokens", "12",
            "--json")
    b = run("generate", "-p", "Once upon a time", "--temperature", "0.9", "--seed", "7", "--max-tokens", "12",
            "--json")
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_chat_one_turn_and_multi_turn_from_stdin():
    r = run("chat", "-p", "What is the capital of France?", "--temperature", "0")
    assert r.returncode == 0 and "Paris" in r.stdout
    r = run("chat", "--temperature", "0", "--max-tokens", "24",
            stdin="What is the capital of France?\nAnd of Germany?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Berlin" in r.stdout


def error_of(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")  # progress lines ("converting ...") may come first
    return last


def test_missing_path(tmp_path):
    err = error_of(run("generate", str(tmp_path / "nope.gguf"), "-p", "hi"))
    assert "nope.gguf" in err and "no such file" in err


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_text("this is not a model")
    err = error_of(run("generate", str(bad), "-p", "hi"))
    assert "weights.gguf" in err and "not a GGUF file" in err


def test_truncated_gguf(tmp_path):
    src = default_model_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src[: len(src) // 3])
    err = error_of(run("generate", str(cut), "-p", "hi"))
    assert "cut.gguf" in err and "truncated" in err


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 10}))
    err = error_of(run("generate", str(tmp_path), "-p", "hi"))
    assert "config.json" in err and "unsupported architecture 'mamba'" in err


def test_config_missing_field(tmp_path):
    cfg = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4,
           "intermediate_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    err = error_of(run("generate", str(tmp_path), "-p", "hi"))
    assert "missing field 'num_hidden_layers'" in err and str(tmp_path) in err


def test_unsupported_quantization(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import numpy as np
    from gguf import GGMLQuantizationType
    from test_gguf import tiny_hf, write_gguf

    path = tmp_path / "q8k.gguf"
    write_gguf(path, tiny_hf(), GGMLQuantizationType.Q8_K, rng=np.random.default_rng(0))
    err = error_of(run("generate", str(path), "-p", "hi"))
    assert "q8k.gguf" in err and "Q8_K" in err


@pytest.mark.parametrize("to", ["hf", "cairn"])
def test_convert_round_trip(tmp_path, to):
    out = tmp_path / to
    r = run("convert", "--to", to, "-o", str(out))
    assert r.returncode == 0, r.stderr
    g = run("generate", str(out), "--chat", "-p", "What is the capital of France?", "--json")
    assert json.loads(g.stdout)["text"].startswith("The capital of France is Paris")


def test_convert_killed_half_way_leaves_no_directory_that_loads(tmp_path):
    """convert writes into a hidden sibling and renames it into place: SIGKILLed while writing (here: once the
    tokenizer and weights are written, before config.json), the output path holds nothing; a later convert
    removes the leftovers and an existing non-model directory is never replaced."""
    import signal

    out = tmp_path / "m"
    script = f"""
import time, cairn.weights.native as n
orig = n.atomic_write_text
def slow(path, text):
    if path.name == "config.json":
        print("writing config", flush=True); time.sleep(60)
    orig(path, text)
n.atomic_write_text = slow
from cairn.cli import main
main(["convert", "--to", "cairn", "-o", {str(out)!r}])
"""
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert p.stdout.readline().strip() == "writing config"
        left = list(tmp_path.glob(".m.tmp-*"))
        assert len(left) == 1 and (left[0] / "model.safetensors").is_file()  # half written, not in place
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not out.exists()
    assert "no such" in error_of(run("generate", str(out), "-p", "hi")).lower()
    r = run("convert", "--to", "cairn", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".m.tmp-*"))
    again = run("convert", "--to", "hf", "-o", str(out))  # replaces a model directory
    assert again.returncode == 0 and "model_type" in (out / "config.json").read_text()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    err = error_of(run("convert", "--to", "cairn", "-o", str(other)))
    assert "exists and is not a model directory" in err and (other / "todo.txt").read_text() == "mine"
