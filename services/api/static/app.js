// Tickwise dashboard: vanilla JS, no build step. API data reaches the DOM only through
// textContent (never innerHTML), so nothing the API returns can become markup or script.
"use strict";
const API = "/api/v1";
const TOKEN_KEY = "tickwise.token";
const POLL_MS = 5000;
const KNOWN = ["created", "running", "stopped", "exited", "failed", "success", "skipped", "yes", "no"];
const $ = (id) => document.getElementById(id);
const IST = { timeZone: "Asia/Kolkata", hourCycle: "h23", hour: "2-digit", minute: "2-digit", second: "2-digit" };
const CLOCK = new Intl.DateTimeFormat("en-GB", IST);
const TIME = new Intl.DateTimeFormat("en-GB", { ...IST, day: "2-digit", month: "short" });

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let timers = [];
let pending = null; // the refresh in flight
let again = false; // something asked for a refresh while one was in flight
const expanded = new Set(); // strategy ids whose order log is open
const rows = new Map(); // strategy id -> { tr, logTr, cells, key }

function apiError(status, body) {
  const err = (body && body.error) || {};
  return Object.assign(new Error(err.message || (status ? "HTTP " + status : "the API did not answer")),
    { status, details: err.details });
}

async function call(method, path, body) {
  const sent = token;
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (sent) headers.Authorization = "Bearer " + sent;
  let res;
  try {
    res = await fetch(API + path, { method, headers, cache: "no-store", credentials: "omit",
      body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw apiError(0, null);
  }
  const data = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) {
    if (res.status === 401 && sent && sent === token) logout("Your session expired. Please log in again.");
    throw apiError(res.status, data);
  }
  return data;
}

// -- small DOM helpers (textContent only) ---------------------------------------------------
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text === null ? "-" : String(text);
  if (cls) node.className = cls;
  return node;
}
const btn = (text, cls, onclick) => Object.assign(el("button", text, cls), { type: "button", onclick });
function badge(node, text) {
  const value = show(text);
  node.replaceChildren(el("span", value, "badge " + (KNOWN.includes(value) ? value : "")));
}
const show = (v) => (v === null || v === undefined || v === "" ? "-" : String(v));
const money = (v) => (v === null || v === undefined ? "-"
  : Number(v).toLocaleString("en-IN", { minimumFractionDigits: 2, maximumFractionDigits: 2 }));
const when = (iso) => (iso ? TIME.format(new Date(iso)) + " IST" : "-");
const setMsg = (text) => { $("msg").textContent = text || ""; };
const clock = (v) => { // "9:30" -> "09:30:00"
  const t = String(v || "").trim().replace(/^(\d):/, "0$1:");
  return /^\d\d:\d\d$/.test(t) ? t + ":00" : t;
};
const num = (v) => (String(v).trim() === "" ? undefined : Number(v)); // blank: the API says "required"

// -- forms: the API's message under the form, field details next to their fields -----------
function clearErrors(form) {
  form.querySelectorAll(".field-err").forEach((n) => n.remove());
  form.querySelectorAll("[aria-invalid]").forEach((n) => n.removeAttribute("aria-invalid"));
  const out = form.querySelector(".form-msg");
  out.textContent = "";
  out.classList.remove("ok");
}

function showError(form, err) {
  const lines = [err.message];
  const details = err.details;
  if (Array.isArray(details)) {
    for (const item of details) {
      const loc = Array.isArray(item && item.loc) ? item.loc.map(String) : [];
      const text = String((item && (item.msg || item.message)) || "invalid value");
      const input = loc.length ? form.elements.namedItem(loc[loc.length - 1]) : null;
      if (input instanceof HTMLInputElement) {
        input.setAttribute("aria-invalid", "true");
        input.closest("label").appendChild(el("span", text, "field-err"));
      } else {
        lines.push((loc.join(".") || "request") + ": " + text);
      }
    }
  } else if (details && typeof details === "object") {
    for (const [key, value] of Object.entries(details)) {
      lines.push(key + ": " + (typeof value === "object" ? JSON.stringify(value) : String(value)));
    }
  }
  form.querySelector(".form-msg").textContent = lines.join("\n");
}

