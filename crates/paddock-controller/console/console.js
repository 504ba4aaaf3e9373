// The Paddock console: the farm's pages, read from the controller's admin API (`/v1/...`, see
// docs/api.md) with the admin token the operator gives. The page itself holds no data; every
// figure it shows is what the API answered at the last refresh, and every button is one API
// call, checked and audited by the controller as the CLI's are.
//
// Rules kept here:
// - Text from the API is set as text (`textContent`), never parsed as HTML.
// - The token lives in this tab's sessionStorage and goes out only in the Authorization header
//   of requests to this controller; a `#token=...` address signs in and is rewritten at once.
// - Each page is reloaded every REFRESH_MS while the tab is visible; a failed refresh says what
//   went wrong and keeps the last figures on screen, marked as old.
"use strict";

const TOKEN_KEY = "paddock.admin-token";
const REFRESH_MS = 2000;

const state = {
  token: null,
  timer: null,
  // Bumped on every navigation: an answer for an older page is dropped.
  view: 0,
  // Bumped on every refresh: an answer older than one already asked for is dropped.
  refresh: 0,
  lastOk: null,
  // What the application page's balanced deploy watches after the cutover (`watch` of the
  // request; 0: no watch step). Kept here: the page is redrawn at every refresh.
  watch: { ms: 0, permille: 10 },
};

// ---- small helpers --------------------------------------------------------------------------

/** An element: h("td", {class: "num"}, "12", child, ...). Strings become text nodes. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** A drop-down of `choices` ([value, label], values numbers) showing `current`; `set` gets
 * the value chosen. */
function choice(name, choices, current, set) {
  // Focus leaves it once chosen: the page is not redrawn while a drop-down has it.
  return h("select", {
    name,
    onchange: (event) => {
      set(Number(event.currentTarget.value));
      event.currentTarget.blur();
    },
  },
    choices.map(([value, label]) => h("option", { value, selected: value === current }, label)));
}

function link(href, text) {
  return h("a", { href }, text);
}

function badge(text, tone) {
  return h("span", { class: `badge ${tone || ""}` }, text);
}

function table(headers, rows, empty) {
  if (rows.length === 0) return h("p", { class: "muted" }, empty);
  // Scrolls sideways on its own on a narrow screen, instead of widening the page.
  return h("div", { class: "scroll" },
    h("table", {}, h("thead", {}, h("tr", {}, headers.map((t) => h("th", {}, t)))), h("tbody", {}, rows)));
}

function clock(ms) {
  if (ms === null || ms === undefined) return "—";
  const d = new Date(ms);
  // A cron schedule that never matches has its next tick at the end of time.
  if (Number.isNaN(d.getTime())) return "never";
  const today = new Date();
  const time = d.toLocaleTimeString([], { hour12: false });
  return d.toDateString() === today.toDateString() ? time : `${d.toISOString().slice(0, 10)} ${time}`;
}

function span(ms) {
  if (ms === null || ms === undefined || ms < 0) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 3600000) return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
  return `${Math.floor(ms / 3600000)} h ${Math.round((ms % 3600000) / 60000)} min`;
}

function ago(ms) {
  return ms ? `${span(Date.now() - ms)} ago` : "never";
}

function short(sha) {
  return sha ? sha.slice(0, 12) : "—";
}

function mib(bytes) {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

function onOff(on) {
  return on ? badge("on", "ok") : badge("off", "warn");
}

const TONES = {
  ready: "ok", drain: "warn", maint: "bad",
  serving: "ok", draining: "warn", stopping: "warn",
  running: "info", paused: "warn", succeeded: "ok", failed: "bad", aborted: "warn",
  done: "ok", pending: "", skipped: "", ok: "ok", lost: "bad",
  active: "ok", passive: "",
};

function stateBadge(s) {
  return badge(s, TONES[s] || "");
}

// ---- the admin API --------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, kind, message) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
}

async function api(method, path, body) {
  const token = state.token;
  const init = { method, headers: { Authorization: `Bearer ${token}` }, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "unreachable", `cannot reach the controller (${e.message}); is it running?`);
  }
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch {
    // Not JSON: the status says what there is to say.
  }
  if (!response.ok) {
    const kind = (data && data.error) || `http_${response.status}`;
    const message = (data && data.message) || response.statusText || "no answer";
    if (response.status === 401 && state.token === token) {
      signOut("The controller refused this admin token: give the one in its data folder (admin.token).");
    }
    throw new ApiError(response.status, kind, message);
  }
  return data;
}

