// Live dashboard: the session list and, per session, emotion over time per speaker, the utterances,
// the call summary and alerts.
//
// Live updates use server-sent events when the server has them (GET /v1/events for the list,
// GET /v1/sessions/{id}/events for one session), found in /openapi.json; otherwise the list is
// polled every 2 s and a session is followed with the results long poll (?after=SEQ&wait=10).
// An event stream that fails falls back to polling. window.dashStats.seen records when each
// result appeared on the page (epoch ms; the browser test and bench read it).

import { ApiError, api, hasRoute, mountKeyField, withKey } from "./api.js";
import { renderTimelines } from "./timeline.js";
import {
  NEGATIVE,
  ago,
  disagreement,
  el,
  errorText,
  groupOf,
  labelChip,
  labelColor,
  pct,
  resultItem,
  toDate,
} from "./ui.js";

const POLL_MS = 2000;
const LONG_POLL_S = 10;
const PAGE = 1000;

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

const stats = { listMode: null, viewMode: null, liveMode: null, seen: {}, errors: [] };
window.dashStats = stats;

const sessions = new Map(); // id -> session JSON as listed
let listSource = null;
let pollTimer = null;
let view = null; // the open session: {id, results: Map seq -> result, lastSeq, abort, source, ...}

// --- the session list ------------------------------------------------------------------------

function setListMode(mode) {
  stats.listMode = mode;
  $("list-mode").textContent = mode === "events" ? "live (events)" : `polling every ${POLL_MS / 1000} s`;
}

async function loadList() {
  const state = $("active-only").checked ? "&state=active" : "";
  try {
    const data = await api(`/v1/sessions?limit=100${state}`);
    sessions.clear();
    for (const s of data.sessions) sessions.set(s.id, s);
    $("list-error").textContent = "";
    renderList();
  } catch (err) {
    $("list-error").textContent = errorText(err);
  }
}

function renderList() {
  const activeOnly = $("active-only").checked;
  const items = [...sessions.values()]
    .filter((s) => !activeOnly || s.state === "active")
    .sort((a, b) => (toDate(b.updated_at) || 0) - (toDate(a.updated_at) || 0));
  $("session-list").replaceChildren(
    ...items.map((s) => {
      const last = s.last_result && s.last_result.emotion;
      return el(
        "li",
        {
          class: `session ${s.state}${view && view.id === s.id ? " current" : ""}${s._alerts ? " alerted" : ""}`,
          dataset: { sessionId: s.id, state: s.state, count: s.result_count ?? 0 },
        },
        el(
          "a",
          { href: `#session=${enc(s.id)}`, title: s.id },
          el("span", { class: "sid", text: s.id.length > 18 ? `${s.id.slice(0, 16)}…` : s.id }),
          el("span", { class: `chip state-${s.state}`, text: s.state }),
          el("span", { class: "muted small", text: `${s.source} · ${s.result_count ?? 0} utt.` }),
          last ? labelChip(last) : null,
          s._alerts ? el("span", { class: "chip warn", text: `${s._alerts} alert${s._alerts > 1 ? "s" : ""}` }) : null,
          el("span", { class: "muted small when", text: ago(s.updated_at) }),
        ),
      );
    }),
  );
  if (!items.length) $("session-list").append(el("li", { class: "muted", text: "no sessions yet" }));
}

function startPolling() {
  if (listSource) listSource.close();
  listSource = null;
  setListMode("polling");
  const tick = async () => {
    await loadList();
    pollTimer = setTimeout(tick, POLL_MS);
  };
  clearTimeout(pollTimer);
  tick();
}

function onListEvent(kind, data) {
  const id = data.session_id;
  if (view && view.viaList && id === view.id) followFromList(view, kind, data);
  if (data.session) sessions.set(id, { ...(sessions.get(id) || {}), ...data.session });
  const s = sessions.get(id);
  if (kind === "result" && data.result) {
    if (s) {
      s.last_result = data.result;
      s.last_seq = Math.max(s.last_seq || 0, data.result.seq || 0);
      s.result_count = Math.max(s.result_count || 0, s.last_seq); // seq counts results: replays cannot inflate it
      s.updated_at = data.result.received_at || new Date().toISOString();
    } else {
      refreshOne(id);
    }
  } else if (kind === "alert" && s) {
    s._alerts = (s._alerts || 0) + 1;
  } else if (!s) {
    refreshOne(id);
  }
  renderList();
}