function onSubmit(id, handler) {
  const form = $(id);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const button = form.querySelector("button[type=submit]");
    if (button.disabled) return; // no double submits
    clearErrors(form);
    const values = Object.fromEntries(new FormData(form));
    button.disabled = true;
    try {
      const note = await handler(values, form);
      const out = form.querySelector(".form-msg");
      out.textContent = note || "";
      out.classList.add("ok");
    } catch (e) {
      showError(form, e);
    } finally {
      button.disabled = false;
      if (token) refreshAll(); // every form changes something the page shows
    }
  });
}

// -- session -------------------------------------------------------------------------------
async function login(email, password) {
  const out = await call("POST", "/auth/login", { email, password });
  token = out.access_token;
  sessionStorage.setItem(TOKEN_KEY, token);
  enter();
}

function enter() {
  document.querySelectorAll("#app, #logout").forEach((n) => n.classList.remove("hidden"));
  $("auth").classList.add("hidden");
  setMsg("");
  const tick = () => { $("clock").textContent = CLOCK.format(new Date()); };
  timers.forEach(clearInterval);
  timers = [setInterval(() => { if (!document.hidden) refreshAll(); }, POLL_MS), setInterval(tick, 1000)];
  tick();
  const mine = token;
  call("GET", "/me").then((me) => { if (token === mine) $("who").textContent = me.name + " · " + me.email; },
    (e) => { if (token) setMsg(e.message); });
  refreshAll();
}

function logout(reason) {
  token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  timers.forEach(clearInterval);
  timers = [];
  [rows, expanded].forEach((m) => m.clear());
  $("rows").replaceChildren();
  ["who", "b-connected", "b-valid", "b-hint", "b-updated", "updated"].forEach((id) => { $(id).textContent = ""; });
  $("b-expired").classList.add("hidden");
  document.querySelectorAll("form").forEach((f) => { f.reset(); clearErrors(f); });
  document.querySelectorAll("#app, #logout").forEach((n) => n.classList.add("hidden"));
  $("auth").classList.remove("hidden");
  setMsg(reason);
}

// -- polling (only while logged in) ---------------------------------------------------------
function refreshAll() {
  if (!token) return Promise.resolve();
  if (pending) { again = true; return pending; }
  return (pending = refreshLoop().finally(() => { pending = null; }));
}

async function refreshLoop() {
  do {
    again = false;
    const mine = token;
    try {
      const [broker, list] = await Promise.all([call("GET", "/broker"), loadStrategies()]);
      if (token !== mine) continue; // logged out (or in as someone else) meanwhile: drop the answer
      renderBroker(broker);
      renderStrategies(...list);
      $("updated").textContent = "Updated " + CLOCK.format(new Date()) + " IST · refreshes every 5 s.";
    } catch (e) {
      if (token) $("updated").textContent = "Refresh failed at " + CLOCK.format(new Date()) + ": " + e.message;
    }
  } while (again && token);
}

async function loadStrategies() {
  const list = await call("GET", "/strategies");
  const gone = (e) => { if (e.status === 404) return null; throw e; }; // deleted meanwhile
  const path = (s, tail) => "/strategies/" + encodeURIComponent(s.id) + tail;
  return Promise.all([list, Promise.all(list.map((s) => call("GET", path(s, "/status")).catch(gone))),
    Promise.all(list.map((s) => (expanded.has(s.id) ? call("GET", path(s, "/orders?limit=50")).catch(gone) : null)))]);
}

function renderBroker(b) { // only these four fields; the API never sends secrets and we never show them
  badge($("b-connected"), b.connected ? "yes" : "no");
  if (b.connected) badge($("b-valid"), b.is_valid ? "yes" : "no");
  else $("b-valid").textContent = "-";
  $("b-hint").textContent = show(b.api_key_hint);
  $("b-updated").textContent = when(b.updated_at);
  $("b-expired").classList.toggle("hidden", !b.connected || b.is_valid);
  $("b-token").textContent = !b.connected ? "-" : b.token_state + (b.token_expires_at
    ? " until " + when(b.token_expires_at) : "") + (b.token_checked_at ? " (checked " + when(b.token_checked_at) + ")" : "");
}