const get = (path) => api("GET", path);
const post = (path, body) => api("POST", path, body === undefined ? {} : body);
const enc = encodeURIComponent;

// ---- notices and actions --------------------------------------------------------------------

function notify(text, tone) {
  const notice = document.getElementById("notice");
  notice.textContent = text;
  notice.className = tone;
  notice.hidden = false;
}

/** A button that makes one API call, says what came of it, and refreshes the page. */
function action(label, name, run, opts = {}) {
  return h("button", {
    type: "button",
    "data-action": name,
    class: opts.danger ? "danger" : null,
    disabled: opts.disabled,
    title: opts.title,
    onclick: async (event) => {
      const button = event.currentTarget;
      button.disabled = true;
      try {
        const said = await run();
        notify(said, "ok");
      } catch (e) {
        notify(e instanceof ApiError ? `${e.message} (${e.kind})` : String(e), "bad");
      } finally {
        button.disabled = false;
        refresh();
      }
    },
  }, label);
}

// ---- pages ----------------------------------------------------------------------------------

/** What needs the operator's eye, from the status, routing, operations and standbys. */
function problems(status, routing, operations, standbys) {
  const found = [];
  for (const { server, alive, out_of_date } of status.servers) {
    if (!alive) found.push([server.name, `${server.name} has sent no heartbeat since ${clock(server.heartbeat_ms)}`]);
    const seen = server.observed;
    if (alive && seen && seen.state !== "serving") found.push([server.name, `${server.name} is ${seen.state}`]);
    for (const f of (seen && seen.failed) || []) {
      found.push([server.name, `${server.name} cannot load ${f.name}@${f.version}: ${f.error}`]);
    }
    if (seen && seen.upgrade_error) found.push([server.name, `${server.name} cannot install build ${short(seen.upgrade_error.build)}: ${seen.upgrade_error.error}`]);
    if (seen && seen.cache && seen.cache.off) found.push([server.name, `${server.name} serves nothing from its response cache: ${seen.cache.off}`]);
    for (const line of out_of_date) found.push([server.name, `${server.name} is out of date: ${line}`]);
  }
  if (routing.balancers.length === 0) found.push(["", "no balancer has reported to this controller"]);
  for (const b of routing.balancers) {
    if (!b.alive) found.push([b.report.name, `balancer ${b.report.name} has not reported since ${clock(b.heartbeat_ms)}`]);
    if (b.report.upgrade_error) found.push([b.report.name, `balancer ${b.report.name} cannot install build ${short(b.report.upgrade_error.build)}: ${b.report.upgrade_error.error}`]);
  }
  for (const s of standbys) {
    if (s.report.upgrade_error) found.push([s.report.name, `standby controller ${s.report.name} cannot install build ${short(s.report.upgrade_error.build)}: ${s.report.upgrade_error.error}`]);
  }
  if (routing.pending.length > 0) found.push(["", `balancers not yet routing by generation ${routing.generation}: ${routing.pending.join(", ")}`]);
  for (const op of operations) {
    if (op.state === "paused") found.push([`#${op.id}`, `operation ${op.id} (${op.kind}) is paused: ${op.message || ""}`]);
  }
  // The newest operation of each kind, if it did not succeed: what it left is for the operator.
  const kinds = new Set();
  for (const op of operations) {
    if (kinds.has(op.kind)) continue;
    kinds.add(op.kind);
    if (op.state === "failed" || op.state === "aborted") {
      found.push([`#${op.id}`, `the last ${op.kind}, operation ${op.id}, ${op.state}: ${op.message || ""}`]);
    }
  }
  return found;
}