async function refreshOne(id) {
  try {
    sessions.set(id, await api(`/v1/sessions/${enc(id)}`));
    renderList();
  } catch {
    /* gone, or another tenant's */
  }
}

async function startList() {
  if (listSource) listSource.close();
  listSource = null;
  clearTimeout(pollTimer);
  await loadList();
  if (!(await hasRoute("/v1/events"))) {
    startPolling();
    return;
  }
  const source = new EventSource(withKey("/v1/events"));
  listSource = source;
  setListMode("events");
  let opened = false;
  source.onopen = () => {
    if (opened) {
      loadList(); // reconnected: catch up on what was missed
      if (view && view.viaList) catchUp(view).catch(() => {});
    }
    opened = true;
  };
  source.addEventListener("deleted", (event) => {
    sessions.delete(JSON.parse(event.data).session_id);
    renderList();
  });
  for (const kind of ["created", "result", "ended", "alert"]) {
    source.addEventListener(kind, (event) => onListEvent(kind, JSON.parse(event.data)));
  }
  source.onerror = () => {
    // CLOSED: refused (404, 401, ...) and not retried by the browser; never opened: same outcome
    if (source.readyState === EventSource.CLOSED || !opened) {
      source.close();
      if (listSource === source) listSource = null;
      stats.errors.push("list events failed; polling");
      startPolling();
      if (view && view.viaList) {
        view.viaList = false;
        longPoll(view); // after= is the last seq on the page: nothing is lost or repeated
      }
    }
  };
}

// --- one session ------------------------------------------------------------------------------

function closeView() {
  if (!view) return;
  view.closed = true;
  view.abort.abort();
  if (view.source) view.source.close();
  clearTimeout(view.metaTimer);
  clearTimeout(view.summaryTimer);
  view = null;
}

function setViewMode(mode) {
  stats.viewMode = mode;
  if (mode === "events" || mode === "long-poll") stats.liveMode = mode; // how the last live view was followed
  $("sv-mode").textContent = mode === "events" ? "live (events)" : mode === "long-poll" ? "live (long poll)" : mode;
}

function renderMeta(s) {
  const rows = [
    ["state", s.state + (s.end_reason ? ` (${s.end_reason})` : "")],
    ["source", s.source],
    ["created", toDate(s.created_at) ? toDate(s.created_at).toLocaleString() : "–"],
    [s.ended_at ? "ended" : "updated", toDate(s.ended_at || s.updated_at) ? ago(s.ended_at || s.updated_at) : "–"],
    ["duration", typeof s.duration_s === "number" ? `${s.duration_s.toFixed(1)} s` : "–"],
    ["audio", typeof s.audio_duration_s === "number" ? `${s.audio_duration_s.toFixed(1)} s` : "–"],
    ["utterances", String(s.result_count ?? 0)],
    ["roles", Array.isArray(s.roles) && s.roles.length ? s.roles.join(", ") : "–"],
    ["metadata", s.metadata && Object.keys(s.metadata).length ? JSON.stringify(s.metadata) : "–"],
  ];
  $("sv-meta").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  $("sv-title").textContent = `Session ${s.id}`;
}

function addResults(v, results) {
  if (v.closed || !results.length) return;
  const list = $("sv-results");
  for (const r of results) {
    if (v.results.has(r.seq)) continue;
    v.results.set(r.seq, r);
    v.lastSeq = Math.max(v.lastSeq, r.seq);
    const key = `${v.id}:${r.seq}`;
    if (!(key in stats.seen)) stats.seen[key] = Date.now();
    list.append(resultItem(r, { showWords: false }));
  }
  $("sv-count").textContent = `(${v.results.size})`;
  if (v.session) {
    // keep the header current between the periodic session reads
    const last = results[results.length - 1];
    v.session.result_count = Math.max(v.session.result_count || 0, v.results.size);
    v.session.audio_duration_s = Math.max(v.session.audio_duration_s || 0, ...results.map((r) => r.end || 0));
    if (last.received_at) v.session.updated_at = last.received_at;
    renderMeta(v.session);
  }
  renderTimelines($("sv-timelines"), $("sv-legend"), [...v.results.values()]);
  scheduleSummary(v);
}

