"""``cairn serve`` as a process: it prints its URL, serves, and on SIGTERM finishes the requests in flight."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

import cairn


def test_serve_process_drains_on_sigterm(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = tmp_path / "keys.txt"
    keys.write_text("# cairn keys\nsk-from-file\n")
    src = str(Path(cairn.__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               CAIRN_API_KEYS="sk-from-env")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cairn.serve.cli", "serve", "--port", str(port),
                                 "--api-key", "sk-from-flag", "--api-keys-file", str(keys), "--log-level", "warning"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while f"http://localhost:{port}/" not in log.read_text():  # the URL is printed once the server serves
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert httpx.get(url + "/health").status_code == 200  # at once: no retry needed
        for key in ("sk-from-flag", "sk-from-file", "sk-from-env"):
            r = httpx.get(url + "/v1/models", headers={"x-api-key": key})
            assert r.status_code == 200, (key, r.text)
        assert httpx.get(url + "/v1/models", headers={"x-api-key": "nope"}).status_code == 401

        body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 24, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": "Tell me about the sea."}]}
        events = []
        with httpx.stream("POST", url + "/v1/messages", json=body, headers={"x-api-key": "sk-from-flag"},
                          timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    if events.count("content_block_delta") == 1:
                        proc.send_signal(signal.SIGTERM)  # shut down while the reply is streaming
        assert events[-2:] == ["message_delta", "message_stop"], events
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_on_a_busy_port_exits_2_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "cairn.cli", "serve", "--port", str(port)], capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"error: port {port} on 127.0.0.1 is already in use" in r.stderr and "--port" in r.stderr
    assert "loading" not in r.stderr and "serving" not in r.stderr and "Traceback" not in r.stderr


def test_a_first_start_converts_the_model_while_it_imports_torch(tmp_path):
    """``cairn serve`` starts a GGUF's conversion (a child process) before anything has imported torch, so that the
    two overlap on a first start; here the child's start is replaced by a spy that reports and stops the server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys\n"
            "import cairn.weights.gguf as g\n"
            "def spy(path):\n"
            "    print('torch imported' if 'torch' in sys.modules else 'torch not imported yet', path.name)\n"
            "    raise SystemExit(3)\n"
            "g.start_conversion = spy\n"
            "from cairn.cli import main\n"
            f"sys.exit(main(['serve', '--port', '{port}']))\n")
    src = str(Path(cairn.__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CAIRN_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 3, r.stderr
    assert r.stdout.split() == ["torch", "not", "imported", "yet", "SmolLM2-135M-Instruct.Q4_1.gguf"], r.stdout


def test_connections_to_the_bound_socket_have_nagle_off():
    """asyncio (so uvicorn) turns Nagle's algorithm off on the connections of a listening socket only when that socket
    was made for IPPROTO_TCP; else each response written in two parts waits out the client's delayed ACK, ~40 ms a
    request on keep-alive connections (measured: a test server made with proto 0 took 44 ms a /health, 0.5 ms with
    it)."""
    import asyncio

    from cairn.serve.cli import bind_port

    sock = bind_port("127.0.0.1", 0)
    port, seen = sock.getsockname()[1], []

    async def main():
        async def accepted(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.read()
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert seen and seen[0] != 0
