// Home page: server readiness and the loaded models.

import { api, mountKeyField } from "./api.js";
import { errorText } from "./ui.js";

const $ = (id) => document.getElementById(id);

async function refresh() {
  try {
    const response = await fetch("/readyz");
    $("ready").textContent = response.ok ? "ready" : "not ready yet (models loading, or a check failing)";
    $("ready").className = response.ok ? "ok" : "error";
  } catch (err) {
    $("ready").textContent = `unreachable (${errorText(err)})`;
  }
  try {
    const info = await api("/v1/models");
    $("models").textContent = `${info.models.map((m) => m.id).join(", ")} (+ ${info.ensemble}); classes ${info.classes.join(", ")}`;
  } catch (err) {
    $("models").textContent = errorText(err);
  }
}

mountKeyField();
document.addEventListener("api-key-changed", refresh);
refresh();
