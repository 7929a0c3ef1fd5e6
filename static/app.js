// The status page: memory at a glance, every model with Load and Unload buttons, live
// activity (requests, slots, tokens per second, time to first token), the lifecycle events,
// and a multi-turn chat that streams from /v1/chat/completions.
//
// The model table follows the /admin/events stream (or polls /admin/models when the stream
// fails); memory and activity come from /admin/stats, polled every few seconds.
// Streams are read with fetch() and a ReadableStream reader, not EventSource, because
// EventSource cannot send the Authorization header. Every string from the server goes
// into the page as text (textContent, Text nodes, Option), never as HTML; model output is
// rendered by markdown.js, which builds nodes the same way.
"use strict";

const KEY_STORAGE = "llama-cpp-server.api-key";
const POLL_MS = 2000; // refresh interval when the event stream fails
// Requests starting and ending are not lifecycle events, so in-flight counts and idle
// countdowns are also refreshed now and then while the stream is live.
const LIVE_REFRESH_MS = 10000;
const STATS_MS = 2000; // memory and activity refresh interval
const EVENTS_KEPT = 200; // events listed at most (newest first)
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
let statsTimer = null;
let statsRunning = false;
const shownEvents = new Set(); // id@time of the events listed: a reconnect's replayed history skips them
const conversation = []; // the chat so far: {role, content} as sent to the server

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
  stopStats();
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
  startStats();
}

async function followEvents() {
  events?.abort();
  const controller = (events = new AbortController());
  try {
    const response = await request("admin/events", { signal: controller.signal }); // recent history first
    if (!response.ok || !response.body) throw new Error(await errorMessage(response));
    setPolling(LIVE_REFRESH_MS);
    setMode("live");
    refreshSoon(); // catch up on anything that changed before the stream opened
    await readEvents(response.body, (data) => {
      showEvent(JSON.parse(data));
      refreshSoon();
      refreshStats();
    });
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
  // The column names, for the phone layout (each row a card, each cell labelled by CSS).
  for (const [key, label] of Object.entries(COLUMN_LABELS)) cells[key].dataset.label = label;
  cells.load = actionButton("Load", id, "load");
  cells.unload = actionButton("Unload", id, "unload");
  const actions = document.createElement("td");
  actions.className = "actions";
  actions.append(cells.load, " ", cells.unload);
  row.append(actions);
  $("models").tBodies[0].append(row);
  const entry = { row, cells, view: null };
  rows.set(id, entry);
  return entry;
}

const COLUMN_LABELS = { state: "State", size: "Size", memory: "Est. memory", inFlight: "In flight",
  lastUsed: "Last used", expires: "Unloads in" };

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

// ------------------------------------------------------------------ memory and activity

function startStats() {
  stopStats();
  statsTimer = setInterval(refreshStats, STATS_MS);
  refreshStats();
}

function stopStats() {
  clearInterval(statsTimer);
  statsTimer = null;
}

// Fetches /admin/stats unless a fetch is already running (the next tick catches up).
async function refreshStats() {
  if (statsRunning || mode === "key") return;
  statsRunning = true;
  try {
    const response = await request("admin/stats");
    if (!response.ok) throw new Error(await errorMessage(response));
    const stats = await response.json();
    renderMemory(stats.memory, stats.instances);
    renderActivity(stats.instances, stats.activity);
  } catch (error) {
    if (!(error instanceof AuthError)) $("memory-summary").textContent = `Cannot read the memory (${error.message})`;
  } finally {
    statsRunning = false;
  }
}

// One colour per model, kept while the page is open, so a model keeps its colour in the
// bar, the legend and its chart.
const colours = new Map();
function colourOf(id) {
  if (!colours.has(id)) colours.set(id, colours.size % 6);
  return `colour-${colours.get(id)}`;
}

// The RAM bar: each model's worker (its RSS), this server, everything else used; the
// memory_budget as a marker; the same for each GPU where NVML reports one.
function renderMemory(memory, instances) {
  const total = memory.total_bytes;
  const workers = instances.filter((i) => i.rss_bytes);
  const modelBytes = workers.reduce((sum, i) => sum + i.rss_bytes, 0);
  const other = Math.max(0, memory.used_bytes - modelBytes - memory.server_rss_bytes);
  const parts = [
    ...workers.map((i) => ({ model: i.model, label: instanceLabel(i), bytes: i.rss_bytes, className: colourOf(i.model),
      detail: `${formatBytes(i.rss_bytes)} resident, estimate ${formatBytes(i.estimated_memory_bytes)}` +
        (i.vram_bytes ? `, ${formatBytes(i.vram_bytes)} VRAM` : "") })),
    { label: "this server", bytes: memory.server_rss_bytes, className: "server", detail: formatBytes(memory.server_rss_bytes) },
    { label: "everything else", bytes: other, className: "other", detail: formatBytes(other) },
  ];
  fillBar($("memory-bar"), parts, total, memory.budget_bytes);
  $("memory-legend").replaceChildren(...parts.map(legendItem));
  const used = `RAM ${formatBytes(memory.used_bytes)} of ${formatBytes(total)} used (${percent(memory.used_bytes, total)})`;
  const models = `models ${formatBytes(modelBytes)} resident`;
  const budget = memory.budget_bytes == null
    ? "no memory_budget set"
    : `memory_budget ${formatBytes(memory.budget_bytes)}, ${formatBytes(memory.estimated_bytes)} of it estimated in use`;
  $("memory-summary").textContent = [used, models, budget].join(" · ");
  renderGpus(memory.gpus, instances);
}

function renderGpus(gpus, instances) {
  $("gpus").replaceChildren(...gpus.map((gpu) => {
    const block = document.createElement("div");
    const summary = document.createElement("p");
    summary.textContent = `GPU ${gpu.index} (${gpu.name}): VRAM ${formatBytes(gpu.used_bytes)} of ` +
      `${formatBytes(gpu.total_bytes)} used (${percent(gpu.used_bytes, gpu.total_bytes)})`;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `GPU ${gpu.index} memory use`);
    bar.append(Object.assign(document.createElement("div"), { className: "segments" }));
    const held = instances.filter((i) => i.vram_bytes);
    const heldBytes = held.reduce((sum, i) => sum + i.vram_bytes, 0);
    fillBar(bar, [
      ...held.map((i) => ({ model: i.model, label: instanceLabel(i), bytes: i.vram_bytes, className: colourOf(i.model) })),
      { label: "everything else", bytes: Math.max(0, gpu.used_bytes - heldBytes), className: "other" },
    ], gpu.total_bytes, null);
    block.append(summary, bar);
    return block;
  }));
}

