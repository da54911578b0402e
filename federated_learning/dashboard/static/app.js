"use strict";
// The dashboard page: polls the REST API, listens on the WebSocket, draws the accuracy chart.
const state = { selected: null, metrics: {}, compare: [] };

// Asked once per page load: a cancelled prompt (or a refused key) does not come back on every
// poll; the "API key" button asks again.
let askedForKey = false;

function apiKey() {
  const stored = sessionStorage.getItem("fl-api-key");
  if (stored) return stored;
  if (askedForKey) return "";
  askedForKey = true;
  const key = prompt("API key (the deployment's, from data/run/deployment.json, or your organisation's):") || "";
  if (key) sessionStorage.setItem("fl-api-key", key);
  return key;
}

async function postJSON(path, body) {
  const response = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json", "X-API-Key": apiKey() },
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401) sessionStorage.removeItem("fl-api-key");
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || `${path}: ${response.status}`);
  return data;
}

async function getJSON(path) {
  const response = await fetch(path, { headers: { "X-API-Key": apiKey() } });
  if (response.status === 401) sessionStorage.removeItem("fl-api-key");
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

// A plain link cannot send the API key header: fetch the model and save it from memory.
async function downloadModel(trainingId, version) {
  const response = await fetch(`/api/training/${trainingId}/versions/${version}/model`,
                               { headers: { "X-API-Key": apiKey() } });
  if (!response.ok) throw new Error(`download: ${response.status}`);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = `${trainingId}-v${version}.safetensors`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
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
    row.onclick = () => { state.selected = t.training_id; state.compare = []; refreshMetrics(); refreshTrainings(); refreshVersions(); refreshPrivacy(); };
  }
  if (!state.selected && trainings.length) { state.selected = trainings[0].training_id; refreshMetrics(); refreshVersions(); refreshPrivacy(); }
}

// The privacy budget used by the selected training: epsilon spent of its target, as a percentage.
function privacyBudgetText(p) {
  if (p.epsilon_target === null || p.epsilon_target === undefined) return { text: `privacy level ${p.level}: no budget`, used: null };
  const used = p.epsilon_target > 0 ? (100 * p.epsilon_spent) / p.epsilon_target : 100;
  return { text: `privacy budget (${p.level}): ε ${fmt(p.epsilon_spent, 2)} / ${fmt(p.epsilon_target, 2)} spent, ` +
                 `${used.toFixed(1)}% used (δ ${p.delta})`, used };
}

async function refreshPrivacy() {
  if (!state.selected) return;
  const trainingId = state.selected;
  const budget = await getJSON(`/api/training/${trainingId}/privacy`);
  if (trainingId !== state.selected) return;
  const { text, used } = privacyBudgetText(budget);
  const box = document.getElementById("privacy-budget");
  box.dataset.level = budget.level;
  box.dataset.percentUsed = used === null ? "" : used.toFixed(1);
  document.getElementById("privacy-text").textContent = `training ${trainingId} — ${text}`;
  const meter = document.getElementById("privacy-meter");
  meter.hidden = used === null;
  meter.value = used === null ? 0 : Math.min(used, 100) / 100;
}

async function refreshMetrics() {
  if (!state.selected) return;
  state.metrics[state.selected] = await getJSON(`/api/training/${state.selected}/metrics`);
  drawChart();
}

const SERIES = [
  { key: "eval_accuracy", label: "accuracy", color: "#1a73e8" },
  { key: "eval_loss", label: "loss", color: "#d93025" },
];

function chartSeries(rows) {
  // Accuracy is on [0, 1]; loss is scaled by its largest value so both share the axis.
  return SERIES.map(s => {
    const points = rows.filter(r => r[s.key] !== null && r[s.key] !== undefined).map(r => [r.round, r[s.key]]);
    const scale = s.key === "eval_loss" ? Math.max(...points.map(p => p[1]), 1e-9) : 1;
    return { ...s, points, scale };
  });
}

