// The mm web page: search (text, a file, a spoken query), result cards that page on scroll, more-like-this,
// an "Ask" panel streamed over the WebSocket /ws, and the collection's status. Plain ES module, no build.

const $ = (selector) => document.querySelector(selector);
const KEY_STORE = "mm.apiKey";
const ALL_MODALITIES = ["image", "audio", "text"];
const MAX_ASK_K = 20; // the /ws generate request accepts at most 20 grounding items
const MAX_RECORD_SECONDS = 10;

// ---------------------------------------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  try {
    return localStorage.getItem(KEY_STORE) || "";
  } catch {
    return ""; // storage disabled: no key
  }
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** fetch + JSON; a non-2xx answer becomes an ApiError carrying the message of the JSON error body. */
async function api(path, { json, form, method } = {}) {
  const headers = authHeaders();
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  let resp;
  try {
    resp = await fetch(path, { method: method || (body ? "POST" : "GET"), headers, body });
  } catch {
    throw new ApiError(0, "network_error", "Cannot reach the service. Is it running?");
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null; // an HTML error page from a proxy, say
  }
  if (!resp.ok) {
    const err = (data && data.error) || {};
    if (resp.status === 401) openKeyBox();
    const message = err.message || `${resp.status} ${resp.statusText || "error"}`.trim();
    throw new ApiError(resp.status, err.code || "http_error", message);
  }
  return data;
}

/** Image and audio elements cannot send headers: with a key, their media is fetched and handed over as a blob. */
const objectUrls = new Set();

function setMediaSource(el, url) {
  if (!apiKey()) {
    el.src = url; // direct: the browser streams audio with Range requests
    return;
  }
  fetch(url, { headers: authHeaders() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`${r.status}`))))
    .then((blob) => {
      const objectUrl = URL.createObjectURL(blob);
      objectUrls.add(objectUrl);
      el.src = objectUrl;
    })
    .catch(() => el.closest(".card")?.classList.add("media-failed"));
}

function releaseObjectUrls() {
  for (const url of objectUrls) URL.revokeObjectURL(url);
  objectUrls.clear();
}

// ---------------------------------------------------------------------------------------------- errors

function showError(context, err) {
  const message = (err && err.message) || String(err);
  $("#error-text").textContent = context ? `${context}: ${message}` : message;
  const box = $("#error");
  box.hidden = false;
  box.dataset.code = (err && err.code) || "";
}

function clearError() {
  $("#error").hidden = true;
  $("#error-text").textContent = "";
}

// ---------------------------------------------------------------------------------------------- API key

function openKeyBox() {
  const box = $("#key-box");
  box.open = true;
  box.classList.add("needed");
}

function initKeyBox() {
  const input = $("#api-key");
  input.value = apiKey();
  if (input.value) $("#key-box").classList.add("has-key");
  $("#key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    try {
      localStorage.setItem(KEY_STORE, input.value.trim());
    } catch {
      showError("API key", new Error("this browser does not allow storing the key"));
    }
    $("#key-box").classList.toggle("has-key", !!input.value.trim());
    $("#key-box").classList.remove("needed");
    closeSocket(); // the WebSocket carries the key in its URL
    clearError();
    refreshStats();
  });
  $("#key-clear").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    input.value = "";
    $("#key-box").classList.remove("has-key");
    closeSocket();
  });
}

// ---------------------------------------------------------------------------------------------- status

let lastJobRunning = false;

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

async function refreshStats() {
  try {
    const s = await api("/stats");
    const m = s.by_modality || {};
    $("#counts").textContent =
      `${plural(s.count, "item", "items")}: ${plural(m.image || 0, "image", "images")} · ` +
      `${plural(m.audio || 0, "sound", "sounds")} · ${plural(m.text || 0, "text", "texts")}`;
    $("#counts").dataset.count = s.count;
  } catch (err) {
    $("#counts").textContent =
      err.status === 401 ? "Enter the API key to use this collection." : `Status unavailable: ${err.message}`;
  }
}