async function overview() {
  const [status, routing, operations, apps, standbys] = await Promise.all([
    get("/v1/status"), get("/v1/routing"), get("/v1/operations"), get("/v1/apps"), get("/v1/standbys"),
  ]);
  const alive = status.servers.filter((s) => s.alive).length;
  const liveBalancers = routing.balancers.filter((b) => b.alive).length;
  const running = operations.filter((o) => o.state === "running" || o.state === "paused");
  const found = problems(status, routing, operations, standbys);
  const card = (name, value, label, tone) =>
    h("div", { class: "card", "data-card": name }, h("div", { class: `value ${tone || ""}` }, value), h("div", { class: "label" }, label));
  return [
    h("h1", {}, "Environment health"),
    h("div", { class: "cards" },
      card("servers", `${alive}/${status.servers.length}`, "front-ends alive", alive === status.servers.length ? "ok" : "bad"),
      card("balancers", `${liveBalancers}/${routing.balancers.length}`, "balancers alive", liveBalancers === routing.balancers.length && liveBalancers > 0 ? "ok" : "bad"),
      card("apps", apps.length, "applications"),
      card("operations", running.length, "operations in progress", running.length ? "info" : ""),
      card("generation", status.generation, `generation · ${status.database}`),
    ),
    h("h2", {}, "Needs a look"),
    found.length === 0
      ? h("p", { class: "ok", id: "all-well" }, "Everything is as desired: every server and balancer reports, serves what is desired, and routes by the latest table.")
      : h("ul", { class: "problems", id: "problems" }, found.map(([subject, text]) => h("li", { class: "bad", "data-subject": subject }, text))),
    running.length ? [h("h2", {}, "In progress"), operationsTable(running)] : null,
    h("h2", {}, "Servers"),
    serversTable(status, routing, false),
  ];
}

function serversTable(status, routing, withActions) {
  const routed = Object.fromEntries(routing.servers.map((s) => [s.name, s]));
  const rows = status.servers.map(({ server, alive, out_of_date }) => {
    const seen = server.observed;
    const r = routed[server.name];
    const lbActions = withActions
      ? h("div", { class: "actions" }, ["ready", "drain", "maint"].map((lb) =>
        action(lb, `lb-${lb}`, async () => {
          await post(`/v1/servers/${enc(server.name)}/lb`, { state: lb });
          return `${server.name}: lb ${lb} (the balancers apply it with the next generation)`;
        }, { disabled: server.lb === lb, title: `paddock server ${server.name} lb ${lb}` })))
      : null;
    const flag = (name, on) => withActions
      ? action(on ? `${name} off` : `${name} on`, `${name}-${on ? "off" : "on"}`, async () => {
        await post(`/v1/servers/${enc(server.name)}/flags`, { flag: name, on: !on });
        return `${server.name}: ${name} service ${on ? "off" : "on"}`;
      })
      : null;
    return h("tr", { "data-server": server.name },
      h("td", {}, h("strong", {}, server.name), h("div", { class: "muted mono" }, server.address)),
      h("td", {}, server.zone),
      h("td", { "data-field": "role" }, stateBadge(server.role)),
      h("td", { "data-field": "health" },
        alive ? (seen ? stateBadge(seen.state) : badge("no report yet", "info")) : badge("down", "bad"),
        h("div", { class: "muted" }, `heartbeat ${ago(server.heartbeat_ms)}`)),
      h("td", { "data-field": "lb" }, stateBadge(server.lb), server.weight !== 1 ? ` weight ${server.weight}` : null,
        r && r.drained ? h("div", { class: "muted" }, "drained") : null,
        r ? h("div", { class: "muted" }, r.up_on.length ? `up on ${r.up_on.join(", ")}` : "up on no balancer") : null,
        lbActions),
      h("td", { class: "num", "data-field": "in-flight" }, seen ? seen.in_flight : "—"),
      h("td", { "data-field": "deployment" }, onOff(server.deployment), " ", flag("deployment", server.deployment)),
      h("td", { "data-field": "scheduler" }, onOff(server.scheduler), " ", flag("scheduler", server.scheduler)),
      h("td", { "data-field": "apps" },
        seen && seen.apps.length ? h("ul", { class: "plain" }, seen.apps.map((a) => h("li", {}, link(`#/apps/${enc(a.name)}`, a.name), `@${a.version}`))) : h("span", { class: "muted" }, "none"),
        out_of_date.map((line) => h("div", { class: "warn" }, line))),
      h("td", { "data-field": "platform" }, server.platform_version,
        seen && seen.build ? h("div", { class: "muted mono" }, short(seen.build)) : null,
        seen && seen.installing ? h("div", { class: "info" }, `installing ${short(seen.installing)}`) : null),
      h("td", { "data-field": "cache" }, seen && seen.cache
        ? [`${seen.cache.entries} entries, ${mib(seen.cache.bytes)}`, h("div", { class: "muted" }, `${seen.cache.hits} hits, ${seen.cache.misses} misses`),
          h("div", { class: "muted", "data-field": "purged" }, `last purge applied: ${seen.cache.purged}`),
          seen.cache.off ? h("div", { class: "bad" }, `off: ${seen.cache.off}`) : null]
        : h("span", { class: "muted" }, "none")),
    );
  });
  return table(["server", "zone", "role", "health", "routing", "in flight", "deployment", "scheduler", "apps", "platform", "response cache"],
    rows, "No front-end has registered yet: start one with `paddock frontend --controller URL --join-token TOKEN`.");
}

