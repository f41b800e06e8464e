// Emotion over time as inline SVG, one chart per speaker (role, or channel when no roles):
// a line per emotion through each utterance's probability (at the utterance's middle), and below
// it a band of the utterances coloured by their label. Hover shows the utterance's text.

import { el, fmtTime, groupOf, labelColor, pct } from "./ui.js";

const NS = "http://www.w3.org/2000/svg";
const ORDER = ["angry", "happy", "neutral", "sad", "calm", "fearful", "disgust", "surprised"];

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

const tip = (text) => svg("title", {}, text);

export function labelsOf(results) {
  const seen = new Set();
  for (const r of results) for (const label of Object.keys((r.emotion && r.emotion.probabilities) || {})) seen.add(label);
  const known = ORDER.filter((l) => seen.has(l));
  return known.concat([...seen].filter((l) => !ORDER.includes(l)).sort());
}

function tickStep(span) {
  for (const step of [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600]) if (span / step <= 8) return step;
  return 7200;
}

/** One chart (an <svg>) of results that belong to one speaker. */
export function chart(results, labels, { width = 760, height = 170, until = null } = {}) {
  const m = { left: 40, right: 12, top: 8, bottom: 40 };
  const plotH = height - m.top - m.bottom;
  const plotW = width - m.left - m.right;
  const t1 = Math.max(1, until || 0, ...results.map((r) => r.end || 0));
  const x = (t) => m.left + (plotW * t) / t1;
  const y = (p) => m.top + plotH * (1 - p);
  const root = svg("svg", {
    class: "timeline",
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": "emotion probability over time",
  });
  for (const p of [0, 0.5, 1]) {
    root.append(svg("line", { class: "grid", x1: m.left, x2: width - m.right, y1: y(p), y2: y(p) }));
    root.append(svg("text", { class: "axis", x: m.left - 6, y: y(p) + 4, "text-anchor": "end" }, p === 0 ? "0" : pct(p)));
  }
  const step = tickStep(t1);
  for (let t = 0; t <= t1 + 1e-9; t += step) {
    root.append(svg("text", { class: "axis", x: x(t), y: height - 4, "text-anchor": "middle" }, fmtTime(t)));
  }
  const withEmotion = results.filter((r) => r.emotion && r.emotion.probabilities).sort((a, b) => a.start - b.start);
  for (const label of labels) {
    const color = labelColor(label);
    const pts = withEmotion.map((r) => [x((r.start + r.end) / 2), y(r.emotion.probabilities[label] ?? 0), r]);
    if (pts.length > 1) {
      root.append(
        svg("polyline", {
          class: "series",
          points: pts.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" "),
          stroke: color,
          "data-label": label,
        }),
      );
    }
    for (const [px, py, r] of pts) {
      root.append(
        svg(
          "circle",
          { class: "point", cx: px.toFixed(1), cy: py.toFixed(1), r: 3, fill: color, "data-label": label },
          tip(`${label} ${pct(r.emotion.probabilities[label] ?? 0)} at ${fmtTime(r.start)}: ${r.text || ""}`),
        ),
      );
    }
  }
  const bandY = m.top + plotH + 8;
  for (const r of results) {
    const label = r.emotion ? r.emotion.label : null;
    root.append(
      svg(
        "rect",
        {
          class: "utterance",
          x: x(r.start).toFixed(1),
          y: bandY,
          width: Math.max(1.5, x(r.end) - x(r.start)).toFixed(1),
          height: 10,
          fill: label ? labelColor(label) : "#ccc",
          "data-seq": r.seq ?? "",
        },
        tip(`${fmtTime(r.start)}–${fmtTime(r.end)} ${label || ""}: ${r.text || ""}`),
      ),
    );
  }
  return root;
}

export function legend(labels) {
  return labels.map((label) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.backgroundColor = labelColor(label);
    return el("span", { class: "legend-item" }, swatch, label);
  });
}

/** Replace container's content with one titled chart per speaker; legendBox gets the labels. */
export function renderTimelines(container, legendBox, results) {
  const labels = labelsOf(results);
  legendBox.replaceChildren(...legend(labels));
  const groups = new Map();
  for (const r of results) {
    const key = groupOf(r);
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(r);
  }
  const until = Math.max(1, ...results.map((r) => r.end || 0)); // one time axis for every speaker
  const keys = [...groups.keys()].sort();
  container.replaceChildren(
    ...keys.map((key) => {
      const rs = groups.get(key);
      const channel = rs[0].channel ?? 0;
      const title = rs[0].role ? `${key} (channel ${channel})` : key;
      return el(
        "figure",
        { class: "timeline-group", dataset: { group: key } },
        el("figcaption", { text: `${title} · ${rs.length} utterance${rs.length === 1 ? "" : "s"}` }),
        chart(rs, labels, { until }),
      );
    }),
  );
  if (!results.length) container.append(el("p", { class: "muted", text: "no utterances yet" }));
}
