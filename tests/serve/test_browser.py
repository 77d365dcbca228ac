"""The chat page in headless Chromium: send a message, see the streamed reply, then a second turn.

Chromium is driven through chromedriver's W3C WebDriver HTTP API (plain JSON over HTTP, so no extra Python
package). The Debian packages are installed when missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

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


class Page:
    """The WebDriver calls the tests make on one browser session."""

    def __init__(self, wd: WebDriver, session: str):
        self.wd, self.s = wd, session

    def find(self, css: str) -> str:
        return self.wd.call("POST", f"/session/{self.s}/element", {"using": "css selector", "value": css})[ELEMENT]

    def js(self, script: str, *args):
        return self.wd.call("POST", f"/session/{self.s}/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, what: str):
        deadline = time.monotonic() + 120
        while not (value := self.js(script)):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)
        return value

    def viewport(self, width: int, height: int) -> None:
        """The page's CSS viewport, as a phone's or a desktop's (Chrome's device emulation)."""
        self.wd.call("POST", f"/session/{self.s}/goog/cdp/execute",
                     {"cmd": "Emulation.setDeviceMetricsOverride",
                      "params": {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}})

    def open(self, url: str) -> None:
        self.wd.call("POST", f"/session/{self.s}/url", {"url": url})

    def click(self, css: str) -> None:
        self.wd.call("POST", f"/session/{self.s}/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        self.wd.call("POST", f"/session/{self.s}/element/{self.find(css)}/value", {"text": text})

    def screenshot(self, path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.wd.call("GET", f"/session/{self.s}/screenshot")))


def test_chat_page_streams_a_reply(paced_server, browser):
    server = paced_server  # paced: the stop button below must find the reply still streaming
    wd, s = browser
    page = Page(wd, s)
    find, js, wait_for = page.find, page.js, page.wait_for
    page.viewport(1280, 800)

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
            " {text: m.querySelector('.body').textContent, deltas: Number(m.dataset.deltas || 0),"
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
    # (a reply's text, rendered from markdown, is the text it came as: these are plain sentences)
    assert js("return turns.map(t => t.role + ':' + t.content.trim())") == [
        "user:What is the capital of France?", "assistant:" + first["text"].strip(), "user:And of Italy?",
        "assistant:" + second["text"].strip()]

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


# A reply whose text the test controls: markdown of every common kind, markup that would run script if it were
# inserted as HTML, a wide table and an unbroken long word, then a tool call; sent as the API's event stream.
REPLY = ("# Plan\n\nSome **bold** text and `inline code`.\n\n- one\n- two\n\n```python\nprint('x' * 200)  "
         + "# " + "wide " * 40 + "\n```\n\n"
         + '<img src=x onerror="window.__pwned = 1"> <script>window.__pwned = 2</script> '
         + "[a link](javascript:window.__pwned=3) <a href=\"https://example.org\">site</a>\n\n"
         + "| a | b |\n|---|---|\n| " + "cell " * 40 + " | 2 |\n\n" + "unbroken" * 30)


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def reply_frames() -> list[str]:
    usage = {"input_tokens": 20, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 0}
    frames = [_sse("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "m",
        "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 0}}}),
        _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}})]
    for i in range(0, len(REPLY), 17):  # pieces that cut markdown and tags anywhere
        frames.append(_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": REPLY[i:i + 17]}}))
    frames += [_sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
               _sse("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                   "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}}),
               _sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                            "delta": {"type": "input_json_delta", "partial_json": '{"city": "Par'}}),
               _sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                            "delta": {"type": "input_json_delta", "partial_json": 'is"}'}}),
               _sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
               _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use",
                                                                         "stop_sequence": None},
                                      "usage": {**usage, "output_tokens": 42}}),
               _sse("message_stop", {"type": "message_stop"})]
    return frames


# The page's fetch of /v1/messages answered by the test: the frames given, or an error response.
FAKE_FETCH = """
const frames = arguments[0], status = arguments[1];
window.__pwned = 0;
window.fetch = async (url, opts) => {
  window.__sent = JSON.parse(opts.body);
  if (status !== 200) {
    return new Response(JSON.stringify({type: "error", error: {type: "authentication_error",
                        message: "no API key was given"}}), {status, headers: {"content-type": "application/json"}});
  }
  const enc = new TextEncoder();
  const body = new ReadableStream({async start(c) {  // paced, as a model streams
    for (const f of frames) { c.enqueue(enc.encode(f)); await new Promise((r) => setTimeout(r, 15)); }
    c.close();
  }});
  return new Response(body, {status: 200, headers: {"content-type": "text/event-stream"}});
};
"""

NO_SIDEWAYS_SCROLL = ("const d = document.documentElement, m = document.getElementById('messages');"
                      "return {page: d.scrollWidth - d.clientWidth, body: document.body.scrollWidth - d.clientWidth,"
                      " messages: m.scrollWidth - m.clientWidth};")


@pytest.mark.parametrize("width", [360, 1280])
def test_chat_page_renders_markdown_safely_and_fits(server, browser, width, tmp_path):
    wd, s = browser
    page = Page(wd, s)
    page.viewport(width, 780)
    page.open(server.url + "/")
    page.js("localStorage.clear(); location.reload();")
    page.wait_for("return document.readyState === 'complete' && typeof marked === 'object'", "the page")
    narrow = width < 760
    # the sidebar: beside the conversation on a wide screen, a drawer behind ☰ on a phone
    side = page.js("const r = document.querySelector('aside').getBoundingClientRect();"
                   "return {right: r.right, visible: getComputedStyle(document.querySelector('aside')).visibility,"
                   " menu: document.getElementById('menu').getClientRects().length > 0};")
    if narrow:
        assert side["right"] <= 0 and side["visible"] == "hidden" and side["menu"], side
    else:
        assert side["right"] == 280 and not side["menu"], side
    assert page.js("return document.getElementById('messages').getBoundingClientRect().width") >= width * (
        0.9 if narrow else 0.7)

    page.js(FAKE_FETCH, reply_frames(), 200)
    page.type("#input", "Show me everything")
    page.click("#send")
    page.wait_for("const m = document.querySelector('.msg.assistant'); return m && m.dataset.done === 'true'",
                  "the reply")
    got = page.js("""
        const m = document.querySelector('.msg.assistant'), b = m.querySelector('.body');
        return {h1: b.querySelector('h1') && b.querySelector('h1').textContent,
                items: Array.from(b.querySelectorAll('li')).map(li => li.textContent),
                bold: b.querySelector('strong') && b.querySelector('strong').textContent,
                code: b.querySelector('pre code') && b.querySelector('pre code').textContent,
                copy: b.querySelectorAll('pre > button.copy').length, table: b.querySelectorAll('th, td').length,
                pwned: window.__pwned, handlers: document.querySelectorAll('[onerror], [onload], [onclick]').length,
                scripts: m.querySelectorAll('script').length,
                hrefs: Array.from(b.querySelectorAll('a')).map(a => a.getAttribute('href') || ''),
                tool: Array.from(m.querySelectorAll('.block')).map(x => x.textContent),
                meta: m.querySelector('.meta').textContent, sent: window.__sent};""")
    assert got["h1"] == "Plan" and got["items"] == ["one", "two"] and got["bold"] == "bold", got
    assert got["code"].startswith("print('x' * 200)") and got["copy"] == 1 and got["table"] == 4
    assert got["pwned"] == 0 and got["handlers"] == 0 and got["scripts"] == 0, got
    assert not any(h.startswith("javascript:") for h in got["hrefs"]) and "https://example.org" in got["hrefs"]
    assert got["tool"] == ['tool call: get_weather{\n  "city": "Paris"\n}']
    assert got["meta"].startswith("42 tokens") and "25 prompt tokens (5 cached)" in got["meta"]
    assert got["meta"].endswith("tool_use") and " tok/s · " in got["meta"]
    assert got["sent"]["messages"] == [{"role": "user", "content": "Show me everything"}]
    assert page.js(NO_SIDEWAYS_SCROLL) == {"page": 0, "body": 0, "messages": 0}
    shots = os.environ.get("CAIRN_SCREENSHOTS")  # set to docs/img to refresh the screenshots in docs/serve.md
    page.screenshot((Path(shots) if shots else tmp_path) / f"chat-page-{width}.png")

    # the copy button puts the code on the clipboard (or selects it where there is no clipboard API)
    page.js("navigator.clipboard.writeText = async (t) => { window.__copied = t; };")
    page.click("pre > button.copy")
    assert page.wait_for("return window.__copied", "the copy").startswith("print('x' * 200)")

    if narrow:  # ☰ opens the drawer over the conversation; the backdrop closes it
        page.click("#menu")
        page.wait_for("return document.querySelector('aside').getBoundingClientRect().left >= 0", "the drawer")
        if shots:
            page.screenshot(Path(shots) / f"chat-page-{width}-drawer.png")
        page.js("document.getElementById('backdrop').click()")  # its visible strip, right of the drawer
        page.wait_for("return getComputedStyle(document.querySelector('aside')).visibility === 'hidden'",
                      "the drawer to close")

    # the conversation is kept in the browser: after a reload it is listed and shown again
    page.js("location.reload();")
    page.wait_for("return document.readyState === 'complete' && document.querySelectorAll('.msg').length === 2"
                  " && document.querySelector('.msg.assistant .body h1') !== null", "the kept conversation")
    assert page.js("return Array.from(document.querySelectorAll('#conversations .open')).map(b => b.textContent)"
                   ) == ["Show me everything"]

    # an error is shown as the server said it
    page.js(FAKE_FETCH, [], 401)
    page.type("#input", "again")
    page.click("#send")
    err = page.wait_for("const m = document.querySelectorAll('.msg.assistant')[1];"
                        "return m && m.dataset.done === 'true' && m.querySelector('.error-text').textContent",
                        "the error")
    assert err == "Error: HTTP 401: no API key was given"
    assert page.js(NO_SIDEWAYS_SCROLL) == {"page": 0, "body": 0, "messages": 0}


def test_page_assets_are_served_here_with_their_licences(server):
    page = httpx.get(server.url + "/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "cdn" not in page.text.lower() and "http" not in page.text.split("<script", 1)[1]  # no outside scripts
    for name, says in (("marked.umd.js", "marked v18"), ("purify.min.js", "DOMPurify 3"),
                       ("LICENSE.marked.md", "Permission is hereby granted"),
                       ("LICENSE.dompurify.txt", "Apache License")):
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and says in r.text, name
    for bad in ("app.py", "..%2Fapp.py", "index.html", ".hidden.js", "missing.js"):
        assert httpx.get(f"{server.url}/static/{bad}").status_code == 404, bad
