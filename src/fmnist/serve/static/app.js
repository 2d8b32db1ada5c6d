// The fmnist web page: send a chosen, dropped or drawn picture to POST /v1/predict and show
// the 28x28 image the model saw with the top classes, then ask POST /v1/explain for the heatmap
// of the top class over it. No libraries, no external assets.
"use strict";

const $ = (id) => document.getElementById(id);
const statusLine = $("status");
const TOP_K = 5;

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function showPredictions(top) {
  const list = $("predictions");
  list.replaceChildren();
  for (const t of top) {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = t.label;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * t.probability).toFixed(1)}%`;
    bar.append(fill);
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = `${(100 * t.probability).toFixed(1)}%`;
    item.append(label, bar, prob);
    list.append(item);
  }
}

let latest = 0;  // the picture shown: a heatmap that arrives for an earlier one is dropped

// The heatmap of the top class over the model's input, beside the bars; hidden when the
// service has no explanations (501) or any error.
async function explain(blob, name, picture) {
  const form = new FormData();
  form.append("file", blob, name);
  try {
    const response = await fetch("/v1/explain?top_k=1", { method: "POST", body: form });
    if (!response.ok || picture !== latest) return;
    const { explanation } = await response.json();
    if (picture !== latest) return;
    $("explanation").src = explanation.png;
    $("explanation-caption").textContent = `What the model looked at for ${explanation.target} (red: for, blue: against)`;
    $("explanation-box").hidden = false;
  } catch (err) {
    // no heatmap: the prediction stands on its own
  }
}

// A file the browser cannot show (a rejected upload) hides the preview instead of a broken icon.
for (const img of [$("preview"), $("model-input")]) {
  img.addEventListener("error", () => img.removeAttribute("src"));
}

// A service started with an API key wants it on /v1/*: asked for once, kept for this tab.
function authHeaders() {
  const key = sessionStorage.getItem("fmnist-api-key");
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function classify(blob, name) {
  const picture = ++latest;
  $("explanation-box").hidden = true;
  $("ood-note").textContent = "";
  $("preview").src = URL.createObjectURL(blob);
  setStatus(`Classifying ${name}...`);
  const form = new FormData();
  form.append("file", blob, name);
  try {
    const response = await fetch(`/v1/predict?top_k=${TOP_K}&input=true`,
      { method: "POST", body: form, headers: authHeaders() });
    const body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
    if (response.status === 401) {
      const key = window.prompt("This service needs an API key:");
      if (key) {
        sessionStorage.setItem("fmnist-api-key", key.trim());
        return classify(blob, name);
      }
    }
    if (!response.ok) {
      $("model-input").removeAttribute("src");
      $("predictions").replaceChildren();
      const noObject = response.status === 422 && String(body.detail).includes("no object found");
      setStatus(noObject
        ? `No object found in ${name}: photograph one item on a plain background, filling most of the picture (see "For a photo").`
        : `Error ${response.status}: ${body.detail}`, true);
      return;
    }
    $("model-input").src = body.input;
    showPredictions(body.top);
    $("predictions").classList.toggle("doubtful", body.in_distribution === false);
    const flaggedAbove = oodThreshold == null ? "" : `, flagged above ${oodThreshold.toFixed(2)}`;
    if (body.in_distribution === false) {
      setStatus(`${name} does not look like clothing (out-of-distribution score ${body.ood_score.toFixed(2)}` +
                `${flaggedAbove}): the bars below are the model's guess all the same.`, true);
    } else {
      setStatus(`${name}: ${body.top[0].label}`);
    }
    $("ood-note").textContent = body.in_distribution === true
      ? `Out-of-distribution score ${body.ood_score.toFixed(2)}${flaggedAbove}: it looks like clothing, ` +
        "which does not make the answer right."
      : "";
    explain(blob, name, picture);
  } catch (err) {
    setStatus(`Cannot reach the service: ${err}`, true);
  }
}

// ---------------------------------------------------------------- choose or drop a file
$("file-input").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) classify(file, file.name);
});
const drop = $("drop-zone");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const file = e.dataTransfer.files[0];
  if (file) classify(file, file.name);
});

// ---------------------------------------------------------------- draw
const canvas = $("draw");
const ctx = canvas.getContext("2d");
function clearCanvas() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}
clearCanvas();
ctx.lineWidth = 14;
ctx.lineCap = "round";
ctx.lineJoin = "round";
ctx.strokeStyle = "#222";
let drawing = false;
function point(e) {
  const r = canvas.getBoundingClientRect();
  return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
}
canvas.addEventListener("pointerdown", (e) => {
  drawing = true;
  canvas.setPointerCapture(e.pointerId);
  ctx.beginPath();
  ctx.moveTo(...point(e));
});
canvas.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  ctx.lineTo(...point(e));
  ctx.stroke();
});
canvas.addEventListener("pointerup", () => { drawing = false; });
$("clear").addEventListener("click", clearCanvas);
$("classify-drawing").addEventListener("click", () => {
  canvas.toBlob((blob) => classify(blob, "drawing.png"), "image/png");
});

// ---------------------------------------------------------------- model info
let oodThreshold = null;  // from /healthz: scores above it are flagged
fetch("/healthz").then((r) => r.json()).then((h) => {
  oodThreshold = h.ood_threshold;
  const acc = h.test_accuracy == null ? "" : `, test accuracy ${(100 * h.test_accuracy).toFixed(1)}%`;
  $("model-info").textContent = `Model: ${h.model}${acc}.`;
  $("scan-model-note").hidden = h.trained_on_photos !== false;
}).catch(() => {});
