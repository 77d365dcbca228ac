// cairn's chat page: conversations kept in the browser (localStorage), replies streamed from /v1/messages and
// rendered as markdown (marked) after sanitising (DOMPurify), code blocks with a copy button, the reply's speed and
// token counts, tool calls and JSON output shown as readable blocks, errors shown as they are.
"use strict";
const $ = (id) => document.getElementById(id);
const STORE = "cairn-conversations";
let conversations = loadConversations();  // [{id, title, turns, updated}], most recent first
let current = null;                        // the conversation on screen
let turns = [];                            // its finished turns: [{role, content, meta?, blocks?}]
let controller = null;

// ------------------------------------------------------------------ storage
function loadConversations() {
  try {
    const data = JSON.parse(localStorage.getItem(STORE) || "[]");
    return Array.isArray(data) ? data.filter((c) => c && Array.isArray(c.turns)) : [];
  } catch (e) {
    return [];
  }
}

function saveConversations() {
  try {
    localStorage.setItem(STORE, JSON.stringify(conversations));
  } catch (e) {  // full or disabled storage: the page still works, the history is not kept
    console.warn("cairn: conversations not saved:", e);
  }
}

function remember() {
  if (!turns.length) return;
  current.turns = turns;
  current.updated = Date.now();
  current.title = current.title || turns[0].content.slice(0, 60);
  if (!conversations.includes(current)) conversations.unshift(current);
  conversations.sort((a, b) => b.updated - a.updated);
  saveConversations();
  listConversations();
}

function listConversations() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of conversations) {
    const li = document.createElement("li");
    if (c === current) li.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title || "(untitled)";
    open.title = c.title || "";
    open.addEventListener("click", () => { if (!controller) { show(c); drawer(false); } });
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.setAttribute("aria-label", "Delete this conversation");
    del.addEventListener("click", () => {
      if (controller && c === current) return;
      conversations = conversations.filter((x) => x !== c);
      saveConversations();
      if (c === current) show(null);
      else listConversations();
    });
    li.append(open, del);
    ul.appendChild(li);
  }
  $("title").textContent = (current && current.title) || "New conversation";
}

function show(conversation) {
  current = conversation || {id: String(Date.now()) + Math.random().toString(16).slice(2), title: "", turns: []};
  turns = current.turns.slice();
  $("messages").replaceChildren();
  for (const t of turns) {
    if (t.role === "user") bubble("user").textContent = t.content;
    else {
      const div = bubble("assistant");
      render(div, t.content, true);
      for (const b of t.blocks || []) blockView(div, b.label, b.text);
      if (t.meta) addMeta(div, t.meta);
      div.dataset.done = "true";
    }
  }
  listConversations();
}

