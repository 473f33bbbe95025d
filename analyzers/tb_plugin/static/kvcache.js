// kvtrace's "KV Cache" TensorBoard tab.
//
// TensorBoard imports this module inside its plugin iframe and calls render(); render() navigates the frame
// to the plugin's own index.html (as the PyTorch Profiler plugin does), whose <script type="module"> loads
// this file again and, finding #kvcache-app, starts the dashboard. Every URL here is relative to the
// plugin's route (data/plugin/kvcache/), so nothing leaves the machine.
//
// The page only formats: every figure comes from the plugin's endpoints, which serve the analyzers' own
// results (the summary is `kvtrace report --json`).

import { bytesAxis, grouped, heatmapFigure, humanBytes, kvFinalTrace, sharedAxes, timeSpan } from './charts.js';

export function render() {
  if (!document.getElementById('kvcache-app')) {
    document.location.href = 'index.html';
  }
}

const COLORS = { weights: '#1f77b4', kv: '#d62728', other: '#7f7f7f' };
// A memory level holds until the next event (plotly's step), as the HTML report and torch's memory_viz draw it:
// a straight line between two events draws growth that never happened.
const LEVEL_LINE = 'hv';
const MARKERS = {
  step: { symbol: 'line-ns-open', color: '#2ca02c' },
  eviction: { symbol: 'triangle-down', color: '#9467bd' },
  oom: { symbol: 'x', color: '#d00000' },
  snapshot: { symbol: 'diamond-open', color: '#ff7f0e' },
};
const PLOT_CONFIG = { displaylogo: false, responsive: true, showLink: false, showSendToCloud: false };
const MAX_DEFAULT_RUNS = 4;

const state = { runs: [], selected: [], panels: new Map(), jsErrors: 0 };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// A run that cannot be read answers 200 with {"error": ...}; only a bad request is 4xx. Both are JSON.
async function getJson(path) {
  const response = await fetch(path, { cache: 'no-store' });
  try {
    return await response.json();
  } catch (err) {
    return { error: `${path}: HTTP ${response.status}, not JSON` };
  }
}

function reportPageError(message) {
  state.jsErrors += 1;
  const box = document.getElementById('kvcache-page-errors');
  if (box) box.textContent += `${message}\n`;
  document.getElementById('kvcache-app')?.setAttribute('data-js-errors', String(state.jsErrors));
}

// -- run selector ----------------------------------------------------------------------------------------
function initialSelection(runs) {
  const wanted = new URLSearchParams(window.location.search).get('runs');
  const names = runs.map((r) => r.name);
  if (wanted) return wanted.split(',').filter((name) => names.includes(name));
  return names.slice(0, MAX_DEFAULT_RUNS);
}

function drawSelector() {
  const box = document.getElementById('kvcache-runs');
  box.replaceChildren();
  if (!state.runs.length) {
    box.append(el('span', { class: 'loading', text: 'No kvtrace run directory under the log directory yet.' }));
  }
  for (const run of state.runs) {
    const input = el('input', { type: 'checkbox', value: run.name });
    input.checked = state.selected.includes(run.name);
    input.addEventListener('change', () => {
      state.selected = state.runs.map((r) => r.name).filter((name) =>
        name === run.name ? input.checked : state.selected.includes(name));
      drawPanels();
    });
    const title = run.error ? run.error : [run.model, run.device, run.status].filter(Boolean).join(' · ');
    const label = el('label', { class: run.error ? 'broken' : '', title }, input, ` ${run.name}`);
    box.append(label);
  }
}

async function loadRuns() {
  const listing = await getJson('runs');
  document.getElementById('kvcache-logdir').textContent = listing.logdir || '';
  const firstTime = state.runs.length === 0;
  state.runs = listing.runs || [];
  if (listing.error) reportPageError(listing.error);
  const names = state.runs.map((r) => r.name);
  state.selected = firstTime ? initialSelection(state.runs) : state.selected.filter((n) => names.includes(n));
  drawSelector();
}

