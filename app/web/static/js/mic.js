// Microphone page: getUserMedia -> AudioWorklet (16 kHz mono int16, 20-ms frames) -> WS /v1/stream;
// live partials, finals with emotion bars, and latency as this page sees it.
//
// Latency: every 20-ms frame is stamped (performance.now()) when the worklet hands it over, so an
// audio time maps back to the moment it was captured. "First partial" counts from the speech start
// (utterance start + the server's 200-ms pre-pad) to the first partial on screen; "final" from the
// speech end (utterance end - the 150-ms post-pad) to the final on screen. window.micStats holds
// the raw numbers (the browser test reads them).

import { api, mountKeyField, wsUrl } from "./api.js";
import { el, errorText, resultItem } from "./ui.js";

const FRAME_MS = 20;
const PRE_PAD_S = 0.2; // the server's default utterance padding (EMOTION_UTTERANCE_PRE_PAD_MS)
const POST_PAD_S = 0.15; // (EMOTION_UTTERANCE_POST_PAD_MS)

const $ = (id) => document.getElementById(id);

const stats = {
  state: "idle",
  sessionId: null,
  contextRate: null,
  framesCaptured: 0,
  framesSent: 0,
  utterances: {}, // "channel:utterance" -> timings and the final's text and label
  warnings: [],
  error: null,
  end: null,
};
window.micStats = stats;

let live = null; // {ws, ctx, node, media, queue, frameWalls, stopTimer}

function setState(state, text) {
  stats.state = state;
  document.body.dataset.state = state;
  $("status").textContent = text || state;
  $("start").disabled = state !== "idle";
  $("stop").disabled = state !== "streaming";
}

function wallAt(audioS) {
  const walls = live.frameWalls;
  const i = Math.min(walls.length - 1, Math.max(0, Math.floor((audioS * 1000) / FRAME_MS)));
  return walls[i];
}

function utterance(msg) {
  const key = `${msg.channel}:${msg.utterance}`;
  if (!stats.utterances[key]) stats.utterances[key] = { channel: msg.channel, utterance: msg.utterance };
  return stats.utterances[key];
}

function showMeter(rms, peak) {
  const db = 20 * Math.log10(Math.max(rms, 1e-6));
  const level = Math.max(0, Math.min(1, (db + 60) / 60));
  $("meter-fill").style.width = `${level * 100}%`;
  $("meter-fill").classList.toggle("clip", peak >= 0.99);
  $("meter-db").textContent = `${db.toFixed(0)} dBFS`;
}

function showPartial(msg) {
  const line = $("partial");
  line.replaceChildren(
    el("span", { class: "who", text: `channel ${msg.channel}` }),
    el("span", { class: "confirmed", text: msg.confirmed }),
    el("span", { class: "unconfirmed", text: msg.unconfirmed }),
  );
  line.dataset.utterance = `${msg.channel}:${msg.utterance}`;
  line.classList.remove("empty");
}

function clearPartial(key) {
  const line = $("partial");
  if (line.dataset.utterance === key) {
    line.replaceChildren("…");
    line.classList.add("empty");
    delete line.dataset.utterance;
  }
}

function showLatency() {
  const done = Object.values(stats.utterances).filter((u) => u.finalMs !== undefined);
  const last = done[done.length - 1];
  const parts = [];
  if (last) {
    if (last.firstPartialMs !== undefined) parts.push(`first partial ${Math.round(last.firstPartialMs)} ms after speech start`);
    parts.push(`final ${Math.round(last.finalMs)} ms after speech end`);
    parts.push(`server ${Math.round(last.serverLatencyMs)} ms`);
  }
  $("latency").textContent = parts.length ? parts.join(" · ") : "–";
}

function onMessage(msg) {
  const now = performance.now();
  if (msg.type === "ready") {
    stats.sessionId = msg.session_id;
    $("session").replaceChildren(
      el("code", { text: msg.session_id }),
      " ",
      el("a", { href: `/ui/dashboard#session=${encodeURIComponent(msg.session_id)}`, text: "open in dashboard" }),
    );
    $("models-used").textContent = (msg.models || []).join(", ");
    setState("streaming", "streaming");
    for (const frame of live.queue) live.ws.send(frame);
    stats.framesSent += live.queue.length;
    live.queue = [];
  } else if (msg.type === "partial") {
    const u = utterance(msg);
    if (u.firstPartialAt === undefined) {
      u.firstPartialAt = now;
      u.partialStart = msg.start;
      u.firstPartialMs = now - wallAt(msg.start + PRE_PAD_S);
    }
    showPartial(msg);
  } else if (msg.type === "final") {
    const u = utterance(msg);
    Object.assign(u, {
      finalAt: now,
      start: msg.start,
      end: msg.end,
      seq: msg.seq,
      text: msg.text,
      label: msg.emotion ? msg.emotion.label : null,
      reason: msg.reason,
      serverLatencyMs: msg.latency_ms,
      finalMs: now - wallAt(Math.max(msg.start, msg.end - POST_PAD_S)),
    });
    clearPartial(`${msg.channel}:${msg.utterance}`);
    const note = `final +${Math.round(u.finalMs)} ms after speech` +
      (u.firstPartialMs !== undefined ? ` · first partial +${Math.round(u.firstPartialMs)} ms` : "");
    const item = resultItem(msg, {
      note,
      showWords: true,
      dataset: {
        utterance: `${msg.channel}:${msg.utterance}`,
        finalMs: u.finalMs.toFixed(1),
        firstPartialMs: u.firstPartialMs !== undefined ? u.firstPartialMs.toFixed(1) : "",
      },
    });
    $("finals").append(item);
    item.scrollIntoView({ block: "nearest" });
    showLatency();
  } else if (msg.type === "warning") {
    stats.warnings.push(msg);
    log(`warning ${msg.code}: ${msg.detail}`);
  } else if (msg.type === "error") {
    stats.error = msg;
    log(`error ${msg.error}: ${msg.detail}`, true);
  } else if (msg.type === "end") {
    stats.end = msg.stats;
    log(`ended: ${msg.stats.finals} finals, ${msg.stats.audio_s.toFixed(1)} s of audio`);
  }
}

