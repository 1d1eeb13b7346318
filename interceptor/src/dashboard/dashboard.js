// Wakegate's dashboard: reads the admin API it is served from (/status and /metrics every
// second, /events as a live stream) and draws every route's state and the recent wakes.
// No build step and no dependencies; everything shown is built with textContent, never HTML.
"use strict";

const POLL_MS = 1000;
const MAX_WAKES = 12;
const SVG = "http://www.w3.org/2000/svg";

const state = {
  status: null,
  counts: {},
  requests: {},   // route -> {t, total} at the previous poll
  rps: {},        // route -> requests per second over the last poll
  wakes: [],      // recent wakes, oldest first: {route, held, ready, served} (Unix µs)
  pending: {},    // route -> its wake not yet served
  streaming: false,
};

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Prometheus text format: [{name, labels, value}] for the sample lines.
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
    }
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

function sum(samples, name, pick) {
  return samples
    .filter((s) => s.name === name && (!pick || pick(s.labels)))
    .reduce((a, s) => a + s.value, 0);
}

function ms(us) {
  if (us === null || us === undefined) return "-";
  const v = us / 1000;
  return v >= 1000 ? (v / 1000).toFixed(2) + " s" : v.toFixed(v >= 100 ? 0 : 1) + " ms";
}

async function poll() {
  try {
    const [status, metrics] = await Promise.all([
      fetch("/status", { cache: "no-store" }).then((r) => r.json()),
      fetch("/metrics", { cache: "no-store" }).then((r) => r.text()),
    ]);
    state.status = status;
    const samples = parseMetrics(metrics);
    state.counts = {
      cold: sum(samples, "wakegate_cold_starts_total"),
      rejections: sum(samples, "interceptor_cold_start_rejections_total"),
      timeouts: sum(samples, "interceptor_cold_start_duration_seconds_count", (l) => l.outcome === "timeout"),
      failovers: sum(samples, "wakegate_failovers_total"),
      upstream: sum(samples, "wakegate_upstream_errors_total"),
    };
    const now = performance.now();
    for (const route of Object.keys(status.routes || {})) {
      const total = sum(samples, "wakegate_requests_total", (l) => l.route === route);
      const prev = state.requests[route];
      if (prev && now > prev.t) state.rps[route] = ((total - prev.total) * 1000) / (now - prev.t);
      state.requests[route] = { t: now, total };
    }
    document.getElementById("ready").textContent = status.ready ? "serving" : "not ready";
  } catch (err) {
    document.getElementById("ready").textContent = "admin API unreachable";
  }
  render();
}

function onEvent(ev) {
  if (ev.type === "wake") {
    const wake = { route: ev.route, held: ev.atUs, ready: null, served: null };
    state.wakes.push(wake);
    if (state.wakes.length > MAX_WAKES) state.wakes.shift();
    state.pending[ev.route] = wake;
  } else if (ev.type === "ready" || ev.type === "served") {
    const wake = state.pending[ev.route];
    if (!wake) return;
    wake[ev.type] = ev.atUs;
    if (ev.type === "served") delete state.pending[ev.route];
  } else {
    return;
  }
  render();
}

async function stream() {
  for (;;) {
    try {
      const rsp = await fetch("/events", { cache: "no-store" });
      const reader = rsp.body.getReader();
      const decoder = new TextDecoder();
      let buffered = "";
      state.streaming = true;
      setLive();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buffered.indexOf("\n")) >= 0) {
          const line = buffered.slice(0, nl);
          buffered = buffered.slice(nl + 1);
          if (line.trim()) {
            try { onEvent(JSON.parse(line)); } catch (_) { /* not an event line */ }
          }
        }
      }
    } catch (_) { /* reconnect below */ }
    state.streaming = false;
    setLive();
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function setLive() {
  const live = document.getElementById("live");
  live.className = "live " + (state.streaming ? "ok" : "down");
  live.textContent = state.streaming ? "live" : "reconnecting";
}

