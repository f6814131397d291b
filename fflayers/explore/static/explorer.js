// fflayers explore: the page. Plain JavaScript, no build step; it talks only to the JSON API of
// docs/explorer.md. The view state lives in location.hash as #state=<URI-encoded JSON> (a permalink).
"use strict";

const $ = (sel) => document.querySelector(sel);
const STATES = ["resid_pre", "attn", "mlp"];
const COLORS = {resid_pre: "#1f6fb4", attn: "#e07b12", mlp: "#2a9d3c"};
const SHOWN = 3;                                           // tokens shown per trace cell (the rest on hover)
const TOKEN = new URLSearchParams(location.search).get("token");   // access token, when the server wants one

const DEFAULT_STATE = {prompt: "", position: -1, lens: "logit", target: "", k: 10, interventions: [], value: null};
let state = {...DEFAULT_STATE};   // the committed state: what the page shows (and the hash says)
let info = null;                  // GET /api/info
let lastTrace = null;             // the last /api/trace answer rendered
let subLayer = null;              // the layer whose sub-updates are shown, or null
let picking = false;              // selection mode: chips pick the subject's tokens instead of retracing
let inflight = 0, traced = false, traceSeq = 0, traceCount = 0;

// ----- small DOM helpers ---------------------------------------------------------------------------------
/** An element with attributes (class, title, data-*, on* handlers) and children (nodes or strings). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, val] of Object.entries(attrs)) {
    if (val === null || val === undefined || val === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), val);
    else node.setAttribute(key, val === true ? "" : val);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** A token made readable: spaces as ␣, newlines as ↵, tabs as ⇥, the empty string as ∅. */
function showTok(tok) {
  if (tok === "") return "∅";
  return tok.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥");
}

/** A probability: 0.412 above 1 %, 2.76e-5 below. */
function fmtP(p) {
  return p >= 0.01 ? p.toFixed(3) : p === 0 ? "0" : p.toExponential(2);
}

function fmtNum(x) {
  return Math.abs(x) >= 1000 || (Math.abs(x) < 0.001 && x !== 0) ? x.toExponential(2) : x.toPrecision(3);
}

/** Layer / position lists, compact: [5, 6, 7, 9] -> "5-7,9". */
function fmtList(xs) {
  const parts = [];
  for (let i = 0; i < xs.length; i++) {
    let j = i;
    while (j + 1 < xs.length && xs[j + 1] === xs[j] + 1 && xs[i] >= 0) j++;
    parts.push(j > i + 1 ? `${xs[i]}-${xs[j]}` : j === i + 1 ? `${xs[i]},${xs[j]}` : `${xs[i]}`);
    i = j;
  }
  return parts.join(",");
}

/** "0-3, 7", "-1", "all" (layers) -> a list of integers; a typo is an Error naming the field. */
function parseList(text, field) {
  const out = [];
  for (const part of text.split(/[\s,]+/).filter(Boolean)) {
    let m;
    if (part === "all" && field === "layers" && info) out.push(...Array.from({length: info.n_layers}, (_, i) => i));
    else if (/^-?\d+$/.test(part)) out.push(Number(part));
    else if ((m = part.match(/^(\d+)-(\d+)$/)) && Number(m[1]) <= Number(m[2])) {
      for (let i = Number(m[1]); i <= Number(m[2]); i++) out.push(i);
    } else throw new Error(`${field}: "${part}" is not an integer or a range like 2-5`);
  }
  if (!out.length) throw new Error(`${field}: give at least one, e.g. 3 or 0-5`);
  return [...new Set(out)];
}

// ----- errors and the busy state -----------------------------------------------------------------------
function showError(message) {
  $("#error-text").textContent = message;
  $("#error").hidden = false;
}

function clearError() {
  $("#error").hidden = true;
  $("#error-text").textContent = "";
}

/** body[data-state]: "loading" while a request is in flight, then "traced" once a trace has rendered. */
function busy(delta) {
  inflight += delta;
  document.body.dataset.state = inflight > 0 ? "loading" : traced ? "traced" : "idle";
  $("#busy").classList.toggle("on", inflight > 0);
}

/** Wraps an event handler: clears the error bar, runs it, shows what went wrong (never an alert). */
function guarded(fn) {
  return async (...args) => {
    clearError();
    try { await fn(...args); } catch (err) { showError(err.message || String(err)); }
  };
}