// -- one run's panel -----------------------------------------------------------------------------------
function summaryTable(summary) {
  const rows = [];
  for (const dev of summary.devices) {
    rows.push([`${dev.device} peak allocated`, humanBytes(dev.peak_allocated_bytes)]);
    for (const [name, value] of Object.entries(dev.categories_at_peak)) rows.push([`  ${name} at peak`, humanBytes(value)]);
    if (dev.fragmentation_at_peak_bytes !== null) {
      rows.push(['  reserved but unallocated', humanBytes(dev.fragmentation_at_peak_bytes)]);
    }
  }
  const kv = summary.kv;
  rows.push(['KV final', humanBytes(kv.final_bytes)]);
  rows.push(['KV peak (transient copies)', humanBytes(kv.peak_bytes)]);
  // What "allocated" sums over, in the report's words: a snapshot's trace span, not the run
  rows.push([`KV allocated ${kv.allocated_over}`, humanBytes(kv.allocated_bytes_total)]);
  rows.push(['evicted tokens', kv.evicted_tokens === null ? '-' : grouped(kv.evicted_tokens)]);
  // An engine's pool (vLLM) has no batch: its tokens are the pool's capacity, as `kvtrace report` says.
  if (kv.tokens_held !== null && kv.batch !== null) {
    rows.push(['tokens held × batch', `${kv.tokens_held} × ${kv.batch}`]);
  } else if (kv.tokens_held !== null) {
    rows.push([summary.engine ? 'KV pool capacity' : 'tokens held', `${grouped(kv.tokens_held)} tokens`]);
  }
  if (kv.bytes_per_token_measured !== null) {
    const expected = kv.bytes_per_token_expected === null ? '-' : grouped(kv.bytes_per_token_expected);
    rows.push(['KV bytes/token measured vs arithmetic', `${grouped(kv.bytes_per_token_measured, 1)} vs ${expected}`]);
  }
  rows.push(['steps', String(summary.steps)]);
  rows.push(['measured from', kv.measured_from]);
  const budget = summary.budget;
  if (budget) {
    rows.push([`budget ${humanBytes(budget.bytes)}`, budget.crossed ? 'crossed' : `fits, ${humanBytes(budget.headroom_bytes)} spare`]);
    if (budget.crossed && !budget.before_first_step) {
      const layer = budget.layer === null ? '' : `, layer ${budget.layer}`;
      rows.push(['  would run out at', `step ${budget.step} (${budget.phase})${layer}`]);
      rows.push(['  request that would fail', `${humanBytes(budget.request_bytes)} ${budget.request_category || ''}`.trim()]);
    }
  }
  return rowsTable(rows);
}

function rowsTable(rows) {
  const table = el('table', { class: 'summary' });
  for (const [label, value] of rows) {
    table.append(el('tr', {}, el('th', { text: label.replace(/^ {2}/, '\u00a0\u00a0') }), el('td', { text: value })));
  }
  return table;
}

function timelineTraces(timeline) {
  const traces = [];
  const several = timeline.devices.length > 1;
  let top = 0;
  for (const dev of timeline.devices) {
    const prefix = several ? `${dev.device} ` : '';
    for (const name of ['weights', 'kv', 'other']) {
      traces.push({
        type: 'scatter', mode: 'lines', x: dev.t_s, y: dev[name], name: `${prefix}${name}`,
        stackgroup: dev.device, line: { width: 0.5, color: COLORS[name], shape: LEVEL_LINE }, text: dev[name].map(humanBytes),
        hovertemplate: '%{text}',
      });
    }
    traces.push({
      type: 'scatter', mode: 'lines', x: dev.t_s, y: dev.allocated, name: `${prefix}allocated`,
      line: { width: 1, color: 'black', shape: LEVEL_LINE }, text: dev.allocated.map(humanBytes), hovertemplate: '%{text}',
    });
    top = Math.max(top, dev.peak_allocated_bytes);
    if (dev.reserved) {
      traces.push({
        type: 'scatter', mode: 'lines', x: dev.t_s, y: dev.reserved, name: `${prefix}reserved`,
        line: { color: 'orange', dash: 'dot', shape: LEVEL_LINE }, text: dev.reserved.map(humanBytes), hovertemplate: '%{text}',
      });
      top = Math.max(top, dev.reserved.reduce((a, b) => Math.max(a, b), 0));
    }
  }
  for (const [kind, style] of Object.entries(MARKERS)) {
    const marks = timeline.markers.filter((m) => m.kind === kind);
    if (!marks.length) continue;
    traces.push({
      type: 'scatter', mode: 'markers', name: kind, x: marks.map((m) => m.t_s),
      y: marks.map(() => top * 1.04), text: marks.map((m) => m.label),
      marker: { symbol: style.symbol, size: 10, color: style.color }, hovertemplate: '%{text}<extra></extra>',
    });
  }
  for (const mark of timeline.markers.filter((m) => m.kind === 'budget')) {
    traces.push({
      type: 'scatter', mode: 'markers', name: 'runs out here', x: [mark.t_s], y: [mark.bytes], text: [mark.label],
      marker: { symbol: 'x', size: 14, color: '#d62728' }, hovertemplate: '%{text}<extra></extra>',
    });
  }
  return { traces, top };
}