async function pollJobs() {
  let delay = 5000;
  try {
    const jobs = await api("/jobs");
    const active = jobs.find((j) => j.status === "running" || j.status === "queued");
    const job = $("#job");
    if (active) {
      job.hidden = false;
      const total = active.total || 0;
      const bar = $("#job-progress");
      if (total > 0) {
        bar.max = total;
        bar.value = active.done;
      } else {
        bar.removeAttribute("value"); // indeterminate until the files are counted
      }
      $("#job-label").textContent =
        active.status === "queued" ? "Indexing queued" : `Indexing ${active.done}/${total || "?"} files`;
      delay = 1000;
    } else {
      job.hidden = true;
      if (lastJobRunning) refreshStats();
    }
    lastJobRunning = !!active;
    showJobErrors(active || jobs[0]);
  } catch (err) {
    if (err.status === 401) delay = 15000;
  }
  setTimeout(pollJobs, delay);
}

function showJobErrors(job) {
  const el = $("#job-errors");
  if (!job || (!job.failed && !job.error)) {
    el.hidden = true;
    return;
  }
  el.hidden = false;
  el.replaceChildren();
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = job.error
    ? `Indexing failed: ${job.error}`
    : `${plural(job.failed, "file", "files")} could not be indexed`;
  details.append(summary);
  const list = document.createElement("ul");
  for (const e of (job.errors || []).slice(0, 50)) {
    const li = document.createElement("li");
    li.textContent = `${e.path.split("/").pop()}: ${e.error}`;
    li.title = e.path;
    list.append(li);
  }
  details.append(list);
  el.append(details);
}

// ---------------------------------------------------------------------------------------------- search

const search = { query: null, offset: 0, k: 12, modalities: null, done: true, loading: false, gen: 0 };

function readK() {
  const k = Number.parseInt($("#k").value, 10);
  return Number.isFinite(k) ? k : 12; // out-of-range values go to the server, which explains the limit
}

/** The checked modalities; null when all are checked (no filter). */
function readModalities() {
  const picked = [...document.querySelectorAll('input[name="modality"]:checked')].map((i) => i.value);
  if (picked.length === 0) throw new ApiError(0, "no_modality", "tick at least one of images, sounds or texts");
  return picked.length === ALL_MODALITIES.length ? null : picked;
}

function startSearch(query) {
  clearError();
  let modalities;
  try {
    modalities = readModalities();
  } catch (err) {
    showError("Search", err);
    return;
  }
  search.gen += 1;
  Object.assign(search, { query, offset: 0, k: readK(), modalities, done: false, loading: false });
  releaseObjectUrls();
  $("#results").replaceChildren();
  $("#empty").hidden = true;
  setHeading(query);
  loadPage();
}

function setHeading(query) {
  const heading = $("#results-heading");
  heading.replaceChildren();
  if (query.type === "text") {
    heading.textContent = `Results for “${query.value}”`;
  } else if (query.type === "item") {
    heading.textContent = `More like “${query.label}”`;
  } else {
    heading.append(`Results for ${query.label || query.file.name}`);
    if (query.file.type.startsWith("image/")) {
      const img = document.createElement("img");
      img.className = "query-thumb";
      img.alt = "";
      img.src = URL.createObjectURL(query.file);
      objectUrls.add(img.src);
      heading.prepend(img);
    }
  }
  $("#results-meta").textContent = "";
}

function fetchPage({ query, offset, k, modalities }) {
  if (query.type === "file") {
    const form = new FormData();
    form.append("file", query.file, query.file.name);
    form.append("k", String(k));
    form.append("offset", String(offset));
    if (modalities) form.append("modalities", modalities.join(","));
    // a file has no words of its own: "words only" applies to text; a spoken query's words join in hybrid
    if ($("#mode").value === "vector") form.append("mode", "vector");
    return api("/search/upload", { form });
  }
  const body = { k, offset };
  if (modalities) body.modalities = modalities;
  if (query.type === "item") body.item_id = query.id;
  else Object.assign(body, { query: query.value, mode: $("#mode").value }); // words need a text query
  return api("/search", { json: body });
}

