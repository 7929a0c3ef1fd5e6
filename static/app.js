// The status page: every model with Load and Unload buttons, kept current from the
// /admin/events stream (or by polling /admin/models when the stream fails), and a chat box
// that streams a reply from /v1/chat/completions.
//
// Streams are read with fetch() and a ReadableStream reader, not EventSource, because
// EventSource cannot send the Authorization header. Every string from the server goes
// into the page as text (textContent, Text nodes, Option), never as HTML.
"use strict";

const KEY_STORAGE = "llama-cpp-server.api-key";
const POLL_MS = 2000; // refresh interval when the event stream fails
// Requests starting and ending are not lifecycle events, so in-flight counts and idle
// countdowns are also refreshed now and then while the stream is live.
const LIVE_REFRESH_MS = 10000;
const MODES = { // how the model list is kept current, as the page says it
  connecting: "Connecting…",
  live: "Live updates",
  polling: `Live updates unavailable: refreshing every ${POLL_MS / 1000} s`,
  key: "Waiting for an API key",
};

const $ = (id) => document.getElementById(id);
const rows = new Map(); // model id -> {row, cells, view}
const pending = new Set(); // model ids with a Load or Unload request from this page running
let serverOffset = 0; // the server's clock minus ours, in seconds
let events = null; // AbortController of the /admin/events fetch
let pollTimer = null;
let mode = "connecting"; // a key of MODES
let refreshing = null;
let refreshAgain = false;
let chat = null; // AbortController of the running chat stream

class AuthError extends Error {}

// ------------------------------------------------------------------ requests

function withKey(headers = {}) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

// fetch() with the API key; a 401 or 403 shows the key form and throws AuthError.
async function request(path, options = {}) {
  const response = await fetch(path, { ...options, headers: withKey(options.headers) });
  if (response.status === 401 || response.status === 403) {
    askForKey(await errorMessage(response));
    throw new AuthError("API key needed");
  }
  return response;
}

function postJSON(path, body, options = {}) {
  return request(path, {
    ...options,
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// Calls onData(text) for every "data:" line of a Server-Sent Events body (this server
// sends one data line per event); "id:", "event:" and ":" comment lines are skipped.
// Stops when the body ends or onData returns false.
async function readEvents(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line.startsWith("data:") && onData(line.slice(5).trimStart()) === false) {
        await reader.cancel();
        return;
      }
    }
  }
}

// ------------------------------------------------------------------ API key

function askForKey(reason) {
  $("key-reason").textContent = `${reason}. Enter a key to continue.`;
  const form = $("key-form");
  if (form.hidden) {
    form.hidden = false;
    $("key-input").focus();
  }
  stopPolling();
  setMode("key");
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
  $("key-input").value = "";
  $("key-form").hidden = true;
  start();
});

// ------------------------------------------------------------------ live updates

function start() {
  stopPolling();
  setMode("connecting");
  refreshSoon();
  followEvents();
}

async function followEvents() {
  events?.abort();
  const controller = (events = new AbortController());
  try {
    const response = await request("admin/events?history=0", { signal: controller.signal });
    if (!response.ok || !response.body) throw new Error(await errorMessage(response));
    setPolling(LIVE_REFRESH_MS);
    setMode("live");
    refreshSoon(); // catch up on anything that changed before the stream opened
    await readEvents(response.body, () => { refreshSoon(); });
    throw new Error("the event stream ended");
  } catch (error) {
    if (!controller.signal.aborted && !(error instanceof AuthError)) {
      setPolling(POLL_MS);
      setMode("polling");
    }
  }
}

function setPolling(ms) {
  stopPolling();
  pollTimer = setInterval(refreshSoon, ms);
}

function stopPolling() {
  clearInterval(pollTimer);
  pollTimer = null;
}

function setMode(newMode) {
  mode = newMode;
  $("connection").textContent = MODES[mode];
}

// Fetches the model list; calls made while one is running coalesce into one more.
function refreshSoon() {
  if (refreshing) {
    refreshAgain = true;
    return refreshing;
  }
  refreshing = refreshModels()
    .catch((error) => {
      if (!(error instanceof AuthError)) $("connection").textContent = `Cannot refresh the models (${error.message})`;
    })
    .finally(() => {
      refreshing = null;
      if (refreshAgain) {
        refreshAgain = false;
        refreshSoon();
      }
    });
  return refreshing;
}

async function refreshModels() {
  const response = await request("admin/models");
  if (!response.ok) throw new Error(await errorMessage(response));
  const { models, requests } = await response.json();
  $("connection").textContent = MODES[mode]; // replaces an earlier failure's message
  render(models);
  renderRequests(requests ?? {});
}

// Requests answered per API since the server started (OpenAI, Anthropic, Ollama, llama.cpp's own).
function renderRequests(requests) {
  const apis = Object.entries(requests).filter(([api]) => api !== "admin" && api !== "other");
  $("requests").textContent = apis.length
    ? "Requests by API: " + apis.map(([api, count]) => `${api} ${count}`).join(" · ")
    : "";
}

// ------------------------------------------------------------------ the table

function render(models) {
  const idle = models.find((m) => m.last_used && m.idle_seconds != null);
  if (idle) serverOffset = idle.last_used + idle.idle_seconds - Date.now() / 1000;
  const seen = new Set();
  for (const model of models) {
    seen.add(model.id);
    const entry = rows.get(model.id) ?? addRow(model.id);
    entry.view = model;
    updateRow(entry);
  }
  for (const [id, entry] of rows) {
    if (!seen.has(id)) {
      entry.row.remove();
      rows.delete(id);
    }
  }
  $("no-models").hidden = models.length > 0;
  updateChatModels(models.map((m) => m.id));
  tick();
}

