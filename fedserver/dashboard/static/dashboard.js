// Flowerbed's dashboard: polls the JSON API every 2 s and draws what it says. Read-only; every
// value goes into the page as text (textContent), never as markup.
"use strict";

const POLL_MS = 2000;
const NODES_SHOWN = 100;
const SVG = "http://www.w3.org/2000/svg";
const W = 480, H = 220, PAD = { left: 44, right: 10, top: 10, bottom: 26 };
let rounds = [];

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 4) => (v === null || v === undefined ? "–" : Number(v).toPrecision(digits));
const ago = (t) => (t ? `${Math.max(0, Math.round(Date.now() / 1000 - t))} s ago` : "–");

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store", credentials: "same-origin" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function showStatus(s) {
  const run = s.run || {};
  $("kind").textContent = s.kind;
  const what = [run.dataset, run.model, run.strategy].filter(Boolean).join(" · ");
  const clients = run.num_clients ? ` · ${run.clients_per_round} of ${run.num_clients} clients a round` : "";
  $("run-line").textContent = (what || "run") + clients + (s.run_id ? ` · run ${s.run_id}` : "");
  const planned = s.rounds || 0;
  $("round").textContent = String(s.rounds_completed);
  $("round-of").textContent = planned ? `of ${planned}` : "";
  $("progress").style.width = planned ? `${Math.min(100, (100 * s.rounds_completed) / planned)}%` : "0";
  $("state").textContent = s.state;
  const last = s.last_metrics || {};
  const evaluated = [...rounds].reverse().find((r) => r.accuracy !== null && r.accuracy !== undefined) || {};
  $("accuracy").textContent = fmt(evaluated.accuracy);
  $("loss").textContent = fmt(evaluated.eval_loss ?? last.train_loss);
  $("round-seconds").textContent = fmt(s.seconds_per_round, 3);
  $("elapsed").textContent = `${fmt(s.elapsed_seconds, 4)} s in all rounds`;
  $("connected").textContent = String(s.connected_nodes);
  $("secagg-tile").hidden = !s.secure_aggregation;
  if (s.secure_aggregation) {
    const a = s.secure_aggregation;
    $("secagg").textContent = "on";
    $("secagg-sub").textContent = `threshold ${a.threshold}, ${a.neighbours} neighbours; last sum ${a.last_round_accepted ?? "–"} clients`;
  }
  $("privacy-tile").hidden = !s.privacy;
  if (s.privacy) {
    const p = s.privacy;
    $("epsilon").textContent = fmt(p.epsilon, 3);
    const target = p.target_epsilon ? ` of ${p.target_epsilon}` : "";
    $("privacy-sub").textContent = `${p.dp}${target}, δ ${p.delta}` + (p.stopped ? ` · stopped: ${p.stopped}` : "");
  }
  $("error").hidden = !s.error;
  $("error").textContent = s.error || "";
}

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  parent.appendChild(node);
  return node;
}

// One chart: each series a path through its measured rounds (a dot where it has one point).
function drawChart(svg, series, yMax, planned) {
  svg.replaceChildren();
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const xMax = Math.max(planned || 1, ...xs, 1);
  const top = yMax ?? Math.max(...series.flatMap((s) => s.points.map((p) => p[1])), 1e-9) * 1.1;
  const x = (r) => PAD.left + ((W - PAD.left - PAD.right) * (r - 1)) / Math.max(1, xMax - 1);
  const y = (v) => H - PAD.bottom - ((H - PAD.top - PAD.bottom) * v) / top;
  el("line", { class: "axis", x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom }, svg);
  el("line", { class: "axis", x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom }, svg);
  el("text", { x: PAD.left - 6, y: PAD.top + 8, "text-anchor": "end" }, svg).textContent = Number(top).toPrecision(2);
  el("text", { x: PAD.left - 6, y: H - PAD.bottom, "text-anchor": "end" }, svg).textContent = "0";
  el("text", { x: PAD.left, y: H - 8 }, svg).textContent = "round 1";
  el("text", { x: W - PAD.right, y: H - 8, "text-anchor": "end" }, svg).textContent = `round ${xMax}`;
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    el("path", { class: `curve ${s.cls}`, d, "data-points": String(s.points.length) }, svg);
    const [r, v] = s.points[s.points.length - 1];
    el("circle", { class: s.cls, cx: x(r).toFixed(1), cy: y(v).toFixed(1), r: 3 }, svg);
  }
}

const points = (key) => rounds.filter((r) => r[key] !== null && r[key] !== undefined).map((r) => [r.round, r[key]]);

function drawCharts(planned) {
  drawChart($("accuracy-chart"), [{ cls: "accuracy", points: points("accuracy") }], 1, planned);
  drawChart($("loss-chart"), [{ cls: "train", points: points("train_loss") }, { cls: "eval", points: points("eval_loss") }], null, planned);
  drawChart($("seconds-chart"), [{ cls: "seconds", points: points("seconds") }], null, planned);
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function showNodes(data) {
  const body = $("nodes").tBodies[0];
  body.replaceChildren();
  for (const n of [...data.nodes].sort((a, b) => a.node_id - b.node_id)) {
    const tr = document.createElement("tr");
    cell(tr, n.name ? `${n.node_id} (${n.name})` : String(n.node_id));
    cell(tr, n.connected ? "yes" : "no");
    cell(tr, ago(n.last_seen));
    cell(tr, String(n.rounds_taken_part));
    cell(tr, String(n.replies));
    cell(tr, String(n.accepted));
    cell(tr, fmt(n.seconds_per_reply, 3));
    cell(tr, n.refused.map((r) => `${r.count}× ${r.reason}`).join("; "), n.refused.length ? "refused" : "");
    body.appendChild(tr);
  }
  const more = data.total > data.nodes.length ? `, the ${data.nodes.length} seen last shown` : "";
  $("nodes-count").textContent = `${data.total} nodes${more}`;
}

async function poll() {
  try {
    const since = rounds.length ? rounds[rounds.length - 1].round : 0;
    const [status, fresh, nodes] = await Promise.all([
      getJSON("/api/status"), getJSON(`/api/rounds?since=${since}`), getJSON(`/api/nodes?limit=${NODES_SHOWN}`),
    ]);
    // the run's rounds started over (a resumed run re-read): take them all again
    rounds = status.rounds_completed < rounds.length ? (await getJSON("/api/rounds")).rounds : rounds.concat(fresh.rounds);
    showStatus(status);
    drawCharts(status.rounds);
    showNodes(nodes);
    $("updated").textContent = new Date().toLocaleTimeString();
  } catch (err) {
    $("error").hidden = false;
    $("error").textContent = `cannot reach the dashboard's API: ${err.message}`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