// ----- the API -------------------------------------------------------------------------------------------
/** GET (no body) or POST (JSON body) an API path; a 4xx answer throws its one-line `error`. */
async function api(path, body) {
  const opts = {headers: {}};
  if (TOKEN) opts.headers.Authorization = `Bearer ${TOKEN}`;
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  busy(+1);
  try {
    let res;
    try { res = await fetch(path, opts); } catch (err) {
      throw new Error(`the server does not answer (${err.message}); is fflayers explore still running?`);
    }
    let data = null;
    try { data = await res.json(); } catch { /* not JSON */ }
    if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}: ${path}`);
    return data;
  } finally { busy(-1); }
}

/** A link for the browser itself (no header possible): the token as ?access_token=. */
function withToken(path) {
  return TOKEN ? `${path}${path.includes("?") ? "&" : "?"}access_token=${encodeURIComponent(TOKEN)}` : path;
}

// ----- permalinks ----------------------------------------------------------------------------------------
function writeHash() {
  history.replaceState(null, "", "#state=" + encodeURIComponent(JSON.stringify(state)));
}

/** The state in location.hash, merged over the defaults; null when there is none. */
function readHash() {
  const m = location.hash.match(/^#state=(.*)$/s);
  if (!m) return null;
  let parsed;
  try { parsed = JSON.parse(decodeURIComponent(m[1])); } catch {
    showError("the link's #state= is not valid URI-encoded JSON; trace again to get a new permalink");
    return null;
  }
  return parsed && typeof parsed === "object" ? {...DEFAULT_STATE, ...parsed} : null;
}

/** The state the form asks for; the position is kept only while the prompt is unchanged. */
function formState(overrides = {}) {
  const prompt = $("#prompt").value;
  return {...state, prompt, position: prompt === state.prompt ? state.position : -1, lens: $("#lens").value,
          target: $("#target").value.replace(/␣/g, " "), k: Number($("#k").value) || 10, ...overrides};
}

function fillForm(s) {
  $("#prompt").value = s.prompt;
  if ([...$("#lens").options].some((o) => o.value === s.lens)) $("#lens").value = s.lens;
  $("#target").value = s.target ? s.target.replace(/ /g, "␣") : "";   // the leading space made visible
  $("#k").value = s.k;
}

// ----- trace ---------------------------------------------------------------------------------------------
/** Traces `next` (a candidate state); it becomes the page's state only when the server accepts it. */
async function runTrace(next) {
  const seq = ++traceSeq;
  busy(+1);
  try {
    const t = await api("/api/trace", {prompt: next.prompt, position: next.position, lens: next.lens, k: next.k,
                                       target: next.target || null, interventions: next.interventions});
    if (seq !== traceSeq) return;               // a newer trace was asked for meanwhile
    state = next;
    lastTrace = t;
    fillForm(state);
    renderTrace(t);
    renderInterventions();
    writeHash();
    traced = true;
    document.body.dataset.traces = String(++traceCount);
  } finally { busy(-1); }
  if (subLayer !== null) await loadSubupdates(subLayer);   // keep the sub-updates in step with the trace
}

function renderTrace(t) {
  renderTokens(t.tokens, t.position);
  renderPrediction(t);
  renderTable(t);
  renderChart(t);
}

function renderTokens(tokens, position) {
  const picked = new Set(picking ? parseToQuiet($("#ba-to").value) : []);
  $("#tokens").replaceChildren(...tokens.map((tok, i) => el("span", {
    class: "token-chip" + (i === position ? " selected" : "") + (picked.has(i) ? " picked" : ""),
    "data-position": i, title: `position ${i} (${i - tokens.length})`, onclick: guarded(() => chipClicked(i)),
  }, showTok(tok))));
}

function parseToQuiet(text) {
  try { return parseList(text, "to"); } catch { return []; }
}

async function chipClicked(i) {
  if (!picking) return runTrace({...formState(), position: i});
  // selection mode: toggle the token among the subject's positions (the block-attention "to")
  const picked = new Set(parseToQuiet($("#ba-to").value));
  if (picked.has(i)) picked.delete(i); else picked.add(i);
  $("#ba-to").value = [...picked].sort((a, b) => a - b).join(",");
  renderTokens(lastTrace.tokens, lastTrace.position);
}

/** A top-k list: the first `n` tokens with probabilities, changes against `orig` when given, all on hover. */
function tokList(items, orig, n, targetId) {
  const before = orig ? new Map(orig.map((x) => [x.id, x.prob])) : null;
  const box = el("div", {class: "toks", title: items.map((x) => `${showTok(x.token)}  ${fmtP(x.prob)}`).join("\n")});
  for (const x of items.slice(0, n)) {
    box.append(el("div", {class: "tok" + (x.id === targetId ? " is-target" : "")},
      el("span", {class: "t"}, showTok(x.token)), el("span", {class: "p"}, fmtP(x.prob)),
      before ? diffSpan(x.prob, before.get(x.id)) : null));
  }
  return box;
}

/** The change p - p0, green up / red down (intensity by the relative change); "new" when p0 is unknown. */
function diffSpan(p, p0) {
  if (p0 === undefined) return el("span", {class: "d new", title: "not in the original top-k"}, "new");
  const delta = p - p0, rel = Math.abs(delta) / Math.max(p, p0, 1e-30);
  const cls = rel < 1e-4 ? "same" : (delta > 0 ? "up" : "down") + (rel > 0.1 ? " strong" : "");
  return el("span", {class: `d ${cls}`, title: `original ${fmtP(p0)}`},
    rel < 1e-4 ? "=" : (delta > 0 ? "+" : "−") + fmtP(Math.abs(delta)));
}

function renderPrediction(t) {
  const box = $("#prediction");
  const chip = (x, orig) => el("span", {
    class: "pred" + (x.id === t.target.id ? " is-target" : ""), "data-token-id": x.id,
    title: "click: make it the target", onclick: guarded(() => runTrace(formState({target: x.token}))),
  }, el("span", {class: "t"}, showTok(x.token)), el("span", {class: "p"}, fmtP(x.prob)),
  orig ? diffSpan(x.prob, orig.get(x.id)) : null);
  if (!t.edited) {
    box.replaceChildren(el("div", {class: "pred-line"}, t.original.prediction.map((x) => chip(x))));
    return;
  }
  const orig = new Map(t.original.prediction.map((x) => [x.id, x.prob]));
  box.replaceChildren(
    el("div", {class: "pred-line edited"}, el("span", {class: "run-label"}, "edited"),
      t.edited.prediction.map((x) => chip(x, orig))),
    el("div", {class: "pred-line original"}, el("span", {class: "run-label"}, "original"),
      t.original.prediction.map((x) => chip(x))));
}

/** One row per layer; each cell the top tokens (edited run beside the original when edited). */
function renderTable(t) {
  const body = $("#trace-table tbody");
  const rows = t.original.layers.map((orig, i) => {
    const ed = t.edited ? t.edited.layers[i] : null;
    const tr = el("tr", {"data-layer": orig.layer});
    tr.append(el("th", {class: "layer"}, orig.layer));
    for (const s of STATES) {
      const cell = el("td", {class: `cell cell-${s}` + (ed ? " edited" : ""), "data-layer": orig.layer});
      if (ed) cell.append(tokList(ed[s], orig[s], SHOWN, t.target.id), tokList(orig[s], null, SHOWN, t.target.id));
      else cell.append(tokList(orig[s], null, SHOWN, t.target.id));
      if (s === "mlp") {
        cell.title += "\n(click: the sub-updates of this layer)";
        cell.addEventListener("click", guarded(() => loadSubupdates(orig.layer)));
      }
      tr.append(cell);
    }
    tr.append(el("td", {class: "cell-target"}, STATES.map((s) => targetLine(s, (ed || orig).target[s],
      ed ? orig.target[s] : null))));
    return tr;
  });
  body.replaceChildren(...rows);
  $("#trace-table").classList.toggle("is-edited", Boolean(t.edited));
  for (const tr of rows) tr.classList.toggle("sub-open", Number(tr.dataset.layer) === subLayer);
}

function targetLine(s, cur, orig) {
  return el("div", {class: "tline"}, el("span", {class: "s"}, s.replace("resid_", "")),
    el("span", {class: "r"}, `#${cur.rank}`), el("span", {class: "p"}, fmtP(cur.prob)),
    orig ? diffSpan(cur.prob, orig.prob) : null);
}

