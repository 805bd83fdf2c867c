// The wavechain dashboard: runs, a run's graph and outputs, live; cancel, retry, start.
// Everything shown comes from the REST API and is put into the page as text (never HTML):
// prompts and errors are user input.

const main = document.getElementById("main");
const live = document.getElementById("live");
const TOKEN_KEY = "wavechain-token";
let streamAbort = null; // the live view's stream, closed when the view changes

// -- the API ---------------------------------------------------------------------------

function headers() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function askToken() {
  return new Promise((resolve) => {
    const dialog = document.getElementById("token-dialog");
    const form = document.getElementById("token-form");
    const input = document.getElementById("token-input");
    input.value = "";
    form.onsubmit = () => {
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      resolve();
    };
    dialog.showModal();
  });
}

async function api(path, options = {}) {
  for (;;) {
    const response = await fetch(path, {
      ...options,
      headers: { ...headers(), ...(options.body ? { "Content-Type": "application/json" } : {}) },
    });
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      await askToken();
      continue;
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    return body;
  }
}

// Server-sent events read with fetch (EventSource cannot send the token), reconnecting
// after a dropped connection.
async function stream(path, onEvent) {
  if (streamAbort) streamAbort.abort();
  const abort = new AbortController();
  streamAbort = abort;
  let failures = 0;
  while (!abort.signal.aborted) {
    try {
      const response = await fetch(path, { headers: headers(), signal: abort.signal });
      if (response.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        await askToken();
        continue;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      live.dataset.state = "live";
      failures = 0;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const chunk = buffer.slice(0, end);
          buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
          let event = "message";
          const data = [];
          for (const line of chunk.split(/\r?\n/)) {
            if (line.startsWith("event:")) event = line.slice(6).trim();
            else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
          }
          if (data.length) onEvent(event, JSON.parse(data.join("\n")));
        }
      }
    } catch (error) {
      if (abort.signal.aborted) return;
    }
    live.dataset.state = "reconnecting";
    failures += 1;
    await new Promise((r) => setTimeout(r, Math.min(5000, 500 * failures)));
  }
}

// -- small DOM helpers (text only) --------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(status) {
  return el("span", { class: `badge ${status}`, "data-status": status }, status);
}

