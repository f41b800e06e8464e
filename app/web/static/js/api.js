// Talking to the server: the API key (localStorage), fetch with a Bearer header, WebSocket and
// EventSource URLs with ?api_key= (browsers cannot set headers on those), and feature detection
// from /openapi.json (so a page never probes a route that may not exist and logs a 404).

const KEY_STORAGE = "emotion-server.api-key";

export class ApiError extends Error {
  constructor(status, error, detail) {
    super(`${status} ${error}: ${detail}`);
    this.status = status;
    this.error = error;
    this.detail = detail;
  }
}

export function apiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled: no key
  }
}

export function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: the key lasts for this page only */
  }
  document.dispatchEvent(new CustomEvent("api-key-changed"));
}

/** fetch a JSON route; throws ApiError with the server's {error, detail} on a non-2xx answer. */
export async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      /* not JSON */
    }
    if (response.status === 401) document.dispatchEvent(new CustomEvent("api-key-required"));
    throw new ApiError(
      response.status,
      (body && body.error) || `http_${response.status}`,
      (body && body.detail) || response.statusText,
    );
  }
  return response.status === 204 ? null : response.json();
}

/** path with ?api_key= added when a key is set (WebSocket, EventSource). */
export function withKey(path) {
  const key = apiKey();
  if (!key) return path;
  return `${path}${path.includes("?") ? "&" : "?"}api_key=${encodeURIComponent(key)}`;
}

export function wsUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${withKey(path)}`;
}

let routes = null;

/** The server's route templates (from /openapi.json), e.g. "/v1/sessions/{session_id}/summary". */
export function serverRoutes() {
  if (!routes) {
    routes = fetch("/openapi.json")
      .then((r) => (r.ok ? r.json() : { paths: {} }))
      .then((spec) => new Set(Object.keys(spec.paths || {})))
      .catch(() => new Set());
  }
  return routes;
}

/** Does the server have this route? Path parameters may be named anything: "/v1/sessions/{}/summary". */
export async function hasRoute(template) {
  const known = await serverRoutes();
  const shape = (p) => p.replace(/\{[^}]*\}/g, "{}");
  const want = shape(template);
  for (const path of known) if (shape(path) === want) return true;
  return false;
}

/** The key field in the page header (#api-key form): stored in localStorage, highlighted after a 401. */
export function mountKeyField() {
  const form = document.getElementById("api-key");
  if (!form) return;
  const input = form.querySelector("input");
  const state = form.querySelector(".key-state");
  const show = () => {
    const key = apiKey();
    input.value = key;
    state.textContent = key ? "key set" : "no key";
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey(input.value.trim());
    form.classList.remove("needed");
    show();
  });
  document.addEventListener("api-key-required", () => {
    form.classList.add("needed");
    state.textContent = apiKey() ? "key rejected" : "key required";
  });
  show();
}
