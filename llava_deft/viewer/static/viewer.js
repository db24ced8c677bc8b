// llava-deft compression viewer: plain JavaScript, no external libraries.
// GET /api/config draws the controls; POST /api/run returns the tokens and, per decoder layer, each
// token's fate (kept / merged with a group / dropped / evicted), which this page draws.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { config: null, initial: {}, values: {}, image: null, result: null, layer: null, seq: 0, shown: 0, timer: null };

function groupColour(group, alpha) {
  const hue = (group * 137.508) % 360; // golden angle: neighbouring groups get distant hues
  return alpha === undefined ? `hsl(${hue.toFixed(0)}, 70%, 78%)` : `hsla(${hue.toFixed(0)}, 75%, 55%, ${alpha})`;
}

function showError(message, field) {
  const box = $("error");
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  if (!message) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.textContent = message;
  if (field) {
    const m = /^stages\.([^.]+)\.([^.]+)/.exec(field);
    const el = m ? $(`opt-${m[1]}-${m[2]}`) : $(field);
    if (el) el.classList.add("invalid");
  }
}

// ---------------------------------------------------------------- controls
function optionRow(stage, opt) {
  const row = document.createElement("div");
  row.className = "opt" + (opt.editable ? "" : " fixed");
  const label = document.createElement("label");
  label.textContent = opt.name;
  label.title = `allowed: ${Array.isArray(opt.allowed) ? opt.allowed.join(", ") : opt.allowed}` + (opt.why ? ` (${opt.why})` : "");
  const id = `opt-${stage.id}-${opt.name}`;
  label.htmlFor = id;
  row.appendChild(label);
  const set = (v) => { state.values[stage.id][opt.name] = v; changed(); };
  if (!opt.editable) {
    const span = document.createElement("span");
    span.id = id;
    span.textContent = JSON.stringify(opt.value);
    span.title = opt.why || "";
    row.appendChild(span);
    row.appendChild(document.createElement("span"));
    return row;
  }
  if (opt.type === "choice" || opt.type === "bool") {
    let input;
    if (opt.type === "choice") {
      input = document.createElement("select");
      for (const c of opt.choices) {
        const o = document.createElement("option");
        o.value = c; o.textContent = c; input.appendChild(o);
      }
      input.value = opt.value;
      input.addEventListener("change", () => set(input.value));
    } else {
      input = document.createElement("input");
      input.type = "checkbox"; input.checked = !!opt.value;
      input.addEventListener("change", () => set(input.checked));
    }
    input.id = id;
    row.appendChild(input);
    row.appendChild(document.createElement("span"));
    return row;
  }
  const isInt = opt.type === "int";
  const step = isInt ? 1 : ((opt.min !== null && opt.max !== null) ? (opt.max - opt.min) / 100 : 0.01);
  let lo = opt.min === null ? 0 : opt.min + (opt.min_exclusive ? step : 0);
  let hi = opt.max === null ? Math.max(64, 4 * Math.abs(opt.value || 1)) : opt.max - (opt.max_exclusive ? step : 0);
  const range = document.createElement("input");
  range.type = "range"; range.id = id + "-range";
  range.min = lo; range.max = hi; range.step = step; range.value = opt.value;
  const num = document.createElement("input");
  num.type = "number"; num.id = id; num.step = step; num.value = opt.value;
  if (opt.min !== null) num.min = lo;
  if (opt.max !== null) num.max = hi;
  const parse = (s) => (isInt ? parseInt(s, 10) : parseFloat(s));
  range.addEventListener("input", () => { num.value = range.value; });
  range.addEventListener("change", () => { num.value = range.value; set(parse(range.value)); });
  num.addEventListener("change", () => {
    const v = parse(num.value);
    if (Number.isNaN(v)) { showError(`stages.${stage.id}.${opt.name}: give a number (${opt.allowed})`, `stages.${stage.id}.${opt.name}`); return; }
    if (v > Number(range.max)) range.max = v;
    range.value = v;
    set(v);
  });
  row.appendChild(range);
  row.appendChild(num);
  return row;
}

