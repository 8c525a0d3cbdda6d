// The Phalanx dashboard: one EventSource (api/events) feeds the runs list, the selected run's
// live header, round table and charts, and the sites table. No framework: every text the page
// shows is set with textContent or setAttribute, never parsed as HTML.
"use strict";

(() => {
  const STATES = new Set(["pending", "waiting", "running", "completed", "failed", "stopped"]);
  const SVG = document.getElementById("loss-chart").namespaceURI; // the charts are SVG elements of the page
  const CHART = { width: 480, height: 240, left: 52, right: 14, top: 14, bottom: 32 };

  const view = {
    runs: [],
    selected: "",
    chosen: false, // picked by the user (or the address), not by default
    run: null,
    rows: [],
    progress: null,
    progressAt: 0,
    sites: [],
    skew: 0, // the server's clock minus this one, in seconds
    source: null,
  };

  const $ = (id) => document.getElementById(id);

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function svgElement(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : element("td", cell));
    return tr;
  }

  const finite = (value) => typeof value === "number" && Number.isFinite(value);
  const fixed = (value, digits) => (finite(value) ? value.toFixed(digits) : "-");
  const percent = (value) => (finite(value) ? (100 * value).toFixed(1) + " %" : "-");

  function bytes(value) {
    if (!finite(value)) return "-";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let scaled = value;
    let unit = 0;
    while (scaled >= 1000 && unit < units.length - 1) {
      scaled /= 1000;
      unit += 1;
    }
    return (unit === 0 ? String(Math.round(scaled)) : scaled.toFixed(scaled < 10 ? 2 : 1)) + " " + units[unit];
  }

  function duration(seconds) {
    if (!finite(seconds)) return "-";
    const s = Math.max(0, seconds);
    if (s < 60) return s.toFixed(1) + " s";
    const minutes = Math.floor(s / 60);
    if (minutes < 60) return minutes + " min " + String(Math.floor(s % 60)).padStart(2, "0") + " s";
    return Math.floor(minutes / 60) + " h " + String(minutes % 60).padStart(2, "0") + " min";
  }

  function stateBadge(node, state) {
    node.textContent = state || "";
    node.className = "state" + (STATES.has(state) ? " state-" + state : "");
  }

  // Selection and the event stream

  function defaultRun(runs) {
    const running = runs.filter((r) => r.state === "running" || r.state === "waiting");
    const pick = running.length ? running[running.length - 1] : runs[runs.length - 1];
    return pick ? pick.id : "";
  }

  function select(runId, chosen) {
    view.selected = runId;
    view.chosen = chosen;
    view.run = view.runs.find((r) => r.id === runId) || null;
    view.rows = [];
    view.progress = null;
    if (chosen) history.replaceState(null, "", "#run=" + encodeURIComponent(runId));
    renderAll();
    connect();
  }

  function connect() {
    if (view.source) view.source.close();
    const query = view.selected ? "?run=" + encodeURIComponent(view.selected) : "";
    const source = new EventSource("api/events" + query);
    view.source = source;
    const on = (kind, handler) =>
      source.addEventListener(kind, (event) => {
        if (source === view.source) handler(JSON.parse(event.data));
      });
    on("runs", onRuns);
    on("sites", onSites);
    on("run", (record) => {
      view.run = record;
      renderRun();
    });
    on("rows", (rows) => {
      view.rows = rows;
      renderRows();
    });
    on("row", (update) => {
      view.rows[Math.min(update.index, view.rows.length)] = update.row;
      renderRows();
    });
    on("progress", (progress) => {
      view.progress = progress;
      view.progressAt = performance.now();
      renderRun();
      renderSites();
    });
    source.onopen = () => setConnection("live");
    source.onerror = () => {
      if (source !== view.source) return;
      if (source.readyState !== EventSource.CLOSED) {
        setConnection("reconnecting");
      } else if (view.selected) {
        // Refused (an unknown run, or no access): fall back to the default run.
        view.chosen = false;
        view.selected = "";
        history.replaceState(null, "", location.pathname);
        setConnection("reconnecting");
        setTimeout(connect, 2000);
      } else {
        setConnection("closed");
        setTimeout(connect, 5000);
      }
    };
  }

  function setConnection(state) {
    const node = $("connection");
    node.textContent = state;
    node.className = "connection " + state;
  }

  function onRuns(runs) {
    view.runs = runs;
    const known = runs.some((r) => r.id === view.selected);
    const pick = view.chosen && known ? view.selected : defaultRun(runs);
    renderRuns();
    if (pick !== view.selected) select(pick, false);
  }

  function onSites(data) {
    view.sites = data.sites;
    view.skew = data.now - Date.now() / 1000;
    renderSites();
  }

  // Rendering

  function renderAll() {
    renderRuns();
    renderRun();
    renderRows();
    renderSites();
  }

  function renderRuns() {
    const body = $("runs").tBodies[0];
    clear(body);
    for (const run of view.runs.slice().reverse()) {
      const id = element("td", run.id.length > 12 ? run.id.slice(0, 12) + "…" : run.id, "run-id");
      id.setAttribute("title", run.id);
      const state = element("td");
      stateBadge(state.appendChild(element("span")), run.state);
      const tr = row([id, state, run.completed_rounds + " / " + run.rounds, run.reason || ""]);
      tr.dataset.run = run.id;
      tr.tabIndex = 0;
      if (run.id === view.selected) tr.className = "selected";
      tr.addEventListener("click", () => select(run.id, true));
      tr.addEventListener("keydown", (event) => {
        if (event.key === "Enter") select(run.id, true);
      });
      body.appendChild(tr);
    }
    $("no-runs").hidden = view.runs.length > 0;
  }

  function renderRun() {
    const run = view.run;
    $("run-panel").hidden = !run;
    if (!run) return;
    $("run-id").textContent = run.id;
    stateBadge($("run-state"), run.state);
    $("run-reason").textContent = run.reason || "-";
    const p = view.progress;
    const ticking = p && p.phase !== "finished" && (run.state === "running" || run.state === "waiting");
    const since = ticking ? (performance.now() - view.progressAt) / 1000 : 0;
    if (p && p.round > 0) $("live-round").textContent = p.round + " / " + p.total_rounds;
    else if (p && p.round === 0) $("live-round").textContent = "0 (initial evaluation) / " + p.total_rounds;
    else $("live-round").textContent = run.completed_rounds + " / " + run.rounds;
    $("live-phase").textContent = p ? p.phase : "-";
    $("live-answered").textContent = p && p.asked.length ? p.answered + " / " + p.asked.length : "-";
    $("live-elapsed").textContent = p ? duration(p.elapsed_seconds + since) : "-";
    $("live-eta").textContent = p && finite(p.eta_seconds) ? duration(p.eta_seconds - since) : "-";
  }

  function renderRows() {
    const table = $("rounds");
    const body = table.tBodies[0];
    clear(body);
    const private_ = view.rows.some((r) => finite(r.dp_epsilon));
    table.classList.toggle("no-epsilon", !private_);
    for (const r of view.rows.slice().reverse()) {
      const status = element("td", r.status + (r.attempt ? " (retry " + r.attempt + ")" : ""), "status-" + (r.status === "ok" ? "ok" : "failed"));
      if (r.failures && r.failures.length) {
        status.appendChild(element("span", " · " + r.failures.length + " failed", "note"));
        status.setAttribute("title", r.failures.map((f) => f.trainer + " " + f.phase + ": " + f.code + " " + f.reason).join("\n"));
      }
      const sites = r.round > 0 ? r.trainers_accepted + " / " + r.trainers_sampled : "evaluation";
      const tr = row([
        r.round === 0 ? "0 (initial)" : r.round,
        status,
        fixed(r.loss, 4),
        percent(r.accuracy),
        fixed(r.train_loss, 4),
        sites,
        fixed(r.seconds, 2),
        bytes(r.bytes_sent),
        bytes(r.bytes_received),
        element("td", fixed(r.dp_epsilon, 3), "epsilon"),
        r.stop_reason || "",
      ]);
      tr.dataset.round = String(r.round);
      body.appendChild(tr);
    }
    renderCharts();
  }

  function renderCharts() {
    const latest = new Map(); // a retried round: its last row
    for (const r of view.rows) latest.set(r.round, r);
    const rows = [...latest.values()].filter((r) => r.status === "ok").sort((a, b) => a.round - b.round);
    const total = view.run ? view.run.rounds : 0;
    const xMax = Math.max(total, ...rows.map((r) => r.round), 1);
    const losses = rows.filter((r) => finite(r.loss)).map((r) => ({ x: r.round, y: r.loss }));
    const [low, high] = lossRange(losses.map((p) => p.y));
    drawChart($("loss-chart"), losses, { xMax, yMin: low, yMax: high, format: (v) => v.toPrecision(3) });
    const accuracies = rows.filter((r) => finite(r.accuracy)).map((r) => ({ x: r.round, y: r.accuracy }));
    drawChart($("accuracy-chart"), accuracies, { xMax, yMin: 0, yMax: 1, format: (v) => Math.round(100 * v) + "%" });
  }

  function lossRange(values) {
    if (!values.length) return [0, 1];
    let low = Math.min(...values);
    let high = Math.max(...values);
    const pad = high > low ? 0.08 * (high - low) : Math.abs(high) * 0.1 || 0.5;
    low -= pad;
    high += pad;
    if (Math.min(...values) >= 0) low = Math.max(0, low);
    return [low, high];
  }

  function drawChart(svg, points, { xMax, yMin, yMax, format }) {
    clear(svg);
    const { width, height, left, right, top, bottom } = CHART;
    const x = (v) => left + (v / xMax) * (width - left - right);
    const y = (v) => height - bottom - ((v - yMin) / (yMax - yMin)) * (height - top - bottom);
    for (let i = 0; i <= 4; i += 1) {
      const value = yMin + ((yMax - yMin) * i) / 4;
      svg.appendChild(svgElement("line", { x1: left, x2: width - right, y1: y(value), y2: y(value), class: "grid" }));
      svg.appendChild(svgElement("text", { x: left - 6, y: y(value) + 4, class: "tick y" }, format(value)));
    }
    const step = Math.max(1, Math.ceil(xMax / 10));
    for (let round = 0; round <= xMax; round += step) {
      svg.appendChild(svgElement("text", { x: x(round), y: height - bottom + 16, class: "tick x" }, round));
    }
    svg.appendChild(svgElement("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis" }));
    svg.appendChild(svgElement("line", { x1: left, x2: left, y1: top, y2: height - bottom, class: "axis" }));
    svg.appendChild(svgElement("text", { x: width - right, y: height - 2, class: "label" }, "round"));
    if (!points.length) {
      svg.appendChild(svgElement("text", { x: width / 2, y: height / 2, class: "empty" }, "no rounds yet"));
      return;
    }
    const line = points.map((p) => x(p.x).toFixed(1) + "," + y(p.y).toFixed(1)).join(" ");
    svg.appendChild(svgElement("polyline", { points: line, class: "line" }));
    for (const p of points) {
      const dot = svgElement("circle", { cx: x(p.x), cy: y(p.y), r: 4, class: "point", "data-round": p.x });
      dot.appendChild(svgElement("title", {}, "round " + p.x + ": " + format(p.y) + " (" + p.y.toPrecision(4) + ")"));
      svg.appendChild(dot);
    }
  }

  function renderSites() {
    const registered = new Map(view.sites.map((s) => [s.name, s]));
    const activity = new Map((view.progress ? view.progress.sites : []).map((s) => [s.name, s]));
    const names = [...new Set([...registered.keys(), ...activity.keys()])].sort();
    const now = Date.now() / 1000 + view.skew;
    const body = $("sites").tBodies[0];
    clear(body);
    for (const name of names) {
      const site = registered.get(name);
      const work = activity.get(name);
      const liveness = !site ? "gone" : site.live ? "live" : "stale";
      const nameCell = element("td", name);
      if (site) nameCell.setAttribute("title", site.address + ", partition " + site.partition);
      const doing = element("td", work ? work.state : "-", "activity");
      if (work && work.steps > 0 && work.state === "training") {
        doing.textContent = "training " + work.step + " / " + work.steps;
        const bar = element("progress");
        bar.max = work.steps;
        bar.value = work.step;
        doing.appendChild(bar);
      }
      const failures = element("td", work ? work.failures : "-", "failures");
      if (work && work.last_failure) failures.appendChild(element("div", work.last_failure, "note"));
      const tr = row([
        nameCell,
        element("td", liveness, "liveness " + liveness),
        doing,
        site ? duration(now - site.heard) + " ago" : "-",
        element("td", work ? work.rounds_joined : "-", "rounds-joined"),
        failures,
        work ? bytes(work.bytes_per_round) : "-",
        work ? fixed(work.seconds_per_round, 2) : "-",
      ]);
      tr.dataset.site = name;
      body.appendChild(tr);
    }
    $("no-sites").hidden = names.length > 0;
  }

  function start() {
    const match = /^#run=(.+)$/.exec(location.hash);
    if (match) {
      view.selected = decodeURIComponent(match[1]);
      view.chosen = true;
    }
    renderAll();
    connect();
    setInterval(() => {
      renderRun();
      renderSites();
    }, 1000);
  }

  start();
})();
