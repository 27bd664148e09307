// The llmos web desktop: sign-in, a streaming chat, the process table, the KV memory map and the models.
// Plain ES module, no dependencies, no build step. It talks only to this daemon's HTTP API and never
// stores the API key anywhere but this tab's sessionStorage.

const KEY_STORAGE = "llmos.key";
const POLL_MS = 1000;          // process table and KV map
const MODELS_POLL_MS = 3000;   // model list
const ENDED_KEEP_MS = 15000;   // how long a process that left the live list stays in the table
const MAX_CELLS = 16384;       // KV map cells at most; larger pools show several blocks per cell

const $ = (id) => document.getElementById(id);

const S = {
  key: sessionStorage.getItem(KEY_STORAGE),
  me: null,                  // {name, role, single_user}
  singleUser: false,
  running: false,            // polling loops run while signed in
  timers: [],
  models: { loaded: [], available: [] },
  rows: new Map(),           // pid -> <tr>
  lastSeen: new Map(),       // pid -> last row object seen from the server
  ended: new Map(),          // pid -> {row, until}: processes no longer listed, kept for a while
  processes: [],             // the rows of the latest poll (live and recently ended)
  kvProcesses: {},           // pid -> {owner, state} of the pids on the KV map
  chat: [],                  // [{role, content}]
  abort: null,               // AbortController of the chat stream in flight
};

// ---- HTTP --------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