function drawControls(config) {
  const box = $("controls");
  box.textContent = "";
  if (!config.stages.length) {
    box.textContent = "This model has no LLM stages (start the viewer with --pipeline FILE.yaml to add some).";
  }
  for (const stage of config.stages) {
    state.values[stage.id] = {};
    state.initial[stage.id] = {};
    const fs = document.createElement("fieldset");
    const lg = document.createElement("legend");
    lg.textContent = `${stage.id}: ${stage.name} (${stage.kind === "cache" ? "KV-cache policy" : "layer stage"})`;
    fs.appendChild(lg);
    for (const opt of stage.options) {
      state.values[stage.id][opt.name] = opt.value;
      state.initial[stage.id][opt.name] = opt.value;
      fs.appendChild(optionRow(stage, opt));
    }
    box.appendChild(fs);
  }
  const sel = $("layer");
  sel.textContent = "";
  for (let i = 0; i < config.layers; i++) {
    const o = document.createElement("option");
    o.value = i; o.textContent = `layer ${i}`; sel.appendChild(o);
  }
  state.layer = config.layers - 1;
  sel.value = state.layer;
}

function changed() {
  if (!$("auto").checked) return;
  clearTimeout(state.timer);
  state.timer = setTimeout(run, 150);
}

// ---------------------------------------------------------------- run
function requestBody() {
  const stages = {};
  for (const [sid, opts] of Object.entries(state.values)) {
    for (const [name, v] of Object.entries(opts)) {
      if (v !== state.initial[sid][name]) (stages[sid] = stages[sid] || {})[name] = v;
    }
  }
  return { text: $("text").value, image: state.image, stages };
}

async function run() {
  const seq = ++state.seq;
  $("status").textContent = "running…";
  let reply, data;
  try {
    reply = await fetch("/api/run", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()) });
    data = await reply.json();
  } catch (err) {
    if (seq === state.seq) { showError(`request failed: ${err}`); $("status").textContent = "failed"; }
    return;
  }
  if (seq !== state.seq) return; // a newer request is on its way
  if (!reply.ok) {
    showError(data.error || `HTTP ${reply.status}`, data.field);
    $("status").textContent = `HTTP ${reply.status}`;
    return;
  }
  showError(null);
  state.result = data;
  state.shown += 1;
  render();
  const status = $("status");
  status.dataset.run = String(state.shown);
  status.textContent = `run ${state.shown} · ${data.prompt_tokens} prompt tokens · ${data.elapsed_ms} ms on the server · next token: ` +
    `${JSON.stringify(data.next_token.with_stages)} (without LLM stages: ${JSON.stringify(data.next_token.without_stages)})`;
}

// ---------------------------------------------------------------- drawing
function fmtBytes(b) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return `${b.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function tokenDetail(i) {
  const r = state.result, t = r.tokens[i], L = r.layers[state.layer];
  const fate = L.fate[i];
  let s = `#${i} ${JSON.stringify(t.text)} (${t.kind}, position ${t.position})` + ` · layer ${state.layer}: ${fate}`;
  if (fate === "merged") {
    const mates = L.group.map((g, j) => (g === L.group[i] ? j : null)).filter((j) => j !== null);
    s += ` into one token with #${mates.join(", #")} (group ${L.group[i]})`;
  }
  if (L.by[i]) s += ` by ${L.by[i]}`;
  if (L.heads[i] !== null && L.heads[i] !== undefined) s += ` · KV cache: held by ${(100 * L.heads[i]).toFixed(0)} % of the layer's KV heads`;
  return s;
}

function renderTokens() {
  const r = state.result, L = r.layers[state.layer];
  const box = $("tokens");
  box.textContent = "";
  r.tokens.forEach((t, i) => {
    const span = document.createElement("span");
    const fate = L.fate[i];
    span.className = `tok fate-${fate}` + (t.kind === "text" ? "" : " media");
    span.dataset.i = i;
    span.dataset.fate = fate;
    if (fate === "merged") { span.style.background = groupColour(L.group[i]); span.dataset.group = L.group[i]; }
    span.textContent = t.kind === "text" ? t.text : t.text.replace(/^<\w+ /, "").replace(/>$/, "");
    span.title = tokenDetail(i);
    box.appendChild(span);
  });
}

