// medunet page: upload an image, show it with its mask, the per-class statistics and a download.
// Plain JavaScript, no build step. The API returns PNG slices of the image and of the coloured mask
// (transparent background), so drawing is two drawImage calls on two stacked canvases.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, result: null, cache: new Map(), slice: 0 };

// A server started with --token is opened as /?token=...: the page sends that token as a bearer
// header on its API calls (the address keeps it, so a reload works, as with Jupyter's links).
const token = new URLSearchParams(window.location.search).get("token");

function api(url, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token) headers.set("Authorization", `Bearer ${token}`);
  return fetch(url, { ...options, headers });
}

function setState(name, message) {
  document.body.dataset.state = name;
  if (message !== undefined) $("status").textContent = message;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  setState("error", "Failed.");
}

async function loadModel() {
  try {
    const res = await api("/api/model");
    if (res.status === 401) throw new Error("this server needs its access token: open the page as /?token=<token>");
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const m = await res.json();
    state.model = m;
    const labels = m.labels.filter((l) => l.index > 0).map((l) => l.name).join(", ");
    $("model-info").textContent =
      `${m.name} · ${m.dimension}D · ${m.input_channels} channel(s) (${m.channel_names.join(", ")})` +
      ` · labels: ${labels} · ${m.device}, ${m.precision}`;
    const hints = { none: "none (fastest)", flip: "flip (mirrored copies)", full: "full (mirrors + rotations)" };
    $("tta").replaceChildren(...m.tta_modes.map((t) => new Option(hints[t] || t, t)));
    $("accepted").textContent = `${m.accepted_suffixes.join(" ")} · up to ${m.max_upload_mb} MB`;
    setState("ready");
  } catch (err) {
    showError(`Cannot reach the model: ${err.message}`);
  }
}

async function segment(file) {
  if (!file) return;
  $("error").hidden = true;
  setState("busy", `Segmenting ${file.name} (${(file.size / 1048576).toFixed(1)} MB)…`);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("tta", $("tta").value);
  form.append("format", "json");
  form.append("view", "true");
  let res;
  try {
    res = await api("/api/segment", { method: "POST", body: form });
  } catch (err) {
    showError(`The upload failed: ${err.message}`);
    return;
  }
  let body = null;
  try {
    body = await res.json();
  } catch (err) {
    body = null;
  }
  if (!res.ok) {
    const detail = body && body.detail ? body.detail : res.statusText;
    const retry = res.headers.get("Retry-After");
    showError(`${res.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}` +
              (retry ? ` (retry in ${retry} s)` : ""));
    return;
  }
  state.result = body;
  state.cache = new Map();
  showResult(body);
}

function showResult(body) {
  const { stats, view } = body;
  const slider = $("slice");
  slider.max = String(view.slices - 1);
  slider.value = String(view.best_slice);
  $("slice-row").hidden = view.slices <= 1;
  $("image-canvas").width = $("overlay").width = view.width;
  $("image-canvas").height = $("overlay").height = view.height;
  $("stage").hidden = false;
  $("placeholder").hidden = true;
  fitStage();

  $("timing").textContent = `Inference ${stats.inference_seconds.toFixed(2)} s` +
    ` (total ${stats.total_seconds.toFixed(2)} s) · ${stats.shape.join(" × ")} · spacing ` +
    `${stats.spacing.map((s) => +s.toFixed(3)).join(" × ")} ${stats.unit.split("^")[0]}`;
  $("measure-head").textContent = `${stats.measure} (${stats.unit.replace("^", "")})`;
  const tbody = $("stats").querySelector("tbody");
  tbody.replaceChildren();
  for (const c of stats.classes) {
    const tr = document.createElement("tr");
    const name = document.createElement("td");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = c.color || "transparent";
    name.append(sw, document.createTextNode(`${c.name} (${c.value})`));
    tr.append(name, cell(c.voxels.toLocaleString()), cell(fmt(c[stats.measure])),
              cell(`${(100 * c.fraction).toFixed(2)}%`));
    tbody.append(tr);
  }
  $("results").hidden = false;
  drawSlice(view.best_slice).then(() => setState("done", `Done: ${stats.case}.`));
}

// Scale the (pixel-sized) canvases up to the panel, keeping the aspect ratio and the pixels crisp.
function fitStage() {
  const view = state.result && state.result.view;
  if (!view) return;
  const panel = $("stage").parentElement;
  const room = Math.max(64, panel.clientWidth - 32);
  const scale = Math.min(room / view.width, (0.75 * window.innerHeight) / view.height);
  const w = `${Math.floor(view.width * scale)}px`;
  const h = `${Math.floor(view.height * scale)}px`;
  for (const el of [$("stage"), $("image-canvas")]) {
    el.style.width = w;
    el.style.height = h;
  }
}

function cell(text) {
  const td = document.createElement("td");
  td.className = "num";
  td.textContent = text;
  return td;
}

function fmt(x) {
  return Math.abs(x) >= 100 ? Math.round(x).toLocaleString() : (+x.toPrecision(4)).toString();
}

async function decoded(kind, i) {
  const key = `${kind}${i}`;
  if (!state.cache.has(key)) {
    const img = new Image();
    img.src = state.result.view[kind][i];
    state.cache.set(key, img.decode().then(() => img));
  }
  return state.cache.get(key);
}

async function drawSlice(i) {
  const view = state.result.view;
  state.slice = i;
  $("slice-value").textContent = `${i + 1} / ${view.slices}`;
  const [img, mask] = await Promise.all([decoded("images", i), decoded("masks", i)]);
  if (state.slice !== i) return; // a newer slice was asked for while decoding
  for (const [id, source] of [["image-canvas", img], ["overlay", mask]]) {
    const ctx = $(id).getContext("2d", { willReadFrequently: true });
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, view.width, view.height);
    ctx.drawImage(source, 0, 0);
  }
  $("stage").dataset.drawn = String(i);
}

function download() {
  const mask = state.result && state.result.mask;
  if (!mask) return;
  const bytes = Uint8Array.from(atob(mask.data), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type: mask.media_type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = mask.filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function setOpacity() {
  const v = $("opacity").value;
  $("overlay").style.opacity = String(v / 100);
  $("opacity-value").textContent = `${v}%`;
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    e.target.value = ""; // choosing the same file again must fire "change" again
    segment(file);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => segment(e.dataTransfer.files[0]));
  // dropping a file anywhere else must not navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("opacity").addEventListener("input", setOpacity);
  $("slice").addEventListener("input", (e) => drawSlice(Number(e.target.value)));
  $("download").addEventListener("click", download);
  window.addEventListener("resize", fitStage);
  setOpacity();
}

wire();
loadModel();
