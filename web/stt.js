// Live transcription from the browser's microphone with a livestt server.
// The audio goes over WebRTC, or over a WebSocket when WebRTC is missing or cannot connect;
// transcripts come back as the events docs/protocol.md describes. Whole files go to the server's
// OpenAI-compatible route (docs/files.md). An ES module: no build step.

const CONNECT_TIMEOUT_MS = 5000;
// The server waits up to 15 s for the last final before it ends a session.
const STOP_TIMEOUT_MS = 20000;
// Chrome reports "disconnected" on short network hiccups; only a lasting one means the link is gone.
const DISCONNECTED_GRACE_MS = 5000;

/** A failure a page can explain to its user; `code` says which (see docs/browser.md). */
export class TranscriptionError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "TranscriptionError";
    this.code = code;
  }
}

/**
 * Opens the microphone and starts a session. Resolves once the server listens, with
 * { stop(), transport: "rtc" | "ws", session: the session.started event, ended: Promise<reason> }.
 * Rejects with a TranscriptionError, which onState("error", error) also reports.
 */
export async function startTranscription(options = {}) {
  const session = new Session(options);
  await session.start();
  return {
    stop: () => session.stop(),
    transport: session.link.kind,
    session: session.info,
    ended: session.ended.promise,
  };
}

class Session {
  constructor(options) {
    const noop = () => {};
    this.o = {
      onPartial: noop, onFinal: noop, onState: noop, onEvent: noop, onLevel: null,
      transport: "auto", language: "", deviceId: "", server: "/", token: "",
      connectTimeoutMs: CONNECT_TIMEOUT_MS, ...options,
    };
    this.base = new URL(this.o.server, location.href);
    this.cleanup = [];
    this.speechStoppedAt = new Map();
    this.ended = deferred();
    this.done = false;
    this.stopping = false;
    this.info = null;
    this.link = null;
  }

  async start() {
    this.o.onState("connecting", {});
    try {
      // Made now, while the caller's click is still the current task: Safari starts audio only then.
      if (this.o.onLevel || this.o.transport !== "rtc") this.audioContext().resume().catch(() => {});
      this.mic = await openMicrophone(this.o.deviceId, this.o.audio);
      if (this.o.onLevel) this.meter();
      this.link = await this.connect();
    } catch (error) {
      const failure = error instanceof TranscriptionError
        ? error : new TranscriptionError("failed", String(error?.message ?? error));
      this.finish(failure);
      throw failure;
    }
    this.o.onState("listening", { transport: this.link.kind, session: this.info });
  }

  async connect() {
    const { transport } = this.o;
    const hasWebRTC = typeof globalThis.RTCPeerConnection === "function";
    if (transport === "ws" || (transport === "auto" && !hasWebRTC)) return this.connectWebSocket();
    if (!hasWebRTC) throw new TranscriptionError("no_webrtc", "This browser has no WebRTC.");
    try {
      return await this.connectWebRTC();
    } catch (error) {
      if (transport !== "auto" || error.code !== "connect_failed") throw error;
      this.o.onState("connecting", { transport: "ws", fallback: true });
      return this.connectWebSocket();
    }
  }