function makeRow(id) {
  const tr = el("tr");
  tr.dataset.id = id;
  const cells = {};
  for (const name of ["symbol", "buy", "sell", "sl", "qty", "status", "position", "action", "price", "actions"]) {
    cells[name] = tr.appendChild(el("td", undefined, ["sl", "qty", "price"].includes(name) ? "num" : name));
  }
  const logTr = el("tr", undefined, "log");
  logTr.appendChild(el("td")).colSpan = 10;
  return { tr, logTr, cells, key: "" };
}

function place(tbody, node, pos) { // move a row only if it is out of place (keeps clicks and focus)
  if (tbody.children[pos] !== node) tbody.insertBefore(node, tbody.children[pos] || null);
  return pos + 1;
}

function renderStrategies(list, statuses, logs) {
  const tbody = $("rows");
  const seen = new Set();
  let pos = 0;
  list.forEach((s, i) => {
    const st = statuses[i];
    if (!st) return;
    seen.add(s.id);
    if (!rows.has(s.id)) rows.set(s.id, makeRow(s.id));
    const r = rows.get(s.id);
    const c = r.cells;
    const text = { symbol: s.symbol, buy: s.buy_time, sell: s.sell_time, sl: money(s.stop_loss), qty: show(s.quantity),
      position: show(st.position), action: show(st.last_action), price: money(st.last_price) };
    for (const [name, value] of Object.entries(text)) c[name].textContent = value;
    badge(c.status, st.status);
    if (st.status === "failed" && s.failure_reason) c.status.appendChild(el("span", s.failure_reason, "reason"));
    if (st.needs_login) c.status.appendChild(el("span", st.reason, "reason"));
    const next = st.next_buy_at ? "next buy " + when(st.next_buy_at) : st.next_sell_at ? "next sell " + when(st.next_sell_at) : "";
    if (next) c.status.appendChild(el("span", next + (st.repeat === "trading_days" ? " · every trading day" : ""), "muted"));
    const key = [st.status, st.position, expanded.has(s.id)].join("|");
    if (r.key !== key) { r.key = key; c.actions.replaceChildren(...actions(s, st)); } // buttons only on change
    pos = place(tbody, r.tr, pos);
    if (expanded.has(s.id)) {
      if (logs[i]) renderLog(r.logTr.firstChild, logs[i]);
      pos = place(tbody, r.logTr, pos);
    } else {
      r.logTr.remove();
    }
  });
  for (const [id, r] of rows) {
    if (!seen.has(id)) { r.tr.remove(); r.logTr.remove(); rows.delete(id); expanded.delete(id); }
  }
  $("empty").classList.toggle("hidden", seen.size > 0);
}

function actions(s, st) {
  const id = { strategy_id: s.id };
  const what = s.symbol + " (" + s.quantity + " shares)";
  const out = [];
  if (st.status === "running") {
    out.push(btn("Stop", "", (ev) => act(ev, s, "POST", "/strategies/stop", id, st.position === "bought"
      ? "Stop " + what + " without selling? The bought position stays open at the broker." : null)));
    out.push(btn("Stop and square off", "danger", (ev) => act(ev, s, "POST", "/strategies/stop",
      { ...id, square_off: true }, "Stop " + what + " and sell any open position at market now?")));
  } else {
    out.push(btn("Start", "primary", (ev) => act(ev, s, "POST", "/strategies/start", id, null)));
    out.push(btn("Delete", "danger", (ev) => act(ev, s, "DELETE", "/strategies/" + encodeURIComponent(s.id),
      undefined, "Delete the " + s.symbol + " strategy (buy " + s.buy_time + ", sell " + s.sell_time + ")?")));
  }
  const open = expanded.has(s.id);
  out.push(btn(open ? "Hide orders" : "Orders", "", () => {
    if (open) expanded.delete(s.id); else expanded.add(s.id);
    refreshAll();
  }));
  return out;
}