async function servers() {
  const [status, routing, standbys] = await Promise.all([get("/v1/status"), get("/v1/routing"), get("/v1/standbys")]);
  return [
    h("h1", {}, "Servers"),
    h("p", { class: "muted" }, "Routing: ready takes new requests; drain lets requests in flight finish and takes no new one; maint takes no traffic. Deployment off: the server keeps the versions it has. Scheduler off: it runs no timer."),
    serversTable(status, routing, true),
    h("h2", {}, "Standby controllers"),
    standbysTable(standbys),
  ];
}

function standbysTable(standbys) {
  const rows = standbys.map((s) => h("tr", { "data-standby": s.report.name },
    h("td", {}, h("strong", {}, s.report.name)),
    h("td", { "data-field": "process" }, s.report.host, h("div", { class: "muted" }, `process ${s.report.pid}`)),
    h("td", { "data-field": "state" }, s.alive ? badge("standing by", "ok") : badge("silent", "bad"),
      h("div", { class: "muted" }, `report ${ago(s.heartbeat_ms)}`)),
    h("td", { "data-field": "platform" }, s.report.version,
      s.report.build ? h("div", { class: "muted mono" }, short(s.report.build)) : null,
      s.report.installing ? h("div", { class: "info" }, `installing ${short(s.report.installing)}`) : null,
      s.report.upgrade_error ? h("div", { class: "bad" }, `cannot install ${short(s.report.upgrade_error.build)}: ${s.report.upgrade_error.error}`) : null)));
  return table(["standby", "host", "state", "platform"], rows,
    "No standby controller reports to this one: start one with `paddock controller --standby --follow URL` (see the README, \"Run the processes yourself\").");
}

async function appsPage() {
  const apps = await get("/v1/apps");
  const rows = apps.map((a) => h("tr", { "data-app": a.name },
    h("td", {}, link(`#/apps/${enc(a.name)}`, a.name)),
    h("td", {}, a.zone),
    h("td", { "data-field": "desired" }, a.desired || h("span", { class: "muted" }, "not deployed")),
    h("td", {}, a.latest),
    h("td", { class: "num" }, a.versions)));
  return [
    h("h1", {}, "Applications"),
    table(["application", "zone", "deployed", "newest", "versions"], rows, "No application yet: `paddock app publish PACKAGE_DIR`."),
  ];
}