function addAlert(v, alert) {
  if (v.closed) return;
  const list = $("sv-alerts");
  if (list.querySelector(".muted")) list.replaceChildren();
  const when = toDate(alert.created_at || alert.at || alert.received_at);
  const what = [alert.name || alert.rule, alert.role, alert.label, typeof alert.score === "number" ? pct(alert.score) : null]
    .filter(Boolean)
    .join(" · ");
  list.append(
    el(
      "li",
      { class: "alert", dataset: { seq: alert.seq ?? "" } },
      el("strong", { text: what || "alert" }),
      when ? el("span", { class: "muted small", text: ` ${when.toLocaleTimeString()}` }) : null,
      alert.text || alert.detail || alert.message ? el("span", { class: "alert-text", text: ` “${alert.text || alert.detail || alert.message}”` }) : null,
    ),
  );
}

async function loadAlerts(v) {
  if (!(await hasRoute("/v1/sessions/{}/alerts"))) {
    $("sv-alerts").replaceChildren(el("li", { class: "muted", text: "this server has no alerts route" }));
    return;
  }
  try {
    const data = await api(`/v1/sessions/${enc(v.id)}/alerts`, { signal: v.abort.signal });
    const alerts = Array.isArray(data) ? data : data.alerts || [];
    $("sv-alerts").replaceChildren(el("li", { class: "muted", text: "none" }));
    for (const a of alerts) addAlert(v, a);
  } catch (err) {
    if (err.name !== "AbortError") $("sv-alerts").replaceChildren(el("li", { class: "error", text: errorText(err) }));
  }
}

// --- call summary -----------------------------------------------------------------------------

function scheduleSummary(v) {
  clearTimeout(v.summaryTimer);
  v.summaryTimer = setTimeout(() => loadSummary(v), 800);
}

/** Per-speaker rows of the server's summary ([[name, stats]]): `by_role` (keys are roles, or
 * `channel_<n>` for results without one) plus `overall`; other groupings are tolerated. */
function summaryGroups(summary) {
  const pretty = (name) => String(name).replace(/^channel_(\d+)$/, "channel $1");
  let rows = [];
  for (const key of ["by_role", "per_role", "groups", "speakers", "by_channel", "per_channel", "channels", "roles"]) {
    const value = summary && summary[key];
    if (Array.isArray(value) && value.length && typeof value[0] === "object") {
      rows = value.map((g, i) => [pretty(g.role ?? g.name ?? (g.channel !== undefined ? `channel ${g.channel}` : i)), g]);
    } else if (value && typeof value === "object" && !Array.isArray(value)) {
      rows = Object.entries(value).map(([name, g]) => [pretty(name), g]);
    }
    if (rows.length) break;
  }
  if (!rows.length) {
    rows = Object.entries(summary || {}).filter(([k, g]) => k !== "overall" && g && typeof g === "object" && typeof g.utterances === "number");
  }
  if (summary && summary.overall && typeof summary.overall === "object" && rows.length > 1) rows.push(["overall", summary.overall]);
  return rows;
}

/** The same numbers from the results on the page (servers without the summary route). */
function localSummary(results) {
  const groups = new Map();
  for (const r of [...results].sort((a, b) => a.start - b.start)) {
    const key = groupOf(r);
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(r);
  }
  const mean = (rs) => {
    const acc = {};
    for (const r of rs) for (const [k, p] of Object.entries(r.emotion.probabilities || {})) acc[k] = (acc[k] || 0) + p / rs.length;
    return acc;
  };
  const out = {};
  for (const [key, rs] of groups) {
    const emo = rs.filter((r) => r.emotion);
    const probs = mean(emo);
    const third = Math.floor(emo.length / 3);
    let trend = null;
    if (third >= 1) {
      const first = mean(emo.slice(0, third));
      const last = mean(emo.slice(emo.length - third));
      trend = Object.fromEntries(Object.keys(probs).map((k) => [k, (last[k] || 0) - (first[k] || 0)]));
    }
    const sentiments = rs.filter((r) => r.text_sentiment && typeof r.text_sentiment.compound === "number");
    out[key] = {
      utterances: rs.length,
      speech_s: rs.reduce((s, r) => s + Math.max(0, r.end - r.start), 0),
      mean_probabilities: probs,
      label: Object.entries(probs).sort((a, b) => b[1] - a[1])[0]?.[0] ?? null,
      trend,
      negative_share: emo.length ? emo.filter((r) => NEGATIVE.has(r.emotion.label)).length / emo.length : null,
      text_sentiment_mean: sentiments.length
        ? sentiments.reduce((s, r) => s + r.text_sentiment.compound, 0) / sentiments.length
        : null,
      disagreements: rs.filter((r) => disagreement(r)).length,
    };
  }
  return out;
}

