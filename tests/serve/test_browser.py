"""The chat page in headless Chromium: send a message, see the streamed reply, then a second turn.

Chromium is driven through chromedriver's W3C WebDriver HTTP API (plain JSON over HTTP, so no extra Python
package). The Debian packages are installed when missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import httpx
import pytest

from tests.serve.conftest import KEYS

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def ensure_chromium() -> None:
    if os.path.exists(CHROMIUM) and os.path.exists(DRIVER):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=60)

    def call(self, method: str, path: str, body: dict | None = None):
        r = self.http.request(method, path, json=body)
        data = r.json()
        assert r.status_code == 200, data
        return data["value"]


@pytest.fixture(scope="module")
def browser():
    ensure_chromium()
    port = free_port()
    profile = tempfile.mkdtemp(prefix="cairn-chromium-")
    driver = subprocess.Popen([DRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wd = WebDriver(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        while True:
            try:
                if wd.http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}
        session = wd.call("POST", "/session", caps)["sessionId"]
        yield wd, session
        wd.call("DELETE", f"/session/{session}")
    finally:
        driver.terminate()
        driver.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


def test_chat_page_streams_a_reply(paced_server, browser):
    server = paced_server  # paced: the stop button below must find the reply still streaming
    wd, s = browser

    def find(css: str) -> str:
        return wd.call("POST", f"/session/{s}/element", {"using": "css selector", "value": css})[ELEMENT]

    def js(script: str):
        return wd.call("POST", f"/session/{s}/execute/sync", {"script": script, "args": []})

    def wait_for(script: str, what: str):
        deadline = time.monotonic() + 120
        while not (value := js(script)):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)
        return value

    wd.call("POST", f"/session/{s}/url", {"url": server.url + "/"})
    assert js("return document.title") == "cairn chat"
    wd.call("POST", f"/session/{s}/element/{find('#api-key')}/value", {"text": KEYS[0]})
    js("document.getElementById('temperature').value = '0'; document.getElementById('max-tokens').value = '24';")

    def send(text: str) -> dict:
        wd.call("POST", f"/session/{s}/element/{find('#input')}/value", {"text": text})
        wd.call("POST", f"/session/{s}/element/{find('#send')}/click", {})
        n = len(js("return document.querySelectorAll('.msg.assistant')"))
        return wait_for(
            f"const m = document.querySelectorAll('.msg.assistant')[{n - 1}];"
            "return m && m.dataset.done === 'true' && document.body.dataset.state === 'idle' &&"
            " {text: m.firstChild ? m.firstChild.textContent : '', deltas: Number(m.dataset.deltas || 0),"
            "  error: m.classList.contains('error')};",
            "the reply")

    first = send("What is the capital of France?")
    assert not first["error"], first
    assert first["text"].strip() and first["deltas"] >= 2  # it arrived in pieces, as a stream
    second = send("And of Italy?")
    assert not second["error"] and second["text"].strip()
    bubbles = js("return Array.from(document.querySelectorAll('.msg')).map(m => m.className)")
    assert bubbles == ["msg user", "msg assistant", "msg user", "msg assistant"]
    # the page keeps the conversation and sends it all with each turn
    assert js("return turns.map(t => t.role + ':' + t.content)") == [
        "user:What is the capital of France?", "assistant:" + first["text"], "user:And of Italy?",
        "assistant:" + second["text"]]

    # the stop button ends a long reply mid-stream; the server lets go of the request
    js("document.getElementById('max-tokens').value = '400';")
    count = "Count from 1 to 500, separated by commas."
    wd.call("POST", f"/session/{s}/element/{find('#input')}/value", {"text": count})
    wd.call("POST", f"/session/{s}/element/{find('#send')}/click", {})
    wait_for("const m = document.querySelectorAll('.msg.assistant')[2]; return m && Number(m.dataset.deltas || 0) >= 3",
             "the long reply to start")
    wd.call("POST", f"/session/{s}/element/{find('#stop')}/click", {})
    stopped = wait_for("const m = document.querySelectorAll('.msg.assistant')[2];"
                       "return m.dataset.done === 'true' && m.querySelector('.meta').textContent", "the stop")
    assert stopped == "stopped"
    deadline = time.monotonic() + 60
    while server.state.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.state.in_flight == 0
