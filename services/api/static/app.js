// Tickwise dashboard: vanilla JS, no build step. API data reaches the DOM only through
// textContent (never innerHTML), so nothing the API returns can become markup or script.
// Live: Server-Sent Events (GET /api/v1/stream, opened with a short-lived ticket); while the
// stream is down the page falls back to refreshing every 10 s.
"use strict";
const API = "/api/v1";
const TOKEN_KEY = "tickwise.token";
const FALLBACK_MS = 10000; // polling only while the live stream is down
const SLOW_MS = 30000; // positions and summary, which also refresh on every new order
const $ = (id) => document.getElementById(id);
const IST = { timeZone: "Asia/Kolkata", hourCycle: "h23", hour: "2-digit", minute: "2-digit", second: "2-digit" };
const CLOCK = new Intl.DateTimeFormat("en-GB", IST);
const TIME = new Intl.DateTimeFormat("en-GB", { ...IST, day: "2-digit", month: "short" });

// Enum values in words.
const STATUS_WORDS = { created: "Not started", running: "Running", stopped: "Stopped", exited: "Finished", failed: "Failed" };
const POSITION_WORDS = { none: "No position", bought: "Holding", sold: "Sold", exited_by_sl: "Stopped out" };
const EVENT_WORDS = { BUY: "Buy", SELL: "Sell", STOPLOSS: "Stop-loss exit", RETRY: "Retry", ABORT: "Aborted" };
const LOG_WORDS = { success: "Done", failed: "Failed", skipped: "Skipped" };

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let timers = [];
let source = null; // the EventSource
let reopen = null; // timer reopening the stream
let live = false;
let routes = new Set(); // "METHOD /path" of the server's operations (optional features)
let editing = null; // strategy being edited
let strategies = []; // last list
const expanded = new Set(); // strategy ids whose order log is open
const rows = new Map(); // strategy id -> { tr, logTr, cells, key }

function apiError(status, body) {
  const err = (body && body.error) || {};
  return Object.assign(new Error(err.message || (status ? "HTTP " + status : "the server did not answer")),
    { status, code: err.code, details: err.details });
}