function ago(iso) {
  if (!iso) return "";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

function duration(run) {
  if (!run.created_at) return "";
  const end = run.status === "running" ? Date.now() : Date.parse(run.updated_at);
  const seconds = (end - Date.parse(run.created_at)) / 1000;
  return seconds < 120 ? `${seconds.toFixed(1)} s` : `${(seconds / 60).toFixed(1)} min`;
}

function cost(item) {
  if (typeof item.cost_usd === "number") return `$${item.cost_usd.toFixed(2)}`;
  return item.cost_known_usd > 0 ? `≥ $${item.cost_known_usd.toFixed(2)}` : "—";
}

// -- the runs list -----------------------------------------------------------------------

async function showRuns(query) {
  const status = query.get("status") || "";
  const pipeline = query.get("pipeline") || "";
  const cursor = query.get("cursor") || "";
  const pipelines = (await api("/v1/pipelines")).pipelines.map((p) => p.name);
  const filters = el(
    "div",
    { class: "filters" },
    el("label", {}, "Status ",
      select("status", ["", "running", "succeeded", "failed", "cancelled"], status)),
    el("label", {}, "Pipeline ", select("pipeline", ["", ...pipelines], pipeline)),
  );
  const table = el("table", { id: "runs" });
  const pager = el("div", { class: "row" });
  main.replaceChildren(el("h1", {}, "Runs"), filters, table, pager);

  async function load() {
    const params = new URLSearchParams({ limit: "25" });
    if (status) params.set("status", status);
    if (pipeline) params.set("pipeline", pipeline);
    if (cursor) params.set("cursor", cursor);
    const page = await api(`/v1/runs?${params}`);
    table.replaceChildren(
      el("thead", {}, el("tr", {}, ["Run", "Pipeline", "Status", "Started", "Duration",
        "Cost"].map((h) => el("th", {}, h)))),
      el("tbody", {}, page.runs.map((run) =>
        el("tr", { "data-run": run.id },
          el("td", {}, el("a", { href: `#/runs/${encodeURIComponent(run.id)}` }, run.id)),
          el("td", {}, run.pipeline),
          el("td", {}, badge(run.status)),
          el("td", {}, ago(run.created_at)),
          el("td", { class: "num" }, duration(run)),
          el("td", { class: "num" }, cost(run))))),
    );
    const links = [];
    if (cursor) links.push(el("a", { href: `#/?${withParam(query, "cursor", "")}` }, "Newest"));
    if (page.next_cursor) {
      links.push(el("a", { href: `#/?${withParam(query, "cursor", page.next_cursor)}` },
        "Older →"));
    }
    pager.replaceChildren(...links);
  }
  await load();
  stream("/v1/runs/stream", () => load().catch(() => {}));
}

function withParam(query, name, value) {
  const params = new URLSearchParams(query);
  if (value) params.set(name, value);
  else params.delete(name);
  return params.toString();
}

function select(name, options, current) {
  return el("select", {
    name,
    onchange: (event) => {
      const params = new URLSearchParams(location.hash.split("?")[1] || "");
      if (event.target.value) params.set(name, event.target.value);
      else params.delete(name);
      params.delete("cursor");
      location.hash = `#/?${params}`;
    },
  }, options.map((option) =>
    el("option", { value: option, ...(option === current ? { selected: "" } : {}) },
      option || "any")));
}

// -- one run -------------------------------------------------------------------------------

async function showRun(runId) {
  const id = encodeURIComponent(runId);
  main.replaceChildren(el("p", { class: "muted" }, "Loading…"));
  let deliveries = [];

  async function render(run) {
    deliveries = (await api(`/v1/runs/${id}/deliveries`)).deliveries;
    main.replaceChildren(
      el("h1", {}, "Run ", el("code", {}, run.id), " ", badge(run.status)),
      el("p", { class: "muted" }, `${run.pipeline} · started ${ago(run.created_at)} · `,
        `${duration(run)} · cost ${cost(run)}`,
        typeof run.budget_usd === "number" ? ` of $${run.budget_usd.toFixed(2)} budget` : "",
        run.deadline_at ? ` · deadline ${run.deadline_at}` : "",
        run.priority !== undefined && run.priority !== 5 ? ` · priority ${run.priority}` : "",
        run.concurrency_key ? ` · key ${run.concurrency_key}` : "",
        run.concurrency_limit ? ` (at most ${run.concurrency_limit} at once)` : ""),
      el("dl", { class: "inputs" }, Object.entries(run.inputs || {}).map(([k, v]) =>
        [el("dt", {}, k), el("dd", { "data-input": k }, typeof v === "string" ? v : JSON.stringify(v))])),
      actions(run),
      dag(run),
      el("div", { class: "stages" }, run.stages.map((stage) => stageCard(stage, deliveries))),
    );
  }

  function actions(run) {
    const row = el("div", { class: "row" });
    const act = (label, path, body, cls) =>
      el("button", {
        class: cls,
        "data-action": label,
        onclick: async () => {
          try {
            const updated = await api(path, { method: "POST", body: JSON.stringify(body) });
            await render(updated);
          } catch (error) {
            row.append(el("span", { class: "error" }, error.message));
          }
        },
      }, label);
    if (run.status === "running") {
      row.append(act("Cancel", `/v1/runs/${id}/cancel`, {}, "danger"));
    } else {
      if (run.status !== "succeeded") row.append(act("Retry failed", `/v1/runs/${id}/retry`, {}));
      const from = el("select", { "aria-label": "stage" },
        run.stages.map((s) => el("option", { value: s.name }, s.name)));
      row.append(from, el("button", {
        "data-action": "Retry from",
        onclick: async () => {
          try {
            await render(await api(`/v1/runs/${id}/retry`,
              { method: "POST", body: JSON.stringify({ from: from.value }) }));
          } catch (error) {
            row.append(el("span", { class: "error" }, error.message));
          }
        },
      }, "Retry from stage"));
    }
    return row;
  }

  const first = await api(`/v1/runs/${id}?previews=true`);
  await render(first);
  stream(`/v1/runs/${id}/stream`, (event, run) => {
    if (event === "run") render(run).catch(() => {});
  });
}

function levels(stages) {
  const byName = Object.fromEntries(stages.map((s) => [s.name, s]));
  const level = {};
  const visit = (name, seen = new Set()) => {
    if (name in level) return level[name];
    if (seen.has(name) || !byName[name]) return 0;
    seen.add(name);
    const needs = byName[name].needs || [];
    level[name] = needs.length ? 1 + Math.max(...needs.map((n) => visit(n, seen))) : 0;
    return level[name];
  };
  stages.forEach((s) => visit(s.name));
  return level;
}

function dag(run) {
  const ns = "http://www.w3.org/2000/svg";
  const level = levels(run.stages);
  const columns = {};
  for (const stage of run.stages) (columns[level[stage.name]] ||= []).push(stage);
  const width = 170, height = 44, gapX = 70, gapY = 22, pad = 16;
  const position = {};
  let maxRows = 1;
  for (const [col, list] of Object.entries(columns)) {
    maxRows = Math.max(maxRows, list.length);
    list.forEach((stage, row) => {
      position[stage.name] = { x: pad + col * (width + gapX), y: pad + row * (height + gapY) };
    });
  }
  const cols = Object.keys(columns).length;
  const svg = document.createElementNS(ns, "svg");
  const w = pad * 2 + cols * width + (cols - 1) * gapX;
  const h = pad * 2 + maxRows * height + (maxRows - 1) * gapY;
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  for (const stage of run.stages) {
    for (const need of stage.needs || []) {
      const a = position[need], b = position[stage.name];
      if (!a || !b) continue;
      const path = document.createElementNS(ns, "path");
      const x1 = a.x + width, y1 = a.y + height / 2, x2 = b.x, y2 = b.y + height / 2;
      path.setAttribute("d", `M${x1},${y1} C${x1 + 35},${y1} ${x2 - 35},${y2} ${x2},${y2}`);
      path.dataset.edge = `${need}->${stage.name}`;
      svg.append(path);
    }
  }
  for (const stage of run.stages) {
    const { x, y } = position[stage.name];
    const group = document.createElementNS(ns, "g");
    group.dataset.stage = stage.name;
    group.dataset.status = stage.status;
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", x);
    rect.setAttribute("y", y);
    rect.setAttribute("width", width);
    rect.setAttribute("height", height);
    rect.setAttribute("stroke", `var(--${stage.status})`);
    const name = document.createElementNS(ns, "text");
    name.setAttribute("x", x + 10);
    name.setAttribute("y", y + 15);
    name.setAttribute("font-weight", "600");
    name.textContent = stage.name;
    const status = document.createElementNS(ns, "text");
    status.setAttribute("x", x + 10);
    status.setAttribute("y", y + 32);
    status.setAttribute("fill", `var(--${stage.status})`);
    status.textContent = stage.cached
      ? `${stage.status} · cached` : `${stage.status} · attempt ${stage.attempt}`;
    group.append(rect, name, status);
    group.addEventListener("click", () =>
      document.getElementById(`stage-${stage.name}`)?.scrollIntoView({ behavior: "smooth" }));
    svg.append(group);
  }
  return el("div", { class: "dag", id: "dag" }, svg);
}

function stageCard(stage, deliveries) {
  const timings = stage.timings || {};
  const mine = deliveries.filter((d) => d.stage === stage.name);
  return el("section", { class: "stage", id: `stage-${stage.name}`, "data-stage": stage.name },
    el("h3", {}, stage.name, badge(stage.status)),
    el("dl", {},
      el("dt", {}, "model"), el("dd", {}, stage.model),
      el("dt", {}, "attempt"), el("dd", {}, String(stage.attempt)),
      el("dt", {}, "task"), el("dd", {}, stage.cached ? "— (served from the cache)" : stage.task_id || "—"),
      el("dt", {}, "cost"), el("dd", {}, cost(stage)),
      el("dt", {}, "submitted"), el("dd", {}, timings.submitted_at || "—"),
      el("dt", {}, "finished"), el("dd", {}, timings.finished_at || "—"),
      el("dt", {}, "took"), el("dd", {},
        timings.elapsed_s != null ? `${timings.elapsed_s} s` : "—"),
      el("dt", {}, "outputs"), el("dd", {}, (stage.outputs || []).join("\n") || "—"),
      stage.error ? [el("dt", {}, "error"), el("dd", { class: "error" }, stage.error)] : null),
    previews(stage),
    mine.length ? el("table", { class: "deliveries" },
      el("thead", {}, el("tr", {}, ["Callback", "Task status", "Effect", "Received"]
        .map((h) => el("th", {}, h)))),
      el("tbody", {}, mine.map((d) => el("tr", { "data-effect": d.effect },
        el("td", {}, d.webhook_id), el("td", {}, d.status || ""),
        el("td", {}, d.effect),
        el("td", {}, new Date(d.received_at * 1000).toISOString()))))) : null);
}

function previews(stage) {
  const items = (stage.previews || []).map((preview, n) => {
    if (preview.kind === "image") {
      return el("img", { src: preview.url, alt: `${stage.name} output ${n}`,
        "data-preview": "image" });
    }
    if (preview.kind === "video") {
      return el("video", { src: preview.url, controls: "", preload: "metadata", muted: "",
        "data-preview": "video" });
    }
    if (preview.kind === "mesh") {
      const viewer = el("model-viewer", { src: preview.url, "camera-controls": "", loading: "eager",
        "auto-rotate": "", alt: `${stage.name} output ${n}`, "data-preview": "mesh" });
      viewer.addEventListener("load", () => { viewer.dataset.loaded = "true"; });
      viewer.addEventListener("error", () => { viewer.dataset.loaded = "error"; });
      return viewer;
    }
    return el("a", { href: preview.url, rel: "noreferrer" }, `output ${n}`);
  });
  return items.length ? el("div", { class: "previews" }, items) : null;
}

// -- a new run -------------------------------------------------------------------------------

async function showNew() {
  if (streamAbort) streamAbort.abort();
  live.dataset.state = "idle";
  const pipelines = (await api("/v1/pipelines")).pipelines;
  const choose = el("select", { name: "pipeline" },
    pipelines.map((p) => el("option", { value: p.name }, p.name)));
  const fields = el("div");
  const message = el("p", { class: "error" });
  const fill = () => {
    const pipeline = pipelines.find((p) => p.name === choose.value);
    fields.replaceChildren(
      el("p", { class: "muted" }, pipeline.description || ""),
      ...Object.entries(pipeline.inputs || {}).map(([name, decl]) =>
        el("label", {}, `${name} (${decl.type})`,
          el("input", { name, "data-type": decl.type,
            value: decl.default ?? "", placeholder: decl.description || "" }))));
  };
  choose.addEventListener("change", fill);
  const form = el("form", {
    class: "new",
    onsubmit: async (event) => {
      event.preventDefault();
      const inputs = {};
      for (const input of fields.querySelectorAll("input")) {
        if (input.value === "") continue;
        const type = input.dataset.type;
        inputs[input.name] = type === "integer" ? parseInt(input.value, 10)
          : type === "number" ? Number(input.value)
          : type === "boolean" ? input.value === "true" : input.value;
      }
      try {
        const run = await api("/v1/runs",
          { method: "POST", body: JSON.stringify({ pipeline: choose.value, inputs }) });
        location.hash = `#/runs/${encodeURIComponent(run.id)}`;
      } catch (error) {
        message.textContent = error.message;
      }
    },
  }, el("label", {}, "Pipeline", choose), fields, message,
  el("div", { class: "row" }, el("button", { class: "primary", type: "submit" }, "Start run")));
  main.replaceChildren(el("h1", {}, "New run"), form);
  fill();
}

// -- routing ------------------------------------------------------------------------------------

async function route() {
  // Close the previous view's stream first: its connection is one of the few a browser
  // keeps open to a server.
  if (streamAbort) streamAbort.abort();
  streamAbort = null;
  live.dataset.state = "idle";
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  try {
    if (path.startsWith("/runs/")) await showRun(decodeURIComponent(path.slice(6)));
    else if (path === "/new") await showNew();
    else await showRuns(new URLSearchParams(query || ""));
  } catch (error) {
    main.replaceChildren(el("p", { class: "error" }, error.message));
  }
}

window.addEventListener("hashchange", route);
route();