function timelineLayout(timeline, top, budget) {
  const shapes = [];
  if (budget && budget.bytes < 4 * Math.max(top, 1)) {
    shapes.push({ type: 'line', xref: 'paper', x0: 0, x1: 1, y0: budget.bytes, y1: budget.bytes,
      line: { color: '#d62728', dash: 'dash', width: 1.5 } });
  }
  for (const dev of timeline.devices) {
    if (dev.capacity_bytes && dev.capacity_bytes < 4 * Math.max(top, 1)) {
      shapes.push({ type: 'line', xref: 'paper', x0: 0, x1: 1, y0: dev.capacity_bytes, y1: dev.capacity_bytes,
        line: { color: 'red', dash: 'dash', width: 1 } });
    }
  }
  return {
    title: { text: 'Memory by category over time', font: { size: 13 } }, height: 380, shapes,
    margin: { t: 36, l: 64, r: 16, b: 40 }, template: 'plotly_white', legend: { orientation: 'h', y: -0.18 },
    xaxis: timeAxis(timeline),
    yaxis: bytesAxis(top),
  };
}

// The x axis of both time charts: one span, so that a second sits at one place on both.
function timeAxis(timeline) {
  const span = timeSpan(timeline);
  return { title: { text: 'seconds from first event' }, ...(span ? { range: span } : {}) };
}

async function fillPanel(panel, name) {
  const q = encodeURIComponent(name);
  const [summary, timeline, layers, diagnosis, pool] = await Promise.all([
    getJson(`summary?run=${q}`), getJson(`timeline?run=${q}`), getJson(`layers?run=${q}`), getJson(`diagnosis?run=${q}`),
    getJson(`pool?run=${q}`),
  ]);
  const body = panel.querySelector('.panel-body');
  body.replaceChildren();
  const failed = [summary, timeline, layers].find((part) => part.error);
  if (failed) {
    panel.dataset.state = 'error';
    body.append(el('div', { class: 'error-box', role: 'alert', text: failed.error }));
    return;
  }
  for (const note of summary.notes) body.append(el('p', { class: 'note', text: note }));
  if (diagnosis.html) {
    const box = el('div', { class: 'diagnosis' });
    box.innerHTML = diagnosis.html; // rendered and escaped by analyzers.render_diagnosis
    body.append(box);
  } else if (diagnosis.error) {
    body.append(el('div', { class: 'error-box', text: `diagnosis: ${diagnosis.error}` }));
  }
  body.append(summaryTable(summary));
  if (timeline.no_chart) {
    // An engine's run whose one memory event is its pool's allocation: the pool chart below is its
    // timeline, and the server says so in the HTML report's words.
    body.append(el('p', { class: 'note no-chart', text: timeline.no_chart }));
  } else {
    await drawTimeline(body, panel, timeline, summary.budget);
  }
  panel.dataset.points = String(timeline.devices.reduce((sum, d) => sum + d.points, 0));
  // An engine allocates its pool once, before its first step (all its KV events at step 0): a per-step
  // heatmap would be one column, numbered apart from the engine's steps. The HTML report leaves it out too.
  if (layers.steps.length && !summary.engine) {
    const heatDiv = el('div', { class: 'plot heatmap-plot' });
    body.append(heatDiv);
    const figure = heatmapFigure(layers);
    await Plotly.newPlot(heatDiv, figure.traces, figure.layout, PLOT_CONFIG);
  }
  if (pool.error) {
    body.append(el('div', { class: 'error-box', text: `pool: ${pool.error}` }));
  } else if (pool.rows.length) {
    // The HTML report's own pool table and figure: blocks used against the total over engine steps,
    // preemptions. A pool made by a run that ended before its first engine step has its table alone.
    body.append(el('h3', { class: 'pool-title', text: pool.title }), rowsTable(pool.rows));
    if (pool.figure) {
      const poolDiv = el('div', { class: 'plot pool-plot' });
      body.append(poolDiv);
      await Plotly.newPlot(poolDiv, pool.figure.data, pool.figure.layout, PLOT_CONFIG);
    }
  }
  panel.dataset.state = 'ok';
}

async function drawTimeline(body, panel, timeline, budget) {
  const timelineDiv = el('div', { class: 'plot timeline-plot' });
  body.append(timelineDiv);
  const { traces, top } = timelineTraces(timeline);
  await Plotly.newPlot(timelineDiv, traces, timelineLayout(timeline, top, budget), PLOT_CONFIG);
  // The KV cache is often a sliver on top of the weights: its own curve, on its own scale.
  const kvDiv = el('div', { class: 'plot kv-plot' });
  body.append(kvDiv);
  const kvTop = Math.max(0, ...timeline.devices.map((dev) => dev.kv.reduce((a, b) => Math.max(a, b), 0)));
  const kvTraces = timeline.devices.map((dev) => ({
    type: 'scatter', mode: 'lines', x: dev.t_s, y: dev.kv, name: `${timeline.devices.length > 1 ? `${dev.device} ` : ''}KV live`,
    line: { color: COLORS.kv, width: 1, shape: LEVEL_LINE }, fill: 'tozeroy', text: dev.kv.map(humanBytes), hovertemplate: '%{text}',
  }));
  const finalMark = timeline.devices.some((dev) => dev.events) ? kvFinalTrace(timeline.kv_final) : null;
  if (finalMark) kvTraces.push(finalMark);
  await Plotly.newPlot(kvDiv, kvTraces, {
    title: { text: 'KV cache live bytes over time', font: { size: 13 } }, height: 220, showlegend: false,
    margin: { t: 36, l: 64, r: 16, b: 36 }, template: 'plotly_white', xaxis: timeAxis(timeline),
    yaxis: bytesAxis(kvTop, 'KV'),
  }, PLOT_CONFIG);
  panel.dataset.top = String(top);
  panel.dataset.kvTop = String(kvTop);
}