async function appPage(name) {
  const [apps, versions, config] = await Promise.all([
    get("/v1/apps"), get(`/v1/apps/${enc(name)}/versions`), get(`/v1/apps/${enc(name)}/config`),
  ]);
  const summary = apps.find((a) => a.name === name) || {};
  const rows = versions.slice().reverse().map((v) => {
    const deployed = v.version === summary.desired;
    return h("tr", { "data-version": v.version },
      h("td", {}, h("strong", {}, v.version), deployed ? [" ", badge("deployed", "ok")] : null),
      h("td", {}, clock(v.created_ms)),
      h("td", { class: "mono" }, short(v.component_sha256)),
      h("td", { class: "mono" }, v.manifest.route),
      h("td", {}, (v.manifest.timers || []).map((t) => t.name).join(", ") || h("span", { class: "muted" }, "none")),
      h("td", {}, deployed ? null : h("div", { class: "actions" },
        action("balanced deploy", "balanced-deploy", async () => {
          const request = { apps: [{ app: name, version: v.version }] };
          const { ms, permille } = state.watch;
          if (ms > 0) request.watch = { ms, max_failed_permille: permille };
          const answer = await post("/v1/operations/balanced-deploy", request);
          go(`#/operations/${answer.operation.id}`);
          const watched = ms > 0 ? `, users' answers watched for ${ms / 1000} s` : "";
          return `operation ${answer.operation.id} started: ${name}@${v.version} without downtime${watched}`;
        }, { title: `paddock deploy --balanced (the procedure with drain and cutover; --watch as chosen above)` }),
        action("deploy in place", "deploy", async () => {
          const answer = await post(`/v1/apps/${enc(name)}/deploy`, { version: v.version });
          return `${name}@${v.version} is desired (generation ${answer.generation}); every front-end swaps to it in place`;
        }, { title: `paddock app deploy ${name} ${v.version}` }))));
  });
  const effective = Object.entries(config.effective || {});
  return [
    h("h1", {}, `Application ${name}`),
    h("p", {}, `Zone ${summary.zone || "—"}; deployed: ${summary.desired || "nothing"}.`),
    h("div", { class: "actions" }, action("purge cached responses", "purge-cache", async () => {
      const answer = await post(`/v1/apps/${enc(name)}/cache/purge`, { tags: [] });
      return `purge ${answer.purge} of ${name}: every cached response of the app; each front-end drops them within its purge poll (servers page: the last purge each applied)`;
    }, { title: `paddock cache purge ${name}` })),
    h("h2", {}, "Versions"),
    h("p", { id: "watch" }, "A balanced deploy counts users' answers after the cutover for ",
      choice("watch-ms", [[0, "no time (no watch step)"], [5000, "5 s"], [30000, "30 s"], [60000, "1 min"], [300000, "5 min"]],
        state.watch.ms, (ms) => { state.watch.ms = ms; }),
      "; more than ",
      choice("max-failed", [[1, "0.1 %"], [10, "1 %"], [50, "5 %"]],
        state.watch.permille, (permille) => { state.watch.permille = permille; }),
      " of them failing (5xx) puts users back on the old version (`--watch`, `--max-failed`)."),
    table(["version", "uploaded", "component", "route", "timers", ""], rows, "No version."),
    h("h2", {}, "Configuration"),
    config.waiting_for && config.waiting_for.length
      ? h("p", { class: "warn" }, `Not yet running this configuration: ${config.waiting_for.join(", ")}`) : null,
    table(["key", "value", "from"], effective.map(([key, value]) => h("tr", { "data-config": key },
      h("td", { class: "mono" }, key), h("td", { class: "mono", "data-field": "value" }, value),
      h("td", {}, Object.hasOwn(config.overrides || {}, key) ? "override (paddock config set)" : "manifest"))),
    "No configuration."),
  ];
}

function planSummary(op) {
  const parts = [];
  if (op.plan && op.plan.platform) parts.push(`platform build ${short(op.plan.platform.sha256)}`);
  for (const zone of (op.plan && op.plan.zones) || []) {
    for (const a of zone.apps || []) parts.push(`${a.app} ${a.from || "—"} → ${a.to}`);
  }
  return parts.join(", ");
}

function operationsTable(ops) {
  const rows = ops.map((op) => h("tr", { "data-operation": op.id },
    h("td", {}, link(`#/operations/${op.id}`, `#${op.id}`)),
    h("td", {}, op.kind),
    h("td", { "data-field": "state" }, stateBadge(op.state), op.abort_requested && op.state === "running" ? h("div", { class: "warn" }, "abort asked") : null),
    h("td", {}, planSummary(op)),
    h("td", {}, op.zones.join(", ")),
    h("td", {}, clock(op.created_ms)),
    h("td", {}, span((op.ended_ms || Date.now()) - op.created_ms)),
    h("td", {}, op.message || "")));
  return table(["id", "kind", "state", "what", "zones", "started", "took", "message"], rows,
    "No operation yet: `paddock deploy --balanced PACKAGE_DIR` runs one.");
}

async function operationsPage() {
  return [h("h1", {}, "Operations"), operationsTable(await get("/v1/operations"))];
}

