"use strict";
// The edgemesh dashboard: every number and action goes through /api (docs/API.md).

const palette = ["#3b6fd8", "#e07b39", "#2f9e77", "#b5487d", "#7a5cc7", "#c2a52b", "#3a97b0", "#8a8f99"];
const base = location.pathname.replace(/dashboard\/?$/, "");  // a proxy may add a prefix
const state = { view: "devices", boxes: [], lost: [], models: [], graphs: [], packages: [],
                events: [], eventSeq: 0, monitor: null, overview: null, plan: null, job: null };
let key = sessionStorage.getItem("edgemesh-key") || "";
let waitingForKey = null;

const $ = id => document.getElementById(id);
function esc(v) { return String(v ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c])); }
function gib(b) { return b == null ? "—" : (b / 2 ** 30).toFixed(b < 2 ** 30 ? 2 : 1) + " GiB"; }
function bytes(b) { return b == null ? "—" : b < 2 ** 20 ? (b / 1024).toFixed(0) + " KiB" : b < 2 ** 30 ? (b / 2 ** 20).toFixed(1) + " MiB" : gib(b); }
function dur(s) {
  if (s == null) return "—";
  s = Math.round(s);
  if (s < 120) return s + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
function num(v, d = 1) { return v == null ? "—" : Number(v).toFixed(d); }
function boxColor(id) {
  const ids = state.boxes.map(b => b.id);
  const i = ids.indexOf(id);
  return palette[(i < 0 ? ids.length : i) % palette.length];
}

// -- the API ---------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || ("HTTP " + status));
    this.status = status; this.code = body && body.error && body.error.code;
  }
}

async function api(path, options = {}) {
  for (;;) {
    const headers = Object.assign({"Content-Type": "application/json"}, options.headers || {});
    if (key) headers.Authorization = "Bearer " + key;
    const res = await fetch(base + path, Object.assign({}, options, {headers}));
    if (res.status === 401) { await askForKey(key ? "That key was refused." : ""); continue; }
    const body = await res.json().catch(() => null);
    if (!res.ok) throw new ApiError(res.status, body);
    return body;
  }
}

function askForKey(message) {
  if (!waitingForKey) {
    waitingForKey = new Promise(resolve => {
      const dlg = $("login");
      $("login-error").textContent = message || "";
      $("login-key").value = "";
      dlg.addEventListener("close", function done() {
        dlg.removeEventListener("close", done);
        key = $("login-key").value.trim();
        sessionStorage.setItem("edgemesh-key", key);
        waitingForKey = null;
        resolve();
      });
      if (!dlg.open) dlg.showModal();
    });
  }
  return waitingForKey;
}

// -- devices ---------------------------------------------------------------

function meter(used, limit) {
  if (used == null || !limit) return "";
  const pct = Math.min(100, 100 * used / limit);
  return `<div class="meter${pct > 90 ? " hot" : ""}"><div style="width:${pct.toFixed(0)}%"></div></div>`;
}

function healthClass(h) { return h === "ok" ? "ok" : (h === "lost" || h === "ray-down") ? "bad" : "warn"; }

