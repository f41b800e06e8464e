// Shared rendering: DOM building without innerHTML (server text is always set as text), emotion
// bars, labels, text-sentiment badges and the voice/text disagreement rule. Reads result shape 2.0
// and tolerates 1.x (no score, ranking, text_sentiment or role).

const COLORS = {
  angry: "#d9534f",
  happy: "#e8a33d",
  neutral: "#8a94a6",
  sad: "#4a7bd0",
  calm: "#5bb5a2",
  fearful: "#8e6cc4",
  disgust: "#6b8e23",
  surprised: "#c45fa0",
};
// negative voice labels (summaries, alerts, disagreement), as in the server's contract
export const NEGATIVE = new Set(["angry", "sad", "fearful", "disgust"]);

/** el("div", {class: "x", dataset: {seq: 1}}, "text", child) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function labelColor(label) {
  if (COLORS[label]) return COLORS[label];
  let h = 0;
  for (const c of String(label)) h = (h * 31 + c.charCodeAt(0)) % 360;
  return `hsl(${h} 45% 50%)`;
}

/** [{label, score}] highest first: emotion.ranking (2.0) or sorted probabilities (1.x). */
export function ranking(emotion) {
  if (!emotion) return [];
  if (Array.isArray(emotion.ranking) && emotion.ranking.length) return emotion.ranking;
  return Object.entries(emotion.probabilities || {})
    .map(([label, score]) => ({ label, score }))
    .sort((a, b) => b.score - a.score);
}

/** probability of the label: emotion.score (2.0) or probabilities[label] (1.x). */
export function score(emotion) {
  if (!emotion) return null;
  if (typeof emotion.score === "number") return emotion.score;
  const p = (emotion.probabilities || {})[emotion.label];
  return typeof p === "number" ? p : null;
}

export const pct = (p) => `${Math.round(p * 100)}%`;

export function emotionBars(emotion) {
  const rows = ranking(emotion).map(({ label, score: p }) => {
    const fill = el("span", { class: "fill" });
    fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`; // CSSOM: allowed by the CSP
    fill.style.backgroundColor = labelColor(label);
    return el(
      "div",
      { class: "bar-row", dataset: { label, p: p.toFixed(4) } },
      el("span", { class: "bar-label", text: label }),
      el("span", { class: "bar" }, fill),
      el("span", { class: "bar-value", text: pct(p) }),
    );
  });
  return el("div", { class: "bars" }, rows);
}

export function labelChip(emotion) {
  if (!emotion) return el("span", { class: "chip muted", text: "no emotion" });
  const chip = el("span", { class: "chip emo", dataset: { label: emotion.label } }, emotion.label);
  chip.style.backgroundColor = labelColor(emotion.label);
  const s = score(emotion);
  if (s !== null) chip.append(el("span", { class: "chip-score", text: ` ${s.toFixed(2)}` }));
  return chip;
}

export function sentimentBadge(sentiment) {
  const label = sentimentLabel(sentiment);
  if (!label) return null;
  const compound = typeof sentiment.compound === "number" ? ` ${sentiment.compound.toFixed(2)}` : "";
  return el("span", {
    class: `chip sentiment sent-${label.replace(/[^a-z]/g, "")}`,
    title: `text sentiment (${sentiment.source || "text"})`,
    dataset: { sentiment: label },
    text: `text: ${label}${compound}`,
  });
}

/** The text sentiment's label; from VADER's compound (>= 0.05 / <= -0.05) when the label is missing. */
export function sentimentLabel(sentiment) {
  if (!sentiment) return null;
  if (sentiment.label) return sentiment.label;
  const c = sentiment.compound;
  if (typeof c !== "number") return null;
  return c >= 0.05 ? "positive" : c <= -0.05 ? "negative" : "neutral";
}

/** Why text and voice disagree (text positive & voice negative, text negative & voice happy), or null. */
export function disagreement(result) {
  const text = result && sentimentLabel(result.text_sentiment);
  const voice = result && result.emotion && result.emotion.label;
  if (!text || !voice) return null;
  if (text === "positive" && NEGATIVE.has(voice)) return `positive words, ${voice} voice`;
  if (text === "negative" && voice === "happy") return "negative words, happy voice";
  return null;
}

export function fmtTime(seconds) {
  if (typeof seconds !== "number" || !isFinite(seconds)) return "–";
  const m = Math.floor(seconds / 60);
  const s = seconds - m * 60;
  return `${m}:${s.toFixed(1).padStart(4, "0")}`;
}

/** ISO-8601 string (2.0) or Unix seconds (1.x) -> Date, or null. */
export function toDate(value) {
  if (value === null || value === undefined) return null;
  if (typeof value === "number") return new Date(value * 1000);
  const d = new Date(value);
  return isNaN(d.getTime()) ? null : d;
}

export function ago(value) {
  const d = toDate(value);
  if (!d) return "";
  const s = Math.max(0, (Date.now() - d.getTime()) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return d.toLocaleString();
}

/** "customer" or "channel 1": the group a result belongs to on timelines and summaries. */
export function groupOf(result) {
  return result.role ? String(result.role) : `channel ${result.channel ?? 0}`;
}

/** One analysed utterance as a list item (mic finals, dashboard finals, upload segments). */
export function resultItem(result, extra = {}) {
  const why = disagreement(result);
  const words =
    Array.isArray(result.words) && result.words.length && extra.showWords
      ? el(
          "p",
          { class: "words" },
          result.words.map((w) => {
            const span = el("span", {
              class: "word",
              title: `${w.start.toFixed(2)}–${w.end.toFixed(2)} s, confidence ${w.confidence.toFixed(2)}`,
              text: w.word,
            });
            span.style.opacity = String(0.35 + 0.65 * w.confidence);
            return span;
          }),
        )
      : null;
  return el(
    "li",
    {
      class: `result${why ? " disagree" : ""}`,
      dataset: {
        seq: result.seq ?? "",
        channel: result.channel ?? 0,
        label: (result.emotion && result.emotion.label) || "",
        ...(extra.dataset || {}),
      },
    },
    el(
      "div",
      { class: "result-head" },
      el("span", { class: "time", text: `${fmtTime(result.start)}–${fmtTime(result.end)}` }),
      el("span", { class: "who", text: groupOf(result) }),
      labelChip(result.emotion),
      sentimentBadge(result.text_sentiment),
      why ? el("span", { class: "chip warn", title: "text sentiment and voice disagree", text: why }) : null,
      extra.note ? el("span", { class: "note", text: extra.note }) : null,
    ),
    el("p", { class: "text", text: result.text || "(no words)" }),
    words,
    result.emotion ? emotionBars(result.emotion) : null,
  );
}

export function errorText(err) {
  if (err && err.error) return `${err.error}: ${err.detail}`;
  return String((err && err.message) || err);
}