  async connectWebRTC() {
    this.started = deferred();
    // No ICE servers: never a public STUN server. Host candidates reach a server on the same network.
    const pc = new RTCPeerConnection({ iceServers: [] });
    // The channel must exist before the offer, so that the offer negotiates it.
    const channel = pc.createDataChannel("events");
    const close = () => {
      pc.onconnectionstatechange = channel.onclose = channel.onmessage = null;
      pc.close();
    };
    this.cleanup.push(close);
    channel.onmessage = ({ data }) => this.receive(data);
    channel.onclose = () => this.lost();
    let grace;
    pc.onconnectionstatechange = () => {
      clearTimeout(grace);
      if (pc.connectionState === "failed") this.lost();
      else if (pc.connectionState === "disconnected") grace = setTimeout(() => this.lost(), DISCONNECTED_GRACE_MS);
    };
    for (const track of this.mic.getAudioTracks()) pc.addTrack(track, this.mic);
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, this.o.connectTimeoutMs);
    const query = this.o.language ? { language: this.o.language } : {};
    const response = await this.post(this.url("v1/rtc", query), pc.localDescription.sdp);
    const resource = new URL(response.headers.get("Location"), this.base);
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
    try {
      await withTimeout(this.started.promise, this.o.connectTimeoutMs,
        () => new TranscriptionError("connect_failed", "WebRTC did not connect in time."));
    } catch (error) {
      close();
      // Free the server's slot now rather than when its own ICE timeout fires.
      fetch(resource, { method: "DELETE", headers: this.headers() }).catch(() => {});
      throw error;
    }
    return {
      kind: "rtc",
      stop: () => {
        if (channel.readyState === "open") channel.send(JSON.stringify({ type: "stop" }));
        else fetch(resource, { method: "DELETE", headers: this.headers() }).then(() => this.finish(null, "deleted"), () => this.lost());
      },
    };
  }

  async connectWebSocket() {
    this.started = deferred();
    const context = this.audioContext();
    await context.resume();
    await context.audioWorklet.addModule(new URL("./pcm-worklet.js", import.meta.url));
    // Browsers set no headers on a WebSocket: the token goes in the query.
    const ws = new WebSocket(this.url("v1/ws", this.o.token ? { token: this.o.token } : {}, true));
    ws.binaryType = "arraybuffer";
    this.cleanup.push(() => {
      ws.onclose = ws.onmessage = null;
      ws.close();
    });
    ws.onmessage = ({ data }) => typeof data === "string" && this.receive(data);
    try {
      await withTimeout(new Promise((resolve, reject) => {
        ws.onopen = resolve;
        ws.onclose = ({ code, reason }) => reject(closedError(code, reason));
      }), this.o.connectTimeoutMs, () => new TranscriptionError("connect_failed", "The WebSocket did not open in time."));
    } catch (error) {
      throw (await this.reachable()) ? error : unreachable();
    }
    ws.onclose = ({ code, reason }) => {
      if (!this.info) this.started.reject(closedError(code, reason));
      else if (code === 1000 || this.stopping) this.finish(null, "closed");
      else this.lost();
    };
    const start = { type: "start", sample_rate: context.sampleRate, encoding: "pcm_s16le" };
    if (this.o.language) start.language = this.o.language;
    ws.send(JSON.stringify(start));
    // Audio flows right after "start", so the first words are not lost while the server answers.
    const pcm = new AudioWorkletNode(context, "pcm-s16le");
    pcm.port.onmessage = ({ data }) => ws.readyState === WebSocket.OPEN && !this.stopping && ws.send(data);
    context.createMediaStreamSource(this.mic).connect(pcm);
    // Chrome only runs a worklet that is pulled by the destination; it writes silence there.
    pcm.connect(context.destination);
    await withTimeout(this.started.promise, this.o.connectTimeoutMs,
      () => new TranscriptionError("connect_failed", "The server did not start the session in time."));
    return { kind: "ws", stop: () => ws.send(JSON.stringify({ type: "stop" })) };
  }

  receive(text) {
    let event;
    try {
      event = JSON.parse(text);
    } catch {
      return;
    }
    this.o.onEvent(event);
    switch (event.type) {
      case "session.started":
        this.info = event;
        this.started.resolve(event);
        break;
      case "transcript.partial":
        this.o.onPartial(event);
        break;
      case "speech.stopped":
        this.speechStoppedAt.set(event.utterance, performance.now());
        break;
      case "transcript.final": {
        const stoppedAt = this.speechStoppedAt.get(event.utterance);
        this.speechStoppedAt.delete(event.utterance);
        this.o.onFinal(event, { delayMs: stoppedAt === undefined ? null : performance.now() - stoppedAt });
        break;
      }
      case "error":
        // Before session.started an error refuses the session (over the WebSocket); later ones are notices.
        if (!this.info) this.started.reject(new TranscriptionError(event.code, event.message));
        break;
      case "session.ended":
        this.finish(null, event.reason);
        break;
    }
  }

  /** Finishes the utterance in progress, waits for its final and session.ended. */
  async stop() {
    if (this.done) return this.ended.promise;
    if (!this.stopping) {
      this.stopping = true;
      this.o.onState("stopping", {});
      // The microphone goes off at once; the server finalizes what it already heard.
      this.mic.getTracks().forEach((track) => track.stop());
      try {
        this.link.stop();
      } catch {
        this.finish(null, "stop");
      }
      const timer = setTimeout(() => this.finish(null, "stop"), STOP_TIMEOUT_MS);
      this.ended.promise.then(() => clearTimeout(timer));
    }
    return this.ended.promise;
  }

  /** The link broke: while connecting, the transport failed; later, the connection is lost. */
  lost() {
    if (this.done) return;
    if (!this.info) this.started.reject(new TranscriptionError("connect_failed", "The connection could not be set up."));
    else if (this.stopping) this.finish(null, "stop");
    else this.finish(new TranscriptionError("connection_lost", "The connection to the server was lost."));
  }

  finish(error, reason) {
    if (this.done) return;
    this.done = true;
    for (const close of this.cleanup.splice(0)) {
      try {
        close();
      } catch {
        // Closing what is already closed: nothing is left to free.
      }
    }
    this.mic?.getTracks().forEach((track) => track.stop());
    this.context?.close().catch(() => {});
    this.ended.resolve(error ? "error" : reason);
    if (error) this.o.onState("error", { error });
    else this.o.onState("stopped", { reason });
  }

  audioContext() {
    this.context ??= new AudioContext();
    return this.context;
  }

  meter() {
    const context = this.audioContext();
    const analyser = context.createAnalyser();
    analyser.fftSize = 1024;
    context.createMediaStreamSource(this.mic).connect(analyser);
    const samples = new Float32Array(analyser.fftSize);
    const tick = () => {
      if (this.done || this.stopping) return this.o.onLevel(0);
      analyser.getFloatTimeDomainData(samples);
      let energy = 0;
      for (const s of samples) energy += s * s;
      // -60 dBFS (a quiet room) to 0 dBFS on a 0..1 scale: speech lands in the upper half.
      const db = 10 * Math.log10(energy / samples.length + 1e-12);
      this.o.onLevel(Math.min(1, Math.max(0, (db + 60) / 60)));
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  }

  url(path, query = {}, websocket = false) {
    const url = new URL(path, this.base);
    for (const [key, value] of Object.entries(query)) url.searchParams.set(key, value);
    if (websocket) url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url;
  }

  /** With a session token from the embedding app (POST /v1/tokens on its server): Bearer. */
  headers(headers = {}) {
    return this.o.token ? { ...headers, Authorization: `Bearer ${this.o.token}` } : headers;
  }

  async post(url, sdp) {
    let response;
    try {
      response = await fetch(url, { method: "POST", headers: this.headers({ "Content-Type": "application/sdp" }), body: sdp });
    } catch {
      throw unreachable();
    }
    if (response.status === 201) return response;
    let error = {};
    try {
      error = (await response.json()).error ?? {};
    } catch {
      // Not the server's JSON error: a proxy or another program answered.
    }
    throw new TranscriptionError(error.code ?? `http_${response.status}`,
      error.message ?? `The server answered ${response.status} ${response.statusText}.`);
  }

  async reachable() {
    try {
      return (await fetch(this.url("health"))).ok;
    } catch {
      return false;
    }
  }
}

