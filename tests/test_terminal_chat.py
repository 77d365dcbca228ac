"""`cairn chat` in a terminal (a pty): Ctrl-C stops a reply and keeps the conversation, history persists across
sessions, /save then /load round-trips; and the commands and conversation files on their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from cairn.errors import CairnError
from cairn.terminal import Chat, history_file, read_conversation

PROMPT = "you>"  # prompt_toolkit draws the prompt's trailing space as a cursor move


def spawn(tmp_path, *args):
    """The chat in a pty, started with SIGINT ignored, as a shell starts a script's background jobs (and as the
    whole suite runs when started that way): the chat must take Ctrl-C back."""
    env = dict(os.environ, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1", OMP_NUM_THREADS="1",
               CAIRN_CHAT_HISTORY=str(tmp_path / "history"))
    child = pexpect.spawn(sys.executable, ["-m", "cairn.cli", "chat", "--temperature", "0", *args], env=env,
                          encoding="utf-8", timeout=240, dimensions=(40, 120),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    child.expect(PROMPT)
    return child


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation_then_history_and_load(tmp_path):
    """pexpect forks the process it runs in to make the pty; a test process that has built many engines can be too
    large to fork (ENOMEM seen in a full run), so the terminal sessions run in a fresh interpreter."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "tests.test_terminal_chat", str(tmp_path)], capture_output=True,
                       text=True, timeout=900, cwd=root)
    assert r.returncode == 0 and r.stdout.strip().endswith("sessions ok"), r.stdout[-3000:] + r.stderr[-3000:]


def terminal_sessions(tmp_path: Path) -> None:
    saved = tmp_path / "conversation.json"
    child = spawn(tmp_path, "--max-tokens", "500")
    try:
        child.send("Write a long story about a dragon.\r")
        child.expect("dragon")  # the line as typed
        child.expect("\r\n")  # the editor's last drawing of the line ends: the terminal is the reply's now
        child.expect(r"[A-Za-z]{2,} [A-Za-z]{2,}")  # the reply's first words (escape codes hold no spaces)
        time.sleep(0.3)  # (500 tokens take seconds: the reply is still running)
        child.sendcontrol("c")
        child.expect(r"stopped")
        child.expect(PROMPT)  # still running, ready for the next line
        child.send("/stats\r")
        child.expect(r"context: (\d+) of (\d+) tokens used \(2 messages\); last reply (\d+) tokens")
        assert 0 < int(child.match.group(3)) < 500
        child.send(f"/save {saved}\r")
        child.expect("saved 2 messages")
        child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    user, reply = json.loads(saved.read_text())
    assert user == {"role": "user", "content": "Write a long story about a dragon."}
    assert reply["role"] == "assistant" and len(reply["content"]) > 4  # the partial reply stayed
    history = (tmp_path / "history").read_text()
    assert "+Write a long story about a dragon." in history and f"+/save {saved}" in history

    # a new session: /load brings the conversation back, and the up arrow walks the last session's lines
    child = spawn(tmp_path)
    try:
        child.send(f"/load {saved}\r")
        child.expect("loaded 2 messages")
        child.expect(PROMPT)
        saved.unlink()
        child.send("\x1b[A\x1b[A\r")  # up, up: `/save FILE` from the first session
        child.expect("saved 2 messages")
        child.expect(PROMPT)
        # multi-line input: Esc then Enter, or a trailing backslash, continue the line
        child.send("/system Be\x1b\rvery\\\rbrief.\r")
        child.expect("system prompt set")
        child.send(f"/save {tmp_path / 'system.json'}\r")
        child.expect("saved 1 message ")
        child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert json.loads(saved.read_text()) == [user, reply]
    assert json.loads((tmp_path / "system.json").read_text()) == [{"role": "system", "content": "Be\nvery\nbrief."}]


class Tokenizer:
    chat_template = "x"

    def encode_chat(self, messages, add_generation_prompt=True):
        return list(range(sum(len(m["content"].split()) for m in messages)))


class Engine:
    tokenizer, max_context = Tokenizer(), 100


def test_save_then_load_round_trips_and_commands_never_reach_the_model(tmp_path, capsys):
    chat = Chat(Engine(), params=None, system="Be brief.")
    chat.messages = [{"role": "user", "content": "héllo 🌟"}, {"role": "assistant", "content": "hi\n```py\nx\n```"}]
    chat.turn = lambda text: pytest.fail(f"sent to the model: {text}")
    path = tmp_path / "sub" / "c.json"
    (tmp_path / "sub").mkdir()
    for line in ("/help", "/stats", f"/save {path}", "/nonsense", "/load"):
        assert chat.handle(line) is True
    err = capsys.readouterr().err
    assert "/system [TEXT]" in err and "unknown command /nonsense" in err and "/load FILE" in err
    assert "context: 8 of 100 tokens used (2 messages)" in err
    other = Chat(Engine(), params=None)
    other.handle(f"/load {path}")
    assert other.conversation() == chat.conversation() and other.system == "Be brief."
    other.handle("/system Be kind.")
    assert other.conversation() == [{"role": "system", "content": "Be kind."}]
    sent = []
    other.turn = sent.append
    other.handle("//etc/hosts is a file")
    assert sent == ["/etc/hosts is a file"] and other.handle("/exit") is False


def test_load_refuses_what_is_not_a_conversation(tmp_path):
    bad = tmp_path / "bad.json"
    for text, says in (("{", "is not JSON"), ('{"a": 1}', "expected a JSON list"),
                       ('[{"role": "robot", "content": "x"}]', "message 0 must be")):
        bad.write_text(text)
        with pytest.raises(CairnError, match=says):
            read_conversation(bad)
    bad.write_text(json.dumps({"system": "S", "messages": [{"role": "user", "content": "q"}]}))
    assert read_conversation(bad) == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    with pytest.raises(CairnError, match="cannot read"):
        read_conversation(tmp_path / "missing.json")


def test_history_file_location(monkeypatch, tmp_path):
    monkeypatch.delenv("CAIRN_CHAT_HISTORY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert history_file() == tmp_path / "cairn" / "chat_history"
    monkeypatch.setenv("CAIRN_CHAT_HISTORY", "/x/h")
    assert str(history_file()) == "/x/h" and str(history_file("/y/z")) == "/y/z"


if __name__ == "__main__":
    terminal_sessions(Path(sys.argv[1]))
    print("sessions ok")