function addRow(id) {
  const row = document.createElement("tr");
  const cells = { name: document.createElement("th") };
  cells.name.scope = "row";
  row.append(cells.name);
  for (const key of ["state", "size", "memory", "inFlight", "lastUsed", "expires"]) {
    cells[key] = document.createElement("td");
    row.append(cells[key]);
  }
  for (const key of ["size", "memory", "inFlight"]) cells[key].className = "number";
  cells.load = actionButton("Load", id, "load");
  cells.unload = actionButton("Unload", id, "unload");
  const actions = document.createElement("td");
  actions.append(cells.load, " ", cells.unload);
  row.append(actions);
  $("models").tBodies[0].append(row);
  const entry = { row, cells, view: null };
  rows.set(id, entry);
  return entry;
}

function actionButton(label, id, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.setAttribute("aria-label", `${label} ${id}`);
  button.addEventListener("click", () => act(action, id));
  return button;
}

function updateRow({ row, cells, view: m }) {
  cells.name.replaceChildren(m.id);
  if (m.aliases.length) {
    const aliases = document.createElement("span");
    aliases.className = "aliases";
    aliases.textContent = `also ${m.aliases.join(", ")}`;
    cells.name.append(aliases);
  }
  row.dataset.state = m.state;
  cells.state.replaceChildren(stateText(m));
  if (m.error) {
    const error = document.createElement("span");
    error.className = "error";
    error.textContent = m.error;
    cells.state.append(error);
  }
  cells.size.textContent = formatBytes(m.size_bytes);
  cells.memory.textContent = formatBytes(m.estimated_memory_bytes);
  cells.inFlight.textContent = m.queued ? `${m.in_flight} (${m.queued} queued)` : String(m.in_flight);
  const busy = pending.has(m.id) || m.state === "loading" || m.state === "unloading";
  cells.load.disabled = busy || m.state === "loaded";
  cells.unload.disabled = busy || !(m.state === "loaded" || m.embeddings?.state === "loaded");
}

function stateText(m) {
  let text = m.state === "loading" && m.progress != null ? `loading ${Math.round(m.progress * 100)}%` : m.state;
  if (m.pinned) text += " (pinned)";
  if (m.embeddings && m.embeddings.state !== "unloaded") text += `, embeddings ${m.embeddings.state}`;
  return text;
}

// Once a second: the "last used" and "unloads in" columns count on between refreshes.
function tick() {
  const now = Date.now() / 1000 + serverOffset;
  for (const { cells, view: m } of rows.values()) {
    cells.lastUsed.textContent = m.last_used ? formatAgo(now - m.last_used) : "never";
    cells.expires.textContent = expiresText(m, now);
  }
}

function expiresText(m, now) {
  if (m.state !== "loaded") return "—";
  if (m.pinned) return "never (pinned)";
  if (m.in_flight) return "busy";
  if (m.expires_at == null) return "never";
  const left = m.expires_at - now;
  return left > 0 ? formatDuration(left) : "due";
}

async function act(action, id) {
  pending.add(id);
  updateRow(rows.get(id));
  $("notice").hidden = true;
  try {
    const response = await postJSON(`admin/${action}`, { model: id });
    if (!response.ok) throw new Error(await errorMessage(response));
  } catch (error) {
    if (!(error instanceof AuthError)) showNotice(`${action === "load" ? "Load" : "Unload"} ${id}: ${error.message}`);
  } finally {
    pending.delete(id);
    await refreshSoon();
  }
}

function showNotice(text) {
  $("notice").textContent = text;
  $("notice").hidden = false;
}

function formatBytes(bytes) {
  if (bytes == null) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function formatDuration(seconds) {
  const total = Math.ceil(seconds);
  const pad = (n) => String(n).padStart(2, "0");
  const [h, m, s] = [Math.floor(total / 3600), Math.floor((total % 3600) / 60), total % 60];
  return h ? `${h}:${pad(m)}:${pad(s)}` : `${m}:${pad(s)}`;
}

function formatAgo(seconds) {
  if (seconds < 5) return "just now";
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

// ------------------------------------------------------------------ chat

function updateChatModels(ids) {
  const select = $("chat-model");
  const current = [...select.options].map((o) => o.value);
  if (current.join("\n") === ids.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...ids.map((id) => new Option(id, id)));
  if (ids.includes(chosen)) select.value = chosen;
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const reply = document.createTextNode("");
  $("chat-reply").replaceChildren(reply);
  $("chat-error").hidden = true;
  chat = new AbortController();
  setChatBusy(true);
  const body = {
    model: $("chat-model").value,
    stream: true,
    messages: [{ role: "user", content: $("chat-message").value }],
  };
  try {
    const response = await postJSON("v1/chat/completions", body, { signal: chat.signal });
    if (!response.ok) throw new Error(await errorMessage(response));
    refreshSoon(); // in flight now
    await readEvents(response.body, (data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) showChatError(chunk.error.message ?? "The server reported an error");
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) reply.appendData(piece);
      return true;
    });
  } catch (error) {
    if (error instanceof AuthError) showChatError("Enter an API key above, then send again.");
    else if (error.name !== "AbortError") showChatError(error.message);
  } finally {
    chat.abort(); // a no-op after [DONE]; after a failure it hangs up so generation stops
    chat = null;
    setChatBusy(false);
    refreshSoon();
  }
});

$("chat-stop").addEventListener("click", () => chat?.abort());

function setChatBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
  $("chat-reply").setAttribute("aria-busy", String(busy));
}

function showChatError(text) {
  $("chat-error").textContent = text;
  $("chat-error").hidden = false;
}

start();
setInterval(tick, 1000);
