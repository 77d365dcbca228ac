"""/health and /metrics (Prometheus text format)."""

from __future__ import annotations

import re

import httpx

from tests.serve.conftest import KEYS

LINE = re.compile(r'^([a-z_]+)(\{.*\})? (-?[0-9.e+-]+|\+Inf)$')


def parse(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_health_and_metrics(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
    assert httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": KEYS[0]},
                      timeout=60).status_code == 200
    r = httpx.get(server.url + "/metrics", headers={"authorization": f"Bearer {KEYS[0]}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse(r.text)
    assert m['cairn_http_requests_total{method="POST",route="/v1/messages",status="200"}'] >= 1
    assert m["cairn_prompt_tokens_total"] > 0 and m["cairn_completion_tokens_total"] > 0
    assert m['cairn_time_to_first_token_seconds_bucket{le="+Inf"}'] >= 1
    assert m["cairn_time_to_first_token_seconds_count"] == m['cairn_time_to_first_token_seconds_bucket{le="+Inf"}']
    for name in ("cairn_requests_in_flight", "cairn_queue_depth", "cairn_requests_running", "cairn_kv_blocks_used",
                 "cairn_kv_blocks_cached"):
        assert name in m, name
    # the paged engine's pool and offload counters reach Prometheus too
    assert m["cairn_engine_kv_blocks_total"] > 0
    assert m["cairn_kv_blocks_cached"] >= 1  # the finished prompt's full blocks stay in the prefix cache
    for name in ("cairn_engine_offload_blocks_out", "cairn_engine_offload_blocks_in", "cairn_engine_prefix_hit_blocks"):
        assert name in m, name
    assert m['cairn_model_info{model="SmolLM2-135M-Instruct"}'] == 1


def test_completion_tokens_include_generations_whose_client_left(paced_server, engine):
    """Issue 14, item 8: the server's token counters equal the engine's, cancelled generations included."""
    url = paced_server.url + "/metrics"
    auth = {"x-api-key": KEYS[0]}
    before_m, before_e = parse(httpx.get(url, headers=auth).text), engine.stats()
    body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 60, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Count from 1 to 100."}]}
    for path, payload in (("/v1/messages", body), ("/v1/chat/completions", {**body, "max_tokens": 60})):
        for _ in range(3):
            with httpx.stream("POST", paced_server.url + path, json=payload, headers=auth, timeout=60) as r:
                assert r.status_code == 200
                for n, _line in enumerate(r.iter_lines()):
                    if n >= 8:
                        break  # leave mid-reply: the server cancels the generation
    engine.wait_idle()
    after_m, after_e = parse(httpx.get(url, headers=auth).text), engine.stats()
    generated = after_e["completion_tokens"] - before_e["completion_tokens"]
    assert generated > 0
    assert after_m["cairn_completion_tokens_total"] - before_m["cairn_completion_tokens_total"] == generated
    assert after_m["cairn_prompt_tokens_total"] - before_m["cairn_prompt_tokens_total"] == \
        after_e["prompt_tokens"] - before_e["prompt_tokens"]
    cancelled = after_e["cancelled"] - before_e["cancelled"]
    assert cancelled == 6
    key = 'cairn_generations_total{reason="cancelled"}'
    assert after_m.get(key, 0) - before_m.get(key, 0) == cancelled
