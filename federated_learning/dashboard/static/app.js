"use strict";
// The dashboard page: polls the REST API, listens on the WebSocket, draws the accuracy and loss chart
// with uPlot (vendored in /static/vendor, like every asset of this page).
const state = { selected: null, trainings: [], metrics: {}, compare: [], socketGeneration: 0, socket: null };
const KEY_STORE = "fl-api-key";

function apiKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

// A 401 from the API or the WebSocket: say so on the page, with where the key is, instead of
// leaving empty tables and a socket that keeps reconnecting.
function showKeyForm(title, detail) {
  document.getElementById("auth-title").textContent = title;
  document.getElementById("auth-detail").textContent = detail;
  document.getElementById("auth").hidden = false;
}

function unauthorized() {
  const refused = apiKey();
  const auth = document.getElementById("auth");
  if (!refused && !auth.hidden) return;
  sessionStorage.removeItem(KEY_STORE);
  showKeyForm("401: set your API key", refused ? "The API refused the key this page had (wrong, revoked or expired)."
                                               : "This page has no API key yet.");
  const badge = document.getElementById("live");
  badge.textContent = "401: no key"; badge.className = "badge failed";
  closeSocket();
}

function useKey(key) {
  sessionStorage.setItem(KEY_STORE, key);
  document.getElementById("auth").hidden = true;
  refreshAll();
  connect();
}

class Unauthorized extends Error {}

async function request(path, options = {}) {
  const key = apiKey();
  const response = await fetch(path, { ...options, headers: { ...options.headers, "X-API-Key": key } });
  if (response.status === 401) {
    // A refusal of a key the user has replaced since (a slow answer to the old key) says nothing
    // about the new one.
    if (key === apiKey()) unauthorized();
    throw new Unauthorized(`${path}: 401`);
  }
  return response;
}

async function postJSON(path, body) {
  const response = await request(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                         body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || `${path}: ${response.status}`);
  return data;
}