function fillBar(bar, parts, total, budget) {
  bar.querySelector(".segments").replaceChildren(...parts.filter((part) => part.bytes > 0).map((part) => {
    const segment = document.createElement("div");
    segment.className = `segment ${part.className}`;
    segment.style.width = `${Math.min(100, (100 * part.bytes) / total)}%`; // CSSOM, which the CSP allows
    segment.title = `${part.label}: ${formatBytes(part.bytes)}`;
    if (part.model) segment.dataset.model = part.model;
    return segment;
  }));
  const marker = bar.querySelector(".budget");
  if (marker) {
    marker.hidden = budget == null;
    if (budget != null) {
      marker.style.left = `${Math.min(100, (100 * budget) / total)}%`;
      marker.title = `memory_budget ${formatBytes(budget)}`;
    }
  }
}

function legendItem(part) {
  const item = document.createElement("li");
  const swatch = document.createElement("span");
  swatch.className = `swatch ${part.className}`;
  const name = document.createElement("strong");
  name.textContent = part.label;
  item.append(swatch, name, ` ${part.detail}`);
  return item;
}

function instanceLabel(instance) {
  const mode = instance.mode === "embed" ? " (embeddings)" : "";
  return `${instance.model}${mode}${instance.pid ? ` · pid ${instance.pid}` : ""}`;
}

function percent(part, whole) {
  return whole ? `${Math.round((100 * part) / whole)}%` : "—";
}

// One card per model that is running or generated lately: its requests and slots, a
// chart of tokens per second over the window, and the time to first token.
const cards = new Map(); // model id -> {card, counts, chart, speed}

function renderActivity(instances, activity) {
  const ids = new Set([...instances.map((i) => i.model), ...Object.keys(activity.models)]);
  for (const id of ids) {
    const entry = cards.get(id) ?? addCard(id);
    const running = instances.filter((i) => i.model === id);
    updateCard(entry, running, activity.models[id], activity);
  }
  for (const [id, entry] of cards) {
    if (!ids.has(id)) {
      entry.card.remove();
      cards.delete(id);
    }
  }
  $("no-activity").hidden = ids.size > 0;
}

function addCard(id) {
  const card = document.createElement("article");
  card.className = "card";
  card.dataset.model = id;
  const title = document.createElement("h3");
  title.textContent = id;
  const counts = document.createElement("p");
  counts.className = "counts";
  const chart = document.createElementNS(SVG, "svg");
  chart.classList.add("chart", colourOf(id));
  chart.setAttribute("viewBox", `0 0 ${CHART.width} ${CHART.height}`);
  chart.setAttribute("preserveAspectRatio", "none");
  chart.setAttribute("role", "img");
  const area = document.createElementNS(SVG, "polygon");
  const line = document.createElementNS(SVG, "polyline");
  chart.append(area, line);
  const speed = document.createElement("p");
  speed.className = "speed";
  card.append(title, counts, chart, speed);
  $("activity").append(card);
  const entry = { card, counts, chart, area, line, speed };
  cards.set(id, entry);
  return entry;
}

