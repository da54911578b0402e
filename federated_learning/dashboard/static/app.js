"use strict";
// The dashboard page: polls the REST API, listens on the WebSocket, draws the accuracy chart.
const state = { selected: null, metrics: {} };

async function getJSON(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fmt(x, digits = 3) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

async function refreshTrainings() {
  const trainings = await getJSON("/api/trainings");
  const body = document.querySelector("#trainings tbody");
  body.replaceChildren();
  for (const t of trainings) {
    const row = body.insertRow();
    if (t.training_id === state.selected) row.className = "selected";
    cell(row, t.training_id);
    cell(row, t.config.name);
    cell(row, t.status + (t.reason ? ` (${t.reason})` : ""), t.status);
    cell(row, `${t.completed_rounds}/${t.config.rounds}`);
    cell(row, t.current_version ?? "–");
    cell(row, fmt(t.best_accuracy));
    cell(row, fmt(t.epsilon_spent, 2));
    row.onclick = () => { state.selected = t.training_id; refreshMetrics(); refreshTrainings(); };
  }
  if (!state.selected && trainings.length) { state.selected = trainings[0].training_id; refreshMetrics(); }
}

async function refreshMetrics() {
  if (!state.selected) return;
  state.metrics[state.selected] = await getJSON(`/api/training/${state.selected}/metrics`);
  drawChart();
}

function drawChart() {
  const canvas = document.getElementById("chart");
  const ctx = canvas.getContext("2d");
  const rows = state.metrics[state.selected] || [];
  document.getElementById("chart-title").textContent = state.selected ? `training ${state.selected}` : "";
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const pad = 36, w = canvas.width - 2 * pad, h = canvas.height - 2 * pad;
  ctx.strokeStyle = "#999"; ctx.fillStyle = "#444"; ctx.font = "11px sans-serif";
  ctx.strokeRect(pad, pad, w, h);
  for (let i = 0; i <= 4; i++) {
    const y = pad + h - (i / 4) * h;
    ctx.fillText((i / 4).toFixed(2), 4, y + 4);
  }
  const points = rows.filter(r => r.eval_accuracy !== null).map(r => [r.round, r.eval_accuracy]);
  if (!points.length) { ctx.fillText("no rounds yet", pad + 10, pad + 20); return; }
  const maxRound = Math.max(...points.map(p => p[0]), 1);
  ctx.strokeStyle = "#1a73e8"; ctx.lineWidth = 2; ctx.beginPath();
  points.forEach(([r, a], i) => {
    const x = pad + (r / maxRound) * w, y = pad + h - a * h;
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
  ctx.fillText(`round ${maxRound}`, pad + w - 50, pad + h + 16);
  ctx.fillText(`last ${points[points.length - 1][1].toFixed(3)}`, pad + 6, pad + 14);
}

async function refreshAgents() {
  const agents = await getJSON("/api/agents");
  const body = document.querySelector("#agents tbody");
  body.replaceChildren();
  let alive = 0;
  for (const a of agents) {
    alive += a.alive ? 1 : 0;
    const row = body.insertRow();
    cell(row, a.agent_id);
    cell(row, a.alive ? "yes" : "no", a.alive ? "ok" : "failed");
    cell(row, Object.values(a.datasets).reduce((s, n) => s + n, 0));
    cell(row, a.dropouts);
  }
  document.getElementById("agent-count").textContent = `${alive} alive of ${agents.length}`;
}

async function refreshAlerts() {
  const alerts = await getJSON("/api/alerts?open_only=true");
  const list = document.getElementById("alerts");
  list.replaceChildren();
  for (const a of alerts) {
    const li = document.createElement("li");
    li.textContent = `[${a.severity}] ${a.message} — ${a.action}`;
    li.className = a.severity;
    list.appendChild(li);
  }
  if (!alerts.length) list.textContent = "no open alerts";
}

async function refreshHealth() {
  const health = await getJSON("/api/system/health");
  const badge = document.getElementById("health");
  badge.textContent = health.health_status + (health.reasons.length ? `: ${health.reasons.join(", ")}` : "");
  badge.className = `badge ${health.health_status}`;
}

function logEvent(message) {
  const list = document.getElementById("events");
  const li = document.createElement("li");
  li.textContent = `${new Date(message.at * 1000).toLocaleTimeString()} ${message.type} ${message.training_id ?? ""} ${message.message ?? ""}`;
  list.prepend(li);
  while (list.children.length > 100) list.lastChild.remove();
}

function connect() {
  const id = Math.random().toString(36).slice(2);
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/${id}`);
  const badge = document.getElementById("live");
  socket.onopen = () => { badge.textContent = "live"; badge.className = "badge ok";
    socket.send(JSON.stringify({ action: "subscribe", training_id: "*" })); };
  socket.onclose = () => { badge.textContent = "reconnecting"; badge.className = "badge warning"; setTimeout(connect, 2000); };
  socket.onmessage = (msg) => {
    const message = JSON.parse(msg.data);
    if (message.type === "metric_update") {
      if (message.training_id === state.selected) refreshMetrics();
      return;
    }
    if (message.type === "agent_update") { refreshAgents(); return; }
    logEvent(message);
    if (["round_completed", "training_completed", "training_status"].includes(message.type)) refreshTrainings();
    if (message.type.startsWith("alert")) refreshAlerts();
  };
}

async function refreshAll() {
  await Promise.allSettled([refreshTrainings(), refreshAgents(), refreshAlerts(), refreshHealth()]);
}
refreshAll();
setInterval(refreshAll, 5000);
connect();