function renderBoxes() {
  const rows = state.boxes.map(b => {
    const live = b.live || {};
    const s = b.summary || {};
    const temps = live.temperatures || [];
    const power = live.power || [];
    const hottest = temps.length ? Math.max(...temps.map(t => t.celsius)) : null;
    const watts = power.length ? power.reduce((a, p) => a + p.watts, 0) : null;
    const runs = (b.stages || []).map(st =>
      `${esc(st.model)} [${st.layers ? st.layers.join(", ") : "?"}) ${esc(st.backend || "")}${st.precision ? "/" + esc(st.precision) : ""}`).join("<br>");
    const actions = b.role === "single" || b.gateway ? "" :
      (b.draining ? `<button data-act="undrain" data-box="${esc(b.id)}">Undrain</button>`
                  : `<button data-act="drain" data-box="${esc(b.id)}">Drain</button>`) +
      ` <button class="danger" data-act="remove" data-box="${esc(b.id)}">Remove</button>`;
    return `<tr data-box="${esc(b.id)}" class="box-row">
      <td><span style="color:${boxColor(b.id)}">■</span> <b>${esc(b.id)}</b><div class="muted small">${esc(b.address || "")} · ${esc(s.arch || "")} · ${s.cores_effective ?? "?"} cores${(s.accelerators || []).length ? " · " + esc(s.accelerators.join(", ")) : ""}</div></td>
      <td>${esc(b.role)}${b.gateway ? ' <span class="muted small">(gateway)</span>' : ""}</td>
      <td class="${healthClass(b.health)} health">${esc(b.health)}${b.draining ? " (draining)" : ""}</td>
      <td class="cpu">${live.cpu_percent == null ? "—" : num(live.cpu_percent) + " %"}${meter(live.cpu_percent, 100)}<div class="muted small">${live.load1 == null ? "" : "load " + num(live.load1, 2)}</div></td>
      <td class="memory">${gib(live.memory_used_bytes)} / ${gib(live.memory_limit_bytes ?? s.memory_limit_bytes)}${meter(live.memory_used_bytes, live.memory_limit_bytes)}<div class="muted small">${esc(live.memory_source === "cgroup" ? "cgroup limit" : live.memory_source ? "host memory" : "")}</div></td>
      <td class="temperature" title="${esc(temps.map(t => t.name + ": " + t.celsius + " °C").join("\n"))}">${hottest == null ? '<span class="muted">not exposed</span>' : num(hottest) + " °C"}<div class="muted small">${temps.length ? temps.length + " sensor(s)" : ""}</div></td>
      <td class="power" title="${esc(power.map(p => p.name + ": " + p.watts + " W").join("\n"))}">${watts == null ? '<span class="muted">not exposed</span>' : num(watts, 2) + " W"}<div class="muted small">${power.map(p => esc(p.name)).join(", ")}</div></td>
      <td class="engines">${esc((b.engines || s.backends || []).join(", ") || "—")}</td>
      <td class="small">${runs || '<span class="muted">nothing</span>'}</td>
      <td>${dur(b.uptime_s)}</td>
      <td>${actions}${b.live_error ? `<div class="bad small">${esc(b.live_error)}</div>` : ""}</td></tr>`;
  });
  const lost = state.lost.map(l => `<tr class="lost box-row" data-box="${esc(l.id)}">
      <td><b>${esc(l.id)}</b></td><td>—</td><td class="bad health">lost</td>
      <td colspan="7" class="small">${esc(l.reason)} at ${clock(l.at)}</td>
      <td><button class="danger" data-act="remove" data-box="${esc(l.id)}">Forget</button></td></tr>`);
  $("boxes").innerHTML = rows.concat(lost).join("");
}

async function boxAction(act, box) {
  const verbs = {drain: "Move every stage off", undrain: "Use again", remove: "Remove"};
  if (act === "remove" && !confirm(`${verbs[act]} box ${box}?`)) return;
  try {
    const r = act === "remove" ? await api(`api/boxes/${encodeURIComponent(box)}`, {method: "DELETE"})
                               : await api(`api/boxes/${encodeURIComponent(box)}/${act}`, {method: "POST"});
    trackJob(r.job);
  } catch (e) { showError(e); }
}

