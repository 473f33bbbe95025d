// Pure helpers of the KV Cache tab's charts: sizes in binary units with one rounding (two decimals, ties
// to even, as `kvtrace report` prints them), byte axes whose ticks read "40 MiB" rather than plotly's SI "40M", and
// the per-layer heatmap. No DOM and no Plotly here, so that tests run them under node.

const UNITS = [['GiB', 2 ** 30], ['MiB', 2 ** 20], ['KiB', 2 ** 10]];

// `value` with `digits` decimals as Python's format writes it. Python rounds a tie to even (46.625 to
// "46.62"), toFixed rounds it up ("46.63"), and the tab shows Python's figures (the diagnosis) beside its
// own. A binary float is a tie at `digits` places exactly when it is an odd multiple of 2^-(digits+1)
// (5^digits must divide out of the decimal tie), which scaling by a power of two tests without error.
export function fixed(value, digits) {
  const size = Math.abs(value);
  const halves = size * 2 ** (digits + 1);
  let text = size.toFixed(digits);
  if (Number.isInteger(halves) && halves % 2 === 1) {
    const below = Math.floor(size * 10 ** digits);
    text = ((below % 2 === 0 ? below : below + 1) / 10 ** digits).toFixed(digits);
  }
  return `${value < 0 ? '-' : ''}${text}`;
}

// As Python's f"{value:,.{digits}f}": thousands separators, ties to even.
export function grouped(value, digits = 0) {
  const [whole, decimals] = fixed(value, digits).split('.');
  const withCommas = whole.replace(/\B(?=(\d{3})+$)/g, ',');
  return decimals === undefined ? withCommas : `${withCommas}.${decimals}`;
}

export function humanBytes(n) {
  if (n === null || n === undefined) return '-';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = Math.abs(n);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const sign = n < 0 ? '-' : '';
  return unit === 0 ? `${sign}${fixed(value, 0)} B` : `${sign}${fixed(value, 2)} ${units[unit]}`;
}

// [unit, bytes per unit] for values up to `top`.
export function binaryUnit(top) {
  for (const [unit, factor] of UNITS) if (top >= factor) return [unit, factor];
  return ['B', 1];
}

// About five ticks from 0 to `top` bytes, on round numbers of a binary unit: {tickvals (bytes), ticktext}.
export function binaryTicks(top, count = 5) {
  const [unit, factor] = binaryUnit(top);
  const span = Math.max(top / factor, 1e-9);
  const raw = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || 10 * magnitude;
  const tickvals = [];
  const ticktext = [];
  for (let v = 0; v <= span * 1.08 + 1e-9; v += step) {
    const rounded = Number(v.toFixed(6));
    tickvals.push(rounded * factor);
    ticktext.push(`${Number.isInteger(rounded) ? rounded : rounded.toFixed(step < 1 ? 2 : 1)} ${unit}`);
  }
  return { tickvals, ticktext };
}

// A y axis of bytes from 0 to a little above `top`, ticked in binary units.
export function bytesAxis(top, title = 'memory') {
  const { tickvals, ticktext } = binaryTicks(top);
  return {
    title: { text: `${title} (${binaryUnit(top)[0]})`, standoff: 8 },
    tickmode: 'array', tickvals, ticktext, range: [0, Math.max(top, 1) * 1.08], automargin: true,
  };
}

// The relayout of each panel's two byte charts when "same y scale" is on: the highest top of all panels,
// for the memory timeline and, separately, for the KV chart (its own scale, shared across runs).
export function sharedAxes(panels) {
  const top = Math.max(0, ...panels.map((p) => p.top || 0));
  const kvTop = Math.max(0, ...panels.map((p) => p.kvTop || 0));
  const relayout = (axis) => ({
    'yaxis.range': axis.range, 'yaxis.tickvals': axis.tickvals, 'yaxis.ticktext': axis.ticktext,
    'yaxis.title.text': axis.title.text,
  });
  return { timeline: relayout(bytesAxis(top)), kv: relayout(bytesAxis(kvTop, 'KV')) };
}

// The seconds a panel's two time charts (memory by category, KV) both span, as the HTML report's panels share
// one x axis: every device's events, every marker and the KV final mark, a little padding each side so that
// a marker at either end is drawn whole. Each chart's own autorange differed: the memory chart reaches back
// to a step that began before the first memory event (a run without a profiler: step 1 at -0.77 s, its KV
// log's first line is the prefill's), the KV chart starts at 0, and the same second sat apart on the two.
// null: nothing to span.
export function timeSpan(timeline) {
  let lo = Infinity;
  let hi = -Infinity;
  const take = (t) => {
    if (typeof t !== 'number') return;
    lo = Math.min(lo, t);
    hi = Math.max(hi, t);
  };
  for (const dev of timeline.devices) for (const t of dev.t_s) take(t);
  for (const mark of timeline.markers) take(mark.t_s);
  if (timeline.kv_final) take(timeline.kv_final.t_s);
  if (lo > hi) return null;
  const pad = (hi - lo) * 0.02 || 0.5;
  return [lo - pad, hi + pad];
}

