// Tickwise dashboard: log in, list strategies with live status, start/stop. No build step.
"use strict";
const API = "/api/v1";
let token = sessionStorage.getItem("tickwise.token") || "";
const $ = (id) => document.getElementById(id);

async function call(method, path, body) {
  const res = await fetch(API + path, {
    method,
    headers: Object.assign({ "Content-Type": "application/json" },
      token ? { Authorization: "Bearer " + token } : {}),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = res.status === 204 ? null : await res.json();
  if (!res.ok) {
    if (res.status === 401) { logout(); }
    throw new Error((data && data.error && data.error.message) || res.statusText);
  }
  return data;
}

function show(loggedIn) {
  $("login").classList.toggle("hidden", loggedIn);
  $("main").classList.toggle("hidden", !loggedIn);
}

function logout() {
  token = "";
  sessionStorage.removeItem("tickwise.token");
  show(false);
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  return td;
}

async function refresh() {
  $("msg").textContent = "";
  try {
    const me = await call("GET", "/me");
    $("who").textContent = me.name + " <" + me.email + ">";
    const strategies = await call("GET", "/strategies");
    const rows = $("rows");
    rows.replaceChildren();
    for (const s of strategies) {
      const st = await call("GET", "/strategies/" + s.id + "/status");
      const tr = document.createElement("tr");
      [s.symbol, s.buy_time, s.sell_time, s.stop_loss, s.quantity, st.status, st.position, st.last_price]
        .forEach((v) => tr.appendChild(cell(v)));
      const actions = document.createElement("td");
      const running = st.status === "running";
      const button = document.createElement("button");
      button.textContent = running ? "Stop" : "Start";
      button.onclick = () => act(running ? "/strategies/stop" : "/strategies/start", s.id);
      actions.appendChild(button);
      tr.appendChild(actions);
      rows.appendChild(tr);
    }
  } catch (e) {
    $("msg").textContent = e.message;
  }
}

async function act(path, id) {
  try {
    await call("POST", path, { strategy_id: id });
  } catch (e) {
    $("msg").textContent = e.message;
  }
  refresh();
}

$("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const out = await call("POST", "/auth/login", { email: $("email").value, password: $("password").value });
    token = out.access_token;
    sessionStorage.setItem("tickwise.token", token);
    show(true);
    refresh();
  } catch (e) {
    $("msg").textContent = e.message;
  }
});
$("refresh").onclick = refresh;
$("logout").onclick = logout;
show(Boolean(token));
if (token) { refresh(); }
setInterval(() => { if (token) { refresh(); } }, 5000);