const SVG = "http://www.w3.org/2000/svg";
const CHART = { width: 300, height: 60 };

function updateCard(entry, running, recent, activity) {
  const sum = (key) => running.reduce((total, i) => total + (i[key] ?? 0), 0);
  const slots = running.map((i) => i.slots).filter((n) => n != null);
  const state = running.length ? running.map((i) => i.state).join(", ") : "not loaded";
  const generating = slots.length ? `${sum("generating")} of ${slots.reduce((a, b) => a + b, 0)} slots generating`
    : `${sum("generating")} generating`;
  entry.counts.textContent = `${state} · ${sum("in_flight")} in flight · ${generating} · ${sum("queued")} queued`;
  const rates = recent?.tokens_per_second ?? new Array(activity.window_seconds / activity.bucket_seconds).fill(0);
  drawChart(entry, rates);
  entry.chart.dataset.tokens = String(recent?.tokens ?? 0);
  const peak = Math.max(0, ...rates);
  entry.chart.setAttribute("aria-label", `Tokens per second over the last ${activity.window_seconds / 60} minutes, ` +
    `peak ${peak.toFixed(1)}`);
  entry.speed.textContent = recent ? speedText(recent, rates) : "No completions in the last 5 minutes";
}

function drawChart(entry, rates) {
  const top = Math.max(1, ...rates);
  const step = CHART.width / Math.max(1, rates.length - 1);
  const points = rates.map((rate, i) =>
    `${(i * step).toFixed(1)},${(CHART.height - 2 - (rate / top) * (CHART.height - 4)).toFixed(1)}`);
  entry.line.setAttribute("points", points.join(" "));
  entry.area.setAttribute("points", `0,${CHART.height} ${points.join(" ")} ${CHART.width},${CHART.height}`);
}

function speedText(recent, rates) {
  const parts = [`now ${rates[rates.length - 1].toFixed(1)} tok/s`,
    `${recent.tokens} tokens in ${recent.completions} completion${recent.completions === 1 ? "" : "s"}`];
  if (recent.last.tokens_per_second != null) parts.push(`last ${recent.last.tokens_per_second.toFixed(1)} tok/s`);
  const ttft = recent.ttft_seconds;
  if (ttft.last != null) parts.push(`first token ${formatSeconds(ttft.last)} (median ${formatSeconds(ttft.median)})`);
  return parts.join(" · ");
}