async function showJoin() {
  const panel = $("join");
  if (!panel.hidden) { panel.hidden = true; return; }
  try {
    const j = await api("api/join");
    panel.innerHTML = `<h2>Add a box</h2>
      ${j.mesh ? `<p>Mesh <b>${esc(j.mesh)}</b>${j.secret_id ? `, secret id <code>${esc(j.secret_id)}</code>` : ""}. The secret stays on the boxes: copy its file, never paste it anywhere.</p>` : ""}
      <ol>${(j.steps || []).map(s => `<li>${esc(s)}</li>`).join("")}</ol>
      ${j.copy_command ? `<p>1. Copy the secret to the new box:</p><pre id="copy-command">${esc(j.copy_command)}</pre>` : ""}
      <p>${j.copy_command ? "2. " : ""}On the new box run:</p>
      <pre id="join-command">${esc(j.command)}</pre>
      <button id="copy-join">Copy the command</button>`;
    panel.hidden = false;
    $("copy-join").onclick = () => navigator.clipboard && navigator.clipboard.writeText(j.command);
  } catch (e) { showError(e); }
}

// -- models ----------------------------------------------------------------

function shardMap(stages, layers) {
  const total = layers || Math.max(1, ...stages.map(s => (s.layers || [0, 1])[1]));
  return `<div class="shardmap">${stages.map(s => {
    const [a, b] = s.layers || [0, total];
    const label = `${s.box} [${a}, ${b}) ${s.backend || ""}${s.precision ? "/" + s.precision : ""}`;
    return `<div title="${esc(label)}" style="flex:${Math.max(1, b - a)};background:${boxColor(s.box)}">${esc(label)}</div>`;
  }).join("")}</div><div class="muted small">${total} layers, ${stages.length} stage(s)</div>`;
}

function planTable(plan) {
  return `<table class="grid plan-stages"><thead><tr><th>stage</th><th>box</th><th>layers</th><th>backend</th>
    <th>precision</th><th>predicted ms/token</th><th>memory</th></tr></thead><tbody>${plan.stages.map((s, i) =>
    `<tr><td>${i}</td><td>${esc(s.box)}</td><td>[${s.layers[0]}, ${s.layers[1]})</td><td>${esc(s.backend)}</td>
      <td>${esc(s.precision)}</td><td>${num(s.predicted_ms, 2)}</td><td>${bytes(s.memory_bytes)} of ${bytes(s.usable_bytes)}</td></tr>`).join("")}</tbody></table>
    <p>Predicted <b class="predicted">${num(plan.predicted_tokens_per_s, 1)} tokens/s</b> with the pipeline full
    (${num(plan.single_stream_tokens_per_s, 1)} for one stream), bottleneck ${num(plan.bottleneck_ms, 2)} ms.
    ${(plan.left_out || []).length ? "Left out: " + plan.left_out.map(x => esc(x.box + " (" + x.reason + ")")).join(", ") : ""}</p>`;
}

