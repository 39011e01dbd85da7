"use strict";
// Keyboard-first labeling: 1..9 label, s skip, u unsure, arrows window/level, +/- zoom, r reset.
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const section = document.getElementById("labeling");
  const canvas = document.getElementById("slice");
  const ctx = canvas.getContext("2d");
  const info = document.getElementById("item-info");
  const statusLine = document.getElementById("status");
  const wlLine = document.getElementById("wl");
  const predictionLine = document.getElementById("prediction");
  const buttonBox = document.getElementById("label-buttons");
  const doneCount = document.getElementById("done-count");
  const showPrediction = section.dataset.showPrediction === "1";

  const view = { window: 256, level: 128, zoom: 1 };
  let current = null;
  let preloaded = null;
  let busy = false;
  let labeled = 0;

  function say(text) { statusLine.textContent = text; }

  function loadImage(url) {
    return new Promise(function (resolve, reject) {
      const img = new Image();
      img.onload = function () { resolve(img); };
      img.onerror = function () { reject(new Error("image failed to load: " + url)); };
      img.src = url;
    });
  }

  function pixelsOf(img) {
    const off = document.createElement("canvas");
    off.width = img.naturalWidth;
    off.height = img.naturalHeight;
    const offCtx = off.getContext("2d");
    offCtx.drawImage(img, 0, 0);
    return { canvas: off, data: offCtx.getImageData(0, 0, off.width, off.height) };
  }

  async function fetchItem(held) {
    const response = await fetch("/api/next?held=" + held.join(","), { credentials: "same-origin" });
    if (response.status === 401) { window.location.assign("/login"); return null; }
    if (!response.ok) { throw new Error("next item: HTTP " + response.status); }
    const body = await response.json();
    return withImage(body.item);
  }

  async function withImage(item) {
    if (!item) { return null; }
    const img = await loadImage(item.image_url);
    return { item: item, source: pixelsOf(img) };
  }

  function lut() {
    const table = new Uint8ClampedArray(256);
    const low = view.level - view.window / 2;
    for (let v = 0; v < 256; v++) { table[v] = ((v - low) / view.window) * 255; }
    return table;
  }

  function draw() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.window = String(view.window);
    canvas.dataset.level = String(view.level);
    canvas.dataset.zoom = view.zoom.toFixed(2);
    wlLine.textContent = "W " + view.window + " · L " + view.level + " · zoom " + view.zoom.toFixed(1) + "×";
    if (!current) { return; }
    const src = current.source.data;
    const mapped = new ImageData(src.width, src.height);
    const table = lut();
    for (let i = 0; i < src.data.length; i += 4) {
      const v = table[src.data[i]];
      mapped.data[i] = v; mapped.data[i + 1] = v; mapped.data[i + 2] = v; mapped.data[i + 3] = 255;
    }
    const off = document.createElement("canvas");
    off.width = src.width; off.height = src.height;
    off.getContext("2d").putImageData(mapped, 0, 0);
    const size = canvas.width * view.zoom;
    const offset = (canvas.width - size) / 2;
    ctx.imageSmoothingEnabled = view.zoom < 2;
    ctx.drawImage(off, offset, offset, size, size);
  }

  function showItem() {
    buttonBox.replaceChildren();
    canvas.dataset.itemId = current ? String(current.item.id) : "";
    if (!current) {
      info.textContent = "The queue is empty. Thank you!";
      predictionLine.hidden = true;
      draw();
      return;
    }
    const item = current.item;
    info.textContent = "Item " + item.id + " · wave " + item.wave + " · " + item.kind;
    item.class_set.forEach(function (name, index) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "label-button";
      button.dataset.label = name;
      button.textContent = (index + 1) + " " + name;
      button.addEventListener("click", function () { act("label", name); });
      buttonBox.appendChild(button);
    });
    if (showPrediction && item.prediction) {
      predictionLine.textContent = "Model: " + item.prediction;
      predictionLine.hidden = false;
    } else {
      predictionLine.hidden = true;
    }
    current.shownAt = performance.now();
    draw();
  }

  async function preload() {
    preloaded = current ? await fetchItem([current.item.id]) : null;
  }

  async function advance() {
    current = preloaded || await fetchItem([]);
    preloaded = null;
    showItem();
    await preload();
  }

  async function act(action, label) {
    if (busy || !current) { return; }
    busy = true;
    section.dataset.busy = "1";
    const upcoming = preloaded;
    const body = { item_id: current.item.id, lease_next_held: upcoming ? [upcoming.item.id] : [] };
    if (action === "label") {
      body.label = label;
      body.seconds_spent = (performance.now() - current.shownAt) / 1000;
    }
    try {
      const response = await fetch("/api/" + action, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(body),
      });
      const answer = await response.json();
      if (response.ok) {
        if (action === "label") { labeled += 1; doneCount.textContent = String(labeled); }
        say(action === "label" ? "Saved: " + label : action === "skip" ? "Skipped" : "Marked unsure");
        const leased = await withImage(answer.next);
        if (upcoming) {
          current = upcoming;
          preloaded = leased;
          showItem();
        } else {
          current = leased;
          preloaded = null;
          showItem();
          await preload();
        }
      } else if (response.status === 409 || response.status === 404) {
        say(answer.detail + " — moving on.");
        await advance();
      } else {
        say("Not saved: " + (answer.detail || ("HTTP " + response.status)));
      }
    } catch (error) {
      say("Not saved (" + error.message + "); press the key again.");
    } finally {
      busy = false;
      section.dataset.busy = "0";
    }
  }

  function clampView() {
    view.window = Math.max(1, Math.min(512, Math.round(view.window)));
    view.level = Math.max(0, Math.min(255, Math.round(view.level)));
    view.zoom = Math.max(1, Math.min(8, view.zoom));
    draw();
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    const key = event.key;
    if (/^[1-9]$/.test(key) && current) {
      const name = current.item.class_set[Number(key) - 1];
      if (name) { act("label", name); }
    } else if (key === "s") { act("skip");
    } else if (key === "u") { act("unsure");
    } else if (key === "ArrowLeft") { view.window -= 8; clampView();
    } else if (key === "ArrowRight") { view.window += 8; clampView();
    } else if (key === "ArrowUp") { view.level += 4; clampView();
    } else if (key === "ArrowDown") { view.level -= 4; clampView();
    } else if (key === "+" || key === "=") { view.zoom *= 1.25; clampView();
    } else if (key === "-") { view.zoom /= 1.25; clampView();
    } else if (key === "r") { view.window = 256; view.level = 128; view.zoom = 1; clampView();
    } else { return; }
    event.preventDefault();
  });

  let drag = null;
  canvas.addEventListener("mousedown", function (event) {
    drag = { x: event.clientX, y: event.clientY, window: view.window, level: view.level };
  });
  window.addEventListener("mouseup", function () { drag = null; });
  window.addEventListener("mousemove", function (event) {
    if (!drag) { return; }
    view.window = drag.window + (event.clientX - drag.x);
    view.level = drag.level - (event.clientY - drag.y);
    clampView();
  });
  canvas.addEventListener("wheel", function (event) {
    event.preventDefault();
    view.zoom *= event.deltaY < 0 ? 1.1 : 1 / 1.1;
    clampView();
  }, { passive: false });
  document.getElementById("skip-button").addEventListener("click", function () { act("skip"); });
  document.getElementById("unsure-button").addEventListener("click", function () { act("unsure"); });

  section.dataset.busy = "1";
  advance()
    .catch(function (error) { say(error.message); })
    .finally(function () { section.dataset.busy = "0"; });
})();