async function operationPage(id) {
  const op = await get(`/v1/operations/${enc(id)}`);
  const journal = op.steps.slice();
  const ended = !["running", "paused"].includes(op.state);
  const zones = (op.plan && op.plan.zones) || [];
  const sections = zones.map((zone) => {
    const planned = zone.steps.map((s, i) => {
      const at = journal.findIndex((j) => j.zone === zone.zone && j.step === s.step);
      const done = at >= 0 ? journal.splice(at, 1)[0] : null;
      return [i + 1, s, done];
    });
    const extra = journal.filter((j) => j.zone === zone.zone).map((j) => ["↺", j, j]);
    return [
      h("h2", {}, `Zone ${zone.zone}`),
      h("p", { class: "muted" },
        `updating: ${zone.updating.join(", ") || "—"}; loaded: ${zone.loaded.join(", ") || "—"}`,
        zone.untouched && zone.untouched.length ? `; untouched: ${zone.untouched.join(", ")}` : "",
        zone.in_place ? " (in place: one front-end)" : ""),
      table(["#", "step", "servers", "state", "attempts", "took", "facts"], planned.concat(extra).map(([n, s, done]) =>
        h("tr", { "data-step": s.step },
          h("td", {}, n),
          h("td", { class: "mono" }, s.step),
          h("td", {}, s.servers.join(", ")),
          h("td", { "data-field": "state" }, stateBadge(done ? done.state : ended ? "skipped" : "pending")),
          h("td", { class: "num" }, done ? done.attempts : ""),
          h("td", {}, done && done.started_ms ? span((done.ended_ms || Date.now()) - done.started_ms) : ""),
          h("td", {}, done ? [h("ul", { class: "facts" }, done.facts.map((f) => h("li", {}, f))), done.message ? h("div", { class: "bad" }, done.message) : null] : null))),
      "No step."),
    ];
  });
  const running = op.state === "running";
  return [
    h("h1", {}, `Operation #${op.id}: ${op.kind}`),
    h("p", { id: "operation-state" }, stateBadge(op.state), " ", planSummary(op),
      h("span", { class: "muted" }, ` · started ${clock(op.created_ms)}, ${op.ended_ms ? `ended ${clock(op.ended_ms)}` : `updated ${clock(op.updated_ms)}`}`)),
    op.message ? h("p", { class: op.state === "succeeded" ? "" : "bad", id: "operation-message" }, op.message) : null,
    h("div", { class: "actions" },
      running ? action("abort", "abort", async () => {
        await post(`/v1/operations/${op.id}/abort`);
        return `operation ${op.id}: abort asked; the steps that put things back run next`;
      }, { danger: true, disabled: op.abort_requested, title: `paddock op abort ${op.id}` }) : null,
      op.state === "paused" ? action("resume", "resume", async () => {
        await post(`/v1/operations/${op.id}/resume`);
        return `operation ${op.id} resumed`;
      }, { title: `paddock op resume ${op.id}` }) : null),
    sections,
  ];
}

function schedule(s) {
  return Object.entries(s || {}).map(([k, v]) => `${k} ${v}`).join(", ");
}

async function timersPage() {
  const timers = await get("/v1/timers");
  const rows = timers.map((t) => h("tr", { "data-timer": `${t.app}/${t.timer}` },
    h("td", {}, link(`#/timers/${enc(t.app)}/${enc(t.timer)}`, `${t.app}/${t.timer}`)),
    h("td", {}, `${t.zone}, ${t.version}`),
    h("td", {}, schedule(t.schedule)),
    h("td", { class: "mono" }, t.path),
    h("td", {}, clock(t.next_ms)),
    h("td", { "data-field": "running" }, t.running_on ? [badge("running", "info"), ` on ${t.running_on}`] : h("span", { class: "muted" }, "—")),
    h("td", {}, action("run now", "run-timer", async () => {
      await post(`/v1/timers/${enc(t.app)}/${enc(t.timer)}/run`);
      return `${t.app}/${t.timer} is due now: a scheduler runs it within a second`;
    }, { title: `paddock timer run ${t.app} ${t.timer}` }))));
  return [h("h1", {}, "Timers"),
    table(["timer", "zone, version", "schedule", "path", "next", "running", ""], rows, "No timer: apps declare them in paddock.toml ([[timers]]).")];
}

