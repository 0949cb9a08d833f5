// The log10 feature-density histogram (the card's, or built from feature summaries) as inline SVG.

import { fmt, h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, value);
  el.append(...children);
  return el;
}

/** Same shape as the trainer's card.density_histogram, from a list of densities (null = no statistics). */
export function densityHistogram(densities, bins = 30) {
  const known = densities.filter((d) => d !== null && d !== undefined);
  const alive = known.filter((d) => d > 0).map((d) => Math.log10(d));
  const low = Math.min(-1, Math.floor(Math.min(0, ...alive)));
  const edges = Array.from({ length: bins + 1 }, (_, i) => low + (i * (0 - low)) / bins);
  const counts = new Array(bins).fill(0);
  for (const x of alive) counts[Math.min(bins - 1, Math.floor(((x - low) / (0 - low)) * bins))] += 1;
  return { log10_bin_edges: edges, counts, never_active: known.length - alive.length };
}

/** An SVG bar chart of a density histogram; `marker` (a density) draws a line where one feature sits. */
export function histogramChart(histogram, marker = null, title = "Feature density") {
  const width = 560, height = 200, pad = { l: 44, r: 10, t: 12, b: 36 };
  const edges = histogram.log10_bin_edges, counts = histogram.counts;
  const x0 = edges[0], x1 = edges[edges.length - 1], top = Math.max(1, ...counts);
  const x = (v) => pad.l + ((v - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const y = (c) => height - pad.b - (c / top) * (height - pad.t - pad.b);
  const bars = counts.map((c, i) =>
    s("rect", { x: x(edges[i]), y: y(c), width: Math.max(0, x(edges[i + 1]) - x(edges[i]) - 1),
                height: height - pad.b - y(c), class: "bar" },
      s("title", {}, `${c} features with log10 density in [${fmt(edges[i], 2)}, ${fmt(edges[i + 1], 2)})`)));
  const ticks = [];
  for (let t = Math.ceil(x0); t <= x1; t += 1) {
    ticks.push(s("line", { x1: x(t), x2: x(t), y1: height - pad.b, y2: height - pad.b + 4, class: "axis" }));
    ticks.push(s("text", { x: x(t), y: height - pad.b + 16, "text-anchor": "middle" }, `1e${t}`));
  }
  const parts = [
    ...bars,
    s("line", { x1: pad.l, x2: width - pad.r, y1: height - pad.b, y2: height - pad.b, class: "axis" }),
    s("text", { x: pad.l - 6, y: pad.t + 8, "text-anchor": "end" }, String(top)),
    s("text", { x: pad.l - 6, y: height - pad.b, "text-anchor": "end" }, "0"),
    s("text", { x: width / 2, y: height - 4, "text-anchor": "middle" }, "feature density (fraction of tokens, log scale)"),
    ...ticks,
  ];
  if (marker !== null && marker > 0) {
    const mx = x(Math.max(x0, Math.min(x1, Math.log10(marker))));
    parts.push(s("line", { x1: mx, x2: mx, y1: pad.t, y2: height - pad.b, class: "marker" }));
  }
  const label = `${title}: histogram of log10 density over features; ${histogram.never_active} never active` +
    (marker !== null ? `; this feature at ${fmt(marker)}` : "");
  return h("figure", { class: "chart" },
    s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label }, ...parts),
    h("figcaption", {}, `${title} · ${histogram.never_active} never active` +
      (marker !== null ? ` · this feature: ${fmt(marker)} (red line)` : "")));
}