function renderModels() {
  $("models").innerHTML = state.models.length ? state.models.map(m => `
    <div class="model" data-model="${esc(m.name)}">
      <div class="bar"><h2>${esc(m.name)} <span class="muted small">context ${m.context_length}, ${esc(m.backend || "")}${m.precision ? "/" + esc(m.precision) : ""}</span></h2>
        <span><button data-act="replan" data-model="${esc(m.name)}">Re-plan</button>
        <button class="danger" data-act="undeploy" data-model="${esc(m.name)}">Undeploy</button></span></div>
      ${shardMap(m.stages || [], m.layers)}
      <div class="kpis">
        <div class="kpi"><b>${m.load.active}</b><span>running</span></div>
        <div class="kpi"><b>${m.load.waiting}</b><span>waiting</span></div>
        <div class="kpi"><b>${m.stats.tokens}</b><span>tokens served</span></div>
        <div class="kpi"><b>${num(m.stats.mean_step_ms, 1)}</b><span>ms per step</span></div>
        ${m.plan ? `<div class="kpi"><b>${num(m.plan.predicted_tokens_per_s, 1)}</b><span>planned tokens/s</span></div>` : ""}
      </div></div>`).join("") : '<p class="muted" id="no-models">No model is served. Plan and deploy a package below.</p>';
  $("packages").innerHTML = state.packages.map((p, i) => `<tr data-package="${esc(p.path)}">
      <td><b>${esc(p.name)}</b><div class="muted small">${esc(p.path)}</div></td><td>${esc(p.box)}</td><td>${esc(p.kind)}</td>
      <td>${p.num_layers ?? "—"}</td><td>${p.context_length ?? "—"}</td><td>${esc((p.precisions || []).join(", "))}</td>
      <td>${bytes(p.size_bytes)}</td><td>${esc((p.deployed_as || []).join(", "))}</td>
      <td>${p.kind === "llm" ? `<button class="primary" data-act="plan" data-index="${i}">Plan…</button>`
        : (p.deployed_as || []).length ? "" : `<button class="primary" data-act="deploy-graph" data-index="${i}">Deploy</button>`}</td></tr>`).join("")
    || '<tr><td colspan="9" class="muted">No packages found (convert one with edgemesh convert, into ~/.cache/edgemesh/packages or $EDGEMESH_PACKAGES).</td></tr>';
  $("graphs").innerHTML = state.graphs.length ? `<h2>Graph (vision) models over /v2</h2><table class="grid"><thead><tr>
      <th>model</th><th>platform</th><th>inputs</th><th>outputs</th><th>backend</th><th></th></tr></thead><tbody>${state.graphs.map(g =>
      `<tr><td>${esc(g.name)}</td><td>${esc(g.platform || "")}</td><td class="small">${esc((g.inputs || []).map(t => `${t.name} ${t.datatype || ""}[${(t.shape || []).join(",")}]`).join("; "))}</td>
       <td class="small">${esc((g.outputs || []).map(t => t.name).join(", "))}</td><td>${esc(g.backend || "")}${g.precision ? "/" + esc(g.precision) : ""}</td>
       <td><button class="danger" data-act="undeploy" data-model="${esc(g.served_as || g.name)}">Undeploy</button></td></tr>`).join("")}</tbody></table>` : "";
}

async function planPackage(index) {
  const p = state.packages[index];
  const panel = $("plan");
  panel.hidden = false;
  panel.innerHTML = `<p>Planning <b>${esc(p.name)}</b> over the boxes (measuring them the first time)…</p>`;
  try {
    const r = await api("api/plan", {method: "POST", body: JSON.stringify({package: p.path, box: p.box})});
    state.plan = {package: p, plan: r.plan};
    panel.innerHTML = `<h2>Plan for ${esc(p.name)}</h2>${planTable(r.plan)}
      <label>serve as <input id="deploy-name" value="${esc(p.name)}"></label>
      <button class="primary" id="deploy-go">Deploy this plan</button> <button id="plan-cancel">Cancel</button>`;
    $("plan-cancel").onclick = () => { panel.hidden = true; state.plan = null; };
    $("deploy-go").onclick = deployPlan;
  } catch (e) { panel.innerHTML = `<p class="bad">${esc(e.message)}</p>`; }
}

async function deployPlan() {
  const {package: p, plan} = state.plan;
  try {
    const r = await api("api/models", {method: "POST",
      body: JSON.stringify({package: p.path, box: p.box, name: $("deploy-name").value.trim() || p.name, plan})});
    $("plan").hidden = true;
    trackJob(r.job);
  } catch (e) { showError(e); }
}

async function deployGraph(index) {
  // A graph model runs whole on its box: no plan; the box picks the engine and precision.
  const p = state.packages[index];
  try {
    const r = await api("api/models", {method: "POST", body: JSON.stringify({package: p.path, box: p.box})});
    trackJob(r.job);
  } catch (e) { showError(e); }
}

