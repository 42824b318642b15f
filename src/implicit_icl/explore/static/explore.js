// implicit-icl explore: plain JS and SVG, no network beyond this server. State lives in the URL
// (?tab=&context=&query=&target=&metric=&prefix=&layer=, and task=&demonstrations=&calibration=&queries= for compile),
// so a link reproduces a view; opening /?context=…&query=… runs that prompt at once.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const state = { tab: "dynamics", metric: "norm", prefix: null, layer: null, dynamics: null, patch: null, compile: null };

// --- small helpers ------------------------------------------------------------------------------------------

function el(tag, attributes = {}, text = null, parent = null) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

const shown = (text) => text.replace(/ /g, "␣").replace(/\n/g, "⏎");
const percent = (p) => (p === null ? "—" : `${(100 * p).toFixed(2)}%`);
const number = (x) => (x === null || x === undefined ? "—" : Number(x).toExponential(2));

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// --- the server: one computation at a time, a visible busy state ----------------------------------------

async function post(endpoint, body) {
  showError(null);
  setBusy(true, endpoint);
  const poll = setInterval(pollStatus, 300);
  try {
    const response = await fetch(`/api/${endpoint}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    const result = await response.json();
    if (!response.ok) throw new Error(result.error || `HTTP ${response.status}`);
    return result;
  } finally {
    clearInterval(poll);
    setBusy(false);
  }
}

function setBusy(busy, what = "") {
  const badge = $("busy");
  badge.className = busy ? "busy" : "idle";
  badge.dataset.busy = String(busy);
  badge.textContent = busy ? `busy: ${what}…` : "idle";
  for (const button of document.querySelectorAll("button[type=submit]")) button.disabled = busy;
}

async function pollStatus() {
  try {
    const status = await (await fetch("/api/status")).json();
    if (status.busy) {
      const seconds = status.seconds === null ? "" : ` (${status.seconds.toFixed(1)} s)`;
      $("busy").textContent = `busy: ${status.endpoint}, step ${status.step}: ${status.stage}${seconds}`;
    }
  } catch (error) {
    /* the next poll tries again */
  }
}

// --- the URL ------------------------------------------------------------------------------------------------

const FIELDS = ["context", "query", "target", "demonstrations", "calibration", "queries"];

function readUrl() {
  const params = new URLSearchParams(location.search);
  for (const field of FIELDS) if (params.has(field)) $(field).value = params.get(field);
  state.tab = params.get("tab") || "dynamics";
  state.metric = params.get("metric") || "norm";
  state.prefix = params.has("prefix") ? Number(params.get("prefix")) : null;
  state.layer = params.has("layer") ? Number(params.get("layer")) : null;
  return params;
}

function writeUrl() {
  const params = new URLSearchParams();
  params.set("tab", state.tab);
  const fields = state.tab === "compile" ? ["demonstrations", "calibration", "queries"] : ["context", "query", "target"];
  for (const field of fields) if ($(field).value) params.set(field, $(field).value);
  if (state.tab === "compile" && $("task").value) params.set("task", $("task").value);
  if (state.tab === "dynamics") {
    params.set("metric", state.metric);
    if (state.prefix !== null) params.set("prefix", state.prefix);
    if (state.layer !== null) params.set("layer", state.layer);
  }
  history.replaceState(null, "", `?${params}`);
}

function showTab(tab) {
  state.tab = tab;
  for (const button of document.querySelectorAll("#tabs button")) button.classList.toggle("active", button.dataset.tab === tab);
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== `tab-${tab}`;
  $("prompt-form").hidden = tab === "compile";
  $("tokens").hidden = tab === "compile";
  $("target-label").hidden = tab === "patch";
  $("run").textContent = tab === "patch" ? "Compute the patch" : "Run";
}

// --- dynamics: tokens, heat map, top-k panel, per-layer chart -----------------------------------------------

async function runPrompt() {
  const body = { context: $("context").value, query: $("query").value };
  if (state.tab === "patch") {
    state.patch = await post("patch", body);
    renderPatch();
  } else {
    if ($("target").value) body.target = $("target").value;
    state.dynamics = await post("dynamics", body);
    const count = state.dynamics.prefix_lengths.length;
    if (state.prefix === null || state.prefix >= count) state.prefix = count - 1;
    if (state.layer === null || state.layer >= state.dynamics.n_layers) state.layer = 0;
    renderDynamics();
  }
  writeUrl();
}

function metricValues(result, metric) {
  // [L][P]: the value of each cell; increments fill prefix j with the step j−1 → j (prefix 0: none).
  const layers = result.layers;
  if (metric === "increment") return layers.increment_norms.map((row) => [null, ...row]);
  if (metric === "alignment") return layers.alignment;
  return layers.update_norms;
}

function colour(t) {
  // a viridis-like ramp, t in [0, 1]
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
  return `rgb(${c.join(",")})`;
}

function scaler(values, metric, prefixLengths) {
  // [0, 1] from a cell's value: alignment linearly from −1 to 1, norms on a log scale over the cells with context
  if (metric === "alignment") {
    $("legend").textContent = "colour: alignment from −1 (dark) to 1 (yellow); grey: no context";
    return (v) => (v + 1) / 2;
  }
  const logs = values
    .flatMap((row) => row.filter((v, j) => prefixLengths[j] > 0 && v !== null && v > 0))
    .map(Math.log10);
  const low = logs.length ? Math.min(...logs) : 0;
  const high = logs.length ? Math.max(...logs) : 0;
  $("legend").textContent = `colour: log scale from ${number(10 ** low)} (dark) to ${number(10 ** high)} (yellow); grey: no context`;
  return (v) => (high > low ? (Math.log10(v) - low) / (high - low) : 1);
}

function renderDynamics() {
  const result = state.dynamics;
  $("dynamics-view").hidden = false;
  $("exactness").textContent = `patched vs with-context: max |Δlogit| ${number(result.max_abs_logit_diff)} over ${result.prefix_lengths.length} prefixes (${result.method}, ${result.seconds.toFixed(2)} s)`;
  for (const input of document.querySelectorAll("input[name=metric]")) input.checked = input.value === state.metric;
  renderHeatmap();
  renderSelection();
}

function renderHeatmap() {
  const result = state.dynamics;
  const svg = $("heatmap");
  svg.replaceChildren();
  const values = metricValues(result, state.metric);
  const scale = scaler(values, state.metric, result.prefix_lengths);
  const layers = result.n_layers;
  const prefixes = result.prefix_lengths.length;
  const width = Math.max(6, Math.min(26, Math.floor(900 / prefixes)));
  const height = 12;
  const left = 34;
  const top = 14;
  svg.setAttribute("width", left + prefixes * width + 10);
  svg.setAttribute("height", top + layers * height + 24);
  el("svg:text", { x: 0, y: 10 }, "layer", svg);
  for (let layer = 0; layer < layers; layer++) {
    if (layer % 5 === 0) el("svg:text", { x: 4, y: top + layer * height + 10 }, String(layer), svg);
    for (let j = 0; j < prefixes; j++) {
      const value = values[layer][j];
      // Without context (prefix 0) the patch is zero up to rounding: no colour on the scale of the others.
      const blank = value === null || !Number.isFinite(value) || result.prefix_lengths[j] === 0;
      const fill = blank ? "#ddd" : colour(scale(value));
      const cell = el(
        "svg:rect",
        { class: "cell", x: left + j * width, y: top + layer * height, width: width - 1, height: height - 1, fill, "data-layer": layer, "data-prefix": j },
        null,
        svg
      );
      el("svg:title", {}, `layer ${layer}, prefix ${result.prefix_lengths[j]} tokens: ${state.metric} ${number(value)}`, cell);
    }
  }
  const axis = top + layers * height + 12;
  for (let j = 0; j < prefixes; j += Math.max(1, Math.ceil(prefixes / 12))) {
    el("svg:text", { x: left + j * width, y: axis }, String(result.prefix_lengths[j]), svg);
  }
  el("svg:text", { x: left, y: axis + 11 }, "prefix length (context tokens)", svg);
}

function renderTopk(list, items, answer) {
  list.replaceChildren();
  for (const item of items) {
    const li = el("li", { "data-token": item.token, "data-probability": item.probability }, null, list);
    if (item.token === answer) li.classList.add("answer");
    el("span", { class: "t" }, shown(item.text), li);
    el("span", { class: "p" }, percent(item.probability), li);
  }
}

function renderTokens(result, prefixLength) {
  const box = $("tokens");
  box.replaceChildren();
  result.context_tokens.forEach((token, i) => {
    const span = el("span", { class: "token", "data-index": i, title: `#${token.token}` }, shown(token.text), box);
    if (prefixLength !== null && i >= prefixLength) span.classList.add("outside");
  });
  for (const token of result.query_tokens) el("span", { class: "token query", title: `#${token.token}` }, shown(token.text), box);
}

