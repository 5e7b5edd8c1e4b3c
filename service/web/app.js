// The web page's only script: upload an image, show the result against a bicubic enlargement.
//
// It uses the public API as any client would (docs/service.md): POST /v1/upscale, and for an
// image too large for a synchronous request (413 too_large_for_sync, or 504 timeout) POST
// /v1/jobs, polling the job until its result is ready. GET /ui-config says whether an API key is needed and whether
// the job queue exists. No framework and no build step: this file is served as it is.
"use strict";

const KEY_STORAGE = "vpdsr-api-key";
const POLL_MS = 1000;
const RETRIES = 5; // for answers that carry Retry-After (server busy, Redis briefly away)

// The API's error codes in plain words; the server's own message follows as the detail.
const PLAIN = {
  network: "The server could not be reached. Check that it is running, then try again.",
  bad_request: "The file could not be read as an image: it may be damaged or cut short.",
  unsupported_media_type: "This file is not an image the server can read. Use PNG, JPEG, WebP, GIF, BMP or TIFF.",
  payload_too_large: "The image is too large for this server.",
  too_large_for_sync: "This image needs more compute than one request may take on this server, and the server " +
    "has no job queue for large images. What to do instead: run vpdsr upscale on your own machine (no time " +
    "limit), ask the operator for the job queue or a higher limit, or send a smaller image (the server's " +
    "message below says how large).",
  timeout: "The image took longer than one request may take on this server. The server's message below " +
    "says what to do instead.",
  unauthorized: "The server needs a valid API key. Enter it above, then try again.",
  invalid_parameter: "One of the options is not accepted by this server.",
  request_timeout: "The upload was too slow and the server gave up on it.",
  queue_full: "The server is busy.",
  job_queue_full: "The job queue is full.",
  queue_timeout: "The server was too busy to start on the image in time.",
  not_ready: "The model is still loading, or the server is shutting down. Try again in a minute.",
  out_of_memory: "The server ran out of memory on this image. Try a smaller image.",
  jobs_disabled: "This server has no job queue for large images. Try a smaller image.",
  jobs_unavailable: "The job queue is unreachable at the moment.",
  job_failed: "The server could not upscale this image.",
  job_cancelled: "The job was cancelled.",
  job_not_found: "The job has expired or is unknown to the server.",
  compute_failed: "The server could not upscale this image.",
};