function renderRatio() {
  const r = state.result, L = r.layers[state.layer], c = L.counts;
  let s = `layer ${L.layer}: ${L.tokens}/${r.prompt_tokens} tokens (ratio ${L.ratio.toFixed(3)})`;
  if (L.cache_tokens !== null) s += ` · KV cache ${L.cache_tokens.toFixed(1)} slots (${L.cache_ratio.toFixed(3)})`;
  s += ` · kept ${c.kept}, merged ${c.merged} in ${L.groups} groups, dropped ${c.dropped}, evicted ${c.evicted}`;
  $("ratio-text").textContent = s;
}

function renderChart() {
  const r = state.result, svg = $("chart"), ns = "http://www.w3.org/2000/svg";
  svg.textContent = "";
  const W = Number(svg.getAttribute("width")), H = Number(svg.getAttribute("height"));
  const left = 30, bottom = 20, top = 14, plotH = H - bottom - top, n = r.layers.length;
  const slot = (W - left - 5) / n, bw = Math.min(26, slot / 3);
  const el = (name, attrs, text) => {
    const e = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  };
  for (const y of [0, 0.5, 1]) {
    const yy = top + plotH * (1 - y);
    el("line", { x1: left, x2: W - 5, y1: yy, y2: yy, stroke: "#ddd" });
    el("text", { x: 2, y: yy + 3 }, y.toFixed(1));
  }
  r.layers.forEach((L, i) => {
    const x = left + i * slot;
    if (i === state.layer) el("rect", { x: x + 1, y: top, width: slot - 2, height: plotH, class: "selected" });
    const h1 = plotH * L.ratio;
    el("rect", { x: x + slot / 2 - bw, y: top + plotH - h1, width: bw, height: h1, class: "bar-tokens" });
    el("text", { x: x + slot / 2 - bw, y: top + plotH - h1 - 2 }, L.ratio.toFixed(2));
    if (L.cache_ratio !== null) {
      const h2 = plotH * L.cache_ratio;
      el("rect", { x: x + slot / 2, y: top + plotH - h2, width: bw, height: h2, class: "bar-cache" });
      el("text", { x: x + slot / 2, y: top + plotH - h2 - 2 }, L.cache_ratio.toFixed(2));
    }
    el("text", { x: x + slot / 2 - 6, y: H - 5 }, `L${i}`);
    const hit = el("rect", { x: x, y: 0, width: slot, height: H, class: "hit", "data-layer": i });
    hit.addEventListener("click", () => selectLayer(i));
  });
}

function renderImage() {
  const r = state.result, fig = $("image-panel");
  if (!r.image) { fig.hidden = true; return; }
  fig.hidden = false;
  const L = r.layers[state.layer], img = new Image();
  img.onload = () => {
    const canvas = $("patches"), ctx = canvas.getContext("2d");
    const [gh, gw] = r.image.grid, scale = Math.max(1, Math.floor(256 / Math.max(img.width, img.height)));
    canvas.width = img.width * scale; canvas.height = img.height * scale;
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    const cw = canvas.width / gw, ch = canvas.height / gh;
    r.image.token_of_patch.forEach((tok, p) => {
      const x = (p % gw) * cw, y = Math.floor(p / gw) * ch;
      let fill = null, stroke = null;
      if (tok === null) fill = "rgba(0, 0, 0, 0.8)"; // removed before the LLM
      else {
        const fate = L.fate[tok];
        if (fate === "dropped") fill = "rgba(40, 40, 40, 0.65)";
        else if (fate === "evicted") fill = "rgba(220, 40, 40, 0.5)";
        else if (fate === "merged") { fill = groupColour(L.group[tok], 0.45); stroke = groupColour(L.group[tok], 1); }
        else stroke = "rgba(60, 200, 60, 0.9)";
      }
      if (fill) { ctx.fillStyle = fill; ctx.fillRect(x, y, cw, ch); }
      if (stroke) { ctx.strokeStyle = stroke; ctx.lineWidth = 1; ctx.strokeRect(x + 0.5, y + 0.5, cw - 1, ch - 1); }
    });
  };
  img.src = r.image.src;
  $("image-caption").textContent = `the image as the encoder sees it, ${r.image.grid[0]} × ${r.image.grid[1]} patches; ` +
    `${r.image.pre_llm_kept}/${r.image.total} reach the LLM (black: removed before it). Layer ${state.layer}: ` +
    `green outline kept, coloured merged, grey dropped, red evicted.`;
}

