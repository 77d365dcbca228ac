"""``cairn chat``'s conversation loop: a line editor, slash commands, replies rendered as markdown.

On a terminal the input is prompt_toolkit's line editor (editing, arrow keys, history kept across sessions in
``chat_history`` under the user's data directory, Esc-Enter or a trailing backslash for a new line) and the reply is
rendered as markdown by rich while it streams; piped, lines are read plainly and the reply is written as plain text.
Ctrl-C stops the reply in progress (the partial reply stays in the conversation), Ctrl-D quits. Lines starting with
``/`` are commands (``/help``), never sent to the model; ``//`` sends a line that starts with ``/``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cairn.errors import CairnError

HELP = """commands:
  /help           this list
  /reset          start the conversation over (the system prompt stays)
  /system [TEXT]  set the system prompt (no TEXT: show it; /system - removes it); the conversation starts over
  /save FILE      write the conversation as JSON messages ([{"role": ..., "content": ...}, ...])
  /load FILE      read a conversation written by /save (or a {"messages": [...]} request body)
  /stats          tokens in the context, the context's size, the last reply's tokens and speed
  /exit, /quit    leave (or Ctrl-D)
keys: Ctrl-C stops a reply and keeps the conversation; Esc then Enter, or a line ending in \\, continues on a new
line; up/down walk the history (kept across sessions); //text sends a message that starts with /."""