async function getJSON(path) {
  const response = await request(path);
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

// A plain link cannot send the API key header: fetch the model and save it from memory.
async function downloadModel(trainingId, version) {
  const response = await request(`/api/training/${trainingId}/versions/${version}/model`);
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

// The table's accuracy: the final model's federated evaluation once there is one, else the best
// single round's. Both are the agents' own held-out data; the server's validation of each version is
// in the selected training's summary above the chart.
function tableAccuracy(t) {
  if (t.final_evaluation) return { value: t.final_evaluation.accuracy, source: "final model, federated eval" };
  if (t.best_accuracy !== null && t.best_accuracy !== undefined) return { value: t.best_accuracy, source: "best round, federated eval" };
  return null;
}

function accuracyCell(row, t) {
  const figure = tableAccuracy(t);
  const td = cell(row, figure ? fmt(figure.value) : "–");
  if (figure) {
    const source = document.createElement("small");
    source.className = "source";
    source.textContent = ` ${figure.source}`;
    td.append(source);
  }
}

let trainingsRequest = 0;
async function refreshTrainings() {
  const request = ++trainingsRequest;
  const trainings = await getJSON("/api/trainings");
  if (request !== trainingsRequest) return;  // a newer refresh started meanwhile and wins
  state.trainings = trainings;
  const body = document.querySelector("#trainings tbody");
  // Rows stay (keyed by training) and only their cells change, so a click lands while rounds finish.
  const kept = new Map([...body.rows].map(row => [row.dataset.key, row]));
  let previous = null;
  for (const t of trainings) {
    const fresh = document.createElement("tr");
    cell(fresh, t.training_id);
    cell(fresh, t.config.name);
    cell(fresh, t.status + (t.reason ? ` (${t.reason})` : ""), t.status);
    cell(fresh, `${t.completed_rounds}/${t.config.rounds}`);
    cell(fresh, t.current_version ?? "–");
    accuracyCell(fresh, t);
    cell(fresh, fmt(t.epsilon_spent, 2));
    let row = kept.get(t.training_id);
    kept.delete(t.training_id);
    if (!row) {
      row = fresh;
      row.dataset.key = t.training_id;
      row.onclick = () => { state.selected = t.training_id; state.compare = []; refreshMetrics(); refreshTrainings(); refreshVersions(); refreshPrivacy(); };
    } else if (row.innerHTML !== fresh.innerHTML) {
      row.replaceChildren(...fresh.childNodes);
    }
    row.className = t.training_id === state.selected ? "selected" : "";
    const next = previous ? previous.nextSibling : body.firstChild;
    if (row !== next) body.insertBefore(row, next);
    previous = row;
  }
  for (const stale of kept.values()) stale.remove();
  if (!state.selected && trainings.length) { state.selected = trainings[0].training_id; refreshMetrics(); refreshVersions(); refreshPrivacy(); }
  showModelAccuracy();
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
  const trainingId = state.selected;
  const rows = await getJSON(`/api/training/${trainingId}/metrics`);
  state.metrics[trainingId] = rows;
  if (trainingId !== state.selected) return;
  drawChart();
  showModelAccuracy();
}

const training = (id) => state.trainings.find(t => t.training_id === id);
const known = (x) => x !== null && x !== undefined;
const lastWith = (rows, key) => rows.filter(r => known(r[key])).at(-1);

// The selected training's figures, each named for what it measures: the server's validation set
// scores one version; the agents' federated evaluation is of the model sent out in a round.
function accuracyFigures(t, rows) {
  const figures = [];
  const current = t?.current_version;
  const server = rows.filter(r => known(r.server_accuracy));
  const scored = server.find(r => r.version === current) || server.at(-1);
  if (scored) {
    figures.push({ id: "server", text: `server validation (the server's held-out set) of version ${scored.version}: ` +
                   `accuracy ${fmt(scored.server_accuracy)}, loss ${fmt(scored.server_loss)}`, value: scored.server_accuracy });
  } else if (t) {
    figures.push({ id: "server", text: t.config.validation_data ? "server validation: no version scored yet"
                   : "server validation: none (the training names no validation_data)", value: null });
  }
  const federated = lastWith(rows, "eval_accuracy");
  if (t?.final_evaluation) {
    figures.push({ id: "federated", text: `federated evaluation (agents' held-out data) of the final version ${current}: ` +
                   `accuracy ${fmt(t.final_evaluation.accuracy)}`, value: t.final_evaluation.accuracy });
  } else if (federated) {
    figures.push({ id: "federated", text: `federated evaluation (agents' held-out data) of version ${federated.eval_of_version ?? "–"}, ` +
                   `round ${federated.round}: accuracy ${fmt(federated.eval_accuracy)}`, value: federated.eval_accuracy });
  }
  if (known(t?.best_accuracy)) {
    figures.push({ id: "best-round", text: `best single round, federated evaluation: ${fmt(t.best_accuracy)} ` +
                   "(noisy: each round asks a sample of agents)", value: t.best_accuracy });
  }
  return figures;
}

function showModelAccuracy() {
  const list = document.getElementById("model-accuracy");
  list.replaceChildren();
  for (const figure of accuracyFigures(training(state.selected), state.metrics[state.selected] || [])) {
    const li = document.createElement("li");
    li.dataset.figure = figure.id;
    li.dataset.value = known(figure.value) ? String(figure.value) : "";
    li.textContent = figure.text;
    list.append(li);
  }
}

const CHART_HEIGHT = 280;
const CHART_SERIES = [
  { key: "eval_accuracy", label: "accuracy, federated eval (agents' held-out data)", scale: "accuracy", stroke: "#1a73e8" },
  { key: "server_accuracy", label: "accuracy, server validation", scale: "accuracy", stroke: "#188038" },
  { key: "eval_loss", label: "loss, federated eval", scale: "loss", stroke: "#d93025", dash: [6, 4] },
  { key: "server_loss", label: "loss, server validation", scale: "loss", stroke: "#e37400", dash: [6, 4] },
];
const chart = { plot: null, signature: "" };

// Rounds on x; each series its values by round (null where it has none), shown only when it has any.
function chartData(rows) {
  const sorted = rows.slice().sort((a, b) => a.round - b.round);
  const series = CHART_SERIES.filter(s => sorted.some(r => known(r[s.key])));
  const data = [sorted.map(r => r.round), ...series.map(s => sorted.map(r => known(r[s.key]) ? r[s.key] : null))];
  return { series, data };
}

// The legend shows the values under the cursor, and the newest round's while the cursor is off the chart.
function legendAtNewest(u) {
  if (u.cursor.idx === null || u.cursor.idx === undefined) {
    if (u.data[0].length) u.setLegend({ idx: u.data[0].length - 1 }, false);
  }
}

const roundTicks = (u, ticks) => ticks.map(t => Number.isInteger(t) ? String(t) : "");

function chartOptions(series, width) {
  return {
    width, height: CHART_HEIGHT,
    scales: {
      x: { time: false, range: (u, min, max) => [known(min) ? min : 0, known(max) ? Math.max(max, (min ?? 0) + 1) : 1] },
      accuracy: { range: [0, 1] },
      loss: { range: (u, min, max) => [0, known(max) && max > 0 ? max * 1.1 : 1] },
    },
    axes: [
      { scale: "x", label: "round", size: 34, labelSize: 20, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000], values: roundTicks },
      { scale: "accuracy", label: "accuracy", values: (u, ticks) => ticks.map(t => t.toFixed(1)) },
      { scale: "loss", label: "loss", side: 1, grid: { show: false } },
    ],
    series: [
      { label: "round", value: (u, v) => known(v) ? String(v) : "–" },
      ...series.map(s => ({ label: s.label, scale: s.scale, stroke: s.stroke, dash: s.dash, width: 2, spanGaps: true,
                            value: (u, v) => known(v) ? v.toFixed(3) : "–" })),
    ],
    cursor: { drag: { x: false, y: false } },
    hooks: { ready: [legendAtNewest], setData: [legendAtNewest], setSize: [legendAtNewest], setCursor: [legendAtNewest] },
  };
}

function drawChart() {
  const box = document.getElementById("chart");
  const rows = state.metrics[state.selected] || [];
  document.getElementById("chart-title").textContent = state.selected ? `training ${state.selected}` : "";
  const { series, data } = chartData(rows);
  const signature = `${state.selected}|${series.map(s => s.key).join(",")}`;
  if (chart.plot && chart.signature === signature) {
    chart.plot.setData(data);
  } else {
    chart.plot?.destroy();
    chart.plot = new uPlot(chartOptions(series, box.clientWidth || 720), data, box);
    chart.signature = signature;
  }
  document.getElementById("chart-empty").hidden = data[0].length > 0;
  // What is drawn, for tests and tools: points per series and the newest round.
  const count = (key) => rows.filter(r => known(r[key])).length;
  box.dataset.trainingId = state.selected || "";
  box.dataset.points = String(count("eval_accuracy"));
  box.dataset.lossPoints = String(count("eval_loss"));
  box.dataset.serverPoints = String(count("server_accuracy"));
  box.dataset.lastRound = String(rows.length ? Math.max(...rows.map(r => r.round)) : 0);
}

new ResizeObserver(() => chart.plot?.setSize({ width: document.getElementById("chart").clientWidth, height: CHART_HEIGHT }))
  .observe(document.getElementById("chart"));

// An agent that said goodbye has no last-seen time (the registry drops it); one that stopped
// sending heartbeats keeps its last one: only that is a failure.
function agentState(agent) {
  if (!agent) return { text: "–", cls: "", title: "" };
  if (agent.alive) return { text: "alive", cls: "ok", title: "heartbeats arriving" };
  if (!known(agent.last_seen)) return { text: "left", cls: "left", title: "left cleanly" };
  return { text: "silent", cls: "failed",
           title: `no heartbeat since ${new Date(agent.last_seen * 1000).toLocaleTimeString()}` };
}

async function refreshAgents() {
  const [agents, board] = await Promise.all([getJSON("/api/agents"), getJSON("/api/agents/leaderboard?top=1000")]);
  const byId = new Map(agents.map(a => [a.agent_id, a]));
  const body = document.querySelector("#agents tbody");
  body.replaceChildren();
  for (const a of board) {
    const row = body.insertRow();
    cell(row, a.rank);
    cell(row, a.agent_id);
    const { text, cls, title } = agentState(byId.get(a.agent_id));
    cell(row, text, cls).title = title;
    cell(row, fmt(a.reliability, 2));
    cell(row, fmt(a.contribution, 3));
    cell(row, a.dropped);
  }
  const counts = agents.map(a => agentState(a).text).reduce((n, k) => ({ ...n, [k]: (n[k] || 0) + 1 }), {});
  document.getElementById("agent-count").textContent =
    `${counts.alive || 0} alive, ${counts.left || 0} left, ${counts.silent || 0} silent of ${agents.length}`;
}

// Rows are kept and updated in place, keyed by training and version: a row (and the button
// a user is about to click) is never rebuilt while rounds commit new versions above it.
let versionsRequest = 0;
async function refreshVersions() {
  if (!state.selected) return;
  const trainingId = state.selected;
  const request = ++versionsRequest;
  const [versions, status] = await Promise.all([getJSON(`/api/training/${trainingId}/versions`),
                                                getJSON(`/api/training/${trainingId}/status`)]);
  if (request !== versionsRequest) return;  // a newer refresh started meanwhile and wins
  const current = status.current_version;
  document.getElementById("versions").dataset.currentVersion = current ?? "";
  const body = document.querySelector("#versions tbody");
  const kept = new Map([...body.rows].map(row => [row.dataset.key, row]));
  const shown = versions.slice().reverse().slice(0, 30);
  let previous = null;
  for (const v of shown) {
    const key = `${trainingId}:${v.version}`;
    const row = kept.get(key) ?? versionRow(trainingId, v, key);
    kept.delete(key);
    row.className = v.version === current ? "current" : "";
    row.querySelector("input").checked = state.compare.includes(v.version);
    const next = previous ? previous.nextSibling : body.firstChild;
    if (row !== next) body.insertBefore(row, next);
    previous = row;
  }
  for (const stale of kept.values()) stale.remove();
}

function versionRow(trainingId, v, key) {
  const row = document.createElement("tr");
  row.dataset.key = key;
  row.dataset.version = v.version;
  row.dataset.parent = v.parent_version ?? "";
  const pick = document.createElement("input");
  pick.type = "checkbox";
  pick.onchange = () => toggleCompare(trainingId, v.version, pick.checked);
  row.insertCell().appendChild(pick);
  cell(row, v.version);
  cell(row, v.round);
  cell(row, v.parent_version ?? "–");
  cell(row, v.contributors.length);
  cell(row, v.privacy.level + (v.privacy.epsilon_spent ? ` ε=${fmt(v.privacy.epsilon_spent, 2)}` : ""));
  const actions = row.insertCell();
  const download = document.createElement("a");
  download.href = "#";
  download.onclick = (event) => { event.preventDefault(); downloadModel(trainingId, v.version).catch((e) => alert(e.message)); };
  download.textContent = "download";
  const rollback = document.createElement("button");
  rollback.textContent = "roll back here";
  rollback.className = "rollback";
  rollback.onclick = () => requestRollback(trainingId, v.version);
  actions.append(download, " ", rollback);
  return row;
}

async function requestRollback(trainingId, version) {
  const out = document.getElementById("version-status");
  try {
    await postJSON(`/api/training/${trainingId}/rollback`, { version });
    out.textContent = `rollback of ${trainingId} to version ${version} requested`;
    out.className = "ok";
  } catch (e) {
    out.textContent = `rollback to version ${version} refused: ${e.message}`;
    out.className = "failed";
  }
  refreshTrainings(); refreshVersions();
}

async function toggleCompare(trainingId, version, on) {
  if (trainingId !== state.selected) return;  // a row of the training shown before
  state.compare = on ? [...state.compare.filter(v => v !== version), version].slice(-2) : state.compare.filter(v => v !== version);
  refreshVersions();
  const out = document.getElementById("comparison");
  if (state.compare.length !== 2) { out.textContent = ""; return; }
  const [a, b] = state.compare.slice().sort((x, y) => x - y);
  const c = await getJSON(`/api/training/${trainingId}/versions/compare?a=${a}&b=${b}`);
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

const UNAUTHORIZED_CLOSE = 4401;

function closeSocket() {
  state.socketGeneration += 1;
  state.socket?.close();
  state.socket = null;
}

function connect() {
  closeSocket();
  if (!apiKey()) { unauthorized(); return; }
  const generation = state.socketGeneration;
  const id = Math.random().toString(36).slice(2);
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/${id}?api_key=${encodeURIComponent(apiKey())}`);
  state.socket = socket;
  const badge = document.getElementById("live");
  socket.onopen = () => { badge.textContent = "live"; badge.className = "badge ok";
    socket.send(JSON.stringify({ action: "subscribe", training_id: "*" })); };
  socket.onclose = (event) => {
    if (generation !== state.socketGeneration) return;
    if (event.code === UNAUTHORIZED_CLOSE) { unauthorized(); return; }
    badge.textContent = "reconnecting"; badge.className = "badge warning"; setTimeout(connect, 2000);
  };
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

// Without a key only the deployment's health is public: ask for the key instead of collecting 401s
// (each one counts as a rejected input on the server).
async function refreshAll() {
  if (!apiKey()) { unauthorized(); await refreshHealth().catch(() => {}); return; }
  await Promise.allSettled([refreshTrainings(), refreshAgents(), refreshAlerts(), refreshHealth(), refreshVersions(),
                            refreshPrivacy()]);
}
refreshAll();
setInterval(refreshAll, 5000);
connect();

document.getElementById("set-key").onclick = () => {
  showKeyForm("set your API key", apiKey() ? "A key is set; a new one replaces it." : "");
  document.getElementById("key-input").focus();
};

document.getElementById("key-form").onsubmit = (event) => {
  event.preventDefault();
  const input = document.getElementById("key-input");
  const key = input.value.trim();
  input.value = "";
  if (key) useKey(key);
};