async function timerPage(app, timer) {
  const runs = await get(`/v1/timers/${enc(app)}/${enc(timer)}/runs?limit=50`);
  const rows = runs.map((r) => h("tr", { "data-run": r.id },
    h("td", {}, clock(r.tick_ms)), h("td", {}, r.server), h("td", { "data-field": "outcome" }, stateBadge(r.outcome)),
    h("td", {}, r.ended_ms ? span(r.ended_ms - r.started_ms) : ""), h("td", {}, r.retry ? "yes" : ""), h("td", {}, r.detail || "")));
  return [h("h1", {}, `Timer ${app}/${timer}`), h("p", {}, link("#/timers", "← all timers")),
    table(["tick", "server", "outcome", "took", "retry", "detail"], rows, "No run yet.")];
}

async function routingPage() {
  const routing = await get("/v1/routing");
  const balancers = routing.balancers.map((b) => h("tr", { "data-balancer": b.report.name },
    h("td", {}, h("strong", {}, b.report.name)),
    h("td", { class: "mono" }, b.report.listen, h("div", { class: "muted" }, `metrics ${b.report.admin || "—"}`)),
    h("td", {}, b.alive ? badge("alive", "ok") : badge("silent", "bad"), h("div", { class: "muted" }, `report ${ago(b.heartbeat_ms)}`)),
    h("td", { class: "num", "data-field": "generation" }, b.report.generation),
    h("td", { "data-field": "build" }, b.report.build ? h("span", { class: "mono" }, short(b.report.build)) : h("span", { class: "muted" }, "not known yet"),
      b.report.installing ? h("div", { class: "info" }, `installing ${short(b.report.installing)}`) : null,
      b.platform_target && b.platform_target !== b.report.build ? h("div", { class: "muted" }, `told to run ${short(b.platform_target)}`) : null),
    h("td", {}, b.report.upstreams.map((u) => h("div", {}, u.up ? badge("up", "ok") : badge("down", "bad"), ` ${u.name}, ${u.in_flight} in flight`))),
    h("td", { "data-field": "answers" }, (b.report.apps || []).length
      ? b.report.apps.map((a) => h("div", { "data-app": a.app }, `${a.app}: ${a.answered} answered`,
        a.failed ? h("span", { class: "bad" }, `, ${a.failed} failed (5xx)`) : null))
      : h("span", { class: "muted" }, "no app routed"))));
  const zones = routing.table.zones.map((z) => [
    h("h2", {}, `Zone ${z.zone}: ${z.policy}`),
    table(["front-end", "address", "state", "weight"], z.upstreams.map((u) => h("tr", { "data-upstream": u.name },
      h("td", {}, u.name), h("td", { class: "mono" }, u.address), h("td", {}, stateBadge(u.state)), h("td", { class: "num" }, u.weight))), "No front-end."),
  ]);
  return [
    h("h1", {}, `Routing: generation ${routing.table.generation}`),
    h("p", { id: "routing-applied" }, routing.applied
      ? badge("applied by every live balancer", "ok")
      : badge(`not yet applied by ${routing.pending.join(", ") || "any balancer"}`, "warn")),
    h("h2", {}, "Balancers"),
    table(["balancer", "listens", "state", "generation", "build", "front-ends", "answers since it started"], balancers, "No balancer has reported: start one with `paddock balancer --controller URL`."),
    zones,
    h("h2", {}, "Routes"),
    table(["path prefix", "application", "zone"], routing.table.routes.map((r) => h("tr", {},
      h("td", { class: "mono" }, r.prefix), h("td", {}, link(`#/apps/${enc(r.app)}`, r.app)), h("td", {}, r.zone))), "No route."),
  ];
}

async function auditPage() {
  const entries = await get("/v1/audit?limit=200");
  return [h("h1", {}, "Audit"), table(["when", "who", "what", "detail"], entries.map((e) => h("tr", { "data-audit": e.id },
    h("td", {}, clock(e.at_ms)), h("td", {}, e.actor), h("td", { class: "mono" }, e.action), h("td", {}, e.detail))), "Nothing yet.")];
}

