"""Token memory on a real model, through `cairn serve`'s OpenAI API with the official `openai` SDK.

A 17-message conversation about a walking trip (389 prompt tokens) is sent with a budget of 300 tokens: the oldest
messages are folded into a summary the model writes, the newest kept verbatim. The next turn sends the conversation
again with one more exchange: the summary is reused and the compacted prompt comes from the prefix cache.

    python examples/memory/demo.py [MODEL]        # default: the bundled SmolLM2-135M-Instruct
"""

import json
import socket
import sys
import threading
import time

import openai
import uvicorn

from cairn.engine import Engine
from cairn.serve.app import create_app
from cairn.weights import load_model

EXCHANGES = [
    ("My name is Ada and I am planning a walking trip in the Lake District.",
     "Nice to meet you, Ada! The Lake District is a great place for walking."),
    ("I will arrive in Keswick on the 3rd of May by train.",
     "Keswick is a good base; the train gets you to Penrith, then a bus to Keswick."),
    ("My budget is 600 pounds for the whole week.",
     "600 pounds for a week is workable if you stay in hostels or B&Bs."),
    ("I am allergic to peanuts, so I need to be careful with food.",
     "Noted: always check menus and packed lunches for peanuts."),
    ("I want to climb Skiddaw on the first full day.",
     "Skiddaw is a fine first climb: about 5 hours up and down from Keswick."),
    ("On day three I would like a boat trip on Derwentwater.",
     "The Keswick Launch runs around Derwentwater all day; it takes about 50 minutes."),
    ("My friend Tom joins me on the 5th of May.", "Great, Tom can join for the second half of the week."),
    ("We want to finish with Scafell Pike on the 7th.",
     "Scafell Pike is England's highest peak; start early from Seathwaite."),
]
OPTIONS = {"cairn": {"memory": {"budget": 300, "summary_max_tokens": 96}}, "temperature": 0}


def main(model: str | None) -> None:
    engine = Engine(load_model(model))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none")
    messages = [{"role": "system", "content": "You are a helpful travel assistant."}]
    for user, assistant in EXCHANGES:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    try:
        for question in ("Which day do I climb Skiddaw, and what am I allergic to?", "And when does Tom arrive?"):
            messages.append({"role": "user", "content": question})
            t0 = time.perf_counter()
            r = client.chat.completions.create(model="cairn", messages=messages, max_tokens=48, extra_body=OPTIONS)
            reply = r.choices[0].message.content
            print(json.dumps({"question": question, "reply": reply, "seconds": round(time.perf_counter() - t0, 2),
                              "usage": {"prompt_tokens": r.usage.prompt_tokens,
                                        "completion_tokens": r.usage.completion_tokens,
                                        "cached_tokens": r.usage.prompt_tokens_details.cached_tokens},
                              "memory": r.model_extra["cairn"]["memory"]}, indent=1, ensure_ascii=False))
            messages.append({"role": "assistant", "content": reply})
    finally:
        server.should_exit = True
        engine.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