async function loadPage() {
  if (search.loading || search.done || !search.query) return;
  const gen = search.gen;
  search.loading = true;
  $("#results").setAttribute("aria-busy", "true");
  try {
    const data = await fetchPage(search);
    if (gen !== search.gen) return; // a newer search replaced this one
    const grid = $("#results");
    for (const r of data.results) {
      if (!grid.querySelector(`.card[data-id="${r.id}"]`)) grid.append(makeCard(r));
    }
    search.offset += data.results.length;
    search.done = data.results.length < search.k;
    const shown = grid.querySelectorAll(".card").length;
    $("#empty").hidden = shown > 0;
    const heard = data.heard && data.heard.text ? ` · heard “${data.heard.text}” (${data.heard.language || "?"})` : "";
    // the model's calibrated threshold: even the best result is unlikely to be what was asked for
    const weak = data.no_good_match && search.offset === data.results.length ? " · no good match: these are the closest, not likely hits" : "";
    $("#results-meta").textContent = `${plural(shown, "result", "results")} · ${data.took_ms} ms${heard}${weak}`;
  } catch (err) {
    if (gen !== search.gen) return;
    search.done = true;
    showError("Search failed", err);
  } finally {
    if (gen === search.gen) {
      search.loading = false;
      $("#results").setAttribute("aria-busy", "false");
      recheckSentinel();
    }
  }
}

// Page on scroll: the sentinel below the grid loads the next page when it comes near the viewport.
const sentinelObserver = new IntersectionObserver(
  (entries) => {
    if (entries.some((e) => e.isIntersecting)) loadPage();
  },
  { rootMargin: "600px 0px" },
);

function recheckSentinel() {
  // observe() reports the current state at once: a page that did not fill the screen loads the next one
  const more = $("#more");
  sentinelObserver.unobserve(more);
  if (!search.done) sentinelObserver.observe(more);
}

// ---------------------------------------------------------------------------------------------- cards

function titleOf(r) {
  if (r.caption) return r.caption;
  return (r.uri || "").split("/").pop() || `item ${r.id}`;
}