async function act(ev, s, method, path, body, question) {
  if (question && !window.confirm(question)) return;
  const label = ev.currentTarget.textContent;
  ev.currentTarget.parentNode.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  try {
    await call(method, path, body);
    setMsg("");
  } catch (e) {
    if (token) setMsg(s.symbol + " — " + label + ": " + e.message);
  }
  if (rows.has(s.id)) rows.get(s.id).key = ""; // rebuild (and re-enable) its buttons
  await refreshAll();
}

function detail(o) {
  const r = o.response_payload || {};
  if (o.status === "success" && r.average_price != null) return "filled " + show(r.filled_quantity) + " @ " + money(r.average_price);
  const text = r.message || r.error || r.status_message || r.skipped || r.aborted || "";
  const retry = r.retry_attempt ? " (retry " + r.retry_attempt + " in " + r.retry_in_s + " s)" : "";
  return (typeof text === "string" ? text : JSON.stringify(text)) + retry;
}

function renderLog(td, items) {
  if (!items.length) { td.replaceChildren(el("span", "No orders logged yet.", "muted")); return; }
  const table = el("table");
  const head = table.appendChild(el("thead")).appendChild(el("tr"));
  ["Time", "Event", "Status", "Broker order id", "Tag", "Detail"].forEach((h) => head.appendChild(el("th", h)));
  const body = table.appendChild(el("tbody"));
  for (const o of items) {
    const tr = body.appendChild(el("tr"));
    const status = el("td");
    badge(status, o.status);
    tr.append(el("td", when(o.created_at)), el("td", show(o.event_type)), status, el("td", show(o.broker_order_id)),
      el("td", show(o.tag)), el("td", detail(o)));
  }
  td.replaceChildren(table);
}

// -- wiring --------------------------------------------------------------------------------
onSubmit("login", (v) => login(v.email, v.password));
onSubmit("register", async (v, form) => {
  await call("POST", "/auth/register", { name: v.name, email: v.email, password: v.password });
  form.reset();
  await login(v.email, v.password);
});
onSubmit("connect", async (v, form) => {
  form.reset(); // secrets leave the page as soon as they are read, success or not
  const out = await call("POST", "/broker/connect",
    { api_key: v.api_key.trim(), api_secret: v.api_secret.trim(), access_token: v.access_token.trim() });
  return "Connected " + out.api_key_hint + (out.user_name ? " as " + out.user_name : "") + ": credentials verified.";
});
onSubmit("session", async (v, form) => {
  form.reset();
  const out = await call("POST", "/broker/session", { request_token: v.request_token.trim() });
  return "Session refreshed for " + out.api_key_hint + (out.is_valid ? ": credentials verified." : ".");
});
onSubmit("create", async (v, form) => {
  const out = await call("POST", "/strategies", { symbol: v.symbol.trim().toUpperCase(), buy_time: clock(v.buy_time),
    sell_time: clock(v.sell_time), stop_loss: num(v.stop_loss), quantity: num(v.quantity),
    repeat: v.repeat ? "trading_days" : "once" });
  form.reset();
  return "Created " + out.symbol + " (buy " + out.buy_time + ", sell " + out.sell_time + " IST). Press Start to schedule it.";
});
$("logout").addEventListener("click", () => logout(""));
$("callback-url").textContent = location.origin + "/api/v1/broker/callback";
$("kite-login").addEventListener("click", async () => {
  try { location.href = (await call("GET", "/broker/login")).login_url; } catch (e) { setMsg(e.message); }
});
{ // back from Kite's login: say how it went, then drop the query from the address bar
  const q = new URLSearchParams(location.search);
  if (q.get("broker_login")) {
    const ok = q.get("broker_login") === "success";
    window.addEventListener("load", () => setMsg(ok ? "Kite login done: today's session is stored."
      : "Kite login failed: " + (q.get("message") || q.get("code") || "unknown error")));
    history.replaceState(null, "", location.pathname);
  }
}
document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshAll(); });
if (token) enter();