function renderSelection() {
  const result = state.dynamics;
  const j = state.prefix;
  const length = result.prefix_lengths[j];
  for (const cell of document.querySelectorAll("#heatmap rect.cell.selected")) cell.classList.remove("selected");
  const cell = document.querySelector(`#heatmap rect[data-layer="${state.layer}"][data-prefix="${j}"]`);
  if (cell) cell.classList.add("selected");
  renderTokens(result, length);
  const detail = $("detail");
  detail.dataset.prefix = j;
  detail.dataset.prefixLength = length;
  $("detail-title").textContent = `prefix ${length} of ${result.context_tokens.length} context tokens (layer ${state.layer}: ‖ΔW‖ ${number(result.layers.update_norms[state.layer][j])})`;
  const answer = result.answer;
  $("answer-text").textContent = shown(answer.text) + (answer.given ? "" : " (the model's top-1 with the whole context)");
  $("answer-probability").textContent = percent(answer.probability[j]);
  $("answer-probability").dataset.probability = answer.probability[j];
  $("answer-rank").textContent = answer.rank[j];
  renderTopk($("topk-patched"), result.top_k.patched[j], answer.token);
  renderTopk($("topk-context"), result.top_k.context[j], answer.token);
  renderTopk($("topk-alone"), result.top_k.query_alone, answer.token);
  const norms = result.layers.update_norms;
  lineChart($("layer-chart"), [norms.map((row) => row[j]), norms.map((row) => row[row.length - 1])], state.layer);
}

