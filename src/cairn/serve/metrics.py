"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library."""

from __future__ import annotations

import threading
from collections import defaultdict

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(**kv: str) -> str:
    if not kv:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(kv.items()))
    return "{" + inner + "}"


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.http: dict[tuple[str, str, int], int] = defaultdict(int)  # (method, route, status) -> count
        self.finished: dict[str, int] = defaultdict(int)  # engine finish reason -> count
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.in_flight = 0
        self.rejected: dict[str, int] = defaultdict(int)  # reason -> count (overloaded, rate_limited, ...)

    def http_done(self, method: str, route: str, status: int) -> None:
        with self.lock:
            self.http[(method, route, status)] += 1

    def generation_done(self, reason: str, prompt: int, cached: int, completion: int) -> None:
        with self.lock:
            self.finished[reason] += 1
            self.prompt_tokens += prompt
            self.cached_prompt_tokens += cached
            self.completion_tokens += completion

    def first_token(self, seconds: float) -> None:
        with self.lock:
            i = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
            self.ttft_counts[i] += 1
            self.ttft_sum += seconds

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] += 1

    def render(self, engine_stats: dict, model: str) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

        with self.lock:
            metric("cairn_http_requests_total", "counter", "HTTP requests answered, by route and status.",
                   [(_labels(method=m, route=r, status=str(s)), n) for (m, r, s), n in sorted(self.http.items())])
            metric("cairn_generations_total", "counter", "Generations finished, by engine finish reason.",
                   [(_labels(reason=r), n) for r, n in sorted(self.finished.items())])
            metric("cairn_requests_rejected_total", "counter", "Requests refused before generation, by reason.",
                   [(_labels(reason=r), n) for r, n in sorted(self.rejected.items())])
            metric("cairn_prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)])
            metric("cairn_cached_prompt_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
                   [("", self.cached_prompt_tokens)])
            metric("cairn_completion_tokens_total", "counter", "Tokens generated.", [("", self.completion_tokens)])
            lines.append("# HELP cairn_time_to_first_token_seconds Time from admission to the first generated token.")
            lines.append("# TYPE cairn_time_to_first_token_seconds histogram")
            cum = 0
            for b, n in zip(TTFT_BUCKETS, self.ttft_counts, strict=False):
                cum += n
                lines.append(f'cairn_time_to_first_token_seconds_bucket{{le="{b:g}"}} {cum}')
            cum += self.ttft_counts[-1]
            lines.append(f'cairn_time_to_first_token_seconds_bucket{{le="+Inf"}} {cum}')
            lines.append(f"cairn_time_to_first_token_seconds_sum {self.ttft_sum:g}")
            lines.append(f"cairn_time_to_first_token_seconds_count {cum}")
            metric("cairn_requests_in_flight", "gauge", "Generation requests admitted and not finished.",
                   [("", self.in_flight)])
        metric("cairn_queue_depth", "gauge", "Requests waiting in the engine's queue.",
               [("", int(engine_stats.get("queued", 0) or 0))])
        metric("cairn_requests_running", "gauge", "Requests the engine is generating for now.",
               [("", int(engine_stats.get("running", 0) or 0))])
        metric("cairn_kv_blocks_used", "gauge", "KV-cache blocks in use (0 when the engine has no paged KV).",
               [("", int(_first(engine_stats, "kv_blocks_used", "blocks_used") or 0))])
        metric("cairn_kv_blocks_cached", "gauge", "KV-cache blocks held by the prefix cache.",
               [("", int(_first(engine_stats, "kv_blocks_cached", "blocks_cached") or 0))])
        others = [(k, v) for k, v in sorted(engine_stats.items())
                  if isinstance(v, int | float) and not isinstance(v, bool)]
        for k, v in others:
            name = "cairn_engine_" + "".join(c if c.isalnum() else "_" for c in k)
            metric(name, "gauge", f"Engine statistic {k!r}.", [("", v)])
        metric("cairn_model_info", "gauge", "The model this server serves.", [(_labels(model=model), 1)])
        return "\n".join(lines) + "\n"


def _first(d: dict, *keys: str):
    for k in keys:
        if k in d:
            return d[k]
    return None
