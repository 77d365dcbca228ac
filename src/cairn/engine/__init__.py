"""The inference engine: requests in, token events out. Used by the CLI, the server and the evals."""

from cairn.engine.engine import Completion, Engine
from cairn.engine.types import Event, FinishEvent, Request, SamplingParams, TokenEvent, Usage

__all__ = ["Completion", "Engine", "Event", "FinishEvent", "Request", "SamplingParams", "TokenEvent", "Usage"]