async function modelAction(act, name) {
  try {
    if (act === "undeploy") {
      if (!confirm(`Stop serving ${name}?`)) return;
      trackJob((await api(`api/models/${encodeURIComponent(name)}`, {method: "DELETE"})).job);
      return;
    }
    const panel = $("plan");
    panel.hidden = false;
    panel.innerHTML = `<p>Re-planning <b>${esc(name)}</b> over the boxes alive now…</p>`;
    const r = await api(`api/models/${encodeURIComponent(name)}/replan`, {method: "POST", body: JSON.stringify({apply: false})});
    panel.innerHTML = `<h2>Re-plan ${esc(name)}</h2>
      <h3 class="small">now</h3>${r.current ? planTable(r.current) : '<p class="muted">no recorded plan</p>'}
      <h3 class="small">proposed</h3>${planTable(r.proposed)}
      <p class="small ${r.live ? "muted" : "bad"}" id="replan-effect">${r.live
        ? "Applying moves the stages live: running streams pause, then go on (replayed onto the new stages)."
        : "Applying deploys the model again on this plan: its running streams are cut (clients get an error and must retry)."}</p>
      <button class="primary" id="replan-go">Apply the proposed plan</button> <button id="plan-cancel">Cancel</button>`;
    $("plan-cancel").onclick = () => { panel.hidden = true; };
    $("replan-go").onclick = async () => {
      if (!r.live && !confirm(`Deploy ${name} again on the new plan? Its running streams will be cut.`)) return;
      try {
        const j = await api(`api/models/${encodeURIComponent(name)}/replan`, {method: "POST", body: JSON.stringify({apply: true, plan: r.proposed})});
        panel.hidden = true; trackJob(j.job);
      } catch (e) { showError(e); }
    };
  } catch (e) { showError(e); $("plan").hidden = true; }
}

function trackJob(job) {
  state.job = job;
  renderJob();
  if (job.state === "running") setTimeout(async () => {
    try { trackJob(await api(`api/jobs/${job.id}`)); } catch (e) { showError(e); }
  }, 1000);
  else refresh(true);
}

function renderJob() {
  const j = state.job, el = $("job");
  if (!j) { el.hidden = true; return; }
  el.hidden = false;
  el.className = "job " + j.state;
  el.innerHTML = `<b>${esc(j.kind)} ${esc(j.target)}</b>: <span class="job-state">${esc(j.state)}</span> — ${esc(j.message)}`;
}

// -- monitoring --------------------------------------------------------------

function drawChart(canvas, series, unit) {
  const ctx = canvas.getContext("2d");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.width = canvas.clientWidth * dpr, h = canvas.height = canvas.clientHeight * dpr;
  ctx.clearRect(0, 0, w, h);
  const pts = series.flatMap(s => s.points.filter(p => p[1] != null));
  ctx.fillStyle = "#6b7385"; ctx.font = `${11 * dpr}px system-ui`;
  if (!pts.length) { ctx.fillText("no data in this window yet", 8 * dpr, h / 2); return; }
  const t0 = Math.min(...pts.map(p => p[0])), t1 = Math.max(...pts.map(p => p[0]), t0 + 1);
  const peak = Math.max(...pts.map(p => p[1]));
  const top = (peak > 0 ? peak : 1) * 1.1;
  const left = 52 * dpr, bottom = h - 16 * dpr;
  ctx.strokeStyle = "#e3e6ee"; ctx.lineWidth = dpr;
  for (let i = 0; i <= 2; i++) {
    const y = bottom - (bottom - 4 * dpr) * i / 2;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w, y); ctx.stroke();
    ctx.fillText(i ? Number((top * i / 2).toPrecision(3)).toString() : "0 " + unit, 2 * dpr, y + 3 * dpr);
  }
  ctx.fillText(clock(t0), left, h - 2 * dpr);
  ctx.textAlign = "right"; ctx.fillText(clock(t1), w - 2 * dpr, h - 2 * dpr); ctx.textAlign = "left";
  series.forEach((s, k) => {
    ctx.strokeStyle = s.color || palette[k % palette.length]; ctx.lineWidth = 2 * dpr; ctx.beginPath();
    let started = false;
    const xy = (t, v) => [left + (w - left - 4 * dpr) * (t - t0) / (t1 - t0), bottom - (bottom - 4 * dpr) * v / top];
    for (const [t, v] of s.points) {
      if (v == null) { started = false; continue; }
      const [x, y] = xy(t, v);
      started ? ctx.lineTo(x, y) : ctx.moveTo(x, y); started = true;
    }
    ctx.stroke();
    // A point with no neighbour (one request in its interval) still shows, as a dot.
    ctx.fillStyle = ctx.strokeStyle;
    s.points.forEach(([t, v], i) => {
      const prev = s.points[i - 1], next = s.points[i + 1];
      if (v == null || (prev && prev[1] != null) || (next && next[1] != null)) return;
      const [x, y] = xy(t, v);
      ctx.beginPath(); ctx.arc(x, y, 3 * dpr, 0, 2 * Math.PI); ctx.fill();
    });
    ctx.fillStyle = "#6b7385";
  });
}

