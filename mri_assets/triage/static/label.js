"use strict";
// Keyboard-first labeling. Keys: 1..9 label, s skip, u unsure, z undo, arrows window/level,
// +/- zoom, r reset, f/b/c window presets. Drag: window/level; shift-drag or right-drag: pan.
//
// The next case is decoded before it is needed and shown the moment a key is pressed; the
// answer goes to the server in the background through an outbox (kept in sessionStorage) that
// is sent in order and retried on network errors, so an answer is never lost. Leases of the
// cases on screen are renewed while the page is visible.
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const section = document.getElementById("labeling");
  const canvas = document.getElementById("slice");
  const ctx = canvas.getContext("2d");
  const $ = function (id) { return document.getElementById(id); };
  const info = $("item-info");
  const statusLine = $("status");
  const noticeLine = $("notice");
  const wlLine = $("wl");
  const sourceInfo = $("source-info");
  const predictionLine = $("prediction");
  const buttonBox = $("label-buttons");
  const doneCount = $("done-count");
  const leaseLeft = $("lease-left");
  const undoButton = $("undo-button");
  const stateBox = $("state-box");
  const showPrediction = section.dataset.showPrediction === "1";
  const leaseSeconds = Number(section.dataset.leaseSeconds) || 300;
  const whoNode = document.getElementById("who");
  const OUTBOX_KEY = "triage-outbox:" + (whoNode ? whoNode.textContent : "");
  const RENEW_EVERY_MS = Math.max(5, Math.min(60, leaseSeconds / 3)) * 1000;

  const view = { window: 256, level: 128, zoom: 1, panX: 0, panY: 0 };
  let current = null;          // the case on screen: {item, source, leaseEnds, shownAt}
  const ahead = [];            // decoded cases waiting to be shown
  let outbox = loadOutbox();   // answers not yet confirmed by the server, oldest first
  let inFlight = null;         // the outbox entry being sent
  let sending = false;
  let pendingNext = 0;         // next cases asked for and not yet decoded
  const decoding = new Set();  // ids of cases whose image is being fetched
  let lastDone = null;         // {entry, shown}: what "undo" takes back
  let stopped = null;          // "budget" or "empty" when there is nothing to label
  let labeled = 0;
  let mapped = null;           // {key, canvas}: the current case at the current window/level

  function say(text) { statusLine.textContent = text; }
  function notice(text) { noticeLine.textContent = text; noticeLine.hidden = !text; }

  function loadOutbox() {
    try { return JSON.parse(sessionStorage.getItem(OUTBOX_KEY) || "[]"); } catch (e) { return []; }
  }
  function saveOutbox() {
    try { sessionStorage.setItem(OUTBOX_KEY, JSON.stringify(outbox)); } catch (e) { /* full */ }
  }
  function updateBusy() {
    const busy = outbox.length > 0 || (!current && !stopped);
    section.dataset.busy = busy ? "1" : "0";
  }
  let leaving = false;
  function toLogin(answer) {
    saveOutbox();
    if (leaving) { return; }  // the first refusal says why; later ones may know less
    leaving = true;
    window.location.assign((answer && answer.login_url) || "/login?notice=ended");
  }
  function sleep(ms) { return new Promise(function (resolve) { setTimeout(resolve, ms); }); }

  function heldIds(except) {
    const ids = new Set();
    if (current) { ids.add(current.item.id); }
    ahead.forEach(function (c) { ids.add(c.item.id); });
    decoding.forEach(function (id) { ids.add(id); });
    outbox.forEach(function (e) { if (e.action !== "undo") { ids.add(e.item_id); } });
    ids.delete(except);
    return Array.from(ids).slice(0, 64);
  }

  // -- pixels -------------------------------------------------------------------------------

  function sourceFromBitmap(bitmap) {
    const off = document.createElement("canvas");
    off.width = bitmap.width; off.height = bitmap.height;
    const offCtx = off.getContext("2d");
    offCtx.drawImage(bitmap, 0, 0);
    const rgba = offCtx.getImageData(0, 0, off.width, off.height).data;
    const values = new Float32Array(off.width * off.height);
    for (let i = 0; i < values.length; i++) { values[i] = rgba[i * 4]; }
    return { width: off.width, height: off.height, values: values, min: 0, max: 255,
             kind: "slice-8bit", label: off.width + " px slice, 8-bit (windowed at ingest)",
             orientation: null };
  }

  async function rawSource(item) {
    // The slice at its original resolution and values; null when the server has none.
    if (!item.raw_url) { return null; }
    try {
      const response = await fetch(item.raw_url, { credentials: "same-origin" });
      if (!response.ok) { return null; }
      const h = function (name) { return response.headers.get("X-Slice-" + name); };
      const width = Number(h("Width")), height = Number(h("Height")), step = Number(h("Step") || "1");
      const values = new Float32Array(await response.arrayBuffer());
      if (!width || !height || values.length !== width * height) { return null; }
      const orientation = {};
      (h("Orientation") || "").split(",").forEach(function (pair) {
        const parts = pair.split("=");
        if (parts.length === 2) { orientation[parts[0]] = parts[1]; }
      });
      const format = h("Format") || "raw";
      return { width: width, height: height, values: values, min: Number(h("Min")), max: Number(h("Max")),
               kind: "raw", label: width + " × " + height + " px, original values (" + format +
               (step > 1 ? ", every " + step + "th pixel" : "") + ")",
               orientation: Object.keys(orientation).length ? orientation : null };
    } catch (error) {
      return null;
    }
  }

  async function decode(item) {
    decoding.add(item.id);
    try {
      const raw = await rawSource(item);
      if (raw) {
        return { item: item, source: raw, leaseEnds: Date.now() + 1000 * item.lease_seconds_left };
      }
      for (let attempt = 0; ; attempt++) {
        let response;
        try {
          response = await fetch(item.image_url, { credentials: "same-origin" });
        } catch (error) {
          if (attempt >= 5) { throw error; }
          await sleep(500 * 2 ** attempt);
          continue;
        }
        if (response.status === 401) { toLogin(await response.json().catch(function () { return null; })); return null; }
        if (!response.ok) {
          const answer = await response.json().catch(function () { return {}; });
          return { item: item, missing: answer.detail || ("HTTP " + response.status) };
        }
        const bitmap = await createImageBitmap(await response.blob());
        const source = sourceFromBitmap(bitmap);
        return { item: item, source: source,
                 leaseEnds: Date.now() + 1000 * item.lease_seconds_left };
      }
    } finally {
      decoding.delete(item.id);
    }
  }

  async function queueDecoded(item) {
    const entry = await decode(item);
    pendingNext = Math.max(0, pendingNext - 1);
    if (!entry) { return; }
    if (entry.missing) {
      notice("Case " + item.id + " skipped: " + entry.missing);
      fill();
      return;
    }
    ahead.push(entry);
    fill();
  }

  // -- the case on screen -------------------------------------------------------------------

  function resetView() {
    const s = current && current.source;
    const low = s ? s.min : 0, high = s ? s.max : 255;
    view.window = Math.max(1, high - low);
    view.level = (high + low) / 2;
    view.zoom = 1; view.panX = 0; view.panY = 0;
    if (s && s.kind === "raw") { preset("brain", true); }
  }

  function percentile(sorted, p) {
    if (!sorted.length) { return 0; }
    return sorted[Math.min(sorted.length - 1, Math.floor(p * (sorted.length - 1)))];
  }

  function preset(name, quiet) {
    const s = current && current.source;
    if (!s) { return; }
    canvas.dataset.preset = name;
    if (name === "full") {
      view.window = Math.max(1, s.max - s.min); view.level = (s.max + s.min) / 2;
    } else {
      if (!s.sorted) {
        const step = Math.max(1, Math.floor(s.values.length / 20000));
        const sample = [];
        for (let i = 0; i < s.values.length; i += step) { if (s.values[i] > s.min) { sample.push(s.values[i]); } }
        s.sorted = Float32Array.from(sample).sort();
      }
      const [lo, hi] = name === "brain" ? [0.01, 0.995] : [0.25, 0.9];
      const low = percentile(s.sorted, lo), high = percentile(s.sorted, hi);
      view.window = Math.max(1, high - low); view.level = (high + low) / 2;
    }
    if (!quiet) { draw(); }
  }

  function mappedCanvas() {
    const s = current.source;
    const key = s.values.length + ":" + view.window + ":" + view.level + ":" + current.item.id;
    if (mapped && mapped.key === key) { return mapped.canvas; }
    const image = new ImageData(s.width, s.height);
    const low = view.level - view.window / 2;
    const scale = 255 / view.window;
    const out = image.data;
    for (let i = 0; i < s.values.length; i++) {
      let v = (s.values[i] - low) * scale;
      v = v < 0 ? 0 : v > 255 ? 255 : v;
      out[i * 4] = v; out[i * 4 + 1] = v; out[i * 4 + 2] = v; out[i * 4 + 3] = 255;
    }
    const off = document.createElement("canvas");
    off.width = s.width; off.height = s.height;
    off.getContext("2d").putImageData(image, 0, 0);
    mapped = { key: key, canvas: off };
    return off;
  }

  function draw() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.window = String(Math.round(view.window));
    canvas.dataset.level = String(Math.round(view.level));
    canvas.dataset.zoom = view.zoom.toFixed(2);
    canvas.dataset.pan = Math.round(view.panX) + "," + Math.round(view.panY);
    wlLine.textContent = "W " + Math.round(view.window) + " · L " + Math.round(view.level) +
      " · zoom " + view.zoom.toFixed(1) + "×";
    if (!current) { return; }
    const s = current.source;
    const fit = Math.min(canvas.width / s.width, canvas.height / s.height);
    const scale = fit * view.zoom;
    const w = s.width * scale, h = s.height * scale;
    ctx.imageSmoothingEnabled = scale < 2;
    ctx.drawImage(mappedCanvas(), (canvas.width - w) / 2 + view.panX,
                  (canvas.height - h) / 2 + view.panY, w, h);
  }

  function showMarkers(orientation) {
    ["top", "bottom", "left", "right"].forEach(function (side) {
      $("marker-" + side).textContent = (orientation && orientation[side]) || "";
    });
  }

  function showState(kind, answer) {
    stopped = kind;
    current = null;
    canvas.dataset.itemId = "";
    buttonBox.replaceChildren();
    showMarkers(null);
    stateBox.hidden = false;
    if (kind === "budget") {
      const day = answer && answer.resumes_on ? new Date(answer.resumes_on + "T00:00:00Z") : null;
      const when = day ? day.toLocaleDateString(undefined, { year: "numeric", month: "long", day: "numeric", timeZone: "UTC" }) : "the start of the next period";
      $("state-title").textContent = "Budget spent for this quarter";
      $("state-text").textContent = "Labelling resumes on " + when + ". Thank you!";
      stateBox.dataset.resumesOn = (answer && answer.resumes_on) || "";
      info.textContent = "Budget spent for this quarter — labelling resumes on " + when + ".";
    } else {
      $("state-title").textContent = "The queue is empty";
      $("state-text").textContent = "Every case is labelled for now. Thank you!";
      info.textContent = "The queue is empty. Thank you!";
    }
    stateBox.dataset.state = kind;
    draw();
    updateBusy();
  }

  function show(entry) {
    current = entry;
    stateBox.hidden = true;
    stopped = null;
    mapped = null;
    buttonBox.replaceChildren();
    const item = entry.item;
    canvas.dataset.itemId = String(item.id);
    canvas.dataset.source = entry.source.kind;
    info.textContent = "Case " + item.id + " · wave " + item.wave + " · " + item.kind;
    sourceInfo.textContent = entry.source.label;
    item.class_set.forEach(function (name, index) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "label-button";
      button.dataset.label = name;
      button.textContent = (index + 1) + " " + name;
      button.addEventListener("click", function () { act("label", name); });
      buttonBox.appendChild(button);
    });
    document.querySelectorAll("#class-definitions dt, #class-definitions dd").forEach(function (node) {
      node.hidden = item.class_set.indexOf(node.dataset.class) < 0;
    });
    document.querySelectorAll("#class-definitions img.example").forEach(function (img) {
      const name = img.dataset.class;
      if (item.class_set.indexOf(name) < 0 || img.dataset.tried) { return; }
      img.dataset.tried = "1";
      img.onload = function () { img.hidden = false; };
      img.onerror = function () { img.hidden = true; };
      img.src = "/api/example.png?label=" + encodeURIComponent(name);
    });
    if (showPrediction && item.prediction) {
      predictionLine.textContent = "Model: " + item.prediction;
      predictionLine.hidden = false;
    } else {
      predictionLine.hidden = true;
    }
    showMarkers(entry.source.orientation);
    entry.shownAt = performance.now();
    resetView();
    draw();
    tickLease();
    updateBusy();
  }

  function fill() {
    if (!current && ahead.length) { show(ahead.shift()); }
    if (!current && !stopped) {
      canvas.dataset.itemId = "";
      info.textContent = "Loading the next case…";
      draw();
    }
    // While answers are being sent, the next case comes with their answer (one round trip).
    if (ahead.length === 0 && pendingNext === 0 && !sending && outbox.length === 0 && !stopped) {
      requestNext();
    }
    updateBusy();
  }

  async function requestNext() {
    pendingNext += 1;
    let answer = null;
    for (let attempt = 0; answer === null; attempt++) {
      try {
        const response = await fetch("/api/next?held=" + heldIds().join(","), { credentials: "same-origin" });
        if (response.status === 401) { toLogin(await response.json().catch(function () { return null; })); return; }
        if (response.ok) { answer = await response.json(); break; }
      } catch (error) { /* network: retry */ }
      say("Waiting for the server…");
      await sleep(Math.min(10000, 500 * 2 ** attempt));
    }
    if (answer.item) { await queueDecoded(answer.item); return; }
    pendingNext = Math.max(0, pendingNext - 1);
    noMore(answer);
  }

  function noMore(answer) {
    if (current || ahead.length || pendingNext || decoding.size) { return; }
    showState(answer && answer.status === "budget_spent" ? "budget" : "empty", answer);
  }

  // -- answers --------------------------------------------------------------------------------

  function act(action, label) {
    if (!current || stopped) { return; }
    const shown = current;
    const entry = { key: Math.random().toString(36).slice(2), action: action, item_id: shown.item.id };
    if (action === "label") {
      entry.label = label;
      entry.seconds_spent = Math.min(86400, (performance.now() - shown.shownAt) / 1000);
    }
    outbox.push(entry);
    saveOutbox();
    lastDone = { entry: entry, shown: shown };
    undoButton.disabled = false;
    say(action === "label" ? "Saving: " + label + "…" : action === "skip" ? "Skipping…" : "Marking unsure…");
    current = null;
    fill();
    pump();
  }

  function undo() {
    if (!lastDone) { return; }
    const done = lastDone;
    lastDone = null;
    undoButton.disabled = true;
    if (done.shown.leaseEnds <= Date.now()) { notice("Too late to undo: the lease on that case has ended."); return; }
    const index = outbox.indexOf(done.entry);
    if (index >= 0 && done.entry !== inFlight) {
      outbox.splice(index, 1);   // never sent: simply forget it
      saveOutbox();
    } else {
      outbox.push({ key: Math.random().toString(36).slice(2), action: "undo", item_id: done.entry.item_id, undoes: done.entry.action });
      saveOutbox();
      pump();
    }
    if (current) { ahead.unshift(current); }
    show(done.shown);
    say("Undone: case " + done.shown.item.id + " is back");
  }

  async function pump() {
    if (sending) { return; }
    sending = true;
    updateBusy();
    let attempt = 0;
    while (outbox.length) {
      const entry = outbox[0];
      const body = { item_id: entry.item_id };
      let askedNext = false;
      if (entry.action !== "undo") {
        if (entry.action === "label") { body.label = entry.label; body.seconds_spent = entry.seconds_spent; }
        if (!stopped && ahead.length + pendingNext < 1) {
          body.lease_next_held = heldIds(entry.item_id);
          pendingNext += 1;
          askedNext = true;
        }
      }
      inFlight = entry;
      let response = null, answer = {};
      try {
        response = await fetch("/api/" + entry.action, {
          method: "POST",
          credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
          body: JSON.stringify(body),
        });
        answer = await response.json().catch(function () { return {}; });
      } catch (error) {
        response = null;
      }
      inFlight = null;
      if (askedNext && !(response && response.ok && answer.next)) { pendingNext = Math.max(0, pendingNext - 1); }
      if (response === null || response.status >= 500 || response.status === 429) {
        say("Not saved yet — the server is not answering; retrying…");
        await sleep(Math.min(10000, 500 * 2 ** attempt));
        attempt += 1;
        continue;
      }
      attempt = 0;
      if (response.status === 401) { sending = false; toLogin(answer); return; }
      outbox.shift();
      saveOutbox();
      if (response.ok) { saved(entry, answer); } else { refused(entry, response.status, answer); }
    }
    sending = false;
    fill();
    updateBusy();
  }

  function saved(entry, answer) {
    if (entry.action === "label") {
      labeled += 1;
      say("Saved: " + entry.label);
    } else if (entry.action === "skip") {
      say("Skipped");
    } else if (entry.action === "unsure") {
      say("Marked unsure");
    } else if (entry.action === "undo") {
      if (entry.undoes === "label") { labeled = Math.max(0, labeled - 1); }
      say("Undone");
    }
    doneCount.textContent = String(labeled);
    if (Date.now() - progressAt > 5000) { refreshProgress(); }
    if (answer.next) {
      queueDecoded(answer.next);
    } else if ("next" in answer) {
      noMore(answer);
    }
  }

  function refused(entry, status, answer) {
    if (lastDone && lastDone.entry === entry) { lastDone = null; undoButton.disabled = true; }
    if (answer.error === "BudgetExhausted") {
      ahead.length = 0;
      showState("budget", answer);
      return;
    }
    if (entry.action === "undo") {
      notice("Could not undo: " + (answer.detail || ("HTTP " + status)));
      if (current && current.item.id === entry.item_id) { current = null; fill(); }
      return;
    }
    notice("Case " + entry.item_id + " was not saved: " + (answer.detail || ("HTTP " + status)));
  }

  // -- leases and progress ------------------------------------------------------------------

  function tickLease() {
    if (lastDone && lastDone.shown.leaseEnds <= Date.now()) { lastDone = null; undoButton.disabled = true; }
    if (!current) { leaseLeft.textContent = "–"; return; }
    const left = Math.max(0, Math.round((current.leaseEnds - Date.now()) / 1000));
    leaseLeft.textContent = left > 0 ? Math.floor(left / 60) + ":" + String(left % 60).padStart(2, "0") : "ended";
    leaseLeft.dataset.seconds = String(left);
  }

  async function renew() {
    if (document.visibilityState !== "visible") { return; }
    const cases = (current ? [current] : []).concat(ahead);
    if (!cases.length) { return; }
    try {
      const response = await fetch("/api/renew", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ item_ids: cases.map(function (c) { return c.item.id; }) }),
      });
      if (response.status === 401) { toLogin(await response.json().catch(function () { return null; })); return; }
      if (!response.ok) { return; }
      const answer = await response.json();
      const ends = Date.now() + 1000 * answer.lease_seconds;
      cases.forEach(function (c) { if (String(c.item.id) in answer.renewed) { c.leaseEnds = ends; } });
      section.dataset.renewals = String(Number(section.dataset.renewals || "0") + 1);
      if (answer.lost.length) {
        for (let i = ahead.length - 1; i >= 0; i--) { if (answer.lost.indexOf(ahead[i].item.id) >= 0) { ahead.splice(i, 1); } }
        if (current && answer.lost.indexOf(current.item.id) >= 0) {
          notice("The lease on case " + current.item.id + " ended; moving on.");
          current = null;
        }
        fill();
      }
      tickLease();
    } catch (error) { /* network: the next renewal tries again */ }
  }

  let progressAt = 0;
  async function refreshProgress() {
    progressAt = Date.now();
    try {
      const response = await fetch("/api/progress", { credentials: "same-origin" });
      if (!response.ok) { return; }
      const p = await response.json();
      $("today-count").textContent = String(p.labeled_today);
      $("queue-open").textContent = String(p.queue_open);
      $("budget-left").textContent = String(p.budget_left_cases);
    } catch (error) { /* shown next time */ }
  }

  // -- input --------------------------------------------------------------------------------

  function range() { return current ? Math.max(1, current.source.max - current.source.min) : 255; }

  function clampView() {
    const r = range();
    const low = current ? current.source.min : 0;
    view.window = Math.max(1, Math.min(2 * r, view.window));
    view.level = Math.max(low - r, Math.min(low + 2 * r, view.level));
    view.zoom = Math.max(1, Math.min(16, view.zoom));
    draw();
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    if (event.target && /^(INPUT|TEXTAREA|SELECT)$/.test(event.target.tagName)) { return; }
    const key = event.key;
    const r = range();
    if (/^[1-9]$/.test(key) && current) {
      const name = current.item.class_set[Number(key) - 1];
      if (name) { act("label", name); }
    } else if (key === "s") { act("skip");
    } else if (key === "u") { act("unsure");
    } else if (key === "z") { undo();
    } else if (key === "ArrowLeft") { view.window -= r / 32; clampView();
    } else if (key === "ArrowRight") { view.window += r / 32; clampView();
    } else if (key === "ArrowUp") { view.level += r / 64; clampView();
    } else if (key === "ArrowDown") { view.level -= r / 64; clampView();
    } else if (key === "+" || key === "=") { view.zoom *= 1.25; clampView();
    } else if (key === "-") { view.zoom /= 1.25; clampView();
    } else if (key === "r") { resetView(); clampView();
    } else if (key === "f") { preset("full");
    } else if (key === "b") { preset("brain");
    } else if (key === "c") { preset("contrast");
    } else { return; }
    event.preventDefault();
  });

  let drag = null;
  canvas.addEventListener("contextmenu", function (event) { event.preventDefault(); });
  canvas.addEventListener("mousedown", function (event) {
    const pan = event.shiftKey || event.button === 2 || event.button === 1;
    drag = { pan: pan, x: event.clientX, y: event.clientY, window: view.window, level: view.level,
             panX: view.panX, panY: view.panY };
    event.preventDefault();
  });
  window.addEventListener("mouseup", function () { drag = null; });
  window.addEventListener("mousemove", function (event) {
    if (!drag) { return; }
    const dx = event.clientX - drag.x, dy = event.clientY - drag.y;
    if (drag.pan) {
      const css = canvas.getBoundingClientRect();
      const ratio = canvas.width / Math.max(1, css.width);
      view.panX = drag.panX + dx * ratio; view.panY = drag.panY + dy * ratio;
    } else {
      view.window = drag.window + dx * range() / 256;
      view.level = drag.level - dy * range() / 256;
    }
    clampView();
  });
  canvas.addEventListener("wheel", function (event) {
    event.preventDefault();
    view.zoom *= event.deltaY < 0 ? 1.1 : 1 / 1.1;
    clampView();
  }, { passive: false });
  $("skip-button").addEventListener("click", function () { act("skip"); });
  $("unsure-button").addEventListener("click", function () { act("unsure"); });
  undoButton.addEventListener("click", undo);
  document.querySelectorAll("#presets [data-preset]").forEach(function (button) {
    button.addEventListener("click", function () { preset(button.dataset.preset); });
  });
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") { renew(); }
  });

  setInterval(tickLease, 1000);
  setInterval(renew, RENEW_EVERY_MS);
  setInterval(refreshProgress, 30000);
  refreshProgress();
  updateBusy();
  if (outbox.length) { pump(); } else { fill(); }
})();
