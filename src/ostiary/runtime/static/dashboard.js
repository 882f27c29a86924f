// The Ostiary queue dashboard: reads /v1/queue/live and shows each backend's queue.
// The admin key is kept in sessionStorage (this tab only) and sent as the
// WebSocket subprotocol "bearer.<key>" beside "ostiary.queue.v1"; never in the URL.
// Every value is set with textContent: nothing from the server is parsed as HTML.
"use strict";

(function () {
  const PROTOCOL = "ostiary.queue.v1";
  const STORAGE = "ostiary.adminKey";
  const HISTORY = 240; // samples kept per backend for the sparkline (a minute at 4/s)
  const $ = (id) => document.getElementById(id);
  const history = new Map(); // backend name -> [{queued, running}]
  let socket = null;
  let retry = null;
  let messages = 0;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function setStatus(text, kind) {
    const status = $("status");
    status.textContent = text;
    status.className = "status " + kind;
  }

  function showError(text) {
    const error = $("error");
    error.textContent = text || "";
    error.hidden = !text;
  }

  function seconds(value) {
    if (value === null || value === undefined) return "–";
    if (value < 1) return Math.round(value * 1000) + " ms";
    return value.toFixed(2) + " s";
  }

  function stat(label, field, value, of) {
    const box = el("div", "stat");
    box.appendChild(el("div", "label", label));
    const line = el("div");
    const number = el("span", "value", value);
    number.dataset.field = field;
    line.appendChild(number);
    if (of !== undefined) line.appendChild(el("span", "of", " / " + of));
    box.appendChild(line);
    return box;
  }

  function sparkline(canvas, samples, limit) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth * ratio;
    const height = canvas.clientHeight * ratio;
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    if (!ctx || samples.length < 2) return;
    const top = Math.max(1, limit, ...samples.map((s) => s.queued + s.running));
    const step = width / (HISTORY - 1);
    const x0 = width - step * (samples.length - 1);
    const draw = (value, color) => {
      ctx.beginPath();
      samples.forEach((s, i) => {
        const y = height - (value(s) / top) * (height - 2) - 1;
        if (i === 0) ctx.moveTo(x0, y);
        else ctx.lineTo(x0 + i * step, y);
      });
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5 * ratio;
      ctx.stroke();
    };
    draw((s) => s.queued, "#f0b35a");
    draw((s) => s.running, "#5fb3ff");
  }

  function renderBackend(b) {
    const card = el("section", "backend");
    card.dataset.backend = b.name;
    const title = el("h2");
    title.appendChild(el("span", "name", b.name));
    title.appendChild(el("span", "kind", b.scheduler + " queue"));
    card.appendChild(title);

    const stats = el("div", "stats");
    stats.appendChild(stat("queued", "queued", b.queued, b.max_queue));
    stats.appendChild(stat("running", "running", b.running, b.max_concurrency));
    stats.appendChild(stat("service rate", "service_rate", b.service_rate.toFixed(2) + "/s"));
    stats.appendChild(stat("wait p50", "wait_p50", seconds(b.wait.p50)));
    stats.appendChild(stat("wait p99", "wait_p99", seconds(b.wait.p99)));
    stats.appendChild(stat("est. wait", "estimated_wait", seconds(b.estimated_wait)));
    card.appendChild(stats);

    const fill = b.max_queue > 0 ? b.queued / b.max_queue : 0;
    const bar = el("div", "bar" + (fill >= 1 ? " full" : fill >= 0.75 ? " hot" : ""));
    const inner = el("div");
    inner.style.width = Math.min(100, fill * 100).toFixed(1) + "%";
    bar.appendChild(inner);
    bar.title = "queue " + Math.round(fill * 100) + "% full";
    card.appendChild(bar);

    const canvas = el("canvas");
    canvas.title = "queued (amber) and running (blue), last minute";
    card.appendChild(canvas);

    const table = el("table");
    const head = el("tr");
    head.appendChild(el("th", "", "principal"));
    head.appendChild(el("th", "num", "queued"));
    head.appendChild(el("th", "num", "running"));
    table.appendChild(head);
    if (b.principals.length === 0) {
      const row = el("tr");
      const cell = el("td", "none", "idle");
      cell.colSpan = 3;
      row.appendChild(cell);
      table.appendChild(row);
    }
    for (const p of b.principals) {
      const row = el("tr");
      row.dataset.principal = p.principal;
      row.appendChild(el("td", "", p.principal));
      row.appendChild(el("td", "num", p.queued));
      row.appendChild(el("td", "num", p.running));
      table.appendChild(row);
    }
    card.appendChild(table);
    card.appendChild(el("div", "of", "waits measured in the last " + b.wait.window_seconds + " s: " + b.wait.samples));
    return { card, canvas };
  }

  function renderRecent(recent) {
    const table = $("recent");
    const head = el("tr");
    for (const name of ["time", "request", "endpoint", "model", "status", "ms", "principal"]) {
      head.appendChild(el("th", name === "status" || name === "ms" ? "num" : "", name));
    }
    const rows = [head];
    if (!recent || recent.length === 0) {
      const row = el("tr");
      const cell = el("td", "none", "none yet");
      cell.colSpan = 7;
      row.appendChild(cell);
      rows.push(row);
    }
    for (const r of recent || []) {
      const row = el("tr", r.status >= 500 ? "bad" : r.status >= 400 ? "warn" : "");
      row.dataset.requestId = r.request_id;
      row.appendChild(el("td", "", new Date(r.created * 1000).toLocaleTimeString()));
      row.appendChild(el("td", "", r.request_id));
      row.appendChild(el("td", "", r.endpoint));
      row.appendChild(el("td", "", r.model));
      row.appendChild(el("td", "num", r.status));
      row.appendChild(el("td", "num", r.duration_ms));
      row.appendChild(el("td", "", r.principal));
      rows.push(row);
    }
    table.replaceChildren(...rows);
  }

  function render(snapshot) {
    const main = $("backends");
    const drawn = [];
    const cards = [];
    for (const b of snapshot.backends) {
      const samples = history.get(b.name) || [];
      samples.push({ queued: b.queued, running: b.running });
      if (samples.length > HISTORY) samples.shift();
      history.set(b.name, samples);
      const { card, canvas } = renderBackend(b);
      cards.push(card);
      drawn.push([canvas, samples, b.max_concurrency]);
    }
    main.replaceChildren(...cards);
    renderRecent(snapshot.recent);
    for (const [canvas, samples, limit] of drawn) sparkline(canvas, samples, limit);
    messages += 1;
    $("messages").textContent = String(messages);
    $("updated").textContent = new Date().toLocaleTimeString();
  }

  function connect(key) {
    if (retry !== null) clearTimeout(retry);
    retry = null;
    if (socket !== null) socket.close(1000);
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    let opened = false;
    let ws;
    try {
      ws = new WebSocket(scheme + location.host + "/v1/queue/live", [PROTOCOL, "bearer." + key]);
    } catch (e) {
      showError("That key cannot be sent (it must look like ost_…).");
      return;
    }
    socket = ws;
    setStatus("connecting…", "off");
    ws.onopen = () => {
      opened = true;
      showError("");
      setStatus("live", "on");
    };
    ws.onmessage = (event) => {
      try {
        render(JSON.parse(event.data));
      } catch (e) {
        showError("Unreadable snapshot: " + e);
      }
    };
    ws.onclose = (event) => {
      if (socket !== ws) return;
      socket = null;
      if (!opened) {
        // The server refused before the upgrade (a wrong or non-admin key, too many
        // viewers); a browser is not told which.
        setStatus("refused", "bad");
        showError("The server refused the feed: check that the key has the admin role.");
        return;
      }
      setStatus(event.code === 1001 ? "server going away" : "disconnected", "bad");
      retry = setTimeout(() => connect(key), 2000);
    };
  }

  function start() {
    const input = $("key");
    $("connect").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(STORAGE, key);
      connect(key);
    });
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(STORAGE);
      input.value = "";
      if (socket !== null) socket.close(1000);
      setStatus("not connected", "off");
    });
    const saved = sessionStorage.getItem(STORAGE);
    if (saved) {
      input.value = saved;
      connect(saved);
    }
  }

  document.addEventListener("DOMContentLoaded", start);
})();
