"""The decoding commands shorten OpenMP's idle spin before torch is imported (cairn.openmp); others do not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import os, sys
from cairn.cli import main
try:
    main([{verb!r}, "--no-such-option"])
except SystemExit:
    pass
print(os.environ.get("GOMP_SPINCOUNT"))
"""


def spincount(verb: str, preset: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    out = subprocess.run([sys.executable, "-c", PROBE.format(verb=verb)], capture_output=True, text=True, env=env,
                         timeout=120)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("verb", ["serve", "chat", "generate"])
def test_decoding_commands_set_a_short_spin(verb):
    assert spincount(verb) == "2000"


def test_other_commands_and_a_users_value_are_left_alone():
    assert spincount("train") == "None"
    assert spincount("serve", preset="300000") == "300000"


def test_too_late_once_torch_is_imported():
    from cairn.openmp import tune_for_decoding

    assert "torch" in sys.modules  # (the test session has imported it)
    before = os.environ.get("GOMP_SPINCOUNT")
    assert tune_for_decoding() is False
    assert os.environ.get("GOMP_SPINCOUNT") == before