class ApiError extends Error {
  constructor(code, message, status = 0, retryAfter = null) {
    super(message);
    this.code = code;
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const state = {
  config: { auth_required: false, jobs: false },
  input: null, // a promise of {file, image}: image is null when the browser cannot decode the file
  urls: {}, // slot ("input", "result") → object URL, revoked when replaced
};

// -- the API ---------------------------------------------------------------------------------
async function api(path, init = {}) {
  const headers = new Headers(init.headers);
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (err) {
    throw new ApiError("network", `(${err.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || "no details";
  try {
    ({ code, message } = (await response.json()).error);
  } catch {
    // not the API's JSON error shape (e.g. a proxy's page): keep the HTTP status
  }
  const retryAfter = Number(response.headers.get("Retry-After")) || null;
  return new ApiError(code, message, response.status, retryAfter);
}

/** ``request()`` again after Retry-After seconds while the server says it is busy. */
async function withRetries(request, onWait) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await request();
    } catch (err) {
      if (!(err instanceof ApiError) || !err.retryAfter || attempt >= RETRIES) throw err;
      onWait(err);
      await sleep(err.retryAfter * 1000);
    }
  }
}

/** An Idempotency-Key: random, without crypto.randomUUID, which plain-http pages lack. */
function idempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function upscale(file, form) {
  const query = new URLSearchParams(options(form));
  // The raw body; the server recognises the format from the bytes, whatever the file's name says.
  const type = file.type.startsWith("image/") ? file.type : "application/octet-stream";
  const send = (path, headers = {}) => () =>
    api(`${path}?${query}`, { method: "POST", body: file, headers: { "Content-Type": type, ...headers } });
  try {
    showBusy("Upscaling…");
    return { response: await withRetries(send("/v1/upscale"), waiting), viaJob: false };
  } catch (err) {
    // Too large, or (estimated too low, after an idle spell) it ran out of time: a job has no limit.
    if (!["too_large_for_sync", "timeout"].includes(err.code) || !state.config.jobs) throw err;
  }
  showBusy("This image is large: it goes to the job queue…");
  // One key for every resend: a retried submission finds its job instead of queuing a second one.
  const submit = await withRetries(send("/v1/jobs", { "Idempotency-Key": idempotencyKey() }), waiting);
  let job = await submit.json();
  while (job.state === "queued" || job.state === "running") {
    showJob(job);
    await sleep(POLL_MS);
    job = await (await withRetries(() => api(job.status_url), waiting)).json();
  }
  if (job.state !== "succeeded") {
    throw new ApiError(job.error?.code ?? `job_${job.state}`, job.error?.message ?? `the job was ${job.state}`);
  }
  return { response: await api(job.result_url), viaJob: true };
}

/** The options as query parameters (the image itself is the raw body). */
function options(form) {
  return [...form.entries()].filter(([name, value]) => name !== "image" && value !== "");
}

// -- what the page shows ---------------------------------------------------------------------
function showBusy(text) {
  $("status").hidden = false;
  $("status-text").textContent = text;
  $("progress").removeAttribute("value"); // indeterminate
}

function waiting(err) {
  showBusy(`${PLAIN[err.code] ?? "The server is busy."} Trying again in ${err.retryAfter} s…`);
}

/** A job's state; its progress, when the server reports ``progress: {done, total}``. */
function showJob(job) {
  const progress = job.progress;
  if (progress && progress.total > 0) {
    $("progress").max = progress.total;
    $("progress").value = progress.done;
    $("status-text").textContent = `Upscaling in the job queue: ${progress.done} of ${progress.total} tiles done.`;
  } else {
    showBusy(job.state === "queued" ? "Waiting in the job queue…" : "Upscaling in the job queue…");
  }
}

function showError(err) {
  const plain = PLAIN[err.code] ?? "The request failed.";
  const retry = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : "";
  $("error-summary").textContent = plain + retry;
  $("error-detail").textContent = err.status ? `The server said: ${err.message} (${err.code})` : err.message;
  $("error").hidden = false;
  if (err.code === "unauthorized") askForKey();
}

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

/** An object URL for ``blob`` in ``slot``, revoking the one it replaces (no leak per upload). */
function objectUrl(slot, blob) {
  if (state.urls[slot]) URL.revokeObjectURL(state.urls[slot]);
  state.urls[slot] = URL.createObjectURL(blob);
  return state.urls[slot];
}

async function showResult(response, viaJob, input, scale) {
  const blob = await response.blob();
  const url = objectUrl("result", blob);
  const after = $("after");
  after.src = url;
  await after.decode();
  const width = after.naturalWidth;
  const height = after.naturalHeight;
  const comparable = drawBicubic(input.image, width, height);
  $("compare").classList.toggle("single", !comparable);
  $("no-compare").hidden = comparable;
  $("slider").disabled = !comparable;
  $("result").style.setProperty("--natural-width", `${width}px`); // the comparison and its slider

  const ext = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" }[blob.type] ?? "img";
  const stem = input.file.name.replace(/\.[^.]*$/, "") || "image";
  $("download").href = url;
  $("download").download = `${stem}_x${scale}.${ext}`;
  const model = `${response.headers.get("X-Model") ?? "?"}:${response.headers.get("X-Model-Version") ?? "?"}`;
  $("result-info").textContent = `${width} × ${height} px, ${model}, seed ${response.headers.get("X-Seed")}` +
    (viaJob ? ", computed as a background job." : ".");
  $("result").hidden = false;
  $("result-title").focus();
}

/** The input enlarged to the result's size by the browser (bicubic-class, "high" quality):
 * the baseline the model should beat. False when the browser could not decode the input. */
function drawBicubic(image, width, height) {
  const canvas = $("before");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  if (!image || !context) return false;
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.clearRect(0, 0, width, height);
  context.drawImage(image, 0, 0, width, height);
  return true;
}

// -- events ----------------------------------------------------------------------------------
function chooseFile(file) {
  $("result").hidden = true;
  $("error").hidden = true;
  state.input = decodeInput(file);
}

async function decodeInput(file) {
  const image = new Image();
  image.src = objectUrl("input", file);
  try {
    await image.decode();
    $("file-info").textContent = `${file.name}: ${image.naturalWidth} × ${image.naturalHeight} px`;
    return { file, image };
  } catch {
    // TIFF, or a damaged file: the server decides; without a decoded input there is no comparison.
    $("file-info").textContent = `${file.name} (${Math.ceil(file.size / 1024)} KiB)`;
    return { file, image: null };
  }
}

async function submit(event) {
  event.preventDefault(); // the file input is required: the browser asks for a file before this runs
  const form = new FormData($("upscale-form"));
  state.input ??= decodeInput($("file").files[0]); // a file the browser kept across a reload
  const input = await state.input;
  $("error").hidden = true;
  $("submit").disabled = true;
  try {
    const { response, viaJob } = await upscale(input.file, form);
    await showResult(response, viaJob, input, form.get("scale"));
  } catch (err) {
    showError(err instanceof ApiError ? err : new ApiError("internal", String(err)));
  } finally {
    $("submit").disabled = false;
    $("status").hidden = true;
  }
}

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  $("key-state").textContent = key ? "Key saved for this tab." : "Key removed.";
}

function setDivider() {
  $("compare").style.setProperty("--position", `${$("slider").value}%`);
}

/** Dragging on the comparison moves the divider too (the slider stays the one source of truth). */
function wireCompare() {
  const compare = $("compare");
  const follow = (event) => {
    if (!(event.buttons & 1) || $("slider").disabled) return;
    const box = compare.getBoundingClientRect();
    $("slider").value = Math.round((100 * (event.clientX - box.left)) / box.width);
    setDivider();
  };
  compare.addEventListener("pointerdown", follow);
  compare.addEventListener("pointermove", follow);
}

function wireDrop() {
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    const files = event.dataTransfer.files;
    if (files.length === 0) return;
    $("file").files = files; // one source of truth: the file input
    chooseFile(files[0]);
  });
}

async function start() {
  $("upscale-form").addEventListener("submit", submit);
  $("key-form").addEventListener("submit", saveKey);
  $("file").addEventListener("change", () => $("file").files[0] && chooseFile($("file").files[0]));
  $("slider").addEventListener("input", setDivider);
  $("actual-size").addEventListener("change", () => $("viewport").classList.toggle("actual", $("actual-size").checked));
  wireDrop();
  wireCompare();
  setDivider();
  try {
    state.config = await (await api("/ui-config")).json();
  } catch (err) {
    showError(err);
    return;
  }
  if (state.config.auth_required) {
    $("key-form").hidden = false;
    $("api-key").value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  }
}

start();