/** The target's rank (log axis, 1 = top) and probability across layers; the original dashed when edited. */
function renderChart(t) {
  const box = $("#target-chart");
  $("#chart-target").textContent = `target “${showTok(t.target.token)}” (id ${t.target.id}) · lens ${t.lens}`;
  if (!window.Plotly) { box.textContent = "plotly.js did not load (/static/plotly.min.js)"; return; }
  const x = t.original.layers.map((r) => r.layer);
  const runs = t.edited ? [["edited", t.edited, "solid"], ["original", t.original, "dash"]] : [["", t.original, "solid"]];
  const traces = [];
  for (const [label, run, dash] of runs) {
    for (const s of STATES) {
      const common = {x, mode: "lines+markers", line: {color: COLORS[s], dash, width: dash === "dash" ? 1.5 : 2},
                      marker: {size: 5}, legendgroup: s + label};
      const name = label ? `${s} (${label})` : s;
      traces.push({...common, name, y: run.layers.map((r) => r.target[s].rank + 1), xaxis: "x", yaxis: "y",
                   hovertemplate: `${name} L%{x}: rank %{customdata}<extra></extra>`,
                   customdata: run.layers.map((r) => r.target[s].rank)});
      traces.push({...common, name, y: run.layers.map((r) => r.target[s].prob), xaxis: "x2", yaxis: "y2",
                   showlegend: false, hovertemplate: `${name} L%{x}: p %{y:.3g}<extra></extra>`});
    }
  }
  const axis = {gridcolor: "#e6e6e6", zeroline: false};
  Plotly.react(box, traces, {
    margin: {l: 55, r: 10, t: 10, b: 40}, height: 300, font: {size: 11}, legend: {orientation: "h", y: -0.2},
    grid: {rows: 1, columns: 2, pattern: "independent"},
    xaxis: {...axis, title: {text: "layer"}, dtick: x.length > 16 ? undefined : 1},
    xaxis2: {...axis, title: {text: "layer"}, dtick: x.length > 16 ? undefined : 1},
    yaxis: {...axis, type: "log", autorange: "reversed", title: {text: "rank (1 = top)"}},
    yaxis2: {...axis, title: {text: "probability"}, rangemode: "tozero"},
  }, {displaylogo: false, responsive: true});
}

