"""32 concurrent streaming clients, half of which leave mid-stream: no 5xx, and afterwards everything is freed."""

from __future__ import annotations

import asyncio
import time

import anthropic
import openai

from tests.serve.conftest import KEYS

MODEL = "SmolLM2-135M-Instruct"
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


async def anthropic_client(url: str, i: int, leave: bool) -> str:
    client = anthropic.AsyncAnthropic(base_url=url, api_key=KEYS[i % 2], max_retries=0)
    async with client.messages.stream(model=MODEL, max_tokens=200 if leave else 6, messages=STORY,
                                      extra_body={"temperature": 0}) as stream:
        text = ""
        async for ev in stream:
            if ev.type == "message_start" and leave and i % 4 == 1:
                return "left-early"  # most likely still queued behind the others
            if ev.type == "text":
                text += ev.text
                if leave:
                    return "left"
        final = await stream.get_final_message()
    assert final.stop_reason in ("max_tokens", "end_turn") and final.content[0].text == text
    return "done"


async def openai_client(url: str, i: int, leave: bool) -> str:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEYS[i % 2], max_retries=0)
    stream = await client.chat.completions.create(model=MODEL, max_tokens=200 if leave else 6, messages=STORY,
                                                  temperature=0, stream=True)
    finish = None
    try:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and leave:
                return "left"
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    finally:
        await stream.close()
    assert finish in ("length", "stop")
    return "done"


def server_errors(state) -> int:
    return sum(n for (_, _, status), n in state.metrics.http.items() if status >= 500)


def test_32_streams_half_disconnect(server, engine):
    state = server.state
    errors_before = server_errors(state)
    cancelled_before = state.metrics.finished.get("cancelled", 0)

    async def main():
        jobs = []
        for i in range(32):
            leave = i % 2 == 1
            fn = anthropic_client if i < 16 else openai_client
            jobs.append(fn(server.url, i, leave))
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert results.count("done") == 16
    assert set(results) - {"done"} <= {"left", "left-early"}

    # every request has ended: nothing running, nothing queued, nothing admitted, no KV block in use
    deadline = time.monotonic() + 120
    while True:
        stats = engine.stats()
        if (stats.get("running", 0) == 0 and stats.get("queued", 0) == 0 and state.in_flight == 0) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert stats.get("running", 0) == 0 and stats.get("queued", 0) == 0, stats
    assert state.in_flight == 0
    for key, value in stats.items():  # a paged-KV engine reports its blocks; all must be free (cached is fine)
        if "block" in key and "used" in key:
            assert value == 0, stats
    assert server_errors(state) == errors_before
    assert state.metrics.finished.get("cancelled", 0) > cancelled_before  # the engine was told the clients left