function formatSeconds(seconds) {
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

// ------------------------------------------------------------------ events

const EVENT_GROUPS = { // the filter's groups
  load: new Set(["loading", "loaded"]),
  unload: new Set(["unloading", "unloaded"]),
  problem: new Set(["failed", "crashed"]),
};

function showEvent(event) {
  const key = `${event.id}@${event.time}`; // ids start again when the server restarts; times do not
  if (shownEvents.has(key)) return;
  if (shownEvents.size > 10 * EVENTS_KEPT) shownEvents.clear(); // bounded; older ones are long off the list
  shownEvents.add(key);
  if (event.event === "loading" && event.progress != null) return; // progress shows in the table
  const item = document.createElement("li");
  item.dataset.kind = event.event;
  item.dataset.model = event.model ?? "";
  const time = document.createElement("time");
  time.dateTime = new Date(event.time * 1000).toISOString();
  time.textContent = new Date(event.time * 1000).toLocaleTimeString();
  const kind = document.createElement("span");
  kind.className = "kind";
  kind.textContent = event.event;
  const model = document.createElement("strong");
  model.textContent = event.model ?? "";
  item.append(time, " ", kind, " ", model, eventDetail(event));
  const list = $("events");
  list.prepend(item);
  while (list.children.length > EVENTS_KEPT) list.lastElementChild.remove();
  filterEvents();
}

function eventDetail(e) {
  const parts = [];
  if (e.mode === "embed") parts.push("embeddings");
  if (e.event === "loaded") parts.push(`in ${e.seconds} s`, e.rss_mb != null ? `${e.rss_mb} MiB resident` : null);
  if (e.event === "unloading") parts.push(`reason: ${e.reason}`);
  if (e.event === "unloaded") {
    parts.push(`reason: ${e.reason}`, `in ${e.seconds} s`, e.freed_rss_mb != null ? `freed ${e.freed_rss_mb} MiB` : null,
      e.freed_vram_mb != null ? `and ${e.freed_vram_mb} MiB VRAM` : null);
  }
  if (e.event === "failed" || e.event === "crashed") parts.push(e.reason, e.signal ? `signal ${e.signal}` : null);
  const text = parts.filter((part) => part != null && part !== "").join(", ");
  return text ? `: ${text}` : "";
}

function filterEvents() {
  const group = EVENT_GROUPS[$("event-kind").value];
  const model = $("event-model").value.trim().toLowerCase();
  let shown = 0;
  for (const item of $("events").children) {
    item.hidden = (group && !group.has(item.dataset.kind)) || (model && !item.dataset.model.toLowerCase().includes(model));
    if (!item.hidden) shown += 1;
  }
  $("no-events").hidden = shown > 0;
  $("no-events").textContent = $("events").children.length ? "No events match the filter." : "No events yet.";
}

$("event-kind").addEventListener("change", filterEvents);
$("event-model").addEventListener("input", filterEvents);

// ------------------------------------------------------------------ chat

function updateChatModels(ids) {
  const select = $("chat-model");
  const current = [...select.options].map((o) => o.value);
  if (current.join("\n") === ids.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...ids.map((id) => new Option(id, id)));
  if (ids.includes(chosen)) select.value = chosen;
}

// A message in the log. The user's text is shown as typed; the assistant's is rendered
// from Markdown as it streams, with any reasoning folded above it.
function addMessage(role, text = "") {
  const message = document.createElement("article");
  message.className = `message ${role}`;
  const who = document.createElement("h3");
  who.textContent = role === "user" ? "You" : $("chat-model").value;
  const content = document.createElement("div");
  content.className = "content";
  message.append(who);
  const parts = { message, content, reasoning: null, reasoningText: null };
  if (role === "assistant") {
    parts.reasoning = document.createElement("details");
    parts.reasoning.className = "reasoning";
    parts.reasoning.hidden = true;
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    parts.reasoningText = document.createElement("div");
    parts.reasoning.append(summary, parts.reasoningText);
    message.append(parts.reasoning);
  } else {
    content.textContent = text;
  }
  message.append(content);
  $("chat-log").append(message);
  message.scrollIntoView({ block: "nearest" });
  return parts;
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("chat-message").value;
  if (!text.trim() || chat) return;
  $("chat-error").hidden = true;
  $("chat-message").value = "";
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant");
  const answer = { content: "", reasoning: "" };
  let drawn = false;
  const draw = () => { // at most once a frame: each draw renders the whole answer so far
    if (drawn) return;
    drawn = true;
    requestAnimationFrame(() => {
      drawn = false;
      reply.content.replaceChildren(renderMarkdown(answer.content));
      if (answer.reasoning) {
        reply.reasoning.hidden = false;
        reply.reasoningText.textContent = answer.reasoning;
      }
    });
  };
  chat = new AbortController();
  setChatBusy(true, reply);
  const body = { model: $("chat-model").value, stream: true, messages: conversation.map((m) => ({ ...m })) };
  try {
    const response = await postJSON("v1/chat/completions", body, { signal: chat.signal });
    if (!response.ok) throw new Error(await errorMessage(response));
    refreshSoon(); // in flight now
    await readEvents(response.body, (data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) showChatError(chunk.error.message ?? "The server reported an error");
      const delta = chunk.choices?.[0]?.delta ?? {};
      if (delta.content) answer.content += delta.content;
      if (delta.reasoning_content) answer.reasoning += delta.reasoning_content;
      if (delta.content || delta.reasoning_content) draw();
      return true;
    });
  } catch (error) {
    if (error instanceof AuthError) showChatError("Enter an API key above, then send again.");
    else if (error.name !== "AbortError") showChatError(error.message);
  } finally {
    chat.abort(); // a no-op after [DONE]; after a failure or Stop it hangs up so generation stops
    chat = null;
    if (answer.content) {
      conversation.push({ role: "assistant", content: answer.content });
    } else if (!answer.reasoning) { // nothing came back: the question is not part of the conversation
      conversation.pop();
      reply.message.classList.add("failed");
      reply.content.textContent = "(no answer)";
    }
    if (answer.content || answer.reasoning) draw(); // a draw of nothing would wipe "(no answer)"
    setChatBusy(false, reply);
    refreshSoon();
    refreshStats();
  }
});

$("chat-stop").addEventListener("click", () => chat?.abort());

$("chat-clear").addEventListener("click", () => {
  chat?.abort();
  conversation.length = 0;
  $("chat-log").replaceChildren();
  $("chat-error").hidden = true;
  $("chat-message").focus();
});

// Enter sends; Shift+Enter starts a new line.
$("chat-message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

function setChatBusy(busy, reply) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
  reply.message.setAttribute("aria-busy", String(busy));
}

function showChatError(text) {
  $("chat-error").textContent = text;
  $("chat-error").hidden = false;
}

start();
setInterval(tick, 1000);