async function openMicrophone(deviceId, constraints) {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw window.isSecureContext
      ? new TranscriptionError("no_microphone", "This browser gives pages no microphone.")
      : new TranscriptionError("insecure_context", "The browser allows the microphone only on a secure page (HTTPS or localhost).");
  }
  // Whisper is trained on unprocessed audio; call-style processing clips and smears words.
  const audio = { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false, ...constraints };
  if (deviceId) audio.deviceId = { exact: deviceId };
  try {
    return await navigator.mediaDevices.getUserMedia({ audio });
  } catch (error) {
    switch (error.name) {
      case "NotAllowedError":
      case "SecurityError":
        throw new TranscriptionError("microphone_denied", "Access to the microphone was denied.");
      case "NotFoundError":
      case "OverconstrainedError":
        throw new TranscriptionError("no_microphone", "No microphone was found.");
      default:
        throw new TranscriptionError("microphone_unavailable", `The microphone could not be started (${error.name}).`);
    }
  }
}

/**
 * Transcribes a whole recording (a File or Blob in any container the server decodes) with
 * POST /v1/audio/transcriptions. Resolves with { text, language, duration, segments: [{ start, end, text,
 * words }] }, times in seconds on the file's timeline. Reports onProgress({ phase: "uploading", loaded, total })
 * while the body goes out, then onProgress({ phase: "transcribing" }). Rejects with a TranscriptionError:
 * the server's code and message (file_too_large, invalid_value for what is not audio, file_limit...),
 * `unreachable`, or `aborted` when `signal` aborts.
 */
