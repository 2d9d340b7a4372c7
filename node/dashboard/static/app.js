// shoal dashboard: plain JavaScript, no dependencies. Every action is an ordinary API call
// (/api/v1/...) made with the session cookie and its CSRF token; the page refreshes from the
// event stream (server-sent events) and every few seconds.
"use strict";

const ROLES = ["viewer", "operator", "admin"];
const REFRESH_MS = 3000;
const state = { user: null, role: null, csrf: null, events: null, timer: null, soon: null,
                last: [0, 0] };

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function canAct() { return ROLES.indexOf(state.role) >= ROLES.indexOf("operator"); }

function say(text, good) {
  const m = $("#message");
  m.textContent = text;
  m.className = "message " + (good ? "good" : "bad");
}

async function call(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const resp = await fetch(path, { method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (resp.status === 401 && path !== "/login") { showLogin(); }
  if (!resp.ok) {
    const msg = (data && data.error && data.error.message) || `HTTP ${resp.status}`;
    const err = new Error(msg);
    err.status = resp.status;
    throw err;
  }
  return data;
}

// ----------------------------------------------------------------------------- login
function showLogin() {
  stopLive();
  state.user = state.role = state.csrf = null;
  state.last = [0, 0];
  $("#events").replaceChildren();
  $("#message").textContent = "";
  for (const sel of ["#nodes tbody", "#services tbody", "#tasks", "#logs"]) {
    $(sel).replaceChildren();  // nothing of the last user's view stays behind
  }
  $("#logs-card").hidden = true;
  $("#app-view").hidden = true;
  $("#login-view").hidden = false;
  $("#logout").hidden = true;
  $("#who").textContent = "";
}

function showApp(who) {
  state.user = who.user; state.role = who.role; state.csrf = who.csrf;
  $("#login-view").hidden = true;
  $("#app-view").hidden = false;
  $("#logout").hidden = false;
  $("#who").textContent = `${who.user} (${who.role})`;
  startLive();
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("#login-error").textContent = "";
  try {
    const who = await call("POST", "/login", { user: $("#login-user").value,
                                               password: $("#login-password").value });
    $("#login-password").value = "";
    showApp(who);
  } catch (e) {
    $("#login-error").textContent = e.status === 429 ? "Too many failed logins: wait a minute."
      : e.status === 401 ? "Wrong user name or password." : e.message;
  }
});

$("#logout").addEventListener("click", async () => {
  try { await call("POST", "/logout"); } catch (e) { /* gone anyway */ }
  showLogin();
});

// ----------------------------------------------------------------------------- live data
function startLive() {
  refresh();
  state.timer = setInterval(refresh, REFRESH_MS);
  // the last 15 minutes first, then live; a reconnect asks again: cursors drop repeats
  const es = new EventSource("/api/v1/events?since=15m");
  es.onopen = () => $("#live").classList.add("on");
  es.onerror = () => $("#live").classList.remove("on");
  es.onmessage = (m) => onEvent(m);
  for (const t of ["service", "task", "node", "secret", "config", "gap"]) {
    es.addEventListener(t, onEvent);
  }
  state.events = es;
}

function stopLive() {
  if (state.timer) clearInterval(state.timer);
  if (state.events) state.events.close();
  if (state.soon) clearTimeout(state.soon);
  state.timer = state.events = state.soon = null;
  $("#live").classList.remove("on");
}

function onEvent(m) {
  let e;
  try { e = JSON.parse(m.data); } catch (err) { return; }
  const cur = String(e.cursor || "0-0").split("-").map(Number);
  if (cur[0] < state.last[0] || (cur[0] === state.last[0] && cur[1] <= state.last[1])) return;
  state.last = cur;
  const when = new Date(e.time * 1000).toLocaleTimeString();
  const what = e.type === "gap" ? "missed events (resynced)"
    : `${e.type} ${e.action} ${e.name || e.id}`;
  const extra = e.attributes && (e.attributes.state || e.attributes.message || "");
  const list = $("#events");
  list.prepend(el("li", { "data-event": `${e.type}:${e.action}` },
                  el("span", { class: "muted", text: when + " " }), what,
                  extra ? el("span", { class: "muted", text: ` (${extra})` }) : ""));
  while (list.children.length > 60) list.lastChild.remove();
  if (!state.soon) state.soon = setTimeout(() => { state.soon = null; refresh(); }, 250);
}

async function refresh() {
  if (!state.user) return;
  let o;
  try { o = await call("GET", "/overview"); } catch (e) { return; }
  renderNodes(o.nodes, o.tasks);
  renderServices(o.services);
  renderTasks(o.nodes, o.tasks);
}

function fmtBytes(n) {
  if (!n) return "?";
  const gib = n / (1 << 30);
  return gib >= 1 ? `${gib.toFixed(1)} GiB` : `${Math.round(n / (1 << 20))} MiB`;
}

function renderNodes(nodes) {
  const body = $("#nodes tbody");
  body.replaceChildren(...nodes.map((n) => {
    const labels = Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
    const act = el("td", { class: "act" });
    if (canAct()) {
      const drain = n.availability !== "drain";
      act.append(el("button", { "data-action": drain ? "drain" : "activate",
        text: drain ? "Drain" : "Activate",
        onclick: () => act_(`node ${n.hostname} ${drain ? "drained" : "activated"}`,
          () => call("POST", `/api/v1/nodes/${n.id}`,
                     { availability: drain ? "drain" : "active" })) }));
    }
    return el("tr", { "data-node": n.hostname },
      el("td", {}, n.hostname, " ", n.leader ? el("span", { class: "badge", text: "leader" }) : ""),
      el("td", { text: n.role + (n.manager_status && !n.leader ? ` (${n.manager_status})` : "") }),
      el("td", { class: `status state-${n.state}`, text: n.state }),
      el("td", { class: `availability state-${n.availability}`, text: n.availability }),
      el("td", { class: "muted", text: labels || "—" }),
      el("td", { text: `${n.cpus || "?"} CPU / ${fmtBytes(n.memory_bytes)}` }),
      el("td", { text: n.tasks }),
      act);
  }));
  $("#node-count").textContent = `${nodes.filter((n) => n.state === "ready").length}/${nodes.length} ready`;
}

function renderServices(services) {
  const body = $("#services tbody");
  // A refresh must not undo what the user is doing. Values typed into any row are carried
  // over to its new controls, and the row holding the focus stays in the page with its
  // controls (moving or replacing a focused element blurs it: the caret, a click half done);
  // only its other cells are renewed.
  const edited = new Map();
  for (const input of body.querySelectorAll("input[data-action]")) {
    if (input.value !== input.defaultValue) edited.set(controlKey(input), input.value);
  }
  const rows = services.map((s) => {
    const row = serviceRow(s);
    for (const input of row.querySelectorAll("input[data-action]")) {
      if (edited.has(controlKey(input))) input.value = edited.get(controlKey(input));
    }
    return row;
  });
  const active = document.activeElement;
  const focused = active && active.closest("#services tbody tr");
  const at = focused ? services.findIndex((s) => s.name === focused.getAttribute("data-service")) : -1;
  if (at < 0) {
    body.replaceChildren(...rows);
  } else {
    for (const row of [...body.children]) if (row !== focused) row.remove();
    focused.before(...rows.slice(0, at));
    focused.after(...rows.slice(at + 1));
    const fresh = [...rows[at].children];
    [...focused.children].forEach((cell, i) => {
      if (!cell.contains(active) && fresh[i]) cell.replaceWith(fresh[i]);
    });
  }
  $("#service-count").textContent = `${services.length}`;
}

// "SERVICE/ACTION" of a control in a service row: the same control across refreshes
function controlKey(control) {
  return `${control.closest("tr").getAttribute("data-service")}/${control.getAttribute("data-action")}`;
}

function serviceRow(s) {
  const us = s.update_status || {};
  const update = us.state ? `${us.state}${us.message ? ": " + us.message : ""}` : "—";
  const ports = (s.ports || []).map((p) => `${p.host_ip ? p.host_ip + ":" : ""}${p.published}→${p.target}/${p.protocol}`).join(", ");
  const act = el("td", { class: "act" });
  act.append(el("button", { "data-action": "logs", text: "Logs", onclick: () => showLogs(s) }));
  if (canAct()) {
    const num = el("input", { class: "num", type: "number", min: "0", value: s.replicas,
                              "data-action": "scale-input", "aria-label": "replicas" });
    const img = el("input", { class: "img", value: s.image, "data-action": "image-input",
                              "aria-label": "image" });
    act.append(" ");
    if (s.mode === "replicated") {
      act.append(num, el("button", { "data-action": "scale", text: "Scale",
        onclick: () => act_(`${s.name} scaled to ${num.value}`,
          () => call("POST", `/api/v1/services/${s.id}/scale`, { replicas: Number(num.value) })) }),
        " ");
    }
    act.append(img, el("button", { "data-action": "update-image", text: "Update image",
      onclick: () => act_(`${s.name} updating to ${img.value}`, () => updateImage(s, img.value)) }));
    if (s.has_previous) {
      act.append(" ", el("button", { "data-action": "rollback", text: "Rollback",
        onclick: () => act_(`${s.name} rolling back`,
          () => call("POST", `/api/v1/services/${s.id}/rollback`)) }));
    }
  }
  return el("tr", { "data-service": s.name },
    el("td", { text: s.name }),
    el("td", { text: s.mode }),
    el("td", { class: "replicas", text: `${s.running}/${s.replicas}` }),
    el("td", { class: "healthy", text: s.healthy }),
    el("td", { class: "muted", text: s.image || "(host rootfs)" }),
    el("td", { text: ports || "—" }),
    el("td", { class: `state-${us.state || "none"}`, text: update }),
    act);
}

function renderTasks(nodes, tasks) {
  const byNode = new Map(nodes.map((n) => [n.id, []]));
  for (const t of tasks) {
    if (t.desired_state !== "running" && t.state !== "running" && !t.error) continue;
    if (!byNode.has(t.node_id)) byNode.set(t.node_id, []);
    byNode.get(t.node_id).push(t);
  }
  const names = new Map(nodes.map((n) => [n.id, n.hostname]));
  const out = [];
  for (const [id, list] of byNode) {
    list.sort((a, b) => a.name.localeCompare(b.name));
    out.push(el("div", { class: "node-tasks", "data-node-tasks": names.get(id) || "unassigned" },
      el("h3", { text: names.get(id) || "unassigned" }),
      list.length ? el("ul", {}, ...list.slice(0, 40).map((t) => el("li", {},
        `${t.name} `, el("span", { class: `state-${t.state}`, text: t.state }),
        t.desired_state !== "running" ? el("span", { class: "muted", text: ` → ${t.desired_state}` }) : "",
        t.error ? el("span", { class: "error", text: ` ${t.error}` }) : "")))
        : el("p", { class: "muted", text: "no tasks" })));
  }
  $("#tasks").replaceChildren(...out);
}

async function act_(done, fn) {
  try { await fn(); say(done, true); refresh(); } catch (e) { say(e.message, false); }
}

async function updateImage(s, image) {
  const svc = await call("GET", `/api/v1/services/${s.id}?stale=1`);
  const spec = svc.spec;
  spec.task.container.image = image;
  return call("POST", `/api/v1/services/${s.id}/update`, { spec, version: svc.version });
}

async function showLogs(s) {
  $("#logs-card").hidden = false;
  $("#logs-service").textContent = s.name;
  $("#logs").textContent = "loading…";
  try {
    const resp = await fetch(`/api/v1/services/${s.id}/logs?tail=100`, { credentials: "same-origin" });
    const text = await resp.text();
    const lines = text.split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l));
    $("#logs").textContent = lines.map((r) => `${r.task ? r.task.slice(0, 12) + " " : ""}${r.line}`)
      .join("\n") || "(no output)";
  } catch (e) { $("#logs").textContent = e.message; }
}
$("#logs-close").addEventListener("click", () => { $("#logs-card").hidden = true; });

// ----------------------------------------------------------------------------- start
(async () => {
  try { showApp(await call("GET", "/session")); } catch (e) { showLogin(); }
})();
