// memlm web chat: a thin client of the HTTP API (see memlm/serve/api.py). No framework, no build step.
// Model output is always inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
const ui = {
  select: $("session-select"), newId: $("new-session"), newBtn: $("new-session-btn"), mode: $("mode"),
  learning: $("learning"), reset: $("reset-btn"), maxTokens: $("max-tokens"), stats: $("stats"),
  layers: document.querySelector("#layers tbody"), messages: $("messages"), form: $("composer"), input: $("input"),
  send: $("send"), status: $("status"), keyPanel: $("key-panel"), key: $("api-key"), keyBtn: $("api-key-btn"),
};
let current = null;   // session id
let busy = false;

function status(text) { ui.status.textContent = text || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({"Content-Type": "application/json"}, options.headers || {});
  const key = sessionStorage.getItem("memlm-api-key");
  if (key) headers["Authorization"] = "Bearer " + key;
  const resp = await fetch(path, Object.assign({}, options, {headers}));
  if (resp.status === 401) ui.keyPanel.hidden = false;
  return resp;
}

async function errorText(resp) {
  try { const j = await resp.json(); return (j.error && j.error.message) || resp.statusText; }
  catch (e) { return resp.status + " " + resp.statusText; }
}

function addMessage(role, text, meta) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  if (meta) setMeta(div, meta);
  ui.messages.appendChild(div);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  return div;
}

function setMeta(div, meta) {
  let m = div.querySelector(".meta");
  if (!m) { m = document.createElement("span"); m.className = "meta"; div.appendChild(m); }
  m.textContent = meta;
}

// ------------------------------------------------------------------------------------------------ sessions

async function loadModel() {
  const r = await api("/v1/models");
  if (r.ok) { const j = await r.json(); $("model-name").textContent = j.data.map((m) => m.id).join(", "); }
}

async function refreshSessions() {
  const r = await api("/v1/sessions");
  const ids = r.ok ? (await r.json()).data.map((s) => s.id) : [];
  if (current && !ids.includes(current)) ids.push(current);
  ids.sort();
  ui.select.replaceChildren(...ids.map((id) => new Option(id, id, false, id === current)));
}

async function selectSession(id) {
  current = id;
  localStorage.setItem("memlm-session", id);
  ui.messages.replaceChildren();
  await refreshSessions();
  const r = await api(`/v1/sessions/${encodeURIComponent(id)}/transcript`);
  if (r.ok) {
    for (const m of (await r.json()).messages) {
      const meta = m.role === "assistant" ? `${m.tokens} tokens · surprise ${m.surprise_mean}` : null;
      addMessage(m.role === "completion" ? "assistant" : m.role === "prompt" ? "user" : m.role, m.content, meta);
    }
  }
  await refreshStats();
  status(`session ${id}`);
  document.body.dataset.session = id;
}

async function createSession(id) {
  const r = await api(`/v1/sessions/${encodeURIComponent(id)}`, {method: "POST", body: "{}"});
  if (!r.ok) { status(await errorText(r)); return false; }
  await selectSession(id);
  return true;
}

function fmtBytes(n) { return n < 1024 ? n + " B" : n < 1 << 20 ? (n / 1024).toFixed(1) + " KiB" : (n / (1 << 20)).toFixed(2) + " MiB"; }

let statsEpoch = 0;  // refreshes can overlap (a reply ends while a setting is saved): only the newest one paints

async function refreshStats() {
  const epoch = ++statsEpoch;
  // build both panels off-screen and swap them in at once, so the panel is never seen empty or half filled
  const dl = [], rowsOut = [];
  const paint = () => { if (epoch === statsEpoch) { ui.stats.replaceChildren(...dl); ui.layers.replaceChildren(...rowsOut); } };
  if (!current) { paint(); return; }
  const r = await api(`/v1/sessions/${encodeURIComponent(current)}`);
  if (!r.ok) {
    dl.push(...dtdd("state", r.status === 404 ? "empty (no turns yet)" : await errorText(r)));
    paint();
    return;
  }
  const s = await r.json();
  if (epoch !== statsEpoch) return;
  ui.stats.dataset.turns = String(s.turns);
  ui.mode.value = s.mode;
  ui.learning.checked = s.learning;
  const rows = [["mode", s.mode], ["learning", s.learning ? "on" : "off"], ["turns", s.turns],
    ["tokens seen", s.tokens_seen], ["state", fmtBytes(s.state_bytes)], ["hash", s.state_hash],
    ["encrypted", s.encrypted ? "yes" : "no"]];
  if (s.controller) rows.push(["controller", `target ${s.controller.target} · T ${s.controller.temperature} · ` +
    `k ${s.controller.top_k} · μ ${s.controller.mu} · exit θ ${s.controller.exit_threshold}`]);
  if (s.cms) rows.push(["CMS deltas", `${s.cms.deltas} tensors · ‖δ‖ ${s.cms.delta_norm} · buffer ${s.cms.buffer}`]);
  for (const [k, v] of rows) dl.push(...dtdd(k, String(v)));
  for (const l of s.layers) {
    const tr = document.createElement("tr");
    const norm = Object.values(l.norms).reduce((a, b) => Math.max(a, b), 0);
    for (const [v, cls] of [[l.layer, "num"], [l.kind, ""], [fmtBytes(l.bytes), "num"], [norm.toFixed(3), "num"]]) {
      const td = document.createElement("td"); td.textContent = v; if (cls) td.className = cls; tr.appendChild(td);
    }
    tr.title = Object.entries(l.norms).map(([k, v]) => `${k}: ${v}`).join("\n");
    rowsOut.push(tr);
  }
  paint();
}