// ------------------------------------------------------------------ rendering
const PURIFY = {FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"], FORBID_ATTR: ["style"]};
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.getAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

function bubble(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "assistant") {
    const body = document.createElement("div");
    body.className = "body";
    div.appendChild(body);
  }
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function asJSON(text) {  // the whole reply is one JSON value (structured output): its parsed form, else undefined
  const t = text.trim();
  if (!/^[[{]/.test(t)) return undefined;
  try { return JSON.parse(t); } catch (e) { return undefined; }
}

function render(div, text, final) {
  const body = div.querySelector(".body");
  const data = final ? asJSON(text) : undefined;
  if (data !== undefined) {  // shown as indented JSON, not as markdown
    const pre = document.createElement("pre");
    const code = document.createElement("code");
    code.className = "language-json";
    code.textContent = JSON.stringify(data, null, 2);
    pre.appendChild(code);
    body.replaceChildren(pre);
    div.dataset.json = "true";
  } else {
    body.innerHTML = DOMPurify.sanitize(marked.parse(text, {gfm: true}), PURIFY);
  }
  for (const pre of body.querySelectorAll("pre")) addCopy(pre);
}

function addCopy(pre) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.addEventListener("click", async () => {
    const text = (pre.querySelector("code") || pre).textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch (e) {  // no clipboard API (plain http on another host): select the text for Ctrl-C
      const range = document.createRange();
      range.selectNodeContents(pre.querySelector("code") || pre);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
    }
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  pre.appendChild(button);
}

function blockView(div, label, text) {  // a tool call or other non-text block, shown plainly
  const box = document.createElement("div");
  box.className = "block";
  const head = document.createElement("div");
  head.className = "label";
  head.textContent = label;
  const pre = document.createElement("pre");
  pre.textContent = text;
  box.append(head, pre);
  div.insertBefore(box, div.querySelector(".meta"));
  return pre;
}

function addMeta(div, text) {
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = text;
  div.appendChild(meta);
}

function describe(usage, seconds, stop) {  // "42 tokens · 18.3 tok/s · 37 prompt tokens (32 cached) · end_turn"
  const parts = [];
  if (usage && usage.output_tokens != null) {
    parts.push(usage.output_tokens + " tokens");
    if (seconds > 0 && usage.output_tokens > 1) parts.push((usage.output_tokens / seconds).toFixed(1) + " tok/s");
    const cached = usage.cache_read_input_tokens || 0;
    if (usage.input_tokens != null) {
      parts.push((usage.input_tokens + cached) + " prompt tokens" + (cached ? " (" + cached + " cached)" : ""));
    }
  }
  if (stop) parts.push(stop);
  return parts.join(" · ");
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "busy" : "idle";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function drawer(open) {
  document.body.classList.toggle("drawer", open);
}

// Server-sent events from a fetch body: the complete frames in buf and the unfinished rest (comments skipped).
function frames(buf) {
  const out = [];
  let i;
  while ((i = buf.indexOf("\n\n")) >= 0) {
    const raw = buf.slice(0, i);
    buf = buf.slice(i + 2);
    let event = "message", data = "";
    for (const line of raw.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    if (data || event !== "message") out.push({event, data});
  }
  return [out, buf];
}

async function errorOf(res) {  // the API's error message, or the status line
  const text = await res.text().catch(() => "");
  try {
    const err = JSON.parse(text).error;
    if (err && err.message) return "HTTP " + res.status + ": " + err.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + res.status + " " + res.statusText + (text ? ": " + text.slice(0, 300) : "");
}

// ------------------------------------------------------------------ one turn
async function send(text) {
  turns.push({role: "user", content: text});
  bubble("user").textContent = text;
  const div = bubble("assistant");
  const body = {
    model: $("model").textContent,
    max_tokens: parseInt($("max-tokens").value, 10) || 512,
    temperature: parseFloat($("temperature").value),
    messages: turns.map((t) => ({role: t.role, content: t.content})),
    stream: true,
    cairn: {self_critique: $("self-critique").checked},
  };
  const system = $("system").value.trim();
  if (system) body.system = system;
  const headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"};
  const key = $("api-key").value;
  if (key) headers["x-api-key"] = key;
  controller = new AbortController();
  setBusy(true);
  let reply = "", stop = null, critique = null, usage = null, failure = null, first = null, last = null;
  const blocks = {};  // index -> {label, json, pre} for non-text content blocks
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; render(div, reply, false); div.scrollIntoView({block: "end"}); });
  };
  try {
    const res = await fetch("/v1/messages", {method: "POST", headers, body: JSON.stringify(body),
                                             signal: controller.signal});
    if (!res.ok) throw new Error(await errorOf(res));
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      let evs;
      [evs, buf] = frames(buf + decoder.decode(value, {stream: true}));
      for (const ev of evs) {
        const data = ev.data ? JSON.parse(ev.data) : {};
        if (ev.event === "message_start") {
          usage = Object.assign({}, data.message.usage);
        } else if (ev.event === "content_block_start" && data.content_block.type !== "text") {
          const b = data.content_block;
          const label = b.type === "tool_use" ? "tool call: " + b.name : b.type;
          const json = b.type === "tool_use" ? "" : JSON.stringify(b, null, 2);
          blocks[data.index] = {label, json, pre: blockView(div, label, json)};
        } else if (ev.event === "content_block_delta" && data.delta.type === "text_delta") {
          reply += data.delta.text;
          first = first || performance.now();
          last = performance.now();
          div.dataset.deltas = String(Number(div.dataset.deltas || 0) + 1);
          redraw();
        } else if (ev.event === "content_block_delta" && data.delta.type === "input_json_delta") {
          const b = blocks[data.index];
          if (b) { b.json += data.delta.partial_json; b.pre.textContent = b.json; }
          first = first || performance.now();
          last = performance.now();
        } else if (ev.event === "content_block_stop" && blocks[data.index]) {
          const b = blocks[data.index];
          try { b.json = JSON.stringify(JSON.parse(b.json || "{}"), null, 2); } catch (e) { /* as it came */ }
          b.pre.textContent = b.json;
        } else if (ev.event === "message_delta") {
          stop = data.delta.stop_reason;
          usage = Object.assign(usage || {}, data.usage);
          critique = data.cairn ? data.cairn.self_critique : null;
        } else if (ev.event === "error") {
          throw new Error((data.error && data.error.message) || "the server reported an error");
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stop = "stopped";
    else failure = e instanceof TypeError ? "could not reach the server (" + e.message + ")" : e.message;
  } finally {
    controller = null;
    setBusy(false);
  }
  render(div, reply, !failure && stop !== "stopped");
  if (failure) {
    div.classList.add("error");
    const p = document.createElement("div");
    p.className = "error-text";
    p.textContent = "Error: " + failure;
    div.appendChild(p);
  }
  const meta = stop === "stopped" ? "stopped" : describe(usage, first && last > first ? (last - first) / 1000 : 0, stop);
  if (meta) addMeta(div, meta);
  if (critique) {  // the draft and each critique, folded away under the revision
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "self-critique: draft and " + critique.critiques.length + " critique(s)";
    details.appendChild(summary);
    details.appendChild(document.createTextNode("Draft: " + critique.draft));
    for (const c of critique.critiques) {
      details.appendChild(document.createTextNode("\n\nCritique (" + c.principle + "): " + c.critique));
    }
    div.appendChild(details);
  }
  const kept = Object.values(blocks).map((b) => ({label: b.label, text: b.json}));
  if (reply) turns.push({role: "assistant", content: reply, meta, blocks: kept});
  else turns.pop();  // no text came back: drop the unanswered user turn (it stays on screen)
  div.dataset.done = "true";
  remember();
}

// ------------------------------------------------------------------ wiring
const apiKey = $("api-key");
apiKey.value = localStorage.getItem("cairn-api-key") || "";
apiKey.addEventListener("change", () => localStorage.setItem("cairn-api-key", apiKey.value));
$("temperature").addEventListener("input", (e) => { $("temperature-value").textContent = e.target.value; });
$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
const fresh = () => {
  if (controller) controller.abort();
  show(null);
  drawer(false);
};
$("clear").addEventListener("click", fresh);
$("new").addEventListener("click", fresh);
$("menu").addEventListener("click", () => drawer(!document.body.classList.contains("drawer")));
$("backdrop").addEventListener("click", () => drawer(false));
show(conversations[0] || null);