function formatDuration(seconds) {
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  const s = Math.round(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function makeCard(r) {
  const title = titleOf(r);
  const card = document.createElement("article");
  card.className = `card ${r.modality}`;
  card.tabIndex = 0;
  card.dataset.id = r.id;
  card.dataset.modality = r.modality;
  card.setAttribute("aria-label", `${r.modality}: ${title}. Press Enter for more like this.`);

  if (r.modality === "image") {
    const img = document.createElement("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = title;
    if (r.width && r.height) {
      img.width = r.width;
      img.height = r.height;
    }
    setMediaSource(img, r.thumbnail_url || r.media_url);
    card.append(img);
  } else if (r.modality === "audio") {
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.preload = "metadata";
    audio.setAttribute("aria-label", `Play ${title}`);
    setMediaSource(audio, r.media_url);
    card.append(audio);
  }

  const body = document.createElement("div");
  body.className = "card-body";
  const caption = document.createElement("p");
  caption.className = r.modality === "text" ? "snippet" : "caption";
  caption.textContent = title;
  caption.title = r.uri || title;
  const meta = document.createElement("p");
  meta.className = "meta";
  const badge = document.createElement("span");
  badge.className = `badge ${r.modality}`;
  badge.textContent = r.modality;
  meta.append(badge);
  if (r.duration) meta.append(` ${formatDuration(r.duration)}`);
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = typeof r.score === "number" ? `score ${r.score.toFixed(3)}` : "cited";
  if (typeof r.score_raw === "number") score.title = `relevance ${r.score.toFixed(3)} (calibrated) · cosine ${r.score_raw.toFixed(3)}${typeof r.lexical_score === "number" ? ` · words matched (BM25 ${r.lexical_score.toFixed(2)})` : ""}`;
  meta.append(score);
  body.append(caption);
  if (r.transcript && r.transcript.text) body.append(transcriptLine(r.transcript, "heard in this clip"));
  body.append(meta);
  card.append(body);
  return card;
}

/** What Whisper heard in a clip (an item's speech, or a spoken query): quoted, in its language. */
function transcriptLine(t, label) {
  const p = document.createElement("p");
  p.className = "transcript";
  p.title = label;
  const q = document.createElement("q");
  q.textContent = t.text;
  if (t.language) q.lang = t.language;
  p.append(q);
  if (t.language) p.append(` (${t.language})`);
  return p;
}

function moreLikeThis(card) {
  const title = card.querySelector(".caption, .snippet")?.textContent || `item ${card.dataset.id}`;
  startSearch({ type: "item", id: Number(card.dataset.id), label: title.slice(0, 60) });
  $("#results").focus({ preventScroll: true });
  $("#results-title").scrollIntoView({ behavior: "smooth", block: "start" });
}

function initCards() {
  const grid = $("#results");
  grid.addEventListener("click", (ev) => {
    if (ev.target.closest("audio, a, button")) return; // playing a sound is not a search
    const card = ev.target.closest(".card");
    if (card) moreLikeThis(card);
  });
  grid.addEventListener("keydown", (ev) => {
    const card = ev.target.closest(".card");
    if (card && ev.target === card && (ev.key === "Enter" || ev.key === " ")) {
      ev.preventDefault();
      moreLikeThis(card);
    }
  });
}

// ---------------------------------------------------------------------------------------------- files

function searchFile(file, label) {
  if (!file) return;
  startSearch({ type: "file", file, label });
}

function initFiles() {
  const input = $("#file");
  input.addEventListener("change", () => {
    searchFile(input.files[0]);
    input.value = ""; // choosing the same file again searches again
  });
  const drop = $("#drop");
  let depth = 0;
  document.addEventListener("dragenter", (ev) => {
    if (!ev.dataTransfer?.types.includes("Files")) return;
    depth += 1;
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) drop.classList.remove("over");
  });
  document.addEventListener("dragover", (ev) => ev.preventDefault());
  document.addEventListener("drop", (ev) => {
    ev.preventDefault();
    depth = 0;
    drop.classList.remove("over");
    const file = ev.dataTransfer?.files?.[0];
    if (file) searchFile(file);
  });
}

// ---------------------------------------------------------------------------------------------- microphone

/** 16-bit PCM mono WAV: what the service decodes everywhere (MediaRecorder's webm/opus it may not). */
function encodeWav(samples, rate) {
  const buf = new ArrayBuffer(44 + samples.length * 2);
  const v = new DataView(buf);
  const text = (off, s) => [...s].forEach((c, i) => v.setUint8(off + i, c.charCodeAt(0)));
  text(0, "RIFF");
  v.setUint32(4, 36 + samples.length * 2, true);
  text(8, "WAVE");
  text(12, "fmt ");
  v.setUint32(16, 16, true); // fmt chunk size
  v.setUint16(20, 1, true); // PCM
  v.setUint16(22, 1, true); // mono
  v.setUint32(24, rate, true);
  v.setUint32(28, rate * 2, true); // byte rate
  v.setUint16(32, 2, true); // block align
  v.setUint16(34, 16, true); // bits per sample
  text(36, "data");
  v.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i += 1) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    v.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Blob([buf], { type: "audio/wav" });
}

let recording = null;

async function startRecording() {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  let ctx;
  try {
    ctx = new AudioContext({ sampleRate: 16000 }); // the model's rate: a smaller upload
  } catch {
    ctx = new AudioContext();
  }
  const source = ctx.createMediaStreamSource(stream);
  // ScriptProcessor needs no separate worklet module; it is deprecated but runs in every browser.
  const proc = ctx.createScriptProcessor(4096, 1, 1);
  const chunks = [];
  proc.onaudioprocess = (ev) => chunks.push(new Float32Array(ev.inputBuffer.getChannelData(0)));
  source.connect(proc);
  proc.connect(ctx.destination); // a processor only runs while connected; its output stays silent
  const timer = setTimeout(stopRecording, MAX_RECORD_SECONDS * 1000);
  recording = { stream, ctx, source, proc, chunks, timer, started: performance.now() };
}

async function stopRecording() {
  const r = recording;
  if (!r) return;
  recording = null;
  clearTimeout(r.timer);
  r.source.disconnect();
  r.proc.disconnect();
  r.stream.getTracks().forEach((t) => t.stop());
  const rate = r.ctx.sampleRate;
  await r.ctx.close();
  const n = r.chunks.reduce((sum, c) => sum + c.length, 0);
  const samples = new Float32Array(n);
  let at = 0;
  for (const c of r.chunks) {
    samples.set(c, at);
    at += c.length;
  }
  setMicState(false, n ? `recorded ${(n / rate).toFixed(1)} s` : "nothing was recorded");
  if (n) searchFile(new File([encodeWav(samples, rate)], "spoken-query.wav", { type: "audio/wav" }), "your recording");
}

function setMicState(on, note) {
  const mic = $("#mic");
  mic.setAttribute("aria-pressed", String(on));
  mic.textContent = on ? "Stop recording" : "Record a spoken query";
  mic.classList.toggle("recording", on);
  $("#mic-state").textContent = note || "";
}

function initMic() {
  const mic = $("#mic");
  if (!navigator.mediaDevices?.getUserMedia || !window.AudioContext) return; // stays hidden
  mic.hidden = false;
  mic.addEventListener("click", async () => {
    if (recording) {
      await stopRecording();
      return;
    }
    try {
      await startRecording();
      setMicState(true, `recording… (up to ${MAX_RECORD_SECONDS} s)`);
    } catch (err) {
      setMicState(false, "");
      showError("Microphone", new Error(err.name === "NotAllowedError" ? "permission was denied" : err.message));
    }
  });
}

// ---------------------------------------------------------------------------------------------- ask

let socket = null;
let socketReady = null;
const handlers = new Map(); // request id -> message handler
let askSeq = 0;
let currentAsk = null;

function closeSocket() {
  if (socket) socket.close();
  socket = null;
  socketReady = null;
}

function openSocket() {
  if (socket && socket.readyState <= WebSocket.OPEN) return socketReady;
  const url = new URL("/ws", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (apiKey()) url.searchParams.set("api_key", apiKey()); // browsers cannot set headers on a WebSocket
  const ws = new WebSocket(url);
  socket = ws;
  socketReady = new Promise((resolve, reject) => {
    ws.addEventListener("open", () => resolve(ws), { once: true });
    ws.addEventListener(
      "error",
      () => reject(new ApiError(0, "ws_error", "cannot open the answer stream (WebSocket /ws)")),
      { once: true },
    );
  });
  ws.addEventListener("message", (ev) => {
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    const handle = handlers.get(String(msg.id));
    if (handle) handle(msg);
    else if (msg.type === "error") showError("Ask failed", msg);
  });
  ws.addEventListener("close", (ev) => {
    if (socket === ws) closeSocket();
    const message =
      ev.code === 1008 ? ev.reason || "a valid API key is required" : "the connection closed before the answer ended";
    if (ev.code === 1008) openKeyBox();
    for (const handle of [...handlers.values()]) handle({ type: "error", code: "closed", message });
  });
  return socketReady;
}

function setAsking(on) {
  $("#ask-go").disabled = on;
  $("#ask-stop").hidden = !on;
  $("#answer").setAttribute("aria-busy", String(on));
}

async function ask(question) {
  clearError();
  let modalities;
  try {
    modalities = readModalities();
  } catch (err) {
    showError("Ask", err);
    return;
  }
  const id = `ask-${++askSeq}`;
  const answer = $("#answer");
  answer.replaceChildren();
  answer.classList.remove("failed");
  $("#citations").replaceChildren();
  $("#answer-box").hidden = false;
  currentAsk = { id, text: "", citations: [] };
  setAsking(true);
  const state = currentAsk;
  const finish = () => {
    handlers.delete(id);
    if (currentAsk === state) setAsking(false);
  };
  handlers.set(id, (msg) => {
    if (msg.type === "token") {
      state.text += msg.text;
      answer.append(msg.text);
    } else if (msg.type === "citations") {
      state.citations = msg.citations || [];
      renderCitations(state.citations);
      linkCitationMarks(answer, state);
    } else if (msg.type === "done") {
      if (msg.cancelled) answer.append(" (stopped)");
      finish();
    } else if (msg.type === "error") {
      showError("Ask failed", msg);
      if (!state.text) {
        answer.textContent = msg.message;
        answer.classList.add("failed");
      }
      finish();
    }
  });
  try {
    const ws = await openSocket();
    const request = { type: "generate", id, query: question, k: Math.min(readK(), MAX_ASK_K) };
    if (modalities) request.modalities = modalities;
    ws.send(JSON.stringify(request));
  } catch (err) {
    finish();
    showError("Ask failed", err);
  }
}

function renderCitations(cites) {
  const list = $("#citations");
  list.replaceChildren();
  cites.forEach((c) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "cite";
    button.dataset.id = c.id;
    const label = document.createElement("span");
    label.textContent = c.caption || citedName(c.id, label);
    const meta = document.createElement("span");
    meta.className = "muted";
    meta.textContent = ` ${c.modality} · ${Number(c.score).toFixed(2)}`;
    button.append(label, meta);
    button.addEventListener("click", () => showCited(c.id));
    li.append(button);
    list.append(li);
  });
}

/** A name for an item without a caption: its card's title, else its file name (looked up, filled in later). */
function citedName(id, label) {
  const card = $("#results").querySelector(`.card[data-id="${id}"] .caption`);
  if (card) return card.textContent;
  api(`/items/${id}`)
    .then((item) => {
      label.textContent = titleOf(item);
    })
    .catch(() => {});
  return `item ${id}`;
}

/** Turn "[2]" marks in the finished answer into buttons that show the cited item. */
function linkCitationMarks(answer, state) {
  const parts = state.text.split(/(\[\d+\])/);
  answer.replaceChildren();
  for (const part of parts) {
    const m = /^\[(\d+)\]$/.exec(part);
    const cite = m && state.citations[Number(m[1]) - 1];
    if (!cite) {
      answer.append(part);
      continue;
    }
    const b = document.createElement("button");
    b.type = "button";
    b.className = "cite-mark";
    b.textContent = part;
    b.setAttribute("aria-label", `show cited item ${m[1]}: ${cite.caption}`);
    b.addEventListener("click", () => showCited(cite.id));
    answer.append(b);
  }
}

/** Scroll to a cited item's card and highlight it, loading the item first when it is not on the page. */
async function showCited(id) {
  const grid = $("#results");
  let card = grid.querySelector(`.card[data-id="${id}"]`);
  if (!card) {
    try {
      card = makeCard(await api(`/items/${id}`));
    } catch (err) {
      showError(`Cannot show item ${id}`, err);
      return;
    }
    grid.prepend(card);
    $("#empty").hidden = true;
  }
  grid.querySelectorAll(".card.highlight").forEach((c) => c.classList.remove("highlight"));
  card.classList.add("highlight");
  card.scrollIntoView({ behavior: "smooth", block: "center" });
  card.focus({ preventScroll: true });
  setTimeout(() => card.classList.remove("highlight"), 4000);
}

// ---------------------------------------------------------------------------------------------- start

function init() {
  initKeyBox();
  initCards();
  initFiles();
  initMic();
  $("#error-close").addEventListener("click", clearError);
  $("#search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("#q").value.trim();
    if (!q) {
      showError("Search", new Error("type what you look for, or choose a file"));
      $("#q").focus();
      return;
    }
    startSearch({ type: "text", value: q });
  });
  $("#ask-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("#ask-q").value.trim();
    if (q) ask(q);
    else $("#ask-q").focus();
  });
  $("#ask-stop").addEventListener("click", () => {
    if (currentAsk && socket?.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "cancel", id: currentAsk.id }));
    }
  });
  refreshStats();
  pollJobs();
  const q = new URLSearchParams(window.location.search).get("q");
  if (q) {
    $("#q").value = q;
    startSearch({ type: "text", value: q });
  } else {
    $("#q").focus();
  }
}

init();
