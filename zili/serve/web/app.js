// zili chat page: talks to /v1/chat/completions with streaming (server-sent events).
// Plain DOM, no framework, nothing loaded from elsewhere. Text is inserted with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, messages: [], controller: null, apiKey: sessionStorage.getItem("zili-api-key") || "" };

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.apiKey) h["Authorization"] = "Bearer " + state.apiKey;
  return h;
}

// The chat request; an empty max-tokens field lets the server use the room left in the context.
function request() {
  const body = { model: state.model, messages: state.messages, stream: true, stream_options: { include_usage: true },
                 temperature: Number($("temperature").value) };
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  return body;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return body;
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("key-bar").hidden = false;
    $("model-name").textContent = "API key needed";
    return;
  }
  const data = await response.json();
  state.model = data.data[0].id;
  $("model-name").textContent = state.model;
  $("key-bar").hidden = true;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Yields the JSON payload of each `data:` event of an SSE body; stops at [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;  // comments are keep-alives
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send() {
  const text = $("input").value.trim();
  if (!text || state.controller || !state.model) return;
  $("input").value = "";
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const target = addMessage("assistant", "");
  state.controller = new AbortController();
  setBusy(true);
  $("stats").textContent = "";
  let answer = "", tokens = 0, deltas = 0, firstTokenAt = null;
  const started = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify(request()),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ error: { message: response.statusText } }));
      throw new Error(error.error.message);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : "";
      if (delta) {
        if (firstTokenAt === null) firstTokenAt = performance.now();
        answer += delta;
        deltas += 1;
        target.textContent = answer;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") {
      target.parentElement.classList.add("error");
      target.textContent = answer + "\n[" + error.message + "]";
    }
  } finally {
    const seconds = (performance.now() - (firstTokenAt ?? started)) / 1000;
    if (!tokens) tokens = deltas;  // stopped early: no usage chunk; a text delta is about one token
    $("stats").textContent = tokens && seconds > 0 ? `${(tokens / seconds).toFixed(1)} tokens/s` : "";
    state.messages.push({ role: "assistant", content: answer });
    state.controller = null;
    setBusy(false);
  }
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("messages").replaceChildren();
  $("stats").textContent = "";
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
});
$("save-key").addEventListener("click", () => {
  state.apiKey = $("api-key").value;
  sessionStorage.setItem("zili-api-key", state.apiKey);
  loadModel();
});
loadModel();
