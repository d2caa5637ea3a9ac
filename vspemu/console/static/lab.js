// The vspemu lab console page: logs in to the console (which logs in to every system of the lab), polls the
// aggregate status every second and renders it with DOM nodes and textContent only (no innerHTML with data).
// Pairs are joined across systems: the P-VOL's status as the primary reports it next to the S-VOL's status as
// the secondary reports it. The console token lives in sessionStorage, never in a URL.
"use strict";

const SESSION = "/lab/api/session";
const STATUS = "/lab/api/status";
const KEY = "vspemu.lab.token";
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

function statusCell(value, cls, note) {
  const td = el("td", null, cls);
  td.appendChild(el("span", value === null || value === undefined ? "-" : value, "st " + (STATUS_CLASS[value] || "")));
  if (note) td.appendChild(el("span", " " + note, "muted"));
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

function emptyRow(body, text, span) {
  const td = el("td", text, "muted");
  td.colSpan = span;
  body.appendChild(row([td]));
}

function progressCell(percent) {
  const td = el("td", null, "progress");
  if (percent === null || percent === undefined) { td.textContent = "-"; return td; }
  const bar = el("span", null, "bar");
  const fill = el("span");
  fill.style.width = Math.max(0, Math.min(100, Number(percent) || 0)) + "%";
  bar.appendChild(fill);
  td.appendChild(bar);
  td.appendChild(el("span", percent + " %", "percent"));
  return td;
}

function orDash(v) { return v === null || v === undefined ? "-" : v; }

function renderSystems(data) {
  const body = document.querySelector("#systems tbody");
  body.replaceChildren();
  for (const s of data.systems) {
    const st = s.status;
    const pairs = st ? st.copyGroups.reduce((n, g) => n + g.pairs.length, 0) : "-";
    const tr = row([el("td", s.serial), el("td", s.storageDeviceId), el("td", s.statusPage, "url"),
                    el("td", s.ok ? "up" : s.error, s.ok ? "state up" : "state down"),
                    el("td", st ? st.copyGroups.length : "-"), el("td", pairs),
                    el("td", st ? st.faults.length : "-", "fault-count")]);
    tr.dataset.system = String(s.serial);
    body.appendChild(tr);
  }
}

// every pair once: found on its primary (role P) and joined with the same pair on its secondary (role S)
function joinPairs(data) {
  const byDevice = {};
  for (const s of data.systems) if (s.status) byDevice[s.storageDeviceId] = s;
  const rows = [];
  const seen = new Set();
  const find = (sys, group, role) => sys && sys.status &&
    sys.status.copyGroups.find((g) => g.name === group && g.role === role);
  for (const s of data.systems) {
    if (!s.status) continue;
    for (const g of s.status.copyGroups) {
      const primary = g.role === "P" ? s : byDevice[g.remoteStorageDeviceId];
      const secondary = g.role === "P" ? byDevice[g.remoteStorageDeviceId] : s;
      const pg = g.role === "P" ? g : find(primary, g.name, "P");
      const sg = g.role === "P" ? find(secondary, g.name, "S") : g;
      const pSerial = primary ? primary.serial : g.remoteStorageDeviceId;
      const sSerial = secondary ? secondary.serial : g.remoteStorageDeviceId;
      for (const p of g.pairs) {
        const key = pSerial + "/" + g.name + "/" + p.name;
        if (seen.has(key)) continue;
        seen.add(key);
        const pp = pg ? pg.pairs.find((x) => x.name === p.name) : null;
        const sp = sg ? sg.pairs.find((x) => x.name === p.name) : null;
        rows.push({ key, group: g.name, type: g.replicationType, name: p.name, pSerial, sSerial,
                    pLdev: pp ? pp.localLdevId : (sp ? sp.remoteLdevId : "-"),
                    sLdev: sp ? sp.localLdevId : (pp ? pp.remoteLdevId : "-"),
                    pStatus: pp ? pp.status : (sp ? sp.pvolStatus : null), pKnown: !!pp,
                    sStatus: sp ? sp.status : (pp ? pp.svolStatus : null), sKnown: !!sp,
                    percent: (pp || sp).copyProgressPercent, dirty: (pp || sp).dirtyBytes,
                    lag: pg ? pg.lagSeconds : null, qCount: pg ? pg.qCount : null });
      }
    }
  }
  return rows;
}

function renderPairs(data) {
  const body = document.querySelector("#pairs tbody");
  body.replaceChildren();
  const rows = joinPairs(data);
  if (!rows.length) emptyRow(body, "no pairs", 11);
  for (const r of rows) {
    const tr = row([el("td", r.group, "group"), el("td", r.type, "type"), el("td", r.name, "name"),
                    el("td", r.pSerial + " LDEV " + r.pLdev, "primary"), el("td", r.sSerial + " LDEV " + r.sLdev, "secondary"),
                    statusCell(r.pStatus, "pvol-status", r.pKnown ? "" : "(as the secondary knows it)"),
                    statusCell(r.sStatus, "svol-status", r.sKnown ? "" : "(as the primary knows it)"),
                    progressCell(r.percent), el("td", bytes(r.dirty), "dirty"),
                    el("td", r.type === "UR" && r.lag !== null && r.lag !== undefined ? r.lag + " s" : "-", "lag"),
                    el("td", r.type === "UR" ? orDash(r.qCount) : "-", "qcount")]);
    tr.dataset.pair = r.key;
    body.appendChild(tr);
  }
}

function table(heads, cls) {
  const t = el("table", null, cls);
  t.appendChild(el("thead")).appendChild(row(heads.map((h) => el("th", h))));
  return [t, t.appendChild(el("tbody"))];
}

function renderSystem(s) {
  const sec = el("section", null, "system");
  sec.dataset.system = String(s.serial);
  sec.appendChild(el("h2", s.storageDeviceId + " (serial " + s.serial + ")"));
  if (!s.status) { sec.appendChild(el("p", s.error, "error")); return sec; }
  const st = s.status;
  sec.appendChild(el("h3", "Journals"));
  const [jt, jb] = table(["journal", "used", "capacity", "usage", "qCount", "mirrors"], "journals");
  if (!st.journals.length) emptyRow(jb, "no journals", 6);
  for (const j of st.journals) {
    const mirrors = j.mirrors.map((m) => "MU" + m.muNumber + " " + m.status).join(", ") || "-";
    const tr = row([el("td", j.journalId), el("td", bytes(j.usedBytes), "used"), el("td", bytes(j.capacityBytes)),
                    progressCell(j.usagePercent), el("td", j.qCount, "qcount"), el("td", mirrors, "mirrors")]);
    tr.dataset.journal = String(j.journalId);
    jb.appendChild(tr);
  }
  sec.appendChild(jt);
  sec.appendChild(el("h3", "Remote paths"));
  const [pt, pb] = table(["remote system", "path group", "local port", "remote port", "status", "reason"], "paths");
  if (!st.pathGroups.length) emptyRow(pb, "no remote paths", 6);
  for (const g of st.pathGroups) {
    for (const p of g.paths) {
      const tr = row([el("td", g.remoteStorageDeviceId), el("td", g.pathGroupId), el("td", p.localPortId),
                      el("td", p.remotePortId), statusCell(p.pathStatus, "path-status"), el("td", p.reason)]);
      tr.dataset.remote = String(g.remoteStorageDeviceId);
      pb.appendChild(tr);
    }
  }
  sec.appendChild(pt);
  sec.appendChild(el("h3", "Faults in force"));
  const [ft, fb] = table(["fault", "kind", "target", "since"], "faults");
  if (!st.faults.length) emptyRow(fb, "no faults in force", 4);
  for (const f of st.faults) {
    const tr = row([el("td", f.faultId), el("td", f.kind, "kind st st-err"), el("td", f.target, "target"),
                    el("td", f.since, "since")]);
    tr.dataset.fault = String(f.faultId);
    fb.appendChild(tr);
  }
  sec.appendChild(ft);
  return sec;
}

function render(data) {
  document.getElementById("lab").textContent = data.systems.length + " storage systems: " +
    data.systems.map((s) => s.serial).join(", ");
  renderSystems(data);
  renderPairs(data);
  document.getElementById("per-system").replaceChildren(...data.systems.map(renderSystem));
  document.getElementById("state").textContent = "live \u00b7 updated " + new Date(data.time * 1000).toLocaleTimeString();
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
    document.getElementById("state").textContent = "cannot reach the lab console (" + e.message + "); retrying";
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
    const r = await fetch(SESSION, { method: "POST", headers: { Authorization: "Basic " + basic }, cache: "no-store" });
    if (!r.ok) { showLogin("Login refused (HTTP " + r.status + ")."); return; }
    const s = await r.json();
    sessionStorage.setItem(KEY, s.token);
    document.getElementById("password").value = "";
    poll();
  } catch (e) {
    showLogin("Login failed: " + e.message);
  }
}

async function logout() {
  const token = sessionStorage.getItem(KEY);
  if (token) {
    try {
      await fetch(SESSION, { method: "DELETE", headers: { Authorization: "Session " + token } });
    } catch (e) { /* the session dies on its own */ }
  }
  showLogin("Logged out.");
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", login);
  document.getElementById("logout").addEventListener("click", logout);
  poll();
});