function trendText(trend) {
  if (!trend || typeof trend !== "object") return "–";
  const [label, delta] = Object.entries(trend).sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]))[0] || [];
  if (label === undefined || Math.abs(delta) < 0.005) return "steady";
  return `${label} ${delta > 0 ? "▲" : "▼"} ${Math.abs(delta * 100).toFixed(0)} pts`;
}

function miniBars(probs) {
  const box = el("span", { class: "mini-bars" });
  for (const [label, p] of Object.entries(probs || {}).sort((a, b) => b[1] - a[1])) {
    const seg = el("span", { class: "mini", title: `${label} ${pct(p)}` });
    seg.style.width = `${p * 100}%`;
    seg.style.backgroundColor = labelColor(label);
    box.append(seg);
  }
  return box;
}

function renderSummary(summary, note) {
  const groups = summaryGroups(summary);
  const num = (v, f) => (typeof v === "number" ? f(v) : "–");
  const head = ["speaker", "utterances", "speech", "voice", "mean probabilities", "trend", "negative", "text sentiment", "disagreements"];
  const table = el(
    "table",
    { class: "summary" },
    el("thead", {}, el("tr", {}, head.map((h) => el("th", { text: h })))),
    el(
      "tbody",
      {},
      groups.map(([name, g]) =>
        el(
          "tr",
          { dataset: { group: name } },
          el("td", { text: name }),
          el("td", { text: num(g.utterances, String) }),
          el("td", { text: num(g.speech_s, (v) => `${v.toFixed(1)} s`) }),
          el("td", {}, g.label ? labelChip({ label: g.label, probabilities: g.mean_probabilities || {} }) : "–"),
          el("td", {}, miniBars(g.mean_probabilities)),
          el("td", { text: trendText(g.trend) }),
          el("td", { text: num(g.negative_share, pct) }),
          el("td", { text: num(g.text_sentiment_mean, (v) => v.toFixed(2)) }),
          el("td", { class: g.disagreements ? "warn-text" : "", text: num(g.disagreements, String) }),
        ),
      ),
    ),
  );
  $("sv-summary").replaceChildren(groups.length ? table : el("p", { class: "muted", text: "no utterances yet" }));
  if (note) $("sv-summary").append(el("p", { class: "muted small", text: note }));
}

async function loadSummary(v) {
  if (v.closed) return;
  if (!(await hasRoute("/v1/sessions/{}/summary"))) {
    renderSummary(localSummary([...v.results.values()]), "Computed in the browser from the utterances below (this server has no summary route).");
    return;
  }
  try {
    const summary = await api(`/v1/sessions/${enc(v.id)}/summary`, { signal: v.abort.signal });
    if (!v.closed) renderSummary(summary);
  } catch (err) {
    if (err.name === "AbortError" || v.closed) return;
    if (err instanceof ApiError && err.status === 404) {
      renderSummary(localSummary([...v.results.values()]), "No summary from the server yet; computed in the browser.");
    } else {
      $("sv-summary").replaceChildren(el("p", { class: "error", text: errorText(err) }));
    }
  }
}

// --- following a session ----------------------------------------------------------------------

async function refreshMeta(v) {
  try {
    const s = await api(`/v1/sessions/${enc(v.id)}`, { signal: v.abort.signal });
    if (v.closed) return;
    v.session = s;
    sessions.set(s.id, { ...(sessions.get(s.id) || {}), ...s });
    renderMeta(s);
  } catch (err) {
    if (err.name !== "AbortError" && !v.closed) $("sv-mode").textContent = errorText(err);
  }
  if (!v.closed && v.session && v.session.state === "active") v.metaTimer = setTimeout(() => refreshMeta(v), 5000);
}

async function catchUp(v) {
  for (;;) {
    const page = await api(`/v1/sessions/${enc(v.id)}/results?after=${v.lastSeq}&limit=${PAGE}`, { signal: v.abort.signal });
    addResults(v, page.results);
    if (page.results.length < PAGE) return page.state;
  }
}

