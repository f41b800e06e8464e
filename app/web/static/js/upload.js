// Upload page: POST /v1/predict (multipart) with the chosen options; the whole file's emotion and
// text sentiment, a timeline per speaker and every segment with its words and emotion bars.

import { api, mountKeyField } from "./api.js";
import { renderTimelines } from "./timeline.js";
import { el, emotionBars, errorText, labelChip, resultItem, sentimentBadge } from "./ui.js";

const $ = (id) => document.getElementById(id);

async function loadModels() {
  try {
    const info = await api("/v1/models");
    const names = info.models.map((m) => m.id).concat([info.ensemble || "ensemble"]);
    $("models").replaceChildren(
      ...names.map((name) => el("label", { class: "check" }, el("input", { type: "checkbox", value: name }), name)),
      el("span", { class: "muted small", text: "(none ticked: the server's default set)" }),
    );
  } catch (err) {
    $("models").textContent = `models unavailable: ${errorText(err)}`;
  }
}

function query() {
  const params = new URLSearchParams();
  const models = [...document.querySelectorAll("#models input:checked")].map((i) => i.value);
  if (models.length) params.set("models", models.join(","));
  params.set("channels", $("channels").value);
  params.set("segmentation", $("segmentation").value);
  params.set("words", $("words").checked ? "true" : "false");
  const roles = $("roles").value.trim();
  if (roles) params.set("roles", roles);
  const sessionId = $("session-id").value.trim();
  if (sessionId) params.set("session_id", sessionId);
  return params.toString();
}

function render(response, file, elapsedMs) {
  const segments = response.segments || [];
  const timing = response.timing_ms || {};
  const facts = [
    ["file", file.name],
    ["duration", `${response.duration_s.toFixed(2)} s`],
    ["language", response.language || "–"],
    ["models", (response.models || []).map((m) => m.id).join(", ") || "–"],
    ["time", `${Math.round(elapsedMs)} ms in the browser, ${Math.round(timing.total || 0)} ms on the server`],
  ];
  if (response.session_id) facts.push(["session", response.session_id]);
  const parts = [
    el("dl", { class: "meta" }, facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })])),
    response.session_id
      ? el("p", {}, el("a", { href: `/ui/dashboard#session=${encodeURIComponent(response.session_id)}`, text: "open the session in the dashboard" }))
      : null,
    el("p", { class: "text transcript", text: response.transcript || "(no words)" }),
    el("div", { class: "result-head" }, labelChip(response.emotion), sentimentBadge(response.text_sentiment)),
    response.emotion ? emotionBars(response.emotion) : el("p", { class: "muted", text: "no speech" }),
  ];
  $("overall").replaceChildren(...parts.filter(Boolean));
  renderTimelines($("timelines"), $("legend"), segments);
  $("segments").replaceChildren(...segments.map((s, i) => resultItem({ seq: i + 1, ...s }, { showWords: true })));
  $("seg-count").textContent = `(${segments.length})`;
  $("result").hidden = false;
}

async function submit(event) {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) return;
  const body = new FormData();
  body.append("file", file, file.name);
  $("submit").disabled = true;
  $("status").className = "status";
  $("status").textContent = `analysing ${file.name}…`;
  const t0 = performance.now();
  try {
    const response = await api(`/v1/predict?${query()}`, { method: "POST", body });
    render(response, file, performance.now() - t0);
    $("status").textContent = `done: ${(response.segments || []).length} segment(s)`;
  } catch (err) {
    $("status").className = "status error";
    $("status").textContent = errorText(err);
  } finally {
    $("submit").disabled = false;
  }
}

mountKeyField();
$("upload-form").addEventListener("submit", submit);
document.addEventListener("api-key-changed", loadModels);
loadModels();