def history_file(flag: str | None = None) -> Path:
    """Where the line editor keeps its history: ``--history FILE``, else ``$CAIRN_CHAT_HISTORY``, else
    ``chat_history`` under ``$XDG_DATA_HOME/cairn`` (default ``~/.local/share/cairn``)."""
    if flag:
        return Path(flag).expanduser()
    if os.environ.get("CAIRN_CHAT_HISTORY"):
        return Path(os.environ["CAIRN_CHAT_HISTORY"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "cairn" / "chat_history"


def read_conversation(path: Path) -> list[dict[str, str]]:
    """Messages from a file ``/save`` wrote (a JSON list of ``{"role", "content"}``), or from a request body with
    ``messages`` (and ``system``, as the Messages API has it); a ``CairnError`` naming what is wrong."""
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        raise CairnError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CairnError(f"{path} is not JSON ({e}): /load reads what /save writes") from None
    system = data.get("system") if isinstance(data, dict) else None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise CairnError(f"{path}: expected a JSON list of messages, or an object with \"messages\"")
    out = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise CairnError(f"{path}: message {i} must be {{\"role\": \"system\"|\"user\"|\"assistant\", "
                             f"\"content\": TEXT}}, got {json.dumps(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class Plain:
    """The reply as plain text, as it streams."""

    def __init__(self, out=None):
        self.out = out or sys.stdout

    def start(self) -> None:
        pass

    def add(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def stop(self, note: str | None = None) -> None:
        self.out.write("\n" + (f"[{note}]\n" if note else ""))
        self.out.flush()


class Markdown:
    """The reply rendered as markdown (rich), redrawn as it streams."""

    def __init__(self):
        from rich.console import Console

        self.console = Console()
        self.live = None
        self.text = ""

    def start(self) -> None:
        from rich.live import Live

        self.text = ""
        self.live = Live(console=self.console, refresh_per_second=12, vertical_overflow="visible")
        self.live.start()

    def add(self, text: str) -> None:
        from rich.markdown import Markdown as Md

        self.text += text
        self.live.update(Md(self.text), refresh=False)

    def stop(self, note: str | None = None) -> None:
        from rich.markdown import Markdown as Md

        if self.live is not None:
            self.live.update(Md(self.text), refresh=True)
            self.live.stop()
            self.live = None
        if note:
            self.console.print(f"[dim]\\[{note}][/dim]")


@dataclass
class Stats:
    reply_tokens: int = 0
    reply_seconds: float = 0.0
    prompt_tokens: int = 0
    total_tokens: int = 0
    replies: int = 0


class Chat:
    """One conversation with a model: commands, turns, and what they cost."""

    def __init__(self, engine, params: Callable, system: str | None = None, render=None, note=None,
                 critique=None, seed: int | None = None, memory=None):
        self.engine, self.tok, self.params = engine, engine.tokenizer, params
        self.memory = memory  # cairn.serve.memory.Settings (--memory): compact the conversation when over budget
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.render = render or Plain()
        self.note = note or (lambda msg: print(f"[{msg}]", file=sys.stderr, flush=True))
        self.critique = critique
        self.rng = critique.rng(seed) if critique is not None else None  # draws principles for the whole session
        self.stats = Stats()
        self.counted = [0, 0]

    def conversation(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def prompt(self) -> list[dict[str, str]]:
        """What the model is shown: the conversation, compacted by token memory (``--memory``) when over budget."""
        turns = self.conversation()
        if self.memory is None:
            return turns
        from cairn.serve import memory

        c = memory.plan(self.tok, self.engine, turns, self.tok.encode_chat(turns), self.tok.encode_chat, self.memory,
                        self.engine.max_context, self.params().max_tokens)
        if isinstance(c, memory.Compaction):
            memory.run(self.engine, c)
            m = c.metadata()
            self.note(f"memory: {m['folded_messages']} older messages "
                      + ("(summary reused)" if c.reused else f"summarised ({m['summary_usage']['completion_tokens']} "
                                                              "tokens)")
                      + f"; prompt {m['original_prompt_tokens']} -> {m['prompt_tokens']} tokens of {m['budget']}")
            return c.messages()
        return turns

    # ------------------------------------------------------------------ commands
    def handle(self, line: str) -> bool:
        """Act on one line of input; False when the user asked to leave."""
        if line.startswith("//"):
            self.turn(line[1:])
        elif line.startswith("/"):
            return self.command(*line[1:].split(None, 1))
        elif line.strip():
            self.turn(line)
        return True

    def command(self, name: str = "", arg: str = "") -> bool:
        arg = arg.strip()
        if name in ("exit", "quit"):
            return False
        if name == "help":
            print(HELP, file=sys.stderr)
        elif name == "reset":
            self.messages = []
            self.note("conversation cleared")
        elif name == "system":
            if not arg:
                self.note(f"system prompt: {self.system!r}" if self.system else "no system prompt")
            else:
                self.system = None if arg == "-" else arg
                self.messages = []
                self.note("system prompt " + ("removed" if self.system is None else "set") + "; conversation cleared")
        elif name == "save":
            if not arg:
                self.note("/save FILE: name the file to write")
                return True
            from cairn.weights.native import atomic_write_text

            path = Path(arg).expanduser()
            try:
                atomic_write_text(path, json.dumps(self.conversation(), ensure_ascii=False, indent=1) + "\n")
            except OSError as e:
                self.note(f"cannot write {path}: {e.strerror or e}")
                return True
            n = len(self.conversation())
            self.note(f"saved {n} message{'' if n == 1 else 's'} to {path}")
        elif name == "load":
            if not arg:
                self.note("/load FILE: name the file to read")
                return True
            try:
                messages = read_conversation(Path(arg))
            except CairnError as e:
                self.note(f"{e} (the conversation is unchanged)")
                return True
            self.system = next((m["content"] for m in messages if m["role"] == "system"), None)
            self.messages = [m for m in messages if m["role"] != "system"]
            self.note(f"loaded {len(messages)} message{'' if len(messages) == 1 else 's'} from {arg}")
        elif name == "stats":
            self.note(self.describe_stats())
        else:
            self.note(f"unknown command /{name}: /help lists the commands (//text sends text starting with /)")
        return True

    def describe_stats(self) -> str:
        s = self.stats
        used = len(self.tok.encode_chat(self.conversation(), add_generation_prompt=False)) if self.messages else 0
        speed = (f"last reply {s.reply_tokens} tokens in {s.reply_seconds:.2f} s "
                 f"({s.reply_tokens / s.reply_seconds:.1f} tok/s)" if s.replies and s.reply_seconds > 0
                 else "no reply yet")
        return (f"context: {used} of {self.engine.max_context} tokens used ({len(self.messages)} messages); {speed}; "
                f"session: {s.replies} replies, {s.prompt_tokens} prompt + {s.total_tokens} generated tokens")

    # ------------------------------------------------------------------ turns
    def turn(self, user: str) -> None:
        """One exchange; Ctrl-C stops the reply, which stays in the conversation as far as it got."""
        self.messages.append({"role": "user", "content": user})
        parts: list[str] = []
        note, t0, finish = None, time.perf_counter(), None
        self.counted = [0, 0]  # prompt and generated tokens, as far as the reply got
        self.render.start()
        try:
            if self.critique is None:
                finish = self._stream(parts)
            else:
                finish = self._critique(parts)
        except KeyboardInterrupt:
            note = "stopped"
        finally:
            if finish is not None and finish.reason == "context_full":
                note = "context full: /reset to start over"
            self.render.stop(note)
        seconds = time.perf_counter() - t0
        reply = "".join(parts)
        self.messages.append({"role": "assistant", "content": reply})
        s = self.stats
        prompt, generated = ((finish.usage.prompt_tokens, finish.usage.completion_tokens) if finish is not None
                             else self.counted)
        s.replies += 1
        s.reply_tokens, s.reply_seconds = generated, seconds
        s.total_tokens += generated
        s.prompt_tokens += prompt

    def _stream(self, parts: list[str]):
        from cairn.engine import FinishEvent, Request

        request = Request(self.tok.encode_chat(self.prompt()), self.params())
        self.counted[0] = len(request.prompt_ids)
        events = self.engine.events(request)
        try:
            for ev in events:
                self.counted[1] += len(getattr(ev, "token_ids", ()))
                if ev.text:
                    parts.append(ev.text)
                    self.render.add(ev.text)
                if isinstance(ev, FinishEvent):
                    return ev
        finally:
            events.close()  # cancels the request if it was stopped midway
        return None

    def _critique(self, parts: list[str]):
        from cairn.serve import self_critique as sc

        def on_text(step, piece: str) -> None:
            if step.final:
                parts.append(piece)
                self.render.add(piece)
            else:
                sys.stderr.write(_dim(piece))
                sys.stderr.flush()

        def on_start(step) -> None:
            if step.kind != "draft":
                print(file=sys.stderr, flush=True)
            if not step.final:
                label = {"draft": "[draft]",
                         "critique": f"[critique: {step.principle.id if step.principle else ''}]",
                         "revision": f"[revision {step.round}: {step.principle.id if step.principle else ''}]"}
                sys.stderr.write(_dim(label[step.kind] + " "))
                sys.stderr.flush()

        chain = sc.chain(self.tok, self.critique, self.prompt(), self.params(), rng=self.rng)
        sc.run(self.engine, chain, on_start, on_text)
        return chain.stages[-1].finish


def _dim(text: str) -> str:
    return f"\033[2m{text}\033[0m" if sys.stderr.isatty() else text


def terminal_lines(history: Path | None) -> Iterator[str]:
    """Lines from prompt_toolkit's editor; Ctrl-C at the prompt clears the line, Ctrl-D ends the input."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    @keys.add("enter")
    def _submit(event) -> None:
        buf = event.current_buffer
        if buf.document.text_before_cursor.endswith("\\") and buf.document.is_cursor_at_the_end:
            buf.delete_before_cursor(1)
            buf.insert_text("\n")
        else:
            buf.validate_and_handle()

    store = InMemoryHistory()
    if history is not None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            history.touch()
            store = FileHistory(str(history))
        except OSError as e:
            print(f"[history not kept: cannot write {history}: {e.strerror or e}]", file=sys.stderr)
    session = PromptSession(history=store, key_bindings=keys, multiline=True,
                            prompt_continuation=lambda width, *_: "." * (width - 1) + " ")
    while True:
        try:
            yield session.prompt("you> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            return


def piped_lines(stream=None) -> Iterator[str]:
    for line in stream or sys.stdin:
        yield line.rstrip("\n")


def run(chat: Chat, lines: Iterator[str]) -> None:
    for line in lines:
        if not chat.handle(line.strip()):
            return