async function longPoll(v) {
  setViewMode("long-poll");
  while (!v.closed) {
    try {
      const page = await api(`/v1/sessions/${enc(v.id)}/results?after=${v.lastSeq}&wait=${LONG_POLL_S}&limit=${PAGE}`, {
        signal: v.abort.signal,
      });
      addResults(v, page.results);
      if (page.state === "ended" && page.results.length < PAGE) {
        await catchUp(v);
        setViewMode("ended");
        refreshMeta(v);
        loadSummary(v);
        return;
      }
    } catch (err) {
      if (err.name === "AbortError" || v.closed) return;
      $("sv-mode").textContent = `${errorText(err)}; retrying`;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }
}

// The open session rides on the list's event stream when it is live: browsers allow 6 HTTP/1.1
// connections per host, and a second EventSource per tab would stall the fourth dashboard tab.
function followFromList(v, kind, data) {
  if (v.closed) return;
  if (kind === "result" && data.result) addResults(v, [data.result]);
  else if (kind === "alert" && data.alert) addAlert(v, data.alert);
  else if (kind === "ended" && data.session) {
    v.viaList = false;
    v.session = data.session;
    renderMeta(v.session);
    catchUp(v).catch(() => {});
    setViewMode("ended");
    loadSummary(v);
  }
}

async function follow(v) {
  if (listSource && listSource.readyState !== EventSource.CLOSED) {
    v.viaList = true;
    setViewMode("events");
    await catchUp(v); // what arrived between the first catch-up and now (addResults skips repeats)
    return;
  }
  if (!(await hasRoute("/v1/sessions/{}/events"))) return longPoll(v);
  const source = new EventSource(withKey(`/v1/sessions/${enc(v.id)}/events?after=${v.lastSeq}`));
  v.source = source;
  setViewMode("events");
  let opened = false;
  source.onopen = () => {
    opened = true;
  };
  source.addEventListener("result", (event) => addResults(v, [JSON.parse(event.data)]));
  source.addEventListener("alert", (event) => addAlert(v, JSON.parse(event.data)));
  source.addEventListener("ended", (event) => {
    source.close();
    v.session = JSON.parse(event.data);
    renderMeta(v.session);
    setViewMode("ended");
    loadSummary(v);
  });
  source.onerror = () => {
    if (v.closed) return;
    if (source.readyState === EventSource.CLOSED || !opened) {
      source.close();
      v.source = null;
      longPoll(v); // after= is the last seq on the page: nothing is lost or repeated
    }
  };
}

async function openSession(id) {
  closeView();
  const v = { id, results: new Map(), lastSeq: 0, abort: new AbortController(), source: null, closed: false, session: null };
  view = v;
  $("empty-detail").hidden = true;
  $("session-view").hidden = false;
  $("sv-results").replaceChildren();
  $("sv-timelines").replaceChildren();
  $("sv-legend").replaceChildren();
  $("sv-summary").replaceChildren(el("p", { class: "muted", text: "…" }));
  $("sv-alerts").replaceChildren(el("li", { class: "muted", text: "none" }));
  $("sv-count").textContent = "";
  $("sv-title").textContent = `Session ${id}`;
  setViewMode("loading");
  renderList();
  try {
    v.session = await api(`/v1/sessions/${enc(id)}`, { signal: v.abort.signal });
    renderMeta(v.session);
    const state = await catchUp(v);
    loadSummary(v);
    loadAlerts(v);
    if (state === "active") {
      v.metaTimer = setTimeout(() => refreshMeta(v), 5000);
      follow(v);
    } else {
      setViewMode("ended");
    }
  } catch (err) {
    if (err.name === "AbortError" || v.closed) return;
    if (err instanceof ApiError && err.status === 404) {
      // not created yet (a link shared before the stream began) or deleted: look again shortly
      setViewMode("no such session (yet); looking again every 2 s");
      v.metaTimer = setTimeout(() => view === v && openSession(id), POLL_MS);
    } else {
      setViewMode(errorText(err));
    }
  }
}

function fromHash() {
  const match = /^#session=(.+)$/.exec(location.hash);
  if (match) openSession(decodeURIComponent(match[1]));
  else {
    closeView();
    $("session-view").hidden = true;
    $("empty-detail").hidden = false;
    renderList();
  }
}

mountKeyField();
$("active-only").addEventListener("change", () => (stats.listMode === "polling" ? loadList() : renderList()));
window.addEventListener("hashchange", fromHash);
document.addEventListener("api-key-changed", () => {
  startList();
  fromHash();
});
setInterval(renderList, 10000); // keep "… ago" fresh
startList();
fromHash();