/** The page for an address: `#/servers`, `#/apps/NAME`, `#/operations/ID`, ... */
function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  const [page, a, b] = parts;
  switch (page || "overview") {
    case "overview": return ["overview", overview];
    case "servers": return ["servers", servers];
    case "apps": return ["apps", a ? () => appPage(a) : appsPage];
    case "operations": return ["operations", a ? () => operationPage(a) : operationsPage];
    case "timers": return ["timers", a && b ? () => timerPage(a, b) : timersPage];
    case "routing": return ["routing", routingPage];
    case "audit": return ["audit", auditPage];
    default: return [null, async () => [h("h1", {}, "No such page"), h("p", {}, `Nothing at “${location.hash}”. `, link("#/", "Go to the overview."))]];
  }
}

// ---- refresh loop ---------------------------------------------------------------------------

async function refresh() {
  clearTimeout(state.timer);
  if (!state.token) return;
  const view = state.view;
  const asked = ++state.refresh;
  const current = () => view === state.view && asked === state.refresh && state.token;
  try {
    const [page, load] = route();
    for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("current", a.dataset.page === page);
    const content = await load();
    if (!current()) return;
    const main = document.getElementById("view");
    // A drop-down being chosen from is not redrawn under the operator (its list would close):
    // this drawing waits for the next refresh.
    const focused = document.activeElement;
    if (focused && focused.tagName === "SELECT" && main.contains(focused)) {
      state.timer = setTimeout(refresh, REFRESH_MS);
      return;
    }
    const scroll = window.scrollY;
    main.replaceChildren();
    append(main, [content]);
    main.dataset.page = page || "none";
    window.scrollTo(0, scroll);
    state.lastOk = Date.now();
    document.getElementById("updated").textContent = `updated ${clock(state.lastOk)}`;
    document.getElementById("updated").className = "";
  } catch (e) {
    if (!current()) return;
    const what = e instanceof ApiError ? `${e.message} (${e.kind})` : String(e);
    if (!(e instanceof ApiError) || (e.status >= 400 && e.status < 500)) {
      const main = document.getElementById("view");
      main.replaceChildren(h("h1", {}, "Cannot show this page"), h("p", { class: "bad", id: "page-error" }, what));
      main.dataset.page = "error";
    } else {
      const updated = document.getElementById("updated");
      updated.textContent = `${what}; showing what was read ${state.lastOk ? ago(state.lastOk) : "never"}, retrying`;
      updated.className = "bad";
    }
  }
  if (current() && !document.hidden) state.timer = setTimeout(refresh, REFRESH_MS);
}

/** Another page, from the address bar or a link: the last page's notice goes. */
function navigate() {
  state.view += 1;
  document.getElementById("notice").hidden = true;
  refresh();
}

/** Another page, from a button: its notice stays (the caller's refresh shows the page). */
function go(hash) {
  history.pushState(null, "", hash);
  state.view += 1;
}

// ---- signing in and out ---------------------------------------------------------------------

function signIn(token) {
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("nav").hidden = false;
  document.getElementById("session").hidden = false;
  navigate();
}

function signOut(reason) {
  state.token = null;
  state.view += 1;
  clearTimeout(state.timer);
  document.getElementById("notice").hidden = true;
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("nav").hidden = true;
  document.getElementById("session").hidden = true;
  const form = document.getElementById("sign-in").content.cloneNode(true);
  const main = document.getElementById("view");
  main.replaceChildren(form);
  main.dataset.page = "sign-in";
  if (reason) {
    const error = document.getElementById("sign-in-error");
    error.textContent = reason;
    error.hidden = false;
  }
  document.getElementById("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = document.getElementById("token").value.trim();
    if (token) signIn(token);
  });
  document.getElementById("token").focus();
}

/** The token of a `#token=...` address (what `paddock up` prints), taken out of the address. */
function tokenFromAddress() {
  const given = new URLSearchParams(location.hash.replace(/^#/, "")).get("token");
  if (given) history.replaceState(null, "", `${location.pathname}#/`);
  return given;
}

function start() {
  document.getElementById("sign-out").addEventListener("click", () => signOut(null));
  window.addEventListener("hashchange", () => {
    const given = tokenFromAddress();
    if (given) signIn(given);
    else navigate();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && state.token) refresh();
    else clearTimeout(state.timer);
  });
  const kept = tokenFromAddress() || sessionStorage.getItem(TOKEN_KEY);
  if (kept) signIn(kept);
  else signOut(null);
}

start();