function headers(json) {
  const h = {};
  if (S.key) h.Authorization = `Bearer ${S.key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function errorOf(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON */ }
  const e = body && body.error;
  return new ApiError(res.status, (e && e.type) || "http_error",
    (e && e.message) || `${res.status} ${res.statusText || "error"}`);
}

// GET/POST/DELETE `path`; returns the parsed JSON body, throws ApiError with the server's message.
async function api(path, { method = "GET", body, signal } = {}) {
  const res = await fetch(path, {
    method, signal, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) {
    const err = await errorOf(res);
    if (err.status === 401 && S.running) signedOut(err.message);
    throw err;
  }
  const text = await res.text();
  return text ? JSON.parse(text) : null;
}

function status(message, kind = "info") {
  const el = $("status");
  el.textContent = message;
  el.className = `status ${kind}`;
  clearTimeout(status.timer);
  if (message) status.timer = setTimeout(() => { el.textContent = ""; el.className = "status"; }, 8000);
}

// ---- sign-in -----------------------------------------------------------------------------------

async function boot() {
  wire();
  let health;
  try {
    health = await api("/health");
  } catch (err) {
    status(`the daemon does not answer: ${err.message}`, "error");
    return;
  }
  S.singleUser = !!health.single_user;
  if (S.key || S.singleUser) {
    if (await signIn(S.key)) return;
  }
  showSignIn("");
}

// Try `key` (null: none, for single-user mode). True when the daemon accepted it.
async function signIn(key) {
  S.key = key || null;
  try {
    S.me = await api("/v1/whoami");
  } catch (err) {
    S.key = null;
    sessionStorage.removeItem(KEY_STORAGE);
    showSignIn(key ? err.message : "");
    return false;
  }
  if (S.key) sessionStorage.setItem(KEY_STORAGE, S.key);
  else sessionStorage.removeItem(KEY_STORAGE);
  showDesktop();
  return true;
}

function showSignIn(error) {
  stopPolling();
  $("desktop").hidden = true;
  $("signin").hidden = false;
  $("signout").hidden = true;
  $("who").textContent = "";
  $("mode").hidden = true;
  $("signin-error").textContent = error;
  $("signin-key").value = "";
  $("signin-key").focus();
}

function signedOut(message) {
  S.key = null;
  S.me = null;
  sessionStorage.removeItem(KEY_STORAGE);
  showSignIn(message);
}

function showDesktop() {
  $("signin").hidden = true;
  $("desktop").hidden = false;
  const single = S.me.single_user;
  $("mode").hidden = false;
  $("mode").textContent = single ? "single-user mode" : "API keys";
  $("mode").title = single ? "No users are configured: no key is needed and you are the local admin. "
    + "Add users with `llmos user add NAME` to require keys." : "Every request carries your API key.";
  $("who").textContent = `${S.me.name} (${S.me.role})`;
  $("signout").hidden = single;
  $("proc-all-label").hidden = single || S.me.role !== "admin";
  $("proc-all").checked = false;
  startPolling();
  $("chat-input").focus();
}

// ---- polling -----------------------------------------------------------------------------------

function every(ms, fn) {
  let stopped = false;
  const loop = async () => {
    if (stopped || !S.running) return;
    try {
      await fn();
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) status(err.message, "error");  // 401: signed out
    }
    if (!stopped && S.running) handle.id = setTimeout(loop, ms);
  };
  const handle = { id: 0, stop() { stopped = true; clearTimeout(handle.id); } };
  loop();
  return handle;
}

async function startPolling() {
  stopPolling();
  S.running = true;
  try { await refreshModels(); } catch (err) { status(err.message, "error"); }  // the KV map needs a model
  if (!S.running) return;
  S.timers = [every(MODELS_POLL_MS, refreshModels), every(POLL_MS, refreshProcesses), every(POLL_MS, refreshKv)];
}

function stopPolling() {
  S.running = false;
  for (const t of S.timers) t.stop();
  S.timers = [];
}

// ---- colours -------------------------------------------------------------------------------------

// One colour per pid (golden-angle hues, so neighbouring pids differ); the table and the KV map agree.
function pidColour(pid) {
  return `hsl(${(Number(pid) * 137.508) % 360}, 65%, 52%)`;
}

function swatch(colour, extra = "") {
  const s = document.createElement("span");
  s.className = `swatch ${extra}`;
  if (colour) s.style.background = colour;
  s.setAttribute("aria-hidden", "true");
  return s;
}

// ---- processes -----------------------------------------------------------------------------------

const LIVE = new Set(["NEW", "READY", "RUNNING", "SUSPENDED"]);

async function refreshProcesses() {
  const everyone = S.me && S.me.role === "admin" && $("proc-all").checked;
  const data = await api(`/v1/processes${everyone ? "?all=true" : ""}`);
  const list = (data && data.processes) || [];
  const now = Date.now();
  const listed = new Set(list.map((r) => r.pid));
  // A process that left the live list has ended (finished, killed, hibernated, or its model unloaded): keep
  // its final row a while so that its end can be seen.
  const vanished = [...S.lastSeen.keys()].filter((pid) => !listed.has(pid) && !S.ended.has(pid));
  for (const pid of vanished) ended(pid, { ...S.lastSeen.get(pid), state: "ENDED" });
  if (vanished.length) finalRows(vanished, everyone);
  for (const [pid, e] of S.ended) if (e.until < now) S.ended.delete(pid);  // pids are never reused
  S.lastSeen = new Map(list.map((r) => [r.pid, r]));
  const rows = [...list.filter((r) => !S.ended.has(r.pid)), ...[...S.ended.values()].map((e) => e.row)];
  rows.sort((a, b) => a.pid - b.pid);
  S.processes = rows;
  renderProcesses(rows);
}

function up(s) { return String(s || "").toUpperCase(); }

function ended(pid, row) {
  const { text, output_token_ids, children, ...rest } = row;  // the detail fields are not shown
  S.ended.set(pid, { row: { ...rest, tokens_per_s: 0, resident_blocks: 0, swapped_blocks: 0 },
    until: Date.now() + ENDED_KEEP_MS });
}

// Replace the rows of vanished processes by their final ones (finished, killed, hibernated) where the daemon
// still has them (a process of an unloaded model stays "ended").
async function finalRows(pids, everyone) {
  try {
    const data = await api(`/v1/processes?finished=true${everyone ? "&all=true" : ""}`);
    for (const row of (data && data.processes) || []) {
      if (pids.includes(row.pid) && S.ended.has(row.pid)) ended(row.pid, row);
    }
  } catch { /* the next poll shows what there is */ }
}

function renderProcesses(rows) {
  const body = $("proc-rows");
  const keep = new Set(rows.map((r) => r.pid));
  for (const [pid, tr] of S.rows) if (!keep.has(pid)) { tr.remove(); S.rows.delete(pid); }
  let live = 0;
  rows.forEach((r, i) => {
    let tr = S.rows.get(r.pid);
    if (!tr) {
      tr = processRow(r.pid);
      S.rows.set(r.pid, tr);
    }
    if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    const state = up(r.state);
    if (LIVE.has(state)) live += 1;
    const c = tr.cells;
    c[1].textContent = r.owner ?? "";
    c[2].textContent = r.model ?? "";
    c[3].textContent = state.toLowerCase();
    c[3].className = `state state-${state.toLowerCase()}`;
    c[4].textContent = `${r.prompt_tokens ?? 0} + ${r.output_tokens ?? 0}`;
    c[5].textContent = Number(r.tokens_per_s || 0).toFixed(1);
    const swapped = r.swapped_blocks || 0;
    c[6].textContent = `${r.resident_blocks ?? 0}${swapped ? ` (+${swapped} swapped)` : ""}`;
    tr.classList.toggle("ended", !LIVE.has(state));
    const [kill, suspend, resume] = c[7].querySelectorAll("button");
    kill.disabled = !LIVE.has(state);
    suspend.disabled = !(state === "NEW" || state === "READY" || state === "RUNNING");
    resume.disabled = state !== "SUSPENDED";
  });
  $("proc-empty").hidden = rows.length > 0;
  $("proc-summary").textContent = `${live} live`;
}

function processRow(pid) {
  const tr = document.createElement("tr");
  tr.dataset.pid = pid;
  const th = document.createElement("th");
  th.scope = "row";
  th.append(swatch(pidColour(pid)), document.createTextNode(String(pid)));
  tr.append(th);
  for (let i = 0; i < 6; i++) tr.append(document.createElement("td"));
  const actions = document.createElement("td");
  actions.className = "actions";
  for (const [action, label] of [["kill", "Kill"], ["suspend", "Suspend"], ["resume", "Resume"]]) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.dataset.action = action;
    b.dataset.pid = pid;
    b.setAttribute("aria-label", `${label} process ${pid}`);
    actions.append(b);
  }
  tr.append(actions);
  return tr;
}

async function processAction(action, pid) {
  const path = `/v1/processes/${encodeURIComponent(pid)}`;
  try {
    const out = action === "kill" ? await api(path, { method: "DELETE" })
      : await api(`${path}/${action}`, { method: "POST" });
    if (action === "kill") {
      const last = S.lastSeen.get(pid) || S.processes.find((r) => r.pid === pid) || { pid };
      ended(pid, { ...last, ...out });
    }
    status(`${{ kill: "killed", suspend: "suspended", resume: "resumed" }[action]} process ${pid}`);
  } catch (err) {
    status(`${action} ${pid}: ${err.message}`, "error");
  }
  await Promise.allSettled([refreshProcesses(), refreshKv()]);
}

// ---- KV memory map -------------------------------------------------------------------------------

// One entry per block ("free", "cached", "other" or a pid) from a run-length list [[value, count], ...].
function expand(runs) {
  const out = [];
  for (const [value, count] of runs || []) {
    const v = typeof value === "string" && /^\d+$/.test(value) ? Number(value) : value;
    const o = typeof v === "number" || v === "free" || v === "cached" ? v : "other";
    for (let i = 0; i < count; i++) out.push(o);
  }
  return out;
}

async function refreshKv() {
  const model = $("kv-model").value;
  if (!model) {
    renderKv(null);
    return;
  }
  renderKv(await api(`/v1/kv/map?model=${encodeURIComponent(model)}`));
}

function renderKv(data) {
  $("kv-empty").hidden = !!data;
  $("kv-maps").hidden = !data;
  if (!data) return;
  S.kvProcesses = data.processes || {};
  const device = expand(data.runs);
  const counts = renderGrid($("kv-grid"), device, "device block");
  const used = device.length - counts.free - counts.cached;
  $("kv-summary").textContent = `${device.length} blocks of ${data.block_size} tokens`
    + `${data.bytes_per_block ? ` (${kib(data.bytes_per_block)} each)` : ""}: `
    + `${used} used, ${counts.cached} cached, ${counts.free} free`;
  $("kv-grid").setAttribute("aria-label", `KV blocks of ${data.model}: ${used} used by processes, `
    + `${counts.cached} cached, ${counts.free} free`);
  const swap = expand(data.swap && data.swap.runs);
  $("kv-swap-section").hidden = swap.length === 0;
  const swapCounts = renderGrid($("kv-swap"), swap, "swap block");
  $("kv-swap-summary").textContent = `${swap.length} blocks: ${swap.length - swapCounts.free} used, `
    + `${swapCounts.free} free`;
  $("kv-swap").setAttribute("aria-label", `host swap blocks of ${data.model}: ${swap.length - swapCounts.free} `
    + `used, ${swapCounts.free} free`);
  const pids = new Map([...counts.pids]);
  for (const [pid, n] of swapCounts.pids) pids.set(pid, (pids.get(pid) || 0) + n);
  renderLegend(pids, counts, swapCounts);
}

function kib(bytes) {
  return bytes >= 2 ** 20 ? `${(bytes / 2 ** 20).toFixed(1)} MiB` : `${(bytes / 1024).toFixed(1)} KiB`;
}

// Draw `owners` (one per block) as cells of `grid`, touching only the cells that changed. Returns the counts.
function renderGrid(grid, owners, what) {
  const per = Math.max(1, Math.ceil(owners.length / MAX_CELLS));
  const ncells = Math.ceil(owners.length / per);
  while (grid.children.length > ncells) grid.lastChild.remove();
  while (grid.children.length < ncells) {
    const cell = document.createElement("div");
    cell.className = "cell";
    grid.append(cell);
  }
  const counts = { free: 0, cached: 0, other: 0, pids: new Map() };
  for (const o of owners) {
    if (typeof o === "number") counts.pids.set(o, (counts.pids.get(o) || 0) + 1);
    else counts[o] += 1;
  }
  for (let i = 0; i < ncells; i++) {
    // A cell covering several blocks shows its busiest kind: a process, else another user's, else cached.
    const group = owners.slice(i * per, (i + 1) * per);
    const o = group.find((x) => typeof x === "number") ?? (group.includes("other") ? "other"
      : group.includes("cached") ? "cached" : "free");
    const cell = grid.children[i];
    const key = String(o);
    if (cell.dataset.owner === key) continue;
    cell.dataset.owner = key;
    const where = per > 1 ? `${what}s ${i * per}-${Math.min(owners.length, (i + 1) * per) - 1}` : `${what} ${i}`;
    if (typeof o === "number") {
      cell.className = "cell used";
      cell.style.background = pidColour(o);
      cell.title = `${where}: pid ${o}`;
    } else {
      cell.className = `cell ${o}`;
      cell.style.background = "";
      cell.title = `${where}: ${o === "other" ? "another user's process" : o}`;
    }
  }
  return counts;
}

function renderLegend(pids, counts, swapCounts) {
  const legend = $("kv-legend");
  const items = [];
  for (const [pid, n] of [...pids].sort((a, b) => a[0] - b[0])) {
    const info = S.kvProcesses[String(pid)];
    const who = info ? ` (${info.owner}, ${up(info.state).toLowerCase()})` : "";
    items.push([swatch(pidColour(pid)), `pid ${pid}${who}: ${n}`]);
  }
  const other = counts.other + swapCounts.other;
  if (other) items.push([swatch(null, "other"), `other users: ${other}`]);
  items.push([swatch(null, "cached"), `cached: ${counts.cached}`]);
  items.push([swatch(null, "free"), `free: ${counts.free}`]);
  legend.replaceChildren(...items.map(([sw, text]) => {
    const li = document.createElement("li");
    li.append(sw, document.createTextNode(text));
    return li;
  }));
}

// ---- models --------------------------------------------------------------------------------------

async function refreshModels() {
  const data = await api("/v1/residency");
  S.models = { loaded: data.data || [], available: data.available || [] };
  renderModels();
}

function mib(bytes) {
  return bytes == null ? "" : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

function renderModels() {
  const loaded = new Map(S.models.loaded.map((m) => [m.name, m]));
  const names = [...new Set([...S.models.available, ...loaded.keys()])].sort();
  const isAdmin = S.me && S.me.role === "admin";
  const body = $("model-rows");
  body.replaceChildren(...names.map((name) => {
    const m = loaded.get(name);
    const tr = document.createElement("tr");
    tr.dataset.model = name;
    const cells = [name, m ? (m.pinned ? "loaded, pinned" : "loaded") : "not loaded", m ? mib(m.bytes) : "",
      m ? String(m.processes ?? 0) : "",
      m ? (m.expires_in_s == null ? "never" : `${Math.round(m.expires_in_s)} s`) : ""];
    cells.forEach((text, i) => {
      const td = document.createElement(i === 0 ? "th" : "td");
      if (i === 0) td.scope = "row";
      td.textContent = text;
      tr.append(td);
    });
    const actions = document.createElement("td");
    actions.className = "actions";
    const buttons = m ? [["unload", "Unload"], ["pin", m.pinned ? "Unpin" : "Pin"]] : [["load", "Load"]];
    for (const [action, label] of buttons) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.dataset.modelAction = action;
      b.dataset.model = name;
      b.dataset.pinned = m && m.pinned ? "1" : "";
      b.setAttribute("aria-label", `${label} model ${name}`);
      b.disabled = !isAdmin;
      if (!isAdmin) b.title = "admins only";
      actions.append(b);
    }
    tr.append(actions);
    return tr;
  }));
  fillModelSelect($("chat-model"), names, loaded);
  fillModelSelect($("kv-model"), [...loaded.keys()].sort(), loaded);
}

// Keep the user's choice; default to the first loaded model.
function fillModelSelect(sel, names, loaded) {
  const current = sel.value;
  const same = sel.options.length === names.length && names.every((n, i) => sel.options[i].value === n);
  if (!same) {
    sel.replaceChildren(...names.map((n) => new Option(n, n)));
  }
  for (const opt of sel.options) opt.textContent = loaded.has(opt.value) ? opt.value : `${opt.value} (not loaded)`;
  if (names.includes(current)) sel.value = current;
  else {
    const first = names.find((n) => loaded.has(n)) || names[0];
    if (first) sel.value = first;
  }
}

async function modelAction(action, name, pinned) {
  const path = `/v1/models/${encodeURIComponent(name)}/${action}`;
  status(`${action === "load" ? "loading" : action === "unload" ? "unloading" : "pinning"} ${name}…`);
  try {
    await api(path, { method: "POST", body: action === "pin" ? { pinned: !pinned } : undefined });
    status(`${name}: ${action === "pin" ? (pinned ? "unpinned" : "pinned") : `${action}ed`}`);  // loaded, unloaded
  } catch (err) {
    status(`${action} ${name}: ${err.message}`, "error");
  }
  await Promise.allSettled([refreshModels(), refreshProcesses()]);
  await refreshKv().catch(() => {});
}

// ---- chat ----------------------------------------------------------------------------------------

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : "Error";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("chat-log").append(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

// Yield the `data:` payloads of a server-sent event stream.
async function* sseData(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, "");
      buf = buf.slice(nl + 1);
      if (line.startsWith("data:")) yield line.slice(5).trim();
    }
  }
}

async function sendChat(text) {
  const model = $("chat-model").value;
  if (!model) {
    status("no model to chat with; load one in Models.", "error");
    return;
  }
  const maxTokens = Math.max(1, parseInt($("chat-max").value, 10) || 64);
  S.chat.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  out.parentElement.classList.add("streaming");
  S.abort = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  let reply = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), signal: S.abort.signal,
      body: JSON.stringify({ model, messages: S.chat, stream: true, max_tokens: maxTokens }),
    });
    if (!res.ok) throw await errorOf(res);
    for await (const data of sseData(res)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(0, event.error.type, event.error.message);
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        reply += delta.content;
        out.textContent = reply;
        out.scrollIntoView({ block: "end" });
      }
    }
    S.chat.push({ role: "assistant", content: reply });
  } catch (err) {
    if (err.name === "AbortError") {
      out.textContent = `${reply} [stopped]`;
      S.chat.push({ role: "assistant", content: reply });
    } else {
      S.chat.pop(); // the question got no answer; let the user send it again
      out.parentElement.className = "msg error";
      out.parentElement.querySelector(".role").textContent = "Error";
      out.textContent = err.message;
      if (err.status === 401) signedOut(err.message);
    }
  } finally {
    out.parentElement.classList.remove("streaming");
    S.abort = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
}

// ---- events --------------------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("signin-key").value.trim();
    if (key) signIn(key);
  });
  $("signout").addEventListener("click", () => signedOut(""));
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("chat-input");
    const text = input.value.trim();
    if (!text || S.abort) return;
    input.value = "";
    sendChat(text);
  });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-stop").addEventListener("click", () => S.abort && S.abort.abort());
  $("chat-new").addEventListener("click", () => {
    if (S.abort) S.abort.abort();
    S.chat = [];
    $("chat-log").replaceChildren();
  });
  $("proc-rows").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-action]");
    if (b) processAction(b.dataset.action, Number(b.dataset.pid));
  });
  $("model-rows").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-model-action]");
    if (b) modelAction(b.dataset.modelAction, b.dataset.model, !!b.dataset.pinned);
  });
  $("kv-model").addEventListener("change", () => refreshKv().catch((err) => status(err.message, "error")));
  $("proc-all").addEventListener("change", () => refreshProcesses().catch((err) => status(err.message, "error")));
}

boot();