export function transcribeFile(file, options = {}) {
  const { server = "/", token = "", language = "", prompt = "", onProgress = () => {}, signal = null } = options;
  const form = new FormData();
  form.append("file", file, file.name || "audio");
  form.append("model", "whisper-1");
  // verbose_json is the only answer with each segment's times; word times fill the JSON download.
  form.append("response_format", "verbose_json");
  form.append("timestamp_granularities[]", "segment");
  form.append("timestamp_granularities[]", "word");
  if (language) form.append("language", language);
  if (prompt) form.append("prompt", prompt);
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new TranscriptionError("aborted", "The transcription was cancelled."));
    // XMLHttpRequest, not fetch: only it reports how much of the body has gone out.
    const xhr = new XMLHttpRequest();
    xhr.open("POST", new URL("v1/audio/transcriptions", new URL(server, location.href)));
    if (token) xhr.setRequestHeader("Authorization", `Bearer ${token}`);
    xhr.responseType = "text";
    const abort = () => xhr.abort();
    signal?.addEventListener("abort", abort);
    const settle = () => signal?.removeEventListener("abort", abort);
    xhr.upload.onprogress = ({ loaded, total }) => onProgress({ phase: "uploading", loaded, total });
    xhr.upload.onload = () => onProgress({ phase: "transcribing" });
    xhr.onabort = () => {
      settle();
      reject(new TranscriptionError("aborted", "The transcription was cancelled."));
    };
    xhr.onerror = () => {
      settle();
      reject(unreachable());
    };
    xhr.onload = () => {
      settle();
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // Not the server's JSON: a proxy or another program answered.
      }
      if (xhr.status === 200 && Array.isArray(body?.segments)) return resolve(fileTranscript(body));
      const error = body?.error ?? {};
      reject(new TranscriptionError(error.code ?? `http_${xhr.status}`,
        error.message ?? `The server answered ${xhr.status} ${xhr.statusText}.`));
    };
    xhr.send(form);
  });
}

/** verbose_json as the page keeps finals: each segment with the words spoken in it. */
function fileTranscript(body) {
  const segments = body.segments.map((s) => ({ start: s.start, end: s.end, text: s.text.trim(), words: [] }));
  // A segment starts where its first word does: a word belongs to the last segment started by its start.
  let at = 0;
  for (const word of body.words ?? []) {
    while (at + 1 < segments.length && segments[at + 1].start <= word.start) at += 1;
    segments[at]?.words.push(word);
  }
  return { text: body.text, language: body.language, duration: body.duration, segments };
}

function iceGathered(pc, timeoutMs) {
  // The server takes no trickled candidates: wait for all of them (host ones come in milliseconds).
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    const timer = setTimeout(resolve, timeoutMs);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

function closedError(code, reason) {
  // 1013 is the WebSocket's "try again later": the server is full or stopping.
  if (code === 1013) return new TranscriptionError("session_limit", reason || "The server has no free session.");
  return new TranscriptionError("connect_failed", reason || `The WebSocket closed (${code}).`);
}

function unreachable() {
  return new TranscriptionError("unreachable", "The server cannot be reached.");
}

function withTimeout(promise, ms, makeError) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(makeError()), ms); }),
  ]).finally(() => clearTimeout(timer));
}

function deferred() {
  const d = {};
  d.promise = new Promise((resolve, reject) => Object.assign(d, { resolve, reject }));
  // A rejection nobody awaits any more (the session moved on) is not an error.
  d.promise.catch(() => {});
  return d;
}

function timestamp(seconds, separator) {
  const ms = Math.max(0, Math.round(seconds * 1000));
  const pad = (n, width = 2) => String(n).padStart(width, "0");
  return `${pad(Math.floor(ms / 3600000))}:${pad(Math.floor(ms / 60000) % 60)}:${pad(Math.floor(ms / 1000) % 60)}`
    + `${separator}${pad(ms % 1000, 3)}`;
}

/** SubRip subtitles from transcript.final events (their start and end, in seconds). */
export function toSRT(finals) {
  return finals.map((f, i) => `${i + 1}\n${timestamp(f.start, ",")} --> ${timestamp(f.end, ",")}\n${f.text.trim()}\n`)
    .join("\n");
}

/** WebVTT subtitles from transcript.final events. */
export function toWebVTT(finals) {
  const escape = (text) => text.trim().replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  return "WEBVTT\n\n" + finals.map((f) => `${timestamp(f.start, ".")} --> ${timestamp(f.end, ".")}\n${escape(f.text)}\n`)
    .join("\n");
}