function log(text, isError = false) {
  const item = el("li", { class: isError ? "error" : "", text: `${new Date().toLocaleTimeString()} ${text}` });
  $("log").prepend(item);
}

function startMessage() {
  const start = { type: "start", sample_rate: 16000, encoding: "pcm_s16le", channels: 1 };
  const models = [...document.querySelectorAll("#models input:checked")].map((i) => i.value);
  if (models.length) start.models = models;
  const role = $("role").value.trim();
  if (role) start.roles = [role];
  start.words = $("words").checked;
  if (!$("partials").checked) start.partials = false;
  start.metadata = { source: "browser-mic" };
  return start;
}

async function start() {
  setState("starting", "asking for the microphone…");
  let media = null;
  let ctx = null;
  try {
    media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    ctx = new AudioContext(); // the device's rate; the worklet resamples to 16 kHz
    await ctx.audioWorklet.addModule("/ui/static/js/pcm-worklet.js");
    const node = new AudioWorkletNode(ctx, "pcm-downsampler", {
      processorOptions: { targetRate: 16000, frameMs: FRAME_MS },
    });
    stats.contextRate = ctx.sampleRate;
    live = { media, ctx, node, ws: null, queue: [], frameWalls: [], stopTimer: null, audioClosed: false };
    stats.utterances = {};
    stats.framesCaptured = stats.framesSent = 0;
    stats.end = stats.error = null;
    $("finals").replaceChildren();
    node.port.onmessage = ({ data }) => {
      if (!live || live.node !== node) return;
      live.frameWalls.push(performance.now());
      stats.framesCaptured += 1;
      showMeter(data.rms, data.peak);
      if (stats.state === "streaming" && live.ws.readyState === WebSocket.OPEN) {
        live.ws.send(data.pcm);
        stats.framesSent += 1;
      } else if (stats.state === "starting") {
        live.queue.push(data.pcm); // sent once the server is ready: audio time 0 = first captured frame
      }
    };
    ctx.createMediaStreamSource(media).connect(node);
    const mute = ctx.createGain(); // the graph must pull the worklet; nothing is played
    mute.gain.value = 0;
    node.connect(mute).connect(ctx.destination);
    setState("starting", "connecting…");
    const ws = new WebSocket(wsUrl("/v1/stream"));
    ws.binaryType = "arraybuffer";
    live.ws = ws;
    ws.onopen = () => ws.send(JSON.stringify(startMessage()));
    ws.onmessage = (event) => onMessage(JSON.parse(event.data));
    ws.onclose = (event) => closed(event);
  } catch (err) {
    log(`could not start: ${errorText(err)}`, true);
    if (live && live.media === media) teardownAudio();
    else {
      if (media) media.getTracks().forEach((t) => t.stop());
      if (ctx) ctx.close().catch(() => {});
    }
    setState("idle", `could not start: ${err.name || "error"}`);
  }
}

function teardownAudio() {
  if (!live || live.audioClosed) return; // stop() and the socket's close both come here
  live.audioClosed = true;
  live.node.port.postMessage("stop");
  live.media.getTracks().forEach((t) => t.stop());
  if (live.ctx.state !== "closed") live.ctx.close().catch(() => {});
}

function stop() {
  if (!live || stats.state !== "streaming") return;
  setState("stopping", "finishing the last utterance…");
  teardownAudio();
  live.ws.send(JSON.stringify({ type: "stop" }));
  live.stopTimer = setTimeout(() => live && live.ws.close(), 60000); // the server answers end, then closes
}

function closed(event) {
  if (live && live.stopTimer) clearTimeout(live.stopTimer);
  teardownAudio();
  const clean = event.code === 1000;
  let reason = "";
  if (!clean && event.reason) {
    try {
      const body = JSON.parse(event.reason);
      reason = `${body.error}: ${body.detail || ""}`;
    } catch {
      reason = event.reason;
    }
  }
  stats.closeCode = event.code;
  setState("idle", clean ? "stopped" : `closed ${event.code} ${reason}`.trim());
  if (!clean) log(`connection closed ${event.code} ${reason}`, true);
}

async function loadModels() {
  try {
    const info = await api("/v1/models");
    const names = info.models.map((m) => m.id).concat([info.ensemble || "ensemble"]);
    $("models").replaceChildren(
      ...names.map((name) =>
        el("label", { class: "check" }, el("input", { type: "checkbox", value: name }), name),
      ),
    );
  } catch (err) {
    $("models").textContent = `models unavailable (${errorText(err)}); the server's default set is used`;
  }
}

mountKeyField();
$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
document.addEventListener("api-key-changed", loadModels);
setState("idle", "idle");
loadModels();