function routeState(route, target, held) {
  const ready = target ? target.readyEndpoints || 0 : 0;
  const wake = state.pending[route];
  if (held > 0 || (wake && wake.ready === null)) return "waking";
  return ready > 0 ? "ready" : "cold";
}

function lastColdStart(route) {
  for (let i = state.wakes.length - 1; i >= 0; i--) {
    const w = state.wakes[i];
    if (w.route !== route || w.ready === null) continue;
    const first = w.served === null ? "" : ", first byte +" + ms(w.served - w.ready);
    return "held \u2192 ready " + ms(w.ready - w.held) + first;
  }
  return "-";
}

function render() {
  for (const [k, v] of Object.entries(state.counts)) {
    document.getElementById("count-" + k).textContent = String(v);
  }
  const status = state.status;
  const body = document.getElementById("routes");
  if (status) {
    const routes = Object.entries(status.routes || {}).sort(([a], [b]) => a.localeCompare(b));
    body.replaceChildren();
    if (!routes.length) {
      const row = el("tr");
      row.append(el("td", { colspan: 8, class: "empty" }, "no routes"));
      body.append(row);
    }
    for (const [route, info] of routes) {
      const target = (status.targets || {})[info.target];
      const queue = (status.queue || {})[route] || {};
      const held = (status.held || {})[route] || 0;
      const s = routeState(route, target, held);
      const row = el("tr", { "data-route": route, "data-state": s });
      row.append(el("td", {}, route), el("td", {}, info.target));
      const cell = el("td", { "data-field": "state" });
      cell.append(el("span", { class: "state " + s }, s));
      row.append(cell);
      const rps = state.rps[route];
      row.append(
        el("td", { class: "num", "data-field": "ready" }, String(target ? target.readyEndpoints || 0 : 0)),
        el("td", { class: "num", "data-field": "inflight" }, String(queue.Concurrency || 0)),
        el("td", { class: "num", "data-field": "held" }, String(held)),
        el("td", { class: "num", "data-field": "rps" }, rps === undefined ? "-" : rps.toFixed(1)),
        el("td", { "data-field": "last" }, lastColdStart(route)),
      );
      body.append(row);
    }
  }
  drawTimeline();
}

function drawTimeline() {
  const box = document.getElementById("timeline");
  box.replaceChildren();
  const wakes = state.wakes.slice().reverse();
  if (!wakes.length) {
    box.setAttribute("height", 28);
    box.append(svg("text", { x: 0, y: 18 }, "no wakes yet"));
    return;
  }
  const nowUs = Date.now() * 1000;
  const width = box.clientWidth || 800;
  const label = 180, right = 90, row = 22;
  const spans = wakes.map((w) => {
    const ready = w.ready === null ? nowUs : w.ready;
    const served = w.served === null ? ready : w.served;
    return { w, boot: Math.max(0, ready - w.held), first: Math.max(0, served - ready) };
  });
  const longest = Math.max(1, ...spans.map((s) => s.boot + s.first));
  const scale = (width - label - right) / longest;
  box.setAttribute("height", spans.length * row + 6);
  spans.forEach((s, i) => {
    const y = i * row + 4;
    const g = svg("g", { "data-wake": s.w.route, "data-done": String(s.w.served !== null) });
    g.append(svg("text", { x: 0, y: y + 13 }, s.w.route));
    g.append(svg("rect", { x: label, y, width: Math.max(1, s.boot * scale), height: 16, rx: 2, fill: "var(--boot)" }));
    g.append(svg("rect", { x: label + s.boot * scale, y, width: Math.max(s.w.served === null ? 0 : 1, s.first * scale), height: 16, rx: 2, fill: "var(--first)" }));
    g.append(svg("text", { x: label + (s.boot + s.first) * scale + 6, y: y + 13 },
      s.w.ready === null ? "waking " + ms(s.boot) : ms(s.boot + s.first)));
    box.append(g);
  });
}

setLive();
poll();
setInterval(poll, POLL_MS);
stream();
