// The vspemu status page: logs in with the array's session, polls the status JSON every second and renders it
// with DOM nodes and textContent only (no innerHTML with data). The token lives in sessionStorage, never in a
// URL sent to the server. For unattended browsers (tests), a token may be handed over once in the URL fragment
// (#token=...): it is read, stored and removed from the address at once (docs/observability.md).
"use strict";

const SESSIONS = "/ConfigurationManager/v1/objects/sessions";
const STATUS = "/ConfigurationManager/vspemu/v1/status";
const KEY = "vspemu.token";
const KEY_ID = "vspemu.sessionId";
const STATUS_CLASS = {
  PAIR: "st-ok", NML_01: "st-ok", SJNN: "st-ok", PJNN: "st-ok", COPY: "st-copy",
  PSUS: "st-susp", SSUS: "st-susp", SSWS: "st-susp", PFUL: "st-susp", SJSN: "st-susp", PJSN: "st-susp",
  PSUE: "st-err", PFUS: "st-err", SJSE: "st-err", PJSE: "st-err", SJSF: "st-err", PJSF: "st-err",
};

let timer = null;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function statusCell(value, cls) {
  const td = el("td", null, cls);
  const span = el("span", value, "st " + (STATUS_CLASS[value] || ""));
  td.appendChild(span);
  return td;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v : v.toFixed(1)) + " " + units[i];
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

function progressCell(percent) {
  const td = el("td", null, "progress");
  const bar = el("span", null, "bar");
  const fill = el("span");
  fill.style.width = Math.max(0, Math.min(100, Number(percent) || 0)) + "%";
  bar.appendChild(fill);
  td.appendChild(bar);
  td.appendChild(el("span", percent + " %", "percent"));
  return td;
}

function renderGroups(data) {
  const box = document.getElementById("groups");
  box.replaceChildren();
  if (!data.copyGroups.length) { box.appendChild(el("p", "no copy groups", "muted")); return; }
  for (const g of data.copyGroups) {
    const div = el("div", null, "group");
    div.dataset.group = g.name;
    div.appendChild(el("h3", g.name + " (" + g.replicationType + ", this side " +
                    (g.role === "P" ? "primary" : "secondary") + ")"));
    let meta = "remote " + g.remoteStorageDeviceId + " \u00b7 path group " + g.pathGroupId +
               " \u00b7 device groups " + g.localDeviceGroupName + " / " + g.remoteDeviceGroupName;
    if (g.replicationType === "UR") {
      meta += " \u00b7 mirror " + g.muNumber + " \u00b7 journals " + g.localJournalId + " \u2192 " + g.remoteJournalId;
      if (g.lagSeconds !== null && g.lagSeconds !== undefined) meta += " \u00b7 lag " + g.lagSeconds + " s";
      if (g.qCount !== null && g.qCount !== undefined) meta += " \u00b7 qCount " + g.qCount;
    }
    div.appendChild(el("div", meta, "meta"));
    const table = el("table", null, "pairs");
    const head = row(["pair", "local LDEV", "remote LDEV", "this side", "other side (as known here)",
                      "P-VOL", "S-VOL", "copy", "differential"].map((t) => el("th", t)));
    table.appendChild(el("thead")).appendChild(head);
    const body = table.appendChild(el("tbody"));
    for (const p of g.pairs) {
      const tr = row([el("td", p.name, "name"), el("td", p.localLdevId), el("td", p.remoteLdevId),
                      statusCell(p.status, "status"), statusCell(p.peerStatus, "peer-status"),
                      statusCell(p.pvolStatus, "pvol-status"), statusCell(p.svolStatus, "svol-status"),
                      progressCell(p.copyProgressPercent), el("td", bytes(p.dirtyBytes), "dirty")]);
      tr.dataset.pair = g.name + "/" + p.name;
      body.appendChild(tr);
    }
    div.appendChild(table);
    box.appendChild(div);
  }
}

function renderJournals(data) {
  const body = document.querySelector("#journals tbody");
  body.replaceChildren();
  if (!data.journals.length) {
    const td = el("td", "no journals", "muted");
    td.colSpan = 6;
    body.appendChild(row([td]));
  }
  for (const j of data.journals) {
    const mirrors = j.mirrors.map((m) => "MU" + m.muNumber + " " + m.status).join(", ") || "-";
    const tr = row([el("td", j.journalId), el("td", bytes(j.usedBytes)), el("td", bytes(j.capacityBytes)),
                    progressCell(j.usagePercent), el("td", j.qCount, "qcount"), el("td", mirrors)]);
    tr.dataset.journal = String(j.journalId);
    body.appendChild(tr);
  }
}

