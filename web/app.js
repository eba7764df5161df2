// The page around stt.js: controls, the transcript, the state, and saving what was said.
import { startTranscription, transcribeFile, toSRT, toWebVTT } from "./stt.js";

const $ = (id) => document.getElementById(id);
const requested = new URLSearchParams(location.search).get("transport");
const transport = requested === "rtc" || requested === "ws" ? requested : "auto";

// Short labels: the badge keeps to one line beside the title on a phone.
const STATE_TEXT = {
  idle: "Idle", connecting: "Connecting…", listening: "Listening",
  stopping: "Finishing…", stopped: "Stopped", error: "Error",
  uploading: "Uploading…", transcribing: "Transcribing…", done: "Done",
};

const ERROR_TEXT = {
  microphone_denied: "Access to the microphone was denied. Allow it for this site (the icon in the "
    + "address bar, or the browser's site settings), then press Start.",
  no_microphone: "No microphone was found. Connect one, then press Start.",
  microphone_unavailable: "The microphone could not be started. Another app may be using it.",
  insecure_context: "The browser opens the microphone only on a secure page. Open this page over "
    + "https:// (start the server with --self-signed) or on localhost.",
  unreachable: "The server cannot be reached. Check that it is running and that this device is on its network.",
  session_limit: "The server is busy: every session is in use. Try again in a few seconds.",
  shutting_down: "The server is shutting down. Try again when it is back.",
  connect_failed: "No audio connection to the server could be opened.",
  connection_lost: "The connection to the server was lost.",
  no_webrtc: "This browser has no WebRTC. Open the page without ?transport=rtc to use the WebSocket.",
};
const RETRYABLE = new Set(["unreachable", "session_limit", "shutting_down", "connect_failed", "connection_lost"]);
// A file refused for a passing reason: sending it again may work.
const FILE_RETRYABLE = new Set(["unreachable", "file_limit", "not_ready", "shutting_down", "body_timeout"]);

// Why a session ended, when the user did not end it.
const ENDED_TEXT = {
  idle_timeout: "The server ended the session: no audio reached it for a while.",
  max_duration: "The session reached the server's longest allowed duration.",
  shutdown: "The server shut down.",
  ice_timeout: "The audio connection could not be set up.",
  connection_failed: "The audio connection failed.",
  peer_closed: "The audio connection was closed.",
};

let session = null; // the handle of the session in progress
let starting = false; // startTranscription has not settled yet
let cancelled = false; // Stop was asked for while starting
let hidden = false; // the session stopped because the page was hidden
let finals = []; // the transcript's finals, times on the transcript's own timeline
let timeOrigin = null; // performance.now() when the transcript's first session began listening
let offset = 0; // seconds from the transcript's start to the current session's start
let delays = [];
let paragraph = null; // the paragraph the last final went into
let paragraphs = 0; // how many paragraphs have a final
let paragraphStart = 0; // when the last paragraph's first final started
let upload = null; // the file being transcribed: { file, controller }
let source = null; // the file the transcript came from, null for the microphone
let retry = null; // what Retry does: start the session again, or send the file again