function renderMemory() {
  const m = state.result.memory;
  const saved = 1 - m.ratio;
  $("memory").innerHTML = "";
  const b = document.createElement("b");
  b.textContent = `KV cache after the prefill: ${fmtBytes(m.with_stages)} with the LLM stages vs ${fmtBytes(m.without_stages)} without ` +
    `(${(100 * m.ratio).toFixed(1)} %, ${saved >= 0 ? "saves" : "costs"} ${(100 * Math.abs(saved)).toFixed(1)} %)`;
  const note = document.createElement("div");
  note.style.fontSize = "0.8em"; note.style.color = "#666";
  note.textContent = m.method;
  $("memory").appendChild(b);
  $("memory").appendChild(note);
}

function renderStages() {
  const t = $("stage-stats");
  t.textContent = "";
  const head = t.insertRow();
  for (const h of ["stage", "after layer", "statistics"]) { const th = document.createElement("th"); th.textContent = h; head.appendChild(th); }
  for (const s of state.result.stages) {
    const row = t.insertRow();
    row.insertCell().textContent = `${s.id}: ${s.name}`;
    row.insertCell().textContent = s.after_layer === null ? (s.kind === "cache" ? "(cache)" : "—") : String(s.after_layer);
    row.insertCell().textContent = Object.entries(s.stats).map(([k, v]) => `${k}=${typeof v === "number" ? +v.toFixed(4) : JSON.stringify(v)}`).join(" ");
  }
}

function render() {
  if (!state.result) return;
  renderTokens(); renderRatio(); renderChart(); renderImage(); renderMemory(); renderStages();
}

function selectLayer(i) {
  state.layer = i;
  $("layer").value = i;
  render();
}

// ---------------------------------------------------------------- wiring
function hoverDetail(ev) {
  const span = ev.target.closest(".tok");
  document.querySelectorAll(".tok.hover").forEach((el) => el.classList.remove("hover"));
  if (!span || !state.result || span.dataset.i === undefined) return;
  const i = Number(span.dataset.i), g = state.result.layers[state.layer].group[i];
  if (g !== null) document.querySelectorAll(`#tokens .tok[data-group="${g}"]`).forEach((el) => el.classList.add("hover"));
  else span.classList.add("hover");
  $("detail").textContent = tokenDetail(i);
}

function patchDetail(ev) {
  const r = state.result;
  if (!r || !r.image) return;
  const canvas = $("patches"), rect = canvas.getBoundingClientRect();
  const [gh, gw] = r.image.grid;
  const c = Math.floor(((ev.clientX - rect.left) / rect.width) * gw), row = Math.floor(((ev.clientY - rect.top) / rect.height) * gh);
  if (c < 0 || c >= gw || row < 0 || row >= gh) return;
  const tok = r.image.token_of_patch[row * gw + c];
  $("detail").textContent = tok === null ? `patch ${row},${c}: removed by the pre-LLM pipeline (${state.config.pre_llm.join(" → ")})` : tokenDetail(tok);
}

async function start() {
  const reply = await fetch("/api/config");
  const config = await reply.json();
  state.config = config;
  $("model-info").textContent = `${config.layers} decoder layers · ${config.heads} heads / ${config.kv_heads} KV heads · ` +
    `pre-LLM: ${config.pre_llm.length ? config.pre_llm.join(" → ") : "none"}`;
  $("text").maxLength = config.limits.max_text_chars;
  if (!config.vision) { $("image").disabled = true; $("image").title = "this model has no vision tower"; }
  drawControls(config);
  $("run").addEventListener("click", run);
  $("layer").addEventListener("change", () => selectLayer(Number($("layer").value)));
  $("tokens").addEventListener("mouseover", hoverDetail);
  $("patches").addEventListener("mousemove", patchDetail);
  $("text").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) run(); });
  $("image").addEventListener("change", () => {
    const file = $("image").files[0];
    if (!file) { state.image = null; return; }
    if (file.size > config.limits.max_image_bytes) {
      showError(`image: ${file.size} bytes is over the limit of ${config.limits.max_image_bytes}`, "image");
      return;
    }
    const reader = new FileReader();
    reader.onload = () => { state.image = reader.result; changed(); };
    reader.readAsDataURL(file);
  });
  $("clear-image").addEventListener("click", () => { $("image").value = ""; state.image = null; changed(); });
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", start);
