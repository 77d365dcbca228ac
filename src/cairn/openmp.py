"""How long an idle OpenMP thread spins before it sleeps, for the commands that decode (serve, chat, generate).

libgomp (the OpenMP runtime PyTorch bundles, which cairn's kernels share: one ``libgomp.so.1`` per process) lets a
thread that has finished a parallel region spin up to ``GOMP_SPINCOUNT`` times, 300,000 by default (milliseconds),
before it sleeps. A batch-1 decode step is one parallel region (``kernels/step.c``) followed by ~0.3 ms of the
engine's Python on one core; through that gap the region's other thread spins on the other core, which then cannot
run the streaming client, the server or a consumer thread without taking a core from the engine (measured on the
2-core reference machine: `cairn serve` streamed 323-341 tok/s to one client against 338-359 in process by
default, 357-378 against 365-383 with 2,000 spins, ~40 us, in alternating fresh processes). Training, whose
PyTorch ops follow each other within microseconds, is ~5% slower with so short a spin, so only the decoding
commands set it. libgomp reads the variable once, when it loads (``import torch``); a value the user set wins.
"""

from __future__ import annotations

import os
import sys

DECODE_SPINCOUNT = "2000"
DECODE_COMMANDS = frozenset({"serve", "chat", "generate"})


def tune_for_decoding() -> bool:
    """Set ``GOMP_SPINCOUNT`` (unless set) for a process that will decode; False if torch is already imported (then
    libgomp has read its settings and this would change nothing)."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("GOMP_SPINCOUNT", DECODE_SPINCOUNT)
    return True