function lineChart(svg, series, marked) {
  // series: arrays over layers (the first solid, the others dashed); log-scaled y
  svg.replaceChildren();
  const width = 640, height = 180, left = 44, bottom = 22, top = 8;
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const finite = series.flat().filter((v) => v !== null && v > 0);
  if (!finite.length) return;
  const low = Math.log10(Math.min(...finite)), high = Math.log10(Math.max(...finite));
  const n = series[0].length;
  const x = (i) => left + (i * (width - left - 10)) / Math.max(1, n - 1);
  const y = (v) => top + (height - top - bottom) * (1 - (high > low ? (Math.log10(v) - low) / (high - low) : 0.5));
  el("svg:text", { x: 0, y: top + 8 }, number(10 ** high), svg);
  el("svg:text", { x: 0, y: height - bottom }, number(10 ** low), svg);
  for (let i = 0; i < n; i += 5) el("svg:text", { x: x(i) - 3, y: height - 6 }, String(i), svg);
  series.forEach((values, s) => {
    const points = values.map((v, i) => (v !== null && v > 0 ? `${x(i)},${y(v)}` : null)).filter(Boolean);
    el("svg:polyline", { points: points.join(" "), fill: "none", stroke: s ? "#999" : "#2a5db0", "stroke-width": s ? 1 : 2, "stroke-dasharray": s ? "4 3" : "" }, null, svg);
    if (s === 0) {
      values.forEach((v, i) => {
        if (v === null || !(v > 0)) return;
        const dot = el("svg:circle", { cx: x(i), cy: y(v), r: i === marked ? 4 : 2.5, fill: i === marked ? "#d00" : "#2a5db0", "data-layer": i, "data-value": v }, null, svg);
        el("svg:title", {}, `layer ${i}: ${number(v)}`, dot);
      });
    }
  });
}

// --- the whole context's patch ------------------------------------------------------------------------------

function renderPatch() {
  const result = state.patch;
  $("patch-view").hidden = false;
  const v = result.verification;
  $("patch-summary").textContent = `${result.model}, output side ${result.output_side}: patched query alone vs with the context max |Δlogit| ${number(v.max_abs_logit_diff)} (unpatched query alone: ${number(v.baseline_max_abs_logit_diff)}); same top-1: ${v.top1_match}; ${result.seconds.toFixed(2)} s`;
  renderTokens(result, null);
  const answer = result.top_k.context[0].token;
  renderTopk($("patch-topk-context"), result.top_k.context, answer);
  renderTopk($("patch-topk-alone"), result.top_k.query_alone, answer);
  renderTopk($("patch-topk-patched"), result.top_k.patched, answer);
  barChart($("patch-chart"), result.layers.map((row) => row.norm), result.layers.map((row) => row.parameters.map((p) => `${p.name}: ${number(p.norm)}`).join("\n")));
}