// A new paragraph starts after a pause of more than PARAGRAPH_PAUSE_S between one final's end and the
// next one's start, or after a final that ends a sentence once the paragraph is PARAGRAPH_LONG_S long:
// a paragraph is a stretch of talk, and a speaker who never pauses still gets breaks between sentences.
const PARAGRAPH_PAUSE_S = 2;
const PARAGRAPH_LONG_S = 30;
const SENTENCE_END = /[.!?\u3002\uff01\uff1f\u2026]["'\u201d\u2019\u00bb)\]]*$/u;
const partial = $("partial");

async function start({ resume = false } = {}) {
  if (starting || session || upload) return;
  hideAlert();
  $("notice").textContent = "";
  if (!resume) clearTranscript();
  starting = true;
  cancelled = hidden = false;
  render();
  let handle = null;
  try {
    handle = await startTranscription({
      transport, deviceId: $("microphone").value,
      language: $("language-field").hidden ? "" : $("language").value,
      onState, onPartial, onFinal, onEvent, onLevel,
    });
  } catch {
    // onState("error") has told the user.
  }
  starting = false;
  session = handle;
  if (session && cancelled) session.stop();
  render();
}

function stop() {
  if (session) session.stop();
  else if (starting) cancelled = true;
  render();
}

function setState(state) {
  $("state").dataset.state = state;
  $("state-text").textContent = STATE_TEXT[state];
}

function onState(state, detail) {
  setState(state);
  if (state === "connecting" && detail.fallback) {
    $("notice").textContent = "WebRTC did not connect: trying the WebSocket.";
  }
  if (state === "listening") {
    $("transport").textContent = detail.transport === "rtc" ? "WebRTC" : "WebSocket";
    $("model").textContent = detail.session.model;
    if (timeOrigin === null) timeOrigin = performance.now();
    offset = (performance.now() - timeOrigin) / 1000;
    refreshMicrophones(); // labels are only readable once the microphone is allowed
  } else if (state === "error") {
    const { code, message } = detail.error;
    showAlert(ERROR_TEXT[code] ?? `The session failed: ${message}`,
      RETRYABLE.has(code) ? () => start({ resume: true }) : null);
  } else if (state === "stopped") {
    if (hidden) showAlert("Stopped because the page was hidden. Press Start to go on.", null);
    else if (ENDED_TEXT[detail.reason]) showAlert(ENDED_TEXT[detail.reason], null);
  }
  if (state === "stopped" || state === "error") {
    session = null;
    setPartial("");
  }
  render();
}

function onPartial(event) {
  keepScrolledToEnd(() => setPartial(event.text, event.start + offset));
}

function onFinal(event, { delayMs }) {
  keepScrolledToEnd(() => {
    if (!event.text.trim()) return setPartial(""); // no credible speech in it: a cough, a door
    addFinal({
      text: event.text.trim(), start: event.start + offset, end: event.end + offset,
      language: event.language, words: event.words,
      delay_ms: delayMs === null ? null : Math.round(delayMs),
    });
  });
  render();
}

/** A final into the transcript: its line, in the paragraph the rule gives, and its delay in the table.
 * Live finals and a file's segments both come this way, so they read and save alike. */
function addFinal(fields) {
  const target = paragraphAt(fields.start);
  if (target !== paragraph) {
    paragraph = target;
    paragraphs += 1;
    paragraphStart = fields.start;
  }
  const final = { ...fields, paragraph: paragraphs - 1 }; // counted from 0
  finals.push(final);
  const line = document.createElement("span");
  line.className = "final";
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = final.text;
  line.append(stamp(final.start), " ", text);
  // The partial of this very utterance is where its final goes.
  const next = partial.parentElement === target ? partial : null;
  if (target.querySelector(".final")) target.insertBefore(document.createTextNode(" "), next);
  target.insertBefore(line, next);
  setPartial("");
  $("placeholder").hidden = true;
  if (final.delay_ms !== null) {
    delays.push(final.delay_ms);
    const row = $("delays").insertRow();
    row.insertCell().append(clock(final.start));
    const delay = row.insertCell();
    delay.className = "delay";
    delay.textContent = seconds(final.delay_ms);
    showDelays();
  }
}

/** The time in the transcript where a final started, as 0:07 or 1:02:03. */
function stamp(start) {
  const time = document.createElement("time");
  time.className = "stamp";
  time.dateTime = `PT${Math.floor(start)}S`;
  time.textContent = clock(start);
  // The live region reads the words; the times are on screen and in the downloads.
  time.setAttribute("aria-hidden", "true");
  return time;
}

function clock(totalSeconds) {
  const s = Math.max(0, Math.floor(totalSeconds));
  const pad = (n) => String(n).padStart(2, "0");
  const hours = Math.floor(s / 3600);
  const minutes = Math.floor(s / 60) % 60;
  return hours ? `${hours}:${pad(minutes)}:${pad(s % 60)}` : `${minutes}:${pad(s % 60)}`;
}

function startsParagraph(start) {
  const last = finals.at(-1);
  if (!last || !paragraph) return true;
  return start - last.end > PARAGRAPH_PAUSE_S
    || (start - paragraphStart > PARAGRAPH_LONG_S && SENTENCE_END.test(last.text));
}

/** The paragraph that speech starting at `start` belongs to: the current one, or a new one. */
function paragraphAt(start) {
  if (!startsParagraph(start)) return paragraph;
  // The partial of the same speech may have opened it already.
  const opened = partial.parentElement;
  if (opened?.classList.contains("paragraph") && !opened.querySelector(".final")) return opened;
  const fresh = document.createElement("p");
  fresh.className = "paragraph";
  $("transcript").append(fresh);
  return fresh;
}

function onEvent(event) {
  if (event.type === "error" && event.code === "overloaded") {
    $("notice").textContent = "The server was overloaded: part of the speech could not be transcribed.";
  }
}

function onLevel(level) {
  $("level-bar").style.transform = `scaleX(${level})`;
}

/** The partial, in a lighter style at the end of the paragraph its speech belongs to; "" removes it. */
function setPartial(text, start) {
  const before = partial.parentElement;
  partial.textContent = text.trim();
  if (text.trim()) {
    paragraphAt(start).append(partial);
    $("placeholder").hidden = true;
  } else {
    partial.remove();
  }
  // A paragraph that the partial opened and no final joined goes with it.
  if (before && before !== partial.parentElement && before.classList.contains("paragraph")
      && !before.querySelector(".final")) before.remove();
}

function keepScrolledToEnd(change) {
  const box = $("transcript");
  const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 48;
  change();
  if (atEnd) box.scrollTop = box.scrollHeight;
}

function clearTranscript() {
  finals = [];
  source = null;
  delays = [];
  timeOrigin = null;
  paragraph = null;
  paragraphs = 0;
  setPartial("");
  $("transcript").querySelectorAll(".paragraph").forEach((p) => p.remove());
  $("placeholder").hidden = false;
  $("delay").textContent = "–";
  $("delays").replaceChildren();
}

function showDelays() {
  const sorted = [...delays].sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)];
  $("delay").textContent = `last ${seconds(delays.at(-1))}, median ${seconds(median)} of ${delays.length}`;
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(2)} s`;
}

/** An alert; `again`, when given, is what its Retry button does. */
function showAlert(text, again) {
  $("alert-text").textContent = text;
  retry = again;
  $("retry").hidden = !again;
  $("alert").hidden = false;
}

function hideAlert() {
  $("alert").hidden = true;
}

function render() {
  const busy = starting || session !== null;
  const focused = document.activeElement;
  // One thing at a time: the microphone or a file.
  $("start").disabled = busy || upload !== null;
  // Enabled until the session is over (pressing it again is harmless): focus has somewhere to stay.
  $("stop").disabled = !busy;
  $("choose").disabled = busy || upload !== null;
  $("file-work").hidden = upload === null;
  // A button that is now disabled or hidden drops keyboard focus: hand it to the one that matters now.
  if (focused instanceof HTMLButtonElement && (focused.disabled || focused.closest("[hidden]"))) {
    const fileControls = [$("cancel"), $("choose")];
    const next = upload ? $("cancel") : busy ? $("stop") : fileControls.includes(focused) ? $("choose") : $("start");
    next.focus();
  }
  $("microphone").disabled = $("language").disabled = busy || upload !== null;
  const empty = finals.length === 0;
  $("copy").disabled = empty;
  document.querySelectorAll("[data-format]").forEach((button) => { button.disabled = empty; });
}

/** Sends a file to the server, shows how far it is, then shows its transcript as the microphone's. */
async function transcribe(file) {
  if (starting || session || upload) return;
  hideAlert();
  $("notice").textContent = "";
  upload = { file, controller: new AbortController() };
  progress({ phase: "uploading", loaded: 0, total: file.size });
  render();
  let result = null;
  try {
    result = await transcribeFile(file, {
      language: $("language-field").hidden ? "" : $("language").value,
      signal: upload.controller.signal,
      onProgress: progress,
    });
  } catch (error) {
    if (error.code === "aborted") {
      setState("idle");
      $("notice").textContent = `Cancelled: ${file.name} was not transcribed.`;
    } else {
      setState("error");
      const reason = error.code === "unreachable" ? ERROR_TEXT.unreachable : sentence(error.message);
      showAlert(`${file.name} could not be transcribed. ${reason}`,
        FILE_RETRYABLE.has(error.code) ? () => transcribe(file) : null);
    }
  }
  upload = null;
  if (result) showFileTranscript(file, result);
  render();
}

/** The upload's share sent, then an indeterminate bar while the server transcribes. */
function progress({ phase, loaded, total }) {
  const { file } = upload;
  const bar = $("file-progress");
  setState(phase);
  if (phase === "uploading") {
    bar.max = total || 1;
    bar.value = loaded;
    const percent = Math.floor((100 * loaded) / (total || 1));
    $("file-status").textContent = `${file.name}: uploading, ${percent}\u00a0% of ${size(file.size)}`;
  } else {
    bar.removeAttribute("value"); // a bar without a value is indeterminate: the server gives no share
    $("file-status").textContent = `${file.name}: transcribing…`;
  }
}

/** The file's transcript in place of the one shown: only now, so that a refused file loses nothing. */
function showFileTranscript(file, result) {
  clearTranscript();
  $("transport").textContent = "File upload";
  const box = $("transcript");
  // A whole file arrives at once: the live region would read all of it aloud. It is silent while the text
  // goes in, and the notice says what came; the transcript can then be read at the reader's pace.
  box.setAttribute("aria-live", "off");
  for (const segment of result.segments) {
    if (!segment.text) continue;
    addFinal({ text: segment.text, start: segment.start, end: segment.end, words: segment.words, delay_ms: null });
  }
  setTimeout(() => box.setAttribute("aria-live", "polite"), 1000);
  box.scrollTop = 0;
  source = { name: file.name, language: result.language, duration: result.duration };
  setState("done");
  $("notice").textContent = finals.length
    ? `${file.name}: ${clock(result.duration)} transcribed, ${finals.length} `
      + `${finals.length === 1 ? "line" : "lines"} in ${paragraphs} ${paragraphs === 1 ? "paragraph" : "paragraphs"}.`
    : `${file.name}: no speech was heard in it.`;
}

/** A file may be dropped anywhere on the page; the drop zone shows that it will be taken. */
function listenForDrops() {
  const carriesFiles = (event) => event.dataTransfer?.types.includes("Files");
  let depth = 0; // dragenter and dragleave fire for every element crossed
  const highlight = (on) => $("drop").classList.toggle("dragging", on);
  document.addEventListener("dragenter", (event) => {
    if (!carriesFiles(event)) return;
    depth += 1;
    highlight(!$("choose").disabled);
  });
  document.addEventListener("dragleave", (event) => {
    if (carriesFiles(event) && --depth <= 0) {
      depth = 0;
      highlight(false);
    }
  });
  document.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    // Taken by the page, never by the browser, which would leave the page to open the file.
    event.preventDefault();
    event.dataTransfer.dropEffect = $("choose").disabled ? "none" : "copy";
  });
  document.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    depth = 0;
    highlight(false);
    const [file, ...more] = event.dataTransfer.files;
    if (!file) return;
    if ($("choose").disabled) {
      $("notice").textContent = "Stop the session in progress, or wait for the file, then drop it again.";
      return;
    }
    transcribe(file).then(() => {
      if (more.length && source) $("notice").textContent += ` One file at a time: ${more.length} more not sent.`;
    });
  });
}

function size(bytes) {
  // A number and its unit keep to one line (no-break space).
  return bytes < 1024 * 1024 ? `${Math.ceil(bytes / 1024)}\u00a0KB` : `${(bytes / 1024 / 1024).toFixed(1)}\u00a0MB`;
}

/** The server's message as a sentence of the page's: a capital first, a full stop last. */
function sentence(message) {
  const text = String(message).trim();
  return text.charAt(0).toUpperCase() + text.slice(1) + (/[.!?]$/.test(text) ? "" : ".");
}

/** The transcript as the page shows it: a paragraph a line, a blank line between paragraphs. */
function plainText() {
  const lines = [];
  for (const f of finals) (lines[f.paragraph] ??= []).push(f.text);
  return lines.map((texts) => texts.join(" ")).join("\n\n");
}

function json() {
  const saved = { model: $("model").textContent };
  if (source) Object.assign(saved, { file: source.name, language: source.language, duration: source.duration });
  return JSON.stringify({ ...saved, finals }, null, 2) + "\n";
}

const FORMATS = {
  txt: ["text/plain", () => plainText() + "\n"],
  srt: ["application/x-subrip", () => toSRT(finals)],
  vtt: ["text/vtt", () => toWebVTT(finals)],
  json: ["application/json", json],
};

function download(format) {
  const [type, make] = FORMATS[format];
  const url = URL.createObjectURL(new Blob([make()], { type: `${type};charset=utf-8` }));
  // A file's transcript is named after the file, to be found beside it; the microphone's after its time.
  const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
  const name = source ? source.name.replace(/\.[^.]*$/, "") || "transcript" : `transcript-${stamp}`;
  const link = Object.assign(document.createElement("a"), { href: url, download: `${name}.${format}` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function copy() {
  try {
    await navigator.clipboard.writeText(plainText());
    $("notice").textContent = "Copied to the clipboard.";
  } catch {
    $("notice").textContent = "The browser did not allow copying: select the text and copy it.";
  }
}

async function refreshMicrophones() {
  if (!navigator.mediaDevices?.enumerateDevices) return;
  const select = $("microphone");
  const chosen = select.value;
  // Before permission the list has one nameless entry; "default" duplicates our first option.
  const inputs = (await navigator.mediaDevices.enumerateDevices())
    .filter((d) => d.kind === "audioinput" && d.deviceId && d.deviceId !== "default");
  select.replaceChildren(new Option("Default microphone", ""),
    ...inputs.map((d, i) => new Option(d.label || `Microphone ${i + 1}`, d.deviceId)));
  select.value = inputs.some((d) => d.deviceId === chosen) ? chosen : "";
}

async function loadServerInfo() {
  let health;
  try {
    health = await (await fetch("/health")).json();
  } catch {
    return; // Start will say that the server cannot be reached
  }
  $("model").textContent = health.model;
  const languages = health.languages ?? [];
  if (languages.length < 2) return; // an English-only model: nothing to choose
  let names;
  try {
    names = new Intl.DisplayNames([navigator.language, "en"], { type: "language" });
  } catch {
    names = { of: (code) => code };
  }
  const options = languages.map((code) => new Option(`${names.of(code) ?? code} (${code})`, code));
  options.sort((a, b) => a.text.localeCompare(b.text));
  $("language").append(...options);
  $("language-field").hidden = false;
}

$("start").addEventListener("click", () => start());
$("stop").addEventListener("click", stop);
$("retry").addEventListener("click", () => retry?.());
$("choose").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", () => {
  const [file] = $("file").files;
  $("file").value = ""; // the same file chosen again is a change too
  if (file) transcribe(file);
});
$("cancel").addEventListener("click", () => upload?.controller.abort());
listenForDrops();
$("copy").addEventListener("click", copy);
document.querySelectorAll("[data-format]").forEach((button) => {
  button.addEventListener("click", () => download(button.dataset.format));
});
// A phone locked or a tab switched away: end the session cleanly rather than stream to nobody.
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "hidden" && (session || starting)) {
    hidden = true;
    stop();
  }
});
navigator.mediaDevices?.addEventListener?.("devicechange", refreshMicrophones);
refreshMicrophones();
loadServerInfo();
render();