// ----- sub-updates ---------------------------------------------------------------------------------------
async function loadSubupdates(layer) {
  subLayer = layer;
  for (const tr of document.querySelectorAll("#trace-table tr[data-layer]")) {
    tr.classList.toggle("sub-open", Number(tr.dataset.layer) === layer);
  }
  const s = await api("/api/subupdates", {prompt: state.prompt, layer, position: state.position,
                                          target: state.target || null, interventions: state.interventions});
  renderSubupdates(s);
}

function renderSubupdates(s) {
  const tok = lastTrace ? showTok(lastTrace.tokens[s.position] ?? "") : "";
  const table = (title, items, metric, label) => el("div", {class: "sub-list", "data-rank": metric},
    el("h4", {}, title),
    el("table", {class: "sub-table"},
      el("thead", {}, el("tr", {}, ["dim", "coef m", label, "top tokens", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, items.map((v) => subRow(s.layer, v, metric)))));
  $("#subupdates").replaceChildren(
    el("div", {class: "sub-head"}, `layer ${s.layer} · position ${s.position} “${tok}” · target “${showTok(s.target.token)}”`),
    el("div", {class: "sub-grid"},
      table("by |m|·‖v‖", s.by_magnitude, "score", "|m|·‖v‖"),
      table("by contribution m·v·e(target)", s.by_target, "contribution", "contrib.")));
}

function subRow(layer, v, metric) {
  return el("tr", {"data-dim": v.dim},
    el("td", {}, valueLink(layer, v.dim)),
    el("td", {class: "num"}, fmtNum(v.coef)),
    el("td", {class: "num", title: `‖v‖ = ${fmtNum(v.norm)}`}, fmtNum(v[metric])),
    el("td", {class: "toks-inline", title: v.top_tokens.map(showTok).join("  ")},
      v.top_tokens.slice(0, 4).map(showTok).join(" ")),
    el("td", {class: "acts"}, valueButtons(layer, v.dim)));
}

/** Buttons that add a value intervention: off, ×2 and set… (an inline number field). */
function valueButtons(layer, dim, everywhere = false) {
  const add = (op, value) => guarded(() => addIntervention(valueEdit(layer, dim, op, value, everywhere)));
  const set = el("button", {class: "mini set-btn", title: "set the coefficient m"}, "set…");
  set.addEventListener("click", () => {
    const input = el("input", {type: "number", step: "any", value: "0", class: "mini-in"});
    const ok = el("button", {class: "mini", onclick: () => add("set", Number(input.value))()}, "ok");
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") ok.click(); });
    set.replaceWith(input, ok);
    input.focus();
  });
  return [el("button", {class: "mini off-btn", title: "switch the value off (m = 0)", onclick: add("off")}, "off"),
          el("button", {class: "mini scale-btn", title: "scale m by 2", onclick: add("scale", 2)}, "×2"), set];
}

function valueEdit(layer, dim, op, value, everywhere) {
  const iv = {kind: "value", layer, dim, op};
  if (op !== "off") iv.value = value;
  if (!everywhere && $("#iv-scope").value === "position") iv.positions = [state.position];
  return iv;
}

function valueLink(layer, dim) {
  const linked = {...state, value: {layer, dim}};
  return el("a", {class: "value-link", href: "#state=" + encodeURIComponent(JSON.stringify(linked)),
                  "data-layer": layer, "data-dim": dim, title: "open the value page",
                  onclick: (e) => { e.preventDefault(); guarded(() => openValue(layer, dim))(); }},
    `L${layer}·${dim}`);
}

// ----- interventions -------------------------------------------------------------------------------------
/** Adds an intervention; the trace is rerun under it and the edit is kept only if the server accepts it. */
async function addIntervention(iv) {
  if (info && state.interventions.length >= info.limits.max_interventions) {
    throw new Error(`at most ${info.limits.max_interventions} interventions; remove some first`);
  }
  await runTrace(formState({interventions: [...state.interventions, iv]}));
}

function describe(iv) {
  const pos = (xs) => xs.map((p) => (lastTrace && lastTrace.tokens.at(p) !== undefined
    ? `${p}“${showTok(lastTrace.tokens.at(p))}”` : `${p}`)).join(",");
  if (iv.kind === "value") {
    const op = iv.op === "off" ? "off" : iv.op === "scale" ? `×${iv.value}` : `= ${iv.value}`;
    return [valueLink(iv.layer, iv.dim), ` ${op} @ ${iv.positions ? pos(iv.positions) : "all positions"}`];
  }
  if (iv.kind === "block_attention") return `block attn L${fmtList(iv.layers)}: ${pos(iv.from)} → ${pos(iv.to)}`;
  if (iv.kind === "zero_sublayer") return `zero ${iv.sublayer} L${fmtList(iv.layers)}`;
  return JSON.stringify(iv);
}

function renderInterventions() {
  const list = $("#interventions");
  if (!state.interventions.length) {
    list.replaceChildren(el("li", {class: "hint"}, "none: the trace is the unedited model"));
    return;
  }
  list.replaceChildren(...state.interventions.map((iv, i) => el("li", {class: "iv", "data-index": i},
    el("span", {class: "iv-text"}, describe(iv)),
    el("button", {class: "link-btn iv-remove", title: "remove", onclick: guarded(() => runTrace(formState({
      interventions: state.interventions.filter((_, j) => j !== i)})))}, "×"))));
}

function togglePicking() {
  picking = !picking;
  $("#ba-pick").textContent = picking ? "done" : "last → subject: pick";
  $("#ba-pick").classList.toggle("active", picking);
  $("#pick-hint").hidden = !picking;
  if (picking) $("#ba-from").value = "-1";
  if (lastTrace) renderTokens(lastTrace.tokens, lastTrace.position);
}

async function addBlockAttention(e) {
  e.preventDefault();
  const iv = {kind: "block_attention", layers: parseList($("#ba-layers").value, "layers"),
              from: parseList($("#ba-from").value, "from"), to: parseList($("#ba-to").value, "to")};
  if (picking) togglePicking();
  await addIntervention(iv);
}

async function addZeroSublayer(e) {
  e.preventDefault();
  await addIntervention({kind: "zero_sublayer", sublayer: $("#zs-sublayer").value,
                         layers: parseList($("#zs-layers").value, "layers")});
}

async function generate() {
  const s = formState();
  const g = await api("/api/generate", {prompt: s.prompt, max_new_tokens: Number($("#max-new-tokens").value) || 10,
                                        interventions: state.interventions});
  const line = (label, run) => el("div", {class: "gen-line"}, el("span", {class: "run-label"}, label),
    el("span", {class: "gen-prompt"}, s.prompt), el("span", {class: "gen-new", title: run.tokens.map(showTok).join(" | ")},
      run.text));
  $("#generation").replaceChildren(line(g.edited ? "original" : "greedy", g.original),
    g.edited ? line("edited", g.edited) : null);
}

async function exportInterventions() {
  const x = await api("/api/export", {prompt: formState().prompt, interventions: state.interventions});
  const block = (title, text) => {
    const pre = el("pre", {}, text);
    const btn = el("button", {class: "mini copy-btn", onclick: () => copy(text, btn)}, "copy");
    return el("div", {class: "export-block"}, el("div", {class: "export-head"}, el("b", {}, title), btn), pre);
  };
  $("#export").replaceChildren(block("JSON", JSON.stringify(x.json, null, 2)), block("Python", x.python));
}

async function copy(text, btn) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {   // no clipboard API (not a secure context): the old way
    const area = el("textarea", {}, text);
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  btn.textContent = "copied";
  setTimeout(() => { btn.textContent = "copy"; }, 1200);
}

// ----- the value page ------------------------------------------------------------------------------------
async function openValue(layer, dim) {
  const v = await api(`/api/value?layer=${layer}&dim=${dim}&k=10`);
  renderValue(v);
  state = {...state, value: {layer, dim}};
  if (traced) writeHash();
}

function scoredList(title, items) {
  return el("div", {class: "scored"}, el("h5", {}, title), el("ol", {}, items.map((x) =>
    el("li", {}, el("span", {class: "t"}, showTok(x.token)), el("span", {class: "p"}, fmtNum(x.score))))));
}

/** An object as a two-column table (agreement rows, knowledge-neuron facts). */
function kvTable(obj) {
  return el("table", {class: "kv"}, Object.entries(obj).map(([k, v]) =>
    el("tr", {}, el("th", {}, k), el("td", {}, typeof v === "number" ? fmtNum(v) : typeof v === "object" ? JSON.stringify(v) : String(v)))));
}

function renderValue(v) {
  const page = $("#value-page");
  const note = v.note || {name: "", note: ""};
  const save = el("button", {id: "note-save"}, "save note");
  const status = el("span", {id: "note-status", class: "hint"});
  save.addEventListener("click", guarded(async () => {
    const r = await api("/api/note", {layer: v.layer, dim: v.dim, name: $("#note-name").value, note: $("#note-text").value});
    status.textContent = r.note && r.note.updated ? `saved ${r.note.updated}` : "saved";
  }));
  page.replaceChildren(
    el("div", {class: "value-head"},
      el("h3", {}, `Value L${v.layer}·${v.dim}`, note.name ? el("span", {class: "sub"}, ` “${note.name}”`) : null),
      el("span", {class: "acts"}, valueButtons(v.layer, v.dim, true)),
      el("button", {class: "link-btn", title: "close", onclick: () => { page.hidden = true; state = {...state, value: null}; if (traced) writeHash(); }}, "×")),
    el("div", {class: "value-grid"},
      scoredList("key · top", v.key.top), scoredList("key · bottom", v.key.bottom),
      scoredList("value · top", v.value.top), scoredList("value · bottom", v.value.bottom)),
    v.triggers ? el("div", {class: "triggers"}, el("h5", {}, `trigger examples (${v.triggers.length})`),
      el("ol", {}, v.triggers.map((t) => el("li", {}, el("span", {class: "act"}, fmtNum(t.activation)),
        el("span", {class: "prefix"}, t.prefix), el("mark", {}, t.target))))) : null,
    v.agreement ? el("div", {}, el("h5", {}, "key-value agreement"), kvTable(v.agreement)) : null,
    v.neurons && v.neurons.length ? el("div", {}, el("h5", {}, "knowledge neuron in"),
      v.neurons.map((n) => kvTable(n))) : null,
    el("div", {class: "note-form"},
      el("input", {id: "note-name", placeholder: "name", value: note.name || ""}),
      el("textarea", {id: "note-text", rows: 2, placeholder: "note"}, note.note || ""),
      el("div", {}, save, " ", status, " ", el("a", {href: withToken("/api/notes.csv")}, "all notes (csv)"))));
  page.hidden = false;
  page.scrollIntoView({block: "nearest"});
}

// ----- search --------------------------------------------------------------------------------------------
async function searchToken(e) {
  e.preventDefault();
  const tok = $("#search-token").value.replace(/␣/g, " ");
  const r = await api(`/api/search?token=${encodeURIComponent(tok)}&limit=50`);
  $("#search-results").replaceChildren(
    el("div", {class: "hint"}, `${r.results.length} values with “${showTok(r.token)}” (id ${r.id}) among their top tokens`),
    el("table", {class: "sub-table"}, el("thead", {}, el("tr", {}, ["value", "rank", "score", "top tokens"].map((h) => el("th", {}, h)))),
      el("tbody", {}, r.results.map((x) => el("tr", {class: "result"}, el("td", {}, valueLink(x.layer, x.dim)),
        el("td", {class: "num"}, x.rank), el("td", {class: "num"}, fmtNum(x.score)),
        el("td", {class: "toks-inline"}, (x.top_tokens || []).slice(0, 5).map(showTok).join(" ")))))));
}

async function searchKeys(e) {
  e.preventDefault();
  const text = $("#search-keys-text").value;
  const r = await api(`/api/search_keys?text=${encodeURIComponent(text)}&limit=50`);
  $("#search-results").replaceChildren(
    el("div", {class: "hint"}, `${r.results.length} keys triggered by examples containing “${r.text}”`),
    el("ol", {class: "triggers"}, r.results.map((x) => el("li", {class: "result"}, valueLink(x.layer, x.dim), " ",
      el("span", {class: "act"}, fmtNum(x.activation)), el("span", {class: "prefix"}, x.prefix), el("mark", {}, x.target)))));
}

// ----- start ---------------------------------------------------------------------------------------------
function renderInfo() {
  $("#model-name").textContent = info.model;
  $("#model-facts").textContent = `${info.n_layers} layers · d_model ${info.d_model} · d_ff ${info.d_ff} · ` +
    `vocab ${info.vocab_size}`;
  $("#fingerprint").textContent = String(info.fingerprint).slice(0, 12);
  $("#fingerprint").title = `model fingerprint ${info.fingerprint}`;
  $("#lens").replaceChildren(...info.lenses.map((l) => el("option", {value: l}, l)));
  $("#k").max = info.limits.max_k;
  $("#max-new-tokens").max = info.limits.max_new_tokens;
  $("#search-keys-form").hidden = !info.memories;
  $("#notes-csv").href = withToken("/api/notes.csv");
}

/** Restores the state of the URL's fragment (if any) and traces it. */
async function restore() {
  const s = readHash();
  if (!s) return;
  fillForm(s);
  busy(+1);   // "traced" only once the value page (when the link has one) is there too
  try {
    if (s.prompt) await runTrace(s);
    if (s.value) await openValue(s.value.layer, s.value.dim);
  } finally { busy(-1); }
}

function bind() {
  $("#trace-btn").addEventListener("click", guarded(() => runTrace(formState())));
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("#trace-btn").click(); }
  });
  for (const id of ["#target", "#k"]) {
    $(id).addEventListener("keydown", (e) => { if (e.key === "Enter") $("#trace-btn").click(); });
  }
  $("#lens").addEventListener("change", () => { if (traced) $("#trace-btn").click(); });
  $("#error-close").addEventListener("click", clearError);
  $("#ba-pick").addEventListener("click", togglePicking);
  $("#ba-form").addEventListener("submit", guarded(addBlockAttention));
  $("#zs-form").addEventListener("submit", guarded(addZeroSublayer));
  $("#generate-btn").addEventListener("click", guarded(generate));
  $("#export-btn").addEventListener("click", guarded(exportInterventions));
  $("#clear-ivs").addEventListener("click", guarded(() => runTrace(formState({interventions: []}))));
  $("#search-form").addEventListener("submit", guarded(searchToken));
  $("#search-keys-form").addEventListener("submit", guarded(searchKeys));
  window.addEventListener("hashchange", guarded(restore));   // a permalink pasted into this tab
}

window.addEventListener("DOMContentLoaded", guarded(async () => {
  bind();
  renderInterventions();
  info = await api("/api/info");
  renderInfo();
  await restore();
}));
