"""`cairn params` / `cairn audit` end to end, through ``python -m cairn.accounting.cli``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent.parent
DATA = ROOT / "tests" / "data" / "configs"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "cairn.accounting.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_params_json_for_an_hf_config_and_a_preset() -> None:
    out = run("params", str(DATA / "mixtral-8x7b.json"), "--json", "--context", "8192", "--kv-dtype", "fp8")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["total_params"] == 46_702_792_704 and report["active_params"] == 12_879_925_248
    assert report["kv_bytes_per_token"] == 32 * 2 * 8 * 128
    assert report["context"] == 8192


def test_params_table_plot_and_list(tmp_path: Path) -> None:
    png = tmp_path / "ds.png"
    out = run("params", "deepseek-v3", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert "671,026,419,200" in out.stdout and "routed_experts" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    listing = run("params", "--list")
    assert "seed003-instant-1" in listing.stdout and "gpt3-175b" in listing.stdout


def test_params_reads_a_cairn_checkpoint_dir(tmp_path: Path) -> None:
    from cairn.config import ModelConfig

    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, d_ff=64, n_experts=4, experts_per_token=2)
    (tmp_path / "config.json").write_text(json.dumps({"cairn_format": 1, **cfg.to_dict()}))
    out = run("params", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    from cairn.accounting.costs import account

    assert json.loads(out.stdout)["total_params"] == account(cfg).total_params


def test_bad_input_exits_2_without_traceback(tmp_path: Path) -> None:
    out = run("params", "llama3-8b")
    assert out.returncode == 2 and "did you mean" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    out = run("params", str(bad))
    assert out.returncode == 2 and "missing field" in out.stderr
    bad.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 5, "n_embd": -8, "n_layer": 0, "n_head": 1}))
    out = run("params", str(bad))
    assert out.returncode == 2 and "d_model=-8" in out.stderr and "n_layers=0" in out.stderr
    out = run("params", "gpt2", "--dtype", "fp6")
    assert out.returncode == 2 and "fp6" in out.stderr


def test_audit_exit_status() -> None:
    out = run("audit", str(ROOT / "examples" / "claims" / "seed000.yaml"))
    assert out.returncode == 1 and "FAILS" in out.stdout and "150,994,944" in out.stdout
    out = run("audit", "no-such.yaml")
    assert out.returncode == 2 and out.stderr.startswith("error:")