function chartSpecs(points) {
  const keyed = (field) => {
    const names = [...new Set(points.flatMap(p => Object.keys(p[field] || {})))];
    return names.map((n, i) => ({label: n, color: palette[i % palette.length],
      points: points.map(p => [p.t, (p[field] || {})[n] ?? null])}));
  };
  const pct = (field) => ["p50", "p95", "p99"].map((q, i) => ({label: q, color: palette[i],
    points: points.map(p => [p.t, (p[field] || {})[q]])}));
  return [
    {title: "tokens/s", unit: "tok/s", series: [{label: "generated", points: points.map(p => [p.t, p.tokens_per_s])}]},
    {title: "time to first token", unit: "ms", series: pct("ttft_ms")},
    {title: "inter-token latency", unit: "ms", series: pct("itl_ms")},
    {title: "queue and running sequences", unit: "", series: [
      {label: "waiting", points: points.map(p => [p.t, p.queue])},
      {label: "running", color: palette[1], points: points.map(p => [p.t, p.active])}]},
    {title: "time per stage", unit: "ms", series: keyed("stage_ms").map(s => Object.assign(s, {label: "stage " + s.label}))},
    {title: "time per hop", unit: "ms", series: keyed("hop_ms").map(s => Object.assign(s, {label: "hop " + s.label}))},
  ];
}

function renderMonitoring() {
  const m = state.monitor;
  if (!m) return;
  const names = Object.keys(m.models);
  if (!names.length) { $("charts").innerHTML = '<p class="muted">No model is served yet.</p>'; return; }
  $("charts").innerHTML = names.map((name, mi) => {
    const pts = m.models[name];
    const last = pts[pts.length - 1] || {};
    const src = last.source === "engine" ? " (engine counters: latency percentiles need the metrics registry)" : "";
    return `<h2>${esc(name)} <span class="muted small">sampled every ${m.interval_s} s from /metrics${esc(src)}</span></h2>
      <div class="charts">${chartSpecs(pts).map((c, ci) => `<div class="chart"><h3>${esc(c.title)}</h3>
        <canvas id="chart-${mi}-${ci}"></canvas><div class="legend">${c.series.map((s, k) =>
          `<i style="background:${s.color || palette[k % palette.length]}"></i>${esc(s.label)}`).join("") || "none"}</div></div>`).join("")}</div>`;
  }).join("");
  names.forEach((name, mi) => chartSpecs(m.models[name]).forEach((c, ci) => drawChart($(`chart-${mi}-${ci}`), c.series, c.unit)));
}

// -- events ------------------------------------------------------------------

function renderEvents() {
  // Newest first by time: the agent's membership events arrive after the fact.
  $("events").innerHTML = state.events.slice().sort((a, b) => b.at - a.at || b.seq - a.seq).map(e => `<tr class="event ${esc(e.level)}" data-kind="${esc(e.kind)}">
    <td>${clock(e.at)}</td><td class="${e.level === "info" ? "" : e.level === "warning" ? "warn" : "bad"}">${esc(e.kind)}</td>
    <td>${esc(e.box || "")}</td><td>${esc(e.model || "")}</td><td>${esc(e.message)}</td></tr>`).join("");
}