function drawAxes(ctx, pad, w, h) {
  ctx.strokeStyle = "#999"; ctx.fillStyle = "#444"; ctx.font = "11px sans-serif"; ctx.lineWidth = 1;
  ctx.strokeRect(pad, pad, w, h);
  for (let i = 0; i <= 4; i++) ctx.fillText((i / 4).toFixed(2), 4, pad + h - (i / 4) * h + 4);
}

function drawLine(ctx, series, maxRound, pad, w, h) {
  ctx.strokeStyle = series.color; ctx.lineWidth = 2; ctx.beginPath();
  series.points.forEach(([r, v], i) => {
    const x = pad + (r / maxRound) * w, y = pad + h - (v / series.scale) * h;
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
}

function drawChart() {
  const canvas = document.getElementById("chart");
  const ctx = canvas.getContext("2d");
  const rows = state.metrics[state.selected] || [];
  document.getElementById("chart-title").textContent = state.selected ? `training ${state.selected}` : "";
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const pad = 36, w = canvas.width - 2 * pad, h = canvas.height - 2 * pad;
  drawAxes(ctx, pad, w, h);
  const series = chartSeries(rows);
  const [accuracy, loss] = series;
  // What is drawn, for tests and tools: points per series and the newest round.
  canvas.dataset.trainingId = state.selected || "";
  canvas.dataset.points = String(accuracy.points.length);
  canvas.dataset.lossPoints = String(loss.points.length);
  canvas.dataset.lastRound = String(rows.length ? Math.max(...rows.map(r => r.round)) : 0);
  if (!accuracy.points.length && !loss.points.length) { ctx.fillText("no rounds yet", pad + 10, pad + 20); return; }
  const maxRound = Math.max(...series.flatMap(s => s.points.map(p => p[0])), 1);
  series.forEach(s => drawLine(ctx, s, maxRound, pad, w, h));
  ctx.fillStyle = "#444";
  ctx.fillText(`round ${maxRound}`, pad + w - 50, pad + h + 16);
  series.forEach((s, i) => {
    const last = s.points.length ? s.points[s.points.length - 1][1].toFixed(3) : "–";
    ctx.fillStyle = s.color;
    ctx.fillText(`${s.label} ${last}${s.scale !== 1 ? ` (÷${s.scale.toFixed(2)})` : ""}`, pad + 6 + i * 150, pad + 14);
  });
}

async function refreshAgents() {
  const [agents, board] = await Promise.all([getJSON("/api/agents"), getJSON("/api/agents/leaderboard?top=1000")]);
  const alive = new Map(agents.map(a => [a.agent_id, a.alive]));
  const body = document.querySelector("#agents tbody");
  body.replaceChildren();
  for (const a of board) {
    const row = body.insertRow();
    cell(row, a.rank);
    cell(row, a.agent_id);
    cell(row, alive.get(a.agent_id) ? "yes" : "no", alive.get(a.agent_id) ? "ok" : "failed");
    cell(row, fmt(a.reliability, 2));
    cell(row, fmt(a.contribution, 3));
    cell(row, a.dropped);
  }
  const live = agents.filter(a => a.alive).length;
  document.getElementById("agent-count").textContent = `${live} alive of ${agents.length}`;
}

async function refreshVersions() {
  if (!state.selected) return;
  const [versions, status] = await Promise.all([getJSON(`/api/training/${state.selected}/versions`),
                                                getJSON(`/api/training/${state.selected}/status`)]);
  const current = status.current_version;
  document.getElementById("versions").dataset.currentVersion = current ?? "";
  const body = document.querySelector("#versions tbody");
  body.replaceChildren();
  for (const v of versions.slice().reverse().slice(0, 30)) {
    const row = body.insertRow();
    row.dataset.version = v.version;
    row.dataset.parent = v.parent_version ?? "";
    if (v.version === current) row.className = "current";
    const pick = document.createElement("input");
    pick.type = "checkbox";
    pick.checked = state.compare.includes(v.version);
    pick.onchange = () => toggleCompare(v.version, pick.checked);
    row.insertCell().appendChild(pick);
    cell(row, v.version);
    cell(row, v.round);
    cell(row, v.parent_version ?? "–");
    cell(row, v.contributors.length);
    cell(row, v.privacy.level + (v.privacy.epsilon_spent ? ` ε=${fmt(v.privacy.epsilon_spent, 2)}` : ""));
    const actions = row.insertCell();
    const download = document.createElement("a");
    download.href = "#";
    const trainingId = state.selected;
    download.onclick = (event) => { event.preventDefault(); downloadModel(trainingId, v.version).catch((e) => alert(e.message)); };
    download.textContent = "download";
    const rollback = document.createElement("button");
    rollback.textContent = "roll back here";
    rollback.className = "rollback";
    rollback.onclick = () => requestRollback(v.version);
    actions.append(download, " ", rollback);
  }
}

async function requestRollback(version) {
  const out = document.getElementById("version-status");
  try {
    await postJSON(`/api/training/${state.selected}/rollback`, { version });
    out.textContent = `rollback of ${state.selected} to version ${version} requested`;
    out.className = "ok";
  } catch (e) {
    out.textContent = `rollback to version ${version} refused: ${e.message}`;
    out.className = "failed";
  }
  refreshTrainings(); refreshVersions();
}

async function toggleCompare(version, on) {
  state.compare = on ? [...state.compare.filter(v => v !== version), version].slice(-2) : state.compare.filter(v => v !== version);
  refreshVersions();
  const out = document.getElementById("comparison");
  if (state.compare.length !== 2) { out.textContent = ""; return; }
  const [a, b] = state.compare.slice().sort((x, y) => x - y);
  const c = await getJSON(`/api/training/${state.selected}/versions/compare?a=${a}&b=${b}`);
  out.textContent = `v${a} -> v${b}: L2 distance ${fmt(c.l2_distance, 4)}, cosine ${fmt(c.cosine_similarity, 4)}\n` +
    c.layers.map(l => `  ${l.name}: L2 ${fmt(l.l2_distance, 4)}, cosine ${fmt(l.cosine_similarity, 4)}`).join("\n") +
    (Object.keys(c.metric_deltas).length ? `\n  metric deltas: ${JSON.stringify(c.metric_deltas)}` : "");
}

async function refreshAlerts() {
  const alerts = await getJSON("/api/alerts?open_only=true");
  const list = document.getElementById("alerts");
  list.replaceChildren();
  for (const a of alerts) {
    const li = document.createElement("li");
    li.textContent = `[${a.severity}] ${a.message} — ${a.action} `;
    li.className = a.severity;
    if (!a.acknowledged) {
      const ack = document.createElement("button");
      ack.textContent = "acknowledge";
      ack.onclick = async () => {
        try { await postJSON(`/api/alerts/${a.alert_id}/acknowledge`); refreshAlerts(); }
        catch (e) { alert(e.message); }
      };
      li.appendChild(ack);
    }
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
  if (!message.at) return;
  const list = document.getElementById("events");
  const li = document.createElement("li");
  li.textContent = `${new Date(message.at * 1000).toLocaleTimeString()} ${message.type} ${message.training_id ?? ""} ${message.message ?? ""}`;
  list.prepend(li);
  while (list.children.length > 100) list.lastChild.remove();
}

function connect() {
  const id = Math.random().toString(36).slice(2);
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/${id}?api_key=${encodeURIComponent(apiKey())}`);
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
    if (["round_completed", "training_completed", "training_status", "rollback"].includes(message.type)) { refreshTrainings(); refreshVersions(); refreshPrivacy(); }
    if (message.type.startsWith("alert")) refreshAlerts();
  };
}

async function refreshAll() {
  await Promise.allSettled([refreshTrainings(), refreshAgents(), refreshAlerts(), refreshHealth(), refreshVersions(),
                            refreshPrivacy()]);
}
refreshAll();
setInterval(refreshAll, 5000);
connect();

document.getElementById("set-key").onclick = () => {
  sessionStorage.removeItem("fl-api-key");
  askedForKey = false;
  if (apiKey()) refreshAll();
};