async function applySameScale() {
  // Both byte charts of every panel share one scale (the timeline's, and the KV chart's own), ticked in
  // binary units; unticked, each goes back to its own top.
  const same = document.getElementById('kvcache-same-scale').checked;
  const panels = [...document.querySelectorAll('.run-panel[data-state="ok"]')];
  const tops = panels.map((p) => ({ top: Number(p.dataset.top || 0), kvTop: Number(p.dataset.kvTop || 0) }));
  const jobs = [];
  for (const [i, panel] of panels.entries()) {
    const axes = sharedAxes(same ? tops : [tops[i]]);
    const timelineDiv = panel.querySelector('.timeline-plot');
    if (timelineDiv) jobs.push(Plotly.relayout(timelineDiv, axes.timeline));
    const kvDiv = panel.querySelector('.kv-plot');
    if (kvDiv) jobs.push(Plotly.relayout(kvDiv, axes.kv));
  }
  await Promise.all(jobs);
  await Promise.all(panels.map(alignTimeCharts));
}

// The two time charts share their seconds (timeAxis); their plot areas start at one x too, at the wider of
// the left margins plotly made room for their y labels in ("60 MiB" against "80 KiB"), so that a second
// sits at one place on both.
async function alignTimeCharts(panel) {
  const divs = ['.timeline-plot', '.kv-plot'].map((sel) => panel.querySelector(sel)).filter((div) => div?._fullLayout);
  if (divs.length < 2) return;
  const left = Math.max(...divs.map((div) => div._fullLayout._size.l));
  await Promise.all(divs.filter((div) => div._fullLayout._size.l !== left)
    .map((div) => Plotly.relayout(div, { 'margin.l': left })));
}

async function drawPanels() {
  const app = document.getElementById('kvcache-app');
  const container = document.getElementById('kvcache-panels');
  app.dataset.state = 'loading';
  const runsByName = new Map(state.runs.map((r) => [r.name, r]));
  const jobs = [];
  container.replaceChildren();
  for (const name of state.selected) {
    const run = runsByName.get(name) || {};
    const meta = [run.model, run.num_layers ? `${run.num_layers} layers` : '', run.device, run.status].filter(Boolean);
    const panel = el('section', { class: 'run-panel', 'data-run': name, 'data-state': 'loading' },
      el('h2', { text: name }), el('div', { class: 'meta', text: meta.join(' · ') }),
      el('div', { class: 'panel-body' }, el('span', { class: 'loading', text: 'loading…' })));
    container.append(panel);
    if (run.error) {
      // The manifest alone already says this run cannot be read: show why, ask the server nothing more.
      panel.dataset.state = 'error';
      panel.querySelector('.panel-body').replaceChildren(el('div', { class: 'error-box', role: 'alert', text: run.error }));
      continue;
    }
    jobs.push(fillPanel(panel, name).catch((err) => {
      panel.dataset.state = 'error';
      panel.querySelector('.panel-body').replaceChildren(el('div', { class: 'error-box', text: String(err) }));
    }));
  }
  await Promise.all(jobs);
  await applySameScale();
  app.dataset.plots = String(document.querySelectorAll('.run-panel .plot-container').length);
  app.dataset.state = 'ready';
}

async function main() {
  window.addEventListener('error', (event) => reportPageError(event.message));
  window.addEventListener('unhandledrejection', (event) => reportPageError(String(event.reason)));
  document.getElementById('kvcache-same-scale').addEventListener('change', applySameScale);
  document.getElementById('kvcache-refresh').addEventListener('click', async () => {
    await loadRuns();
    await drawPanels();
  });
  if (typeof Plotly === 'undefined') {
    reportPageError('plotly.min.js did not load');
    return;
  }
  await loadRuns();
  await drawPanels();
}

if (document.getElementById('kvcache-app')) {
  main().catch((err) => reportPageError(String(err)));
}