// -- the loop ------------------------------------------------------------------

function showError(e) { $("error").textContent = e ? (e.message || String(e)) : ""; }

function render() {
  const o = state.overview;
  if (o) {
    $("meta").textContent = `v${o.version} · ${o.mode === "mesh" ? "mesh " + (o.mesh || "") + ", head " + (o.head || "?") : "one box"} · ` +
      `${state.boxes.length} box(es)${state.lost.length ? ", " + state.lost.length + " lost" : ""} · ${state.models.length} model(s) · up ${dur(o.uptime_s)}`;
  }
  if (state.view === "devices") renderBoxes();
  if (state.view === "models") renderModels();
  if (state.view === "monitoring") renderMonitoring();
  if (state.view === "events") renderEvents();
}

const slow = {packages: 0};  // when the packages were last asked for (they ask every box)
const inFlight = new Set();

function apply(n, v) {
  if (n === "overview") state.overview = v;
  if (n === "boxes") { state.boxes = v.boxes; state.lost = v.lost || []; }
  if (n === "models") { state.models = v.models; state.graphs = v.graph_models || []; }
  if (n === "packages") state.packages = v.packages;
  if (n === "v2" && !state.graphs.length) state.graphs = Array.isArray(v) ? v : (v.models || []);
  if (n === "monitor") state.monitor = v;
  if (n === "events") {  // polls overlap: keep each event once
    state.events = state.events.concat(v.events.filter(e => e.seq > state.eventSeq)).slice(-1000);
    state.eventSeq = Math.max(state.eventSeq, v.next);
  }
}

async function refresh(force = false) {
  const view = state.view;
  const window_s = $("window").value;
  const wants = {overview: "api/overview", boxes: "api/boxes", models: "api/models",
                 events: `api/events?since=${state.eventSeq}`};
  if (view === "models" && (force || Date.now() - slow.packages > 10000)) {
    wants.packages = "api/packages";
    wants.v2 = "v2/models";
  }
  if (view === "monitoring") wants.monitor = `api/monitor?window_s=${window_s}`;
  // Each answer is shown as it comes: a slow one (a box that is slow to list
  // its packages) must not hold back the others.
  const calls = Object.keys(wants).filter(n => !inFlight.has(n)).map(async n => {
    inFlight.add(n);
    if (n === "packages") slow.packages = Date.now();
    try {
      apply(n, await api(wants[n]));
      render();
      return null;
    } catch (e) {
      return n === "v2" ? null : e;  // no graph gateway here: nothing to list
    } finally {
      inFlight.delete(n);
    }
  });
  const failed = (await Promise.all(calls)).find(e => e);
  if (failed) showError(failed); else if (!state.job || state.job.state !== "failed") showError(null);
  render();
}

async function loop() {
  try { await refresh(); } catch (e) { showError("gateway unreachable: " + e); }
  setTimeout(loop, 2000);
}

document.addEventListener("click", ev => {
  const t = ev.target.closest("button");
  if (!t) return;
  if (t.dataset.view) {
    state.view = t.dataset.view;
    document.querySelectorAll("#tabs button").forEach(b => b.classList.toggle("active", b === t));
    document.querySelectorAll(".view").forEach(v => { v.hidden = v.id !== "view-" + state.view; });
    render();
    refresh(true);
    return;
  }
  const act = t.dataset.act;
  if (act === "drain" || act === "undrain" || act === "remove") boxAction(act, t.dataset.box);
  if (act === "plan") planPackage(Number(t.dataset.index));
  if (act === "deploy-graph") deployGraph(Number(t.dataset.index));
  if (act === "undeploy" || act === "replan") modelAction(act, t.dataset.model);
  if (t.id === "add-box") showJoin();
});
$("window").addEventListener("change", refresh);
loop();