async function call(method, path, body, raw) {
  const sent = token;
  const headers = { Accept: raw ? "*/*" : "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (sent) headers.Authorization = "Bearer " + sent;
  let res;
  try {
    res = await fetch(API + path, { method, headers, cache: "no-store", credentials: "omit",
      body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw apiError(0, null);
  }
  if (raw && res.ok) return res;
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
const badgeEl = (text, cls) => el("span", text, "badge " + (cls || ""));
const show = (v) => (v === null || v === undefined || v === "" ? "-" : String(v));
const money = (v) => (v === null || v === undefined ? "-"
  : Number(v).toLocaleString("en-IN", { minimumFractionDigits: 2, maximumFractionDigits: 2 }));
const rupees = (v) => (v === null || v === undefined ? "-" : "₹" + money(v));
const signed = (v) => (v === null || v === undefined ? "-" : (v > 0 ? "+" : v < 0 ? "−" : "") + "₹" + money(Math.abs(v)));
const signCls = (v) => (v > 0 ? "num pos" : v < 0 ? "num neg" : "num");
const when = (iso) => (iso ? TIME.format(new Date(iso)) + " IST" : "-");
const setMsg = (text) => { $("msg").textContent = text || ""; };
const clock = (v) => { // "9:30" -> "09:30:00"
  const t = String(v || "").trim().replace(/^(\d):/, "0$1:");
  return /^\d\d:\d\d$/.test(t) ? t + ":00" : t;
};
const num = (v) => (String(v).trim() === "" ? undefined : Number(v)); // blank: the API says "is required"

// -- forms: the API's message under the form, field details next to their fields -----------
function clearErrors(form) {
  form.querySelectorAll(".field-err").forEach((n) => n.remove());
  form.querySelectorAll("[aria-invalid]").forEach((n) => n.removeAttribute("aria-invalid"));
  const out = form.querySelector(".form-msg");
  out.textContent = "";
  out.classList.remove("ok");
}

function showError(form, err) {
  let placed = 0;
  if (Array.isArray(err.details)) {
    for (const item of err.details) {
      const loc = Array.isArray(item && item.loc) ? item.loc.map(String) : [];
      const input = loc.length ? form.elements.namedItem(loc[loc.length - 1]) : null;
      if (input instanceof HTMLInputElement) {
        input.setAttribute("aria-invalid", "true");
        input.closest("label").appendChild(el("span", String(item.msg || "is not valid"), "field-err"));
        placed += 1;
      }
    }
  }
  // The API's message already says it in words ("Quantity must be at least 1"); say it once more
  // under the form only when no field shows it.
  form.querySelector(".form-msg").textContent = placed ? "Please fix the highlighted field" + (placed > 1 ? "s." : ".")
    : err.message;
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
      if (token) { refreshAll(); refreshSlow(); } // every form changes something the page shows
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
  timers.forEach(clearInterval);
  timers = [setInterval(() => { if (!live && !document.hidden) refreshAll(); }, FALLBACK_MS),
    setInterval(() => { if (!document.hidden) refreshSlow(); }, SLOW_MS)];
  const mine = token;
  call("GET", "/me").then((me) => { if (token === mine) $("who").textContent = me.name + " · " + me.email; },
    (e) => { if (token) setMsg(e.message); });
  loadRoutes().then(() => { if (token === mine) showOptional(); });
  call("GET", "/notifications").then((n) => { if (token === mine) renderNotify(n); }, () => {});
  refreshAll();
  refreshSlow();
  openStream();
}

function logout(reason) {
  token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  timers.forEach(clearInterval);
  timers = [];
  closeStream();
  [rows, expanded].forEach((m) => m.clear());
  strategies = [];
  editing = null;
  ["rows", "pos-rows", "trade-rows"].forEach((id) => $(id).replaceChildren());
  ["who", "b-connected", "b-valid", "b-hint", "b-updated", "updated", "pos-msg", "trades-msg", "broker-msg", "quote",
    "s-realized", "s-open", "s-orders", "s-running", "s-exited", "s-failed"].forEach((id) => { $(id).textContent = ""; });
  ["b-expired", "mode", "live", "sl-warn", "notify-secret"].forEach((id) => $(id).classList.add("hidden"));
  document.querySelectorAll("form").forEach((f) => { f.reset(); clearErrors(f); });
  document.querySelectorAll("#app, #logout").forEach((n) => n.classList.add("hidden"));
  $("auth").classList.remove("hidden");
  setMsg(reason);
}

// -- optional features: shown only where the server has the route ----------------------------
async function loadRoutes() {
  try {
    const res = await fetch("/openapi.json", { cache: "no-store", credentials: "omit" });
    const doc = await res.json();
    routes = new Set(Object.entries(doc.paths || {}).flatMap(([path, ops]) =>
      Object.keys(ops).map((m) => m.toUpperCase() + " " + path)));
  } catch (e) {
    routes = new Set();
  }
}

function showOptional() {
  $("kite-login").classList.toggle("hidden", !routes.has("GET /api/v1/broker/login"));
  $("kill").classList.toggle("hidden", !routes.has("POST /api/v1/kill-switch"));
  $("kite-callback").classList.toggle("hidden", !routes.has("GET /api/v1/broker/login"));
  $("password").classList.toggle("hidden", !routes.has("POST /api/v1/me/password"));
}

// -- live stream ----------------------------------------------------------------------------
function setLive(on) {
  live = on;
  const node = $("live");
  node.classList.remove("hidden");
  node.className = on ? "on" : "off";
  node.textContent = on ? "● Live" : "○ Reconnecting… refreshing every 10 s";
}

async function openStream() {
  closeStream();
  const mine = token;
  let ticket;
  try {
    ticket = await call("POST", "/stream/ticket");
  } catch (e) {
    if (token === mine && token) { setLive(false); reopen = setTimeout(openStream, FALLBACK_MS); }
    return;
  }
  if (token !== mine || !token) return;
  const es = new EventSource(ticket.url);
  source = es;
  es.onopen = () => { setLive(true); refreshAll(); }; // catch up on anything missed while down
  es.onerror = () => {
    setLive(false);
    if (es.readyState === EventSource.CLOSED) { // refused (ticket expired): a new ticket, a bit later
      reopen = setTimeout(() => { if (token === mine) openStream(); }, 3000);
    }
  };
  const on = (name, fn) => es.addEventListener(name, (ev) => { if (token === mine) fn(JSON.parse(ev.data)); });
  on("strategies", (list) => { renderStrategies(list); stamp("pushed"); });
  on("broker", renderBroker);
  on("orders", () => { refreshSlow(); refreshLogs(); });
}

function closeStream() {
  if (reopen) clearTimeout(reopen);
  reopen = null;
  if (source) source.close();
  source = null;
  live = false;
}

function stamp(how) {
  $("updated").textContent = "Updated " + CLOCK.format(new Date()) + " IST (" + how + ").";
}

// -- refreshes ------------------------------------------------------------------------------
let pending = null;
let again = false;
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
      const [broker, list] = await Promise.all([call("GET", "/broker"), call("GET", "/strategies")]);
      if (token !== mine) continue; // logged out (or in as someone else) meanwhile: drop the answer
      renderBroker(broker);
      renderStrategies(list);
      await refreshLogs();
      stamp(live ? "live" : "refreshed every 10 s");
    } catch (e) {
      if (token) $("updated").textContent = "Refresh failed at " + CLOCK.format(new Date()) + " IST: " + e.message;
    }
  } while (again && token);
}

function refreshSlow() {
  if (!token) return;
  const mine = token;
  call("GET", "/summary").then((s) => { if (token === mine) renderSummary(s); }, () => {});
  call("GET", "/positions").then((p) => { if (token === mine) renderPositions(p, null); },
    (e) => { if (token === mine) renderPositions([], e); });
  call("GET", "/orders?limit=200").then((t) => { if (token === mine) renderTrades(t); },
    (e) => { if (token === mine) $("trades-msg").textContent = e.message; });
}

async function refreshLogs() {
  const gone = (e) => { if (e.status === 404) return null; throw e; }; // deleted meanwhile
  await Promise.all([...expanded].map(async (id) => {
    const items = await call("GET", "/strategies/" + encodeURIComponent(id) + "/orders?limit=50").catch(gone);
    const r = rows.get(id);
    if (items && r) renderLog(r.logTr.firstChild, items);
  }));
}

// -- rendering ------------------------------------------------------------------------------
function renderSummary(s) {
  const mode = $("mode");
  mode.classList.remove("hidden");
  mode.className = "badge " + (s.mode === "paper" ? "paper" : "live-mode");
  mode.textContent = s.mode === "paper" ? "PAPER TRADING" : "LIVE — real money";
  const tile = (id, text, v) => { $(id).textContent = text; $(id).className = "v " + (v > 0 ? "pos" : v < 0 ? "neg" : ""); };
  tile("s-realized", signed(s.realized_pnl), s.realized_pnl);
  tile("s-open", signed(s.unrealized_pnl), s.unrealized_pnl);
  $("s-orders").textContent = s.orders_placed;
  $("s-running").textContent = s.strategies_by_status.running;
  $("s-exited").textContent = s.strategies_by_status.exited;
  $("s-failed").textContent = s.strategies_by_status.failed;
}

function renderBroker(b) { // only these fields; the API never sends secrets and we never show them
  $("b-connected").replaceChildren(badgeEl(b.connected ? "Connected" : "Not connected", b.connected ? "yes" : "no"));
  if (b.connected) $("b-valid").replaceChildren(badgeEl(b.is_valid ? "Valid" : "Expired — log in again", b.is_valid ? "yes" : "no"));
  else $("b-valid").textContent = "-";
  $("b-hint").textContent = show(b.api_key_hint);
  $("b-updated").textContent = when(b.updated_at);
  $("b-expired").classList.toggle("hidden", !b.connected || b.is_valid);
  $("b-token").textContent = !b.connected || !b.token_state ? "-" : b.token_state + (b.token_expires_at
    ? " until " + when(b.token_expires_at) : "") + (b.token_checked_at ? " (checked " + when(b.token_checked_at) + ")" : "");
}

function makeRow(id) {
  const tr = el("tr");
  tr.dataset.id = id;
  const cells = {};
  const numeric = ["sl", "qty", "entry", "exit", "price", "pnl"];
  for (const name of ["symbol", "buy", "sell", "sl", "qty", "status", "position", "entry", "exit", "price", "pnl", "next", "actions"]) {
    cells[name] = tr.appendChild(el("td", undefined, numeric.includes(name) ? "num" : name));
  }
  const logTr = el("tr", undefined, "log");
  logTr.appendChild(el("td")).colSpan = 13;
  return { tr, logTr, cells, key: "" };
}

function place(tbody, node, pos) { // move a row only if it is out of place (keeps clicks and focus)
  if (tbody.children[pos] !== node) tbody.insertBefore(node, tbody.children[pos] || null);
  return pos + 1;
}

function positionBadge(s) {
  const pnl = s.realized_pnl;
  let cls = "";
  if (s.position === "bought") cls = "holding";
  else if (s.position === "exited_by_sl") cls = pnl > 0 ? "profit" : "loss"; // a stop-loss exit is a loss unless it made money
  else if (s.position === "sold") cls = pnl === null || pnl === undefined ? "" : pnl >= 0 ? "profit" : "loss";
  return badgeEl(POSITION_WORDS[s.position] || show(s.position), cls);
}

function renderStrategies(list) {
  strategies = list;
  const tbody = $("rows");
  const seen = new Set();
  let pos = 0;
  for (const s of list) {
    seen.add(s.id);
    if (!rows.has(s.id)) rows.set(s.id, makeRow(s.id));
    const r = rows.get(s.id);
    const c = r.cells;
    const text = { symbol: s.symbol, buy: s.buy_time, sell: s.sell_time, sl: money(s.stop_loss), qty: show(s.quantity),
      entry: money(s.entry_average_price), exit: money(s.exit_average_price), price: money(s.last_price) };
    for (const [name, value] of Object.entries(text)) c[name].textContent = value;
    const pnl = s.realized_pnl !== null && s.realized_pnl !== undefined ? s.realized_pnl : s.unrealized_pnl;
    c.pnl.textContent = signed(pnl);
    c.pnl.className = signCls(pnl);
    c.pnl.title = s.realized_pnl !== null && s.realized_pnl !== undefined ? "realized" : "open (marked to the last price)";
    c.status.replaceChildren(badgeEl(STATUS_WORDS[s.status] || show(s.status), s.status));
    if (s.status === "failed" && s.failure_reason) c.status.appendChild(el("span", s.failure_reason, "reason"));
    if (s.needs_login) c.status.appendChild(el("span", s.reason, "reason"));
    c.position.replaceChildren(positionBadge(s));
    const next = s.next_buy_at ? "Buy · " + when(s.next_buy_at) : s.next_sell_at ? "Sell · " + when(s.next_sell_at) : "-";
    c.next.textContent = next + (s.repeat === "trading_days" ? " · every trading day" : "");
    c.next.className = "next";
    const key = [s.status, s.position, expanded.has(s.id)].join("|");
    if (r.key !== key) { r.key = key; c.actions.replaceChildren(...actions(s)); } // buttons only on change
    pos = place(tbody, r.tr, pos);
    if (expanded.has(s.id)) pos = place(tbody, r.logTr, pos);
    else r.logTr.remove();
  }
  for (const [id, r] of rows) {
    if (!seen.has(id)) { r.tr.remove(); r.logTr.remove(); rows.delete(id); expanded.delete(id); }
  }
  $("empty").classList.toggle("hidden", seen.size > 0);
}

function actions(s) {
  const id = { strategy_id: s.id };
  const what = s.symbol + " (" + s.quantity + " shares)";
  const out = [];
  if (s.status === "running") {
    out.push(btn("Stop", "", (ev) => act(ev, s, "POST", "/strategies/stop", id, s.position === "bought"
      ? "Stop " + what + " without selling? The bought position stays open at the broker." : null)));
    out.push(btn("Stop and square off", "danger", (ev) => act(ev, s, "POST", "/strategies/stop",
      { ...id, square_off: true }, "Stop " + what + " and sell any open position at market now?")));
  } else {
    out.push(btn("Start", "primary", (ev) => act(ev, s, "POST", "/strategies/start", id, null)));
    out.push(btn("Edit", "", () => startEdit(s)));
    out.push(btn("Delete", "danger", (ev) => act(ev, s, "DELETE", "/strategies/" + encodeURIComponent(s.id),
      undefined, "Delete the " + s.symbol + " strategy (buy " + s.buy_time + ", sell " + s.sell_time + ")?")));
  }
  const open = expanded.has(s.id);
  out.push(btn(open ? "Hide orders" : "Orders", "", () => {
    if (open) expanded.delete(s.id); else expanded.add(s.id);
    renderStrategies(strategies);
    refreshLogs();
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
  refreshSlow();
}

function detail(o) {
  const r = o.response_payload || {};
  if (o.status === "success" && r.average_price != null) return "filled " + show(r.filled_quantity) + " @ ₹" + money(r.average_price);
  const text = r.message || r.error || r.status_message || r.skipped || r.aborted || "";
  const retry = r.retry_attempt ? " (retry " + r.retry_attempt + " in " + r.retry_in_s + " s)" : "";
  return (typeof text === "string" ? text : JSON.stringify(text)) + retry;
}

function renderLog(td, items) {
  if (!items.length) { td.replaceChildren(el("span", "No orders logged yet.", "muted")); return; }
  const table = el("table");
  const head = table.appendChild(el("thead")).appendChild(el("tr"));
  ["Time", "Event", "Result", "Broker order id", "Detail"].forEach((h) => head.appendChild(el("th", h)));
  const body = table.appendChild(el("tbody"));
  for (const o of items) {
    const tr = body.appendChild(el("tr"));
    const status = el("td");
    status.appendChild(badgeEl(LOG_WORDS[o.status] || show(o.status), o.status));
    tr.append(el("td", when(o.created_at)), el("td", EVENT_WORDS[o.event_type] || show(o.event_type)), status,
      el("td", show(o.broker_order_id)), el("td", detail(o)));
  }
  td.replaceChildren(table);
}

function renderPositions(list, err) {
  const why = err && err.code === "broker_not_connected" ? "Connect your broker to see its positions."
    : err && err.code === "broker_credentials_invalid" ? "The broker token has expired: log in to Kite again."
      : err ? err.message : "";
  $("pos-msg").textContent = err ? why : list.length ? "" : "No positions today.";
  $("pos-rows").replaceChildren(...list.map((p) => {
    const tr = el("tr");
    const pnl = el("td", signed(p.pnl), signCls(p.pnl));
    tr.append(el("td", p.symbol), el("td", show(p.quantity), "num"), el("td", p.quantity ? money(p.average_price) : "-", "num"),
      el("td", money(p.last_price), "num"), pnl,
      el("td", p.strategies.length ? p.strategies.map((s) => STATUS_WORDS[s.status] || s.status).join(", ") : "not Tickwise"));
    return tr;
  }));
}

function renderTrades(list) {
  $("trades-msg").textContent = list.length ? list.length + " fills" : "No fills in the last 30 days.";
  $("trade-rows").replaceChildren(...list.map((t) => {
    const tr = el("tr");
    const kind = t.kind === "STOPLOSS" ? badgeEl("Stop-loss exit", "loss") : badgeEl(EVENT_WORDS[t.kind] || t.kind, "");
    const kindTd = el("td");
    kindTd.appendChild(kind);
    tr.append(el("td", when(t.filled_at)), el("td", show(t.symbol)), kindTd, el("td", show(t.quantity), "num"),
      el("td", money(t.average_price), "num"), el("td", signed(t.realized_pnl), signCls(t.realized_pnl)),
      el("td", show(t.broker_order_id)));
    return tr;
  }));
}

function renderNotify(n) {
  const form = $("notify");
  form.elements.webhook_url.value = n.webhook_url || "";
  form.elements.telegram_chat_id.value = n.telegram_chat_id || "";
  $("telegram-field").classList.toggle("hidden", !n.telegram_available);
  const secret = $("notify-secret");
  secret.classList.toggle("hidden", !n.webhook_secret);
  secret.textContent = n.webhook_secret ? "Signing secret (shown once): " + n.webhook_secret : "";
}

// -- create / edit and the stop-loss warning -------------------------------------------------
let quoteTimer = null;
let quoted = null; // { symbol, last_price }
function checkStopLoss() {
  const form = $("create");
  const symbol = form.elements.symbol.value.trim().toUpperCase();
  const sl = Number(form.elements.stop_loss.value);
  const warn = $("sl-warn");
  const price = quoted && quoted.symbol === symbol ? quoted.last_price : null;
  $("quote").textContent = price !== null ? "Current price " + rupees(price) : "";
  if (price !== null && form.elements.stop_loss.value !== "" && sl >= price) {
    warn.textContent = "Stop-loss " + rupees(sl) + " is at or above the current price " + rupees(price)
      + ": the strategy would sell right after it buys.";
    warn.classList.remove("hidden");
  } else {
    warn.classList.add("hidden");
  }
}

function onSymbolInput() {
  clearTimeout(quoteTimer);
  const symbol = $("create").elements.symbol.value.trim().toUpperCase();
  quoted = null;
  checkStopLoss();
  if (!/^[A-Z0-9&_-]{1,30}$/.test(symbol)) return;
  quoteTimer = setTimeout(async () => {
    try {
      const q = await call("GET", "/quote?symbol=" + encodeURIComponent(symbol));
      if ($("create").elements.symbol.value.trim().toUpperCase() === symbol) { quoted = q; checkStopLoss(); }
    } catch (e) { /* unknown symbol or no broker: creating says so */ }
  }, 350);
}

function startEdit(s) {
  editing = s;
  const form = $("create");
  clearErrors(form);
  for (const name of ["symbol", "buy_time", "sell_time", "stop_loss", "quantity"]) form.elements[name].value = s[name];
  form.elements.repeat.checked = s.repeat === "trading_days";
  $("form-title").textContent = "Edit " + s.symbol + " strategy";
  form.querySelector("button[type=submit]").textContent = "Save changes";
  $("cancel-edit").classList.remove("hidden");
  onSymbolInput();
  form.elements.symbol.focus();
}

function endEdit() {
  editing = null;
  const form = $("create");
  form.reset();
  $("form-title").textContent = "New strategy";
  form.querySelector("button[type=submit]").textContent = "Create";
  $("cancel-edit").classList.add("hidden");
  quoted = null;
  checkStopLoss();
}

async function saveStrategy(v) {
  const body = { symbol: v.symbol.trim().toUpperCase(), buy_time: clock(v.buy_time), sell_time: clock(v.sell_time),
    stop_loss: num(v.stop_loss), quantity: num(v.quantity), repeat: v.repeat ? "trading_days" : "once" };
  if (editing) {
    const changed = Object.fromEntries(Object.entries(body).filter(([k, val]) => val !== editing[k]));
    const out = await call("PATCH", "/strategies/" + encodeURIComponent(editing.id), changed);
    endEdit();
    return "Saved " + out.symbol + " (buy " + out.buy_time + ", sell " + out.sell_time + " IST).";
  }
  const out = await call("POST", "/strategies", body);
  endEdit();
  return "Created " + out.symbol + " (buy " + out.buy_time + ", sell " + out.sell_time + " IST). Press Start to schedule it.";
}

async function exportCsv() {
  const res = await call("GET", "/orders?format=csv&limit=5000", undefined, true);
  const blob = await res.blob();
  const name = (/filename="([^"]+)"/.exec(res.headers.get("Content-Disposition") || "") || [])[1] || "tickwise-trades.csv";
  const a = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob), download: name });
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
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
onSubmit("create", saveStrategy);
onSubmit("password", async (v, form) => {
  await call("POST", "/me/password", { current_password: v.current_password, new_password: v.new_password });
  form.reset();
  return "Password changed.";
});
onSubmit("notify", async (v) => {
  const body = { webhook_url: v.webhook_url.trim() || null };
  if (!$("telegram-field").classList.contains("hidden")) body.telegram_chat_id = (v.telegram_chat_id || "").trim() || null;
  const out = await call("PUT", "/notifications", body);
  renderNotify(out);
  return out.webhook_secret ? "Saved. Copy the signing secret now: it is not shown again." : "Saved.";
});
$("notify-test").addEventListener("click", async () => {
  const out = $("notify").querySelector(".form-msg");
  try {
    await call("POST", "/notifications/test", {});
    out.textContent = "Test queued: it arrives within a few seconds.";
    out.classList.add("ok");
  } catch (e) { out.textContent = e.message; out.classList.remove("ok"); }
});
$("cancel-edit").addEventListener("click", () => { clearErrors($("create")); endEdit(); });
$("create").elements.symbol.addEventListener("input", onSymbolInput);
$("create").elements.stop_loss.addEventListener("input", checkStopLoss);
$("export").addEventListener("click", () => exportCsv().catch((e) => { $("trades-msg").textContent = e.message; }));
$("kite-login").addEventListener("click", async () => {
  try {
    const out = await call("GET", "/broker/login");
    const url = out && (out.login_url || out.url);
    if (url) window.location.assign(url);
  } catch (e) { $("broker-msg").textContent = e.message; }
});
$("kill").addEventListener("click", async () => {
  if (!window.confirm("Stop every running strategy and square off open positions now?")) return;
  try {
    const out = await call("POST", "/kill-switch", { square_off: true });
    $("broker-msg").textContent = "Kill switch used: " + out.stopped + " stopped, " + out.squaring_off
      + " squaring off.";
  } catch (e) { $("broker-msg").textContent = e.message; }
  refreshAll();
});
$("logout").addEventListener("click", () => logout(""));
$("callback-url").textContent = location.origin + "/api/v1/broker/callback";
{ // back from Kite's login: say how it went, then drop the query from the address bar
  const q = new URLSearchParams(location.search);
  if (q.get("broker_login")) {
    const ok = q.get("broker_login") === "success";
    window.addEventListener("load", () => setMsg(ok ? "Kite login done: today's session is stored."
      : "Kite login failed: " + (q.get("message") || q.get("code") || "unknown error")));
    history.replaceState(null, "", location.pathname);
  }
}
document.addEventListener("visibilitychange", () => { if (!document.hidden && token) { refreshAll(); refreshSlow(); } });
setInterval(() => { $("clock").textContent = CLOCK.format(new Date()); }, 1000);
$("clock").textContent = CLOCK.format(new Date());
if (token) enter();
