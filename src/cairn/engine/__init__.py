"""The inference engine: requests in, token events out. Used by the CLI, the server and the evals.

``Engine`` and ``Completion`` are imported on first use (PEP 562): the request and event types need no torch, so a
command can build its parser and check its flags (which read those types) before torch's ~1.3 s import, and a
server's first start can convert its model meanwhile (``cairn.weights.prepared_ahead``).
"""

from cairn.engine.types import Event, FinishEvent, Request, SamplingParams, TokenEvent, Usage

__all__ = ["Completion", "Engine", "Event", "FinishEvent", "Request", "SamplingParams", "TokenEvent", "Usage"]


def __getattr__(name: str):
    if name in ("Completion", "Engine"):
        from cairn.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'cairn.engine' has no attribute {name!r}")