function barChart(svg, values, titles) {
  svg.replaceChildren();
  const width = 640, height = 180, left = 44, bottom = 22, top = 8;
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const high = Math.max(...values);
  const band = (width - left - 10) / values.length;
  el("svg:text", { x: 0, y: top + 8 }, number(high), svg);
  values.forEach((v, i) => {
    const h = high > 0 ? ((height - top - bottom) * v) / high : 0;
    const bar = el("svg:rect", { x: left + i * band, y: height - bottom - h, width: Math.max(1, band - 2), height: h, fill: "#2a5db0", "data-layer": i, "data-value": v }, null, svg);
    el("svg:title", {}, `layer ${i}: ${number(v)}\n${titles[i]}`, bar);
    if (i % 5 === 0) el("svg:text", { x: left + i * band, y: height - 6 }, String(i), svg);
  });
}

// --- compile ------------------------------------------------------------------------------------------------

const asQueries = (text) =>
  text.split("\n").map((line) => line.trim()).filter(Boolean).map((line) => (/A:$/.test(line) ? line : `${line}\nA:`));

async function runCompile() {
  const body = {};
  const queries = asQueries($("queries").value);
  if (queries.length) body.queries = queries;
  if ($("task").value) body.task = $("task").value;
  else {
    // every demonstration ends with a blank line, the last one too, so that the queries start a new line
    body.demonstrations = $("demonstrations").value.replace(/\s*$/, "\n\n");
    body.calibration = asQueries($("calibration").value);
  }
  state.compile = await post("compile", body);
  renderCompile();
  writeUrl();
}

function topOne(items, against) {
  const top = items[0];
  const td = el("td", { "data-token": top.token, "data-probability": top.probability }, `${shown(top.text)} ${percent(top.probability)}`);
  if (against !== undefined) td.classList.add(top.token === against ? "agree" : "disagree");
  return td;
}

function renderCompile() {
  const result = state.compile;
  $("compile-view").hidden = false;
  $("compile-summary").textContent = `${result.task || "pasted demonstrations"}: ${result.context_tokens} context tokens compiled on ${result.calibration_queries} calibration queries (ridge ${result.settings.ridge}); compiled top-1 = ICL top-1 on ${Math.round(result.top1_agreement * result.queries.length)}/${result.queries.length} queries`;
  const body = document.querySelector("#compile-results tbody");
  body.replaceChildren();
  for (const row of result.queries) {
    const tr = el("tr", {}, null, body);
    el("td", {}, shown(row.query || row.query_tokens.map((t) => t.text).join("")), tr);
    el("td", {}, row.answer === null ? "—" : row.answer, tr);
    const icl = row.icl[0].token;
    tr.appendChild(topOne(row.compiled, icl));
    tr.appendChild(topOne(row.icl));
    tr.appendChild(topOne(row.zero_shot, icl));
  }
}

// --- wiring -------------------------------------------------------------------------------------------------

function guarded(action) {
  return (event) => {
    if (event) event.preventDefault();
    action().catch((error) => showError(error.message));
  };
}

async function start() {
  const params = readUrl();
  showTab(state.tab);
  const info = await (await fetch("/api/info")).json();
  $("model").textContent = `${info.model} (${info.family}, ${info.n_layers} layers)`;
  for (const name of info.tasks) el("option", { value: name }, name, $("task"));
  if (params.has("task")) $("task").value = params.get("task");
  $("prompt-form").addEventListener("submit", guarded(runPrompt));
  $("compile-form").addEventListener("submit", guarded(runCompile));
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => {
      showTab(button.dataset.tab);
      writeUrl();
    });
  }
  for (const input of document.querySelectorAll("input[name=metric]")) {
    input.addEventListener("change", () => {
      state.metric = input.value;
      if (state.dynamics) renderDynamics();
      writeUrl();
    });
  }
  $("heatmap").addEventListener("click", (event) => {
    const cell = event.target.closest("rect.cell");
    if (!cell) return;
    state.layer = Number(cell.dataset.layer);
    state.prefix = Number(cell.dataset.prefix);
    renderSelection();
    writeUrl();
  });
  if (state.tab === "compile" && (params.has("task") || params.has("demonstrations"))) guarded(runCompile)();
  else if (state.tab !== "compile" && $("context").value && $("query").value) guarded(runPrompt)();
}

start().catch((error) => showError(error.message));