function renderPaths(data) {
  const body = document.querySelector("#paths tbody");
  body.replaceChildren();
  if (!data.pathGroups.length) {
    const td = el("td", "no remote paths", "muted");
    td.colSpan = 6;
    body.appendChild(row([td]));
  }
  for (const g of data.pathGroups) {
    for (const p of g.paths) {
      body.appendChild(row([el("td", g.remoteStorageDeviceId), el("td", g.pathGroupId), el("td", p.localPortId),
                            el("td", p.remotePortId), statusCell(p.pathStatus, "path-status"), el("td", p.reason)]));
    }
  }
}

function renderFaults(data) {
  const body = document.querySelector("#faults tbody");
  body.replaceChildren();
  const faults = data.faults || [];
  if (!faults.length) {
    const td = el("td", "no faults in force", "muted");
    td.colSpan = 4;
    body.appendChild(row([td]));
  }
  for (const f of faults) {
    const tr = row([el("td", f.faultId), el("td", f.kind, "kind st st-err"), el("td", f.target, "target"),
                    el("td", f.since, "since")]);
    tr.dataset.fault = String(f.faultId);
    body.appendChild(tr);
  }
}

function render(data) {
  document.getElementById("system").textContent = data.storageDeviceId + " (serial " + data.serial + ")";
  document.title = "vspemu " + data.serial + " status";
  renderGroups(data);
  renderJournals(data);
  renderPaths(data);
  renderFaults(data);
  const state = document.getElementById("state");
  state.textContent = "live \u00b7 updated " + new Date(data.time * 1000).toLocaleTimeString();
  document.body.dataset.updated = String(data.time);
}

function showLogin(message) {
  if (timer !== null) { clearTimeout(timer); timer = null; }
  sessionStorage.removeItem(KEY);
  document.getElementById("view").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("state").textContent = "not logged in";
  document.getElementById("login-error").textContent = message || "";
}

async function poll() {
  timer = null;
  const token = sessionStorage.getItem(KEY);
  if (!token) { showLogin(); return; }
  try {
    const r = await fetch(STATUS, { headers: { Authorization: "Session " + token }, cache: "no-store" });
    if (r.status === 401) { showLogin("The session ended; log in again."); return; }
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    document.getElementById("login").hidden = true;
    document.getElementById("view").hidden = false;
    document.getElementById("logout").hidden = false;
  } catch (e) {
    document.getElementById("state").textContent = "cannot reach the system (" + e.message + "); retrying";
  }
  timer = setTimeout(poll, 1000);
}

async function login(event) {
  event.preventDefault();
  const user = document.getElementById("user").value;
  const password = document.getElementById("password").value;
  const bytesOf = new TextEncoder().encode(user + ":" + password);
  const basic = btoa(String.fromCharCode(...bytesOf));
  try {
    const r = await fetch(SESSIONS, { method: "POST", headers: { Authorization: "Basic " + basic,
                          "Content-Type": "application/json" }, body: "{}", cache: "no-store" });
    if (!r.ok) { showLogin("Login refused (HTTP " + r.status + ")."); return; }
    const s = await r.json();
    sessionStorage.setItem(KEY, s.token);
    sessionStorage.setItem(KEY_ID, String(s.sessionId));
    document.getElementById("password").value = "";
    poll();
  } catch (e) {
    showLogin("Login failed: " + e.message);
  }
}

async function logout() {
  const token = sessionStorage.getItem(KEY);
  const id = sessionStorage.getItem(KEY_ID);
  if (token && id && /^[0-9]+$/.test(id)) {
    try {
      await fetch(SESSIONS + "/" + id, { method: "DELETE", headers: { Authorization: "Session " + token } });
    } catch (e) { /* the session dies on its own */ }
  }
  sessionStorage.removeItem(KEY_ID);
  showLogin("Logged out.");
}

function takeFragmentToken() {
  const m = /^#token=([0-9a-fA-F]{16,128})$/.exec(location.hash);
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  if (m) sessionStorage.setItem(KEY, m[1]);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", login);
  document.getElementById("logout").addEventListener("click", logout);
  takeFragmentToken();
  poll();
});