// Where the KV log's final figures are taken (the summary's "KV final": the end of the last step), on the KV
// chart, as the HTML report marks it: a cache generate() dropped as it returned leaves the line at 0 B after
// it, and the summary's figure is not that 0. `kvFinal`: the timeline's `kv_final`, null for none.
export function kvFinalTrace(kvFinal) {
  if (!kvFinal) return null;
  return {
    type: 'scatter', mode: 'markers', name: 'KV final', x: [kvFinal.t_s], y: [kvFinal.bytes], text: [kvFinal.label],
    marker: { symbol: 'diamond', size: 9, color: '#d62728' }, hovertemplate: '%{text}<extra></extra>',
    showlegend: false,
  };
}

// An eviction marker's hover: tokens over every batch row (the report's per-layer figure), by kind, and the
// steps a downsampled column stands for.
const EVICTION_KINDS = { window: 'sliding window', press: 'press', crop: 'crop' };
export function evictionText(e) {
  const kinds = Object.entries(e.by_kind || {}).map(([k, n]) => `${EVICTION_KINDS[k] || k} ${grouped(n, 0)}`);
  const first = e.first_step ?? e.step;
  const where = first !== e.step ? `steps ${first}-${e.step}` : `step ${e.step}`;
  return `${where}, L${e.layer}: ${grouped(e.evicted_tokens, 0)} tokens evicted (all rows)`
    + (kinds.length ? `<br>${kinds.join(', ')}` : '');
}

// Ticks of the step axis every 1, 2, 5, 10, 20... steps: about ten at most, never between two steps
// (plotly's own ticks halve a short run's steps, which its 'd' format then prints twice: "1 1 2 2 3").
export function stepTick(span) {
  for (let magnitude = 1; ; magnitude *= 10) {
    for (const m of [1, 2, 5]) if (span <= 10 * m * magnitude) return m * magnitude;
  }
}

// The KV-per-layer heatmap: whole numbers on the step axis (phase in the hover), colours from zero so
// that a constant cache is one colour, not a gradient across a rounding error, and a colour bar in binary
// units.
export function heatmapFigure(layers) {
  const zmax = Math.max(0, ...layers.kv_bytes.flat());
  const phaseOf = new Map(layers.steps.map((s, i) => [s, layers.phases[i] || '']));
  const text = layers.kv_bytes.map((row) => row.map((v) => humanBytes(v)));
  const ticks = binaryTicks(zmax || 1, 4);
  const traces = [{
    type: 'heatmap', z: layers.kv_bytes, x: layers.steps, y: layers.layers.map((l) => `L${l}`),
    colorscale: 'Reds', zmin: 0, zmax: zmax || 1, text,
    customdata: layers.kv_bytes.map(() => layers.steps.map((s) => phaseOf.get(s))),
    colorbar: { title: { text: 'KV' }, tickmode: 'array', tickvals: ticks.tickvals, ticktext: ticks.ticktext },
    hovertemplate: 'step %{x} (%{customdata})<br>%{y}: %{text}<extra></extra>',
  }];
  const shown = new Set(layers.steps);
  const evictions = layers.evictions.filter((e) => shown.has(e.step));
  if (evictions.length) {
    traces.push({
      type: 'scatter', mode: 'markers', name: 'eviction', x: evictions.map((e) => e.step),
      y: evictions.map((e) => `L${e.layer}`), text: evictions.map(evictionText),
      marker: { symbol: 'triangle-down', color: '#9467bd', size: 8 }, hovertemplate: '%{text}<extra></extra>',
      showlegend: false,
    });
  }
  const subtitle = layers.steps.length < layers.steps_total ? ` (${layers.steps.length} of ${layers.steps_total} steps)` : '';
  const layout = {
    title: { text: `KV bytes per layer at the end of each step${subtitle}`, font: { size: 13 } },
    height: Math.min(560, 180 + 18 * layers.layers.length), margin: { t: 36, l: 64, r: 16, b: 56 },
    template: 'plotly_white',
    xaxis: {
      type: 'linear', title: { text: 'step (1 = prefill)', standoff: 6 }, automargin: true, tickformat: 'd',
      tickmode: 'linear', tick0: 0, dtick: stepTick(Math.max(...layers.steps) - Math.min(...layers.steps)),
    },
    yaxis: { type: 'category', automargin: true },
  };
  return { traces, layout };
}