function dtdd(k, v) {
  const dt = document.createElement("dt"); dt.textContent = k;
  const dd = document.createElement("dd"); dd.textContent = v;
  return [dt, dd];
}

async function configure(settings) {
  if (!current) return;
  const r = await api(`/v1/sessions/${encodeURIComponent(current)}`, {method: "POST", body: JSON.stringify(settings)});
  if (!r.ok) status(await errorText(r)); else status("settings saved");
  await refreshStats();
}

// ------------------------------------------------------------------------------------------------ chat

async function send(text) {
  if (busy || !text.trim() || !current) return;
  busy = true; ui.send.disabled = true;
  addMessage("user", text);
  const bot = addMessage("assistant", "");
  bot.classList.add("streaming");
  bot.dataset.chunks = "0";
  const textEl = bot.querySelector(".text");
  try {
    const body = {messages: [{role: "user", content: text}], stream: true, session_id: current,
                  max_tokens: Math.max(1, parseInt(ui.maxTokens.value, 10) || 64)};
    const resp = await api("/v1/chat/completions", {method: "POST", body: JSON.stringify(body)});
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          const choice = obj.choices && obj.choices[0];
          if (choice && choice.delta && choice.delta.content) {
            textEl.textContent += choice.delta.content;
            bot.dataset.chunks = String(parseInt(bot.dataset.chunks, 10) + 1);
            ui.messages.scrollTop = ui.messages.scrollHeight;
          }
          if (choice && choice.finish_reason && obj.memlm) {
            setMeta(bot, `${obj.memlm.prompt_tokens} prompt tokens · surprise ${obj.memlm.surprise_mean} · ` +
              `turn ${obj.memlm.turn} · ${choice.finish_reason}`);
          }
        }
      }
    }
    bot.dataset.done = "1";
  } catch (e) {
    bot.remove();
    addMessage("error", String(e.message || e));
  } finally {
    bot.classList.remove("streaming");
    busy = false; ui.send.disabled = false;
    await refreshSessions();
    await refreshStats();
  }
}

// ------------------------------------------------------------------------------------------------ wiring

ui.form.addEventListener("submit", (e) => { e.preventDefault(); const t = ui.input.value; ui.input.value = ""; send(t); });
ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); ui.form.requestSubmit(); }
});
ui.select.addEventListener("change", () => selectSession(ui.select.value));
ui.newBtn.addEventListener("click", async () => {
  const id = ui.newId.value.trim();
  if (!ID_RE.test(id)) { status("a session id is 1-64 characters from A-Z a-z 0-9 _ -"); return; }
  if (await createSession(id)) ui.newId.value = "";
});
ui.mode.addEventListener("change", () => configure({mode: ui.mode.value}));
ui.learning.addEventListener("change", () => configure({learning: ui.learning.checked}));
ui.reset.addEventListener("click", async () => {
  if (!current) return;
  const r = await api(`/v1/sessions/${encodeURIComponent(current)}/reset`, {method: "POST", body: "{}"});
  if (!r.ok) status(await errorText(r));
  await selectSession(current);
});
ui.keyBtn.addEventListener("click", () => {
  sessionStorage.setItem("memlm-api-key", ui.key.value);
  ui.keyPanel.hidden = true;
  start();
});

async function start() {
  await loadModel();
  const saved = localStorage.getItem("memlm-session");
  const id = saved && ID_RE.test(saved) ? saved : "web-" + Math.random().toString(36).slice(2, 8);
  if (!(await createSession(id))) await refreshSessions();
}
start();
