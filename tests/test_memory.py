"""The memory check before loading or training (issue 14: validate before allocating)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cairn import memory, presets
from cairn.accounting.costs import account
from cairn.errors import CairnError


def test_available_is_the_smallest_limit(monkeypatch):
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 8 << 30)
    monkeypatch.setattr(memory, "_cgroup_available", lambda: 3 << 30)
    monkeypatch.setattr(memory, "_address_space_available", lambda: None)
    assert memory.available() == (3 << 30, "the container's memory limit")
    monkeypatch.setattr(memory, "_cgroup_available", lambda: None)
    assert memory.available() == (8 << 30, "available memory (MemAvailable)")


def test_real_readings_are_sane():
    have, what = memory.available()
    assert have is not None and have > 0 and what


def test_a_model_larger_than_the_machine_is_refused_with_the_figures(monkeypatch):
    monkeypatch.setattr(memory, "available", lambda: (16 << 30, "available memory (MemAvailable)"))
    cfg = presets.get("llama-3-8b")
    need = account(cfg).weight_bytes("fp32")
    assert need > 16 << 30
    with pytest.raises(CairnError) as e:
        memory.check_model_fits(cfg, "big.gguf")
    msg = str(e.value)
    assert msg.startswith("big.gguf: loading this model (8,030,261,248 parameters as fp32) needs about")
    assert "needs about 29.92 GiB, but this machine can give 16.00 GiB" in msg, msg
    assert memory.ENV in msg
    monkeypatch.setenv(memory.ENV, "0")
    memory.check_model_fits(cfg, "big.gguf")  # turned off: no error


def test_training_check_counts_optimizer_state(monkeypatch):
    cfg = presets.get("llama-3.2-1b")
    mem = account(cfg).train_memory_bytes(batch=1, context=256, dtype="fp32")["total"]
    monkeypatch.setattr(memory, "available", lambda: (mem - 1, "available memory (MemAvailable)"))
    with pytest.raises(CairnError, match="AdamW state"):
        memory.check_training_fits(cfg, "llama-3.2-1b", batch=1, context=256)
    monkeypatch.setattr(memory, "available", lambda: (mem, "available memory (MemAvailable)"))
    memory.check_training_fits(cfg, "llama-3.2-1b", batch=1, context=256)


def test_loading_a_checkpoint_that_claims_a_huge_model_fails_before_reading(tmp_path):
    """An HF directory whose config.json claims a 405B model (its weights file absent): the loader reads the
    config, finds it cannot fit, and says so — exit 2, no traceback, long before touching any tensor file."""
    cfg = presets.get("llama-3.1-405b")
    hf = cfg.to_hf(bos_token_id=1, eos_token_id=2)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    r = subprocess.run([sys.executable, "-m", "cairn", "generate", str(tmp_path), "-p", "hi", "--max-tokens", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "405,853,388,800 parameters" in r.stderr and "needs about" in r.stderr


def test_under_an_address_space_limit_the_error_names_it(tmp_path):
    """Under ``prlimit --as`` (the issue's reproduction), the check reads the limit and refuses a model that
    does not fit in it instead of dying on an allocation."""
    code = ("import resource; from cairn import memory, presets\n"
            "hard = resource.getrlimit(resource.RLIMIT_AS)[1]\n"
            "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, hard))\n"
            "memory.check_model_fits(presets.get('llama-3-8b'), 'x')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "CairnError" in r.stderr and "ulimit -v" in r.stderr, (r.stdout, r.stderr)
