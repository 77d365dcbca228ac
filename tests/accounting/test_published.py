"""The accounting of real models' config.json files equals their published exact parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cairn.accounting.costs import account
from cairn.config_hf import config_from_hf_file

DATA = Path(__file__).parent.parent / "data" / "configs"
PUBLISHED = {k: v for k, v in json.loads((DATA / "published.json").read_text()).items() if not k.startswith("_")}


def test_at_least_twelve_real_models() -> None:
    assert len(PUBLISHED) >= 12
    assert all((DATA / f"{name}.json").is_file() for name in PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_total_equals_published(name: str) -> None:
    acc = account(config_from_hf_file(DATA / f"{name}.json"))
    want = PUBLISHED[name]
    assert acc.total_params == want["total_params"]
    if "active_params" in want:
        assert acc.active_params == want["active_params"]
    if "active_params_approx" in want:
        assert acc.active_params == pytest.approx(want["active_params_approx"], rel=0.03)
    if acc.cfg.n_experts == 0:
        assert acc.active_params == acc.total_params


def test_qwen3_non_embedding_share() -> None:
    acc = account(config_from_hf_file(DATA / "qwen3-0.6b.json"))
    non_embedding = acc.total_params - acc.components()["token_embedding"]
    assert non_embedding == pytest.approx(PUBLISHED["qwen3-0.6b"]["non_embedding_params_approx"], rel=0.01)


def test_tied_head_counts_once_in_total_and_again_untied() -> None:
    acc = account(config_from_hf_file(DATA / "gpt2.json"))
    assert acc.total_params_untied - acc.total_params == 50257 * 768
    assert acc.components()["head"] == 0
    assert acc.components(untied=True)["head"] == 50257 * 768
