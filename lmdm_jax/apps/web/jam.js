// The jam page: capture -> WebSocket (float32 PCM at the server's rate) -> the model's part back
// -> AudioWorklet playback. Shows level meters (dBFS), a scrolling waveform of both parts, the
// server's set-up progress, records takes as WAV files (your part, the model's part, the mix), and
// keeps the latency and under-run numbers under "Numbers". No build step, no dependencies.
// URL parameters: ?autotest=1&seconds=5&max_seconds=20&prompt=...&delay=2&steps=2&cfg=1 starts by
// itself with the microphone and sends a {"type": "report"} with its measurements after `seconds`
// of audio once 0.5 s of generated audio came back (or after `max_seconds`), then stops.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const AUTOTEST = params.get("autotest") === "1";
const METER_FLOOR_DB = -60;  // the meters' scale: -60 .. 0 dBFS
const SILENT_DB = -100;      // below this a part reads "silent"

const S = {
  ws: null, hello: null, ctx: null, capture: null, player: null, source: null, media: null,
  begin: null, inAnalyser: null, outAnalyser: null,
  monitorGain: null, running: false, sessionStarted: false,
  sr: 22050, delaySamples: 0, delaySeconds: null, delayParts: null,
  sent: 0, received: 0, sendLog: [],  // [{idx, n, t}] of frames sent (t: performance.now())
  firstSendT: null, firstGeneratedT: null, generatedNonzero: 0, generatedMax: 0,
  inSq: 0, outSq: 0, outGen: 0,
  latencies: [], rttLast: null, pings: [], playStatus: null, serverStats: null,
  errors: [], reported: false, setup: null, setupSummary: null, reconnect: null,
  wsErrorSaid: false, promptEdited: false,
};

function log(msg, error = false) {  // the message list under the page; errors in red
  const el = $("log");
  const line = document.createElement("div");
  line.textContent = msg;
  if (error) line.className = "err";
  el.append(line);
  el.scrollTop = el.scrollHeight;
  console.log("[jam] " + msg);
}
function setStatus(s) { $("status").textContent = s; }
function fmtMs(x) { return x == null ? "–" : `${x.toFixed(0)} ms`; }
function fmtDb(db) { return db <= SILENT_DB ? "silent" : `${db.toFixed(1)} dBFS`; }
function toDb(x) { return x > 0 ? Math.max(20 * Math.log10(x), SILENT_DB) : SILENT_DB; }
function stats(a) {
  if (!a.length) return null;
  const s = [...a].sort((x, y) => x - y);
  return { mean: a.reduce((p, q) => p + q, 0) / a.length, min: s[0], max: s[s.length - 1],
    median: s[Math.floor(s.length / 2)], last: a[a.length - 1], n: a.length };
}

// ------------------------------------------------------------------------------- WebSocket

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  S.ws = ws;
  ws.onopen = () => { S.wsErrorSaid = false; setStatus("connected, waiting for the server…"); };
  ws.onclose = (e) => {
    $("start").disabled = true; $("stop").disabled = true; $("apply").disabled = true;
    stopAudio();
    endSetup(null);
    if (S.reported) { setStatus("disconnected"); return; }
    setStatus(`disconnected (${e.code}${e.reason ? ": " + e.reason : ""}); reconnecting in 3 s…`);
    clearTimeout(S.reconnect);
    S.reconnect = setTimeout(connect, 3000);
  };
  ws.onerror = () => {  // said once until a connection opens again, not at every retry
    if (!S.wsErrorSaid) log("WebSocket error (is the server running?)", true);
    S.wsErrorSaid = true;
  };
  ws.onmessage = (e) => {
    if (typeof e.data === "string") onControl(JSON.parse(e.data));
    else onAudio(e.data);
  };
}

function send(obj) {
  if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(JSON.stringify(obj));
}

function onControl(m) {
  switch (m.type) {
    case "hello": {
      S.hello = m; S.sr = m.sample_rate;
      $("r_server").textContent = `config ${m.config}${m.random_weights ? " (random weights)" : ""}, `
        + `${m.sample_rate} Hz, blocks of ${(1000 * m.block_seconds).toFixed(0)} ms, `
        + `${m.active_sessions}/${m.max_sessions} sessions busy`;
      $("delay").value = m.defaults.delay_blocks; $("steps").value = m.defaults.steps;
      $("cfg").value = m.defaults.cfg;
      if (m.defaults.prompt && !S.promptEdited) $("prompt").value = m.defaults.prompt;
      $("start").disabled = false;
      setStatus(m.random_weights ? "ready (note: this server's model has random weights)" : "ready");
      if (AUTOTEST) autotestStart();
      break;
    }
    case "progress": setupStage(m.stage, m.elapsed_s); break;
    case "started":
      S.delaySamples = m.delay_samples; S.delaySeconds = m.delay_seconds;
      S.delayParts = { blocks: m.delay_blocks, blockSeconds: m.block_seconds,
                       decoderSeconds: m.decoder_latency_samples / m.sample_rate,
                       leadSeconds: m.lead_seconds };
      S.sessionStarted = true;
      S.capture.port.postMessage({ type: "enable" });
      if (S.begin) { S.begin(); S.begin = null; }  // a file starts playing with the session
      endSetup(m.setup_seconds);
      setStatus(`jamming: the model plays ${(1000 * m.delay_seconds).toFixed(0)} ms behind you `
        + `(set up in ${m.setup_seconds.toFixed(1)} s)`);
      $("apply").disabled = false; $("record").disabled = false;
      break;
    case "stats": S.serverStats = m; break;
    case "pong":
      if (typeof m.t === "number") { S.rttLast = performance.now() - m.t; S.pings.push(S.rttLast); }
      break;
    case "prompt_ok": log(`prompt changed at block ${m.block}`); break;
    case "stopped":
      if (m.reason && S.running) {
        log(`server stopped the session: ${m.reason}`, true);
        stopAudio(); endSetup(null); setStatus("stopped by the server");
        $("stop").disabled = true; $("apply").disabled = true; $("start").disabled = false;
      }
      break;
    case "error":
      S.errors.push(m); log(`server: ${m.code}: ${m.error}`, true);
      if (m.code === "start_failed" || m.code === "busy") {
        stopAudio(); endSetup(null); setStatus("could not start");
        $("stop").disabled = true; $("start").disabled = false;
      }
      break;
    case "warning": log(`server warning: ${m.code}: ${m.error}`); break;
    case "report_ok": break;
    default: log(`unknown message ${m.type}`, true);
  }
}

// One binary frame of n samples answers each frame sent: output sample i is the model's music
// for the moment of input sample i - delaySamples.
function onAudio(buf) {
  const now = performance.now();
  const y = new Float32Array(buf);
  const a = S.received, n = y.length;
  S.received += n;
  const m = a - S.delaySamples;  // the input moment that this frame's first sample answers
  if (m >= 0) {
    while (S.sendLog.length > 1 && S.sendLog[0].idx + S.sendLog[0].n <= m) S.sendLog.shift();
    const f = S.sendLog[0];
    if (f && f.idx <= m && m < f.idx + f.n) {
      // input sample m was captured (f.idx + f.n - m) samples before its frame was sent
      const tCap = f.t - (1000 * (f.idx + f.n - m)) / S.sr;
      S.latencies.push(now - tCap);
      if (S.latencies.length > 2000) S.latencies.splice(0, 1000);
    }
  }
  const g0 = Math.max(0, S.delaySamples - a);  // generated part of this frame
  let nz = 0, mx = 0, sq = 0;
  for (let i = g0; i < n; i++) { const v = Math.abs(y[i]); if (v > 1e-6) nz++; if (v > mx) mx = v; sq += v * v; }
  if (nz && S.firstGeneratedT === null) S.firstGeneratedT = now;
  S.generatedNonzero += nz; S.generatedMax = Math.max(S.generatedMax, mx);
  S.outSq += sq; S.outGen += Math.max(0, n - g0);
  scopeAdd(SCOPE.out, a, y);
  recordFrame("model", a, y);
  if (S.player) S.player.port.postMessage({ type: "audio", data: y }, [y.buffer]);  // (detaches y)
}

function onCaptureFrame(e) {
  if (e.data.type !== "frame" || !S.running || !S.sessionStarted) return;
  const x = e.data.data;
  const t = performance.now();
  for (let i = 0; i < x.length; i++) S.inSq += x[i] * x[i];
  S.sendLog.push({ idx: S.sent, n: x.length, t });
  if (S.firstSendT === null) S.firstSendT = t;
  scopeAdd(SCOPE.in, S.sent, x);
  recordFrame("input", S.sent, x);
  S.sent += x.length;
  if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(x.buffer);
  if (AUTOTEST) autotestTick();
}

// ----------------------------------------------------------------------- set-up progress

// The server names each stage of a session's set-up as it begins ({"type": "progress"}); the
// page lists them with their durations and ticks the current one.
function beginSetup() {
  S.setup = { t0: performance.now(), stages: [] };
  $("stages").textContent = "";
  $("setup").hidden = false;
  setupStage("asking the server for a session", 0);
}

function setupStage(name, elapsed) {
  const st = S.setup;
  if (!st) return;
  closeStage(elapsed);
  const li = document.createElement("li");
  const label = document.createElement("span");
  const t = document.createElement("span");
  label.textContent = name[0].toUpperCase() + name.slice(1);
  t.className = "t"; t.setAttribute("aria-hidden", "true");
  li.append(label, " ", t);
  $("stages").append(li);
  st.stages.push({ name, start: elapsed, li, t, tLocal: performance.now() });
  setStatus(`setting up: ${name}…`);
}

function closeStage(elapsed) {
  const st = S.setup;
  const cur = st && st.stages[st.stages.length - 1];
  if (!cur || cur.end != null) return;
  cur.end = elapsed != null ? elapsed : (performance.now() - st.t0) / 1000;
  cur.li.className = "done";
  cur.li.firstChild.textContent += `: ${(cur.end - cur.start).toFixed(1)} s`;
  cur.t.textContent = "";
}

function tickSetup() {
  const st = S.setup;
  const cur = st && st.stages[st.stages.length - 1];
  if (cur && cur.end == null) {
    cur.t.textContent = `… ${((performance.now() - cur.tLocal) / 1000).toFixed(1)} s`
      + ` (total ${((performance.now() - st.t0) / 1000).toFixed(1)} s)`;
  }
}

function endSetup(total) {  // total: the server's set-up seconds (null: it did not finish)
  const st = S.setup;
  if (!st) return;
  closeStage(total);
  if (total != null) {
    S.setupSummary = `${total.toFixed(1)} s: ` + st.stages.slice(1)
      .map((s) => `${s.name} ${(s.end - s.start).toFixed(1)} s`).join(", ");
  }
  S.setup = null;
  $("setup").hidden = true;
}

// ----------------------------------------------------------------------------------- audio

async function openMic(deviceId) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia)
    throw new Error("no microphone API here (the page needs http://localhost or https)");
  const audio = { echoCancellation: false, noiseSuppression: false, autoGainControl: false,
    channelCount: 1 };
  if (deviceId) audio.deviceId = { exact: deviceId };
  const media = await navigator.mediaDevices.getUserMedia({ audio });
  const track = media.getAudioTracks()[0];
  $("input-name").textContent = track ? `listening to: ${track.label || "a microphone"}` : "";
  listDevices();  // labels are readable once the microphone is allowed
  return media;
}

async function getSource(ctx) {
  const kind = document.querySelector("input[name=source]:checked").value;
  if (kind === "file") {
    const file = $("file").files[0];
    if (!file) throw new Error("choose an audio file first");
    const audio = await ctx.decodeAudioData(await file.arrayBuffer());
    const src = ctx.createBufferSource();
    src.buffer = audio; src.loop = true;
    return { node: src, begin: () => src.start() };
  }
  S.media = await openMic($("device").value);
  return { node: ctx.createMediaStreamSource(S.media), begin: () => {} };
}

// Where the input goes: the capture worklet (to the server), the monitor and the input meter.
function connectSource(node) {
  node.connect(S.capture);
  node.connect(S.monitorGain);
  node.connect(S.inAnalyser);
}

async function switchInput() {  // a new device takes over at once; the session runs on
  if (!S.ctx || !S.source || !(S.source instanceof MediaStreamAudioSourceNode)) return;
  try {
    const media = await openMic($("device").value);
    if (!S.ctx) { media.getTracks().forEach((t) => t.stop()); return; }
    const node = S.ctx.createMediaStreamSource(media);
    S.source.disconnect();
    if (S.media) S.media.getTracks().forEach((t) => t.stop());
    S.media = media; S.source = node;
    connectSource(node);
    log(`input switched to ${media.getAudioTracks()[0].label || "the chosen device"}`);
  } catch (err) {
    log(`could not switch the input: ${err.message || err}`, true);
  }
}

async function listDevices() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
  const sel = $("device");
  const keep = sel.value;
  const devices = (await navigator.mediaDevices.enumerateDevices())
    .filter((d) => d.kind === "audioinput" && d.deviceId);
  sel.textContent = "";
  const def = new Option("default microphone", "");
  sel.append(def);
  devices.filter((d) => d.deviceId !== "default").forEach((d, i) => {
    sel.append(new Option(d.label || `microphone ${i + 1}`, d.deviceId));
  });
  sel.value = [...sel.options].some((o) => o.value === keep) ? keep : "";
}

async function start() {
  if (S.running) return;
  $("start").disabled = true;
  try {
    S.ctx = new AudioContext({ latencyHint: "interactive" });
    await S.ctx.audioWorklet.addModule("worklet.js");
    const frame = S.hello.frame_samples;
    S.capture = new AudioWorkletNode(S.ctx, "jam-capture", { numberOfInputs: 1, numberOfOutputs: 1,
      outputChannelCount: [1], processorOptions: { targetRate: S.sr, frameSamples: frame } });
    S.player = new AudioWorkletNode(S.ctx, "jam-player", { numberOfInputs: 0, numberOfOutputs: 1,
      outputChannelCount: [2], processorOptions: { sourceRate: S.sr,
        prebufferSeconds: 2.5 * frame / S.sr, maxQueueSeconds: 1.0 } });
    S.capture.port.onmessage = onCaptureFrame;
    S.player.port.onmessage = (e) => { if (e.data.type === "status") S.playStatus = e.data; };
    const silent = S.ctx.createGain(); silent.gain.value = 0;  // keeps the capture node pulled
    S.capture.connect(silent).connect(S.ctx.destination);
    S.player.connect(S.ctx.destination);
    S.inAnalyser = new AnalyserNode(S.ctx, { fftSize: 2048 });   // the meters: what you play ...
    S.outAnalyser = new AnalyserNode(S.ctx, { fftSize: 2048 });  // ... and the model as heard
    S.player.connect(S.outAnalyser);
    S.monitorGain = S.ctx.createGain();
    S.monitorGain.gain.value = $("monitor").checked ? 1 : 0;
    S.monitorGain.connect(S.ctx.destination);
    const src = await getSource(S.ctx);
    S.source = src.node;
    connectSource(S.source);
    S.begin = src.begin;
    await S.ctx.resume();
    Object.assign(S, { sent: 0, received: 0, sendLog: [], latencies: [], firstSendT: null,
      firstGeneratedT: null, generatedNonzero: 0, generatedMax: 0, inSq: 0, outSq: 0, outGen: 0,
      sessionStarted: false, running: true });
    scopeReset();
    send({ type: "start", prompt: $("prompt").value, delay_blocks: Number($("delay").value),
      steps: Number($("steps").value), cfg: Number($("cfg").value) });
    beginSetup();
    $("stop").disabled = false;
  } catch (err) {
    log(`could not start: ${err.message || err}`, true);
    S.errors.push({ code: "client", error: String(err.message || err) });
    stopAudio();
    $("start").disabled = !S.hello;
    if (AUTOTEST) sendReport();
  }
}

function stopAudio() {
  S.running = false; S.sessionStarted = false;
  if (REC.on) recordStop();
  $("record").disabled = true;
  if (S.capture) S.capture.port.postMessage({ type: "disable" });
  if (S.media) S.media.getTracks().forEach((t) => t.stop());
  if (S.ctx) S.ctx.close().catch(() => {});
  Object.assign(S, { ctx: null, capture: null, player: null, source: null, media: null,
    begin: null, inAnalyser: null, outAnalyser: null });
}

function stop() {
  send({ type: "stop" });
  stopAudio();
  endSetup(null);
  $("stop").disabled = true; $("apply").disabled = true;
  $("start").disabled = !(S.ws && S.ws.readyState === WebSocket.OPEN);
  setStatus("stopped");
}

// ---------------------------------------------------------------------------------- meters

// Each meter reads its AnalyserNode (the last 2048 samples): the bar is the RMS level in dBFS
// (instant attack, 24 dB/s release), the tick the peak held for 1.5 s; the readout shows the
// RMS level over the last 0.3 s and "clip" when a sample reached full scale in the last 2 s.
const METERS = {
  in: { id: "in", analyser: () => S.inAnalyser, bar: SILENT_DB, peak: SILENT_DB, peakT: 0,
    clipT: -1e9, acc: [], buf: null },
  out: { id: "out", analyser: () => S.outAnalyser, bar: SILENT_DB, peak: SILENT_DB, peakT: 0,
    clipT: -1e9, acc: [], buf: null },
};

function meterUpdate(m, now, dt) {
  const an = m.analyser();
  let rmsDb = SILENT_DB, pk = 0;
  if (an) {
    if (!m.buf || m.buf.length !== an.fftSize) m.buf = new Float32Array(an.fftSize);
    an.getFloatTimeDomainData(m.buf);
    let sq = 0;
    for (let i = 0; i < m.buf.length; i++) { const v = m.buf[i]; sq += v * v; pk = Math.max(pk, Math.abs(v)); }
    rmsDb = toDb(Math.sqrt(sq / m.buf.length));
    m.acc.push({ t: now, sq: sq / m.buf.length });
  }
  while (m.acc.length && now - m.acc[0].t > 300) m.acc.shift();
  m.bar = Math.max(rmsDb, m.bar - 24 * dt);
  const pkDb = toDb(pk);
  if (pkDb >= m.peak || now - m.peakT > 1500) { m.peak = pkDb; m.peakT = now; }
  if (pk >= 0.999) m.clipT = now;
  const frac = (db) => Math.min(Math.max((db - METER_FLOOR_DB) / -METER_FLOOR_DB, 0), 1);
  const el = $("m_" + m.id);
  el.querySelector(".bar").style.width = `${100 * frac(m.bar)}%`;
  el.querySelector(".peak").style.left = `calc(${100 * frac(m.peak)}% - 2px)`;
}

function meterReadout(m, now) {  // the text and the ARIA value, a few times a second
  const el = $("db_" + m.id);
  const meter = $("m_" + m.id);
  if (!m.analyser()) {  // not jamming
    el.dataset.db = ""; el.textContent = "– dBFS";
    meter.setAttribute("aria-valuenow", String(METER_FLOOR_DB)); meter.setAttribute("aria-valuetext", "off");
    return;
  }
  const level = m.acc.length ? toDb(Math.sqrt(m.acc.reduce((p, q) => p + q.sq, 0) / m.acc.length))
    : SILENT_DB;
  el.dataset.db = level <= SILENT_DB ? "-Infinity" : level.toFixed(2);
  el.textContent = fmtDb(level);
  if (now - m.clipT < 2000) {
    const c = document.createElement("span"); c.className = "clip"; c.textContent = "clip";
    el.append(c);
  }
  meter.setAttribute("aria-valuenow", Math.max(level, METER_FLOOR_DB).toFixed(0));
  meter.setAttribute("aria-valuetext", fmtDb(level) + (now - m.clipT < 2000 ? ", clipping" : ""));
}

// ---------------------------------------------------------------------------------- scope

// A scrolling waveform of both parts on the stream's time line (sample i of your part and sample
// i of the model's part are heard together): one column per COL samples holds the column's
// peak, drawn mirrored with height sqrt(peak) (between linear and dB: quiet playing stays
// visible, loud playing does not fill the lane).
const COL = 256;
const SCOPE = { in: new Float32Array(8192), out: new Float32Array(8192), last: -1 };

function scopeReset() { SCOPE.in.fill(0); SCOPE.out.fill(0); SCOPE.last = -1; }

function scopeAdd(ring, start, x) {
  for (let i = 0; i < x.length; i++) {
    const c = Math.floor((start + i) / COL), j = c % ring.length;
    if ((start + i) % COL === 0) ring[j] = 0;
    const v = Math.abs(x[i]);
    if (v > ring[j]) ring[j] = v;
  }
}

function drawScope() {
  const cv = $("scope");
  const dpr = window.devicePixelRatio || 1;
  const w = Math.round(cv.clientWidth * dpr), h = Math.round(cv.clientHeight * dpr);
  if (!w || !h) return;
  if (cv.width !== w || cv.height !== h) { cv.width = w; cv.height = h; }
  const g = cv.getContext("2d");
  const css = getComputedStyle(document.documentElement);
  const colors = { in: css.getPropertyValue("--you").trim(), out: css.getPropertyValue("--model").trim(),
    muted: css.getPropertyValue("--muted").trim(), bg: css.getPropertyValue("--scope-bg").trim() };
  g.clearRect(0, 0, w, h);
  const cols = Math.floor(w / dpr);  // one column per CSS pixel
  const now = Math.floor(S.sent / COL);  // the newest column of your part, at the right edge
  const lane = h / 2;
  g.font = `600 ${12 * dpr}px system-ui, sans-serif`;
  // a tick every second
  const perSec = S.sr / COL;
  g.fillStyle = colors.muted; g.globalAlpha = 0.25;
  for (let s = Math.floor((now - cols) / perSec) + 1; s <= now / perSec; s++) {
    const x = w - (now - s * perSec) * dpr;
    g.fillRect(Math.round(x), 0, Math.max(1, dpr), h);
  }
  g.globalAlpha = 1;
  const lanes = [["in", 0, S.sent], ["out", 1, S.received]];
  for (const [key, k, have] of lanes) {
    const ring = SCOPE[key], mid = lane * k + lane / 2, half = lane / 2 - 3 * dpr;
    g.fillStyle = colors[key];
    const newest = Math.floor((have - 1) / COL);
    for (let i = 0; i < cols; i++) {
      const c = now - i;
      if (c < 0 || c > newest || now - c >= ring.length) continue;
      const a = Math.sqrt(Math.min(ring[c % ring.length], 1)) * half;
      if (a > 0.25) g.fillRect(w - (i + 1) * dpr, mid - Math.max(a, 0.5), dpr, 2 * Math.max(a, 0.5));
    }
  }
  for (const [key, k] of lanes) {  // lane names on a backdrop, over the waveform
    const name = key === "in" ? "You" : "Model", x = 6 * dpr, y = lane * k + 5 * dpr;
    g.fillStyle = colors.bg; g.globalAlpha = 0.85;
    g.fillRect(x, y, g.measureText(name).width + 8 * dpr, 17 * dpr);
    g.globalAlpha = 1; g.fillStyle = colors[key];
    g.fillText(name, x + 4 * dpr, y + 13 * dpr);
  }
  g.fillStyle = colors.muted; g.globalAlpha = 0.4;
  g.fillRect(0, Math.round(lane), w, Math.max(1, dpr));
  g.globalAlpha = 1;
  if (!S.sessionStarted && S.sent === 0) {
    g.fillStyle = colors.muted;
    g.textAlign = "center";
    g.fillText(S.running ? "waiting for the session…" : "press Start to jam", w / 2, h / 2 - 6 * dpr);
    g.textAlign = "start";
  }
}

// ------------------------------------------------------------------------------- recording

// A take keeps the frames sent (your part) and received (the model's part) from the stream
// position where Record was pressed; frames are one-to-one, so the parts align sample for sample
// as heard live. Stop waits for the model's answers to the last frames sent (at most 3 s), then
// writes 16-bit mono WAVs at the server's rate; the mix is 0.5 (you + model), clipped, as the
// `jam` CLI writes its live mix.
const REC = { on: false, start: 0, end: null, input: [], model: [], takes: 0, timer: null,
  maxSeconds: 20 * 60 };

function recordStart() {
  Object.assign(REC, { on: true, start: S.sent, end: null, input: [], model: [] });
  $("record").setAttribute("aria-pressed", "true");
  log(`recording from ${(S.sent / S.sr).toFixed(1)} s`);
}

function recordFrame(part, idx, x) {
  if (!REC.on && REC.end === null) return;
  const end = REC.end === null ? Infinity : REC.end;
  if (idx < REC.start || idx >= end) return;
  REC[part].push(x.slice());
  if (part === "input" && (idx - REC.start) / S.sr > REC.maxSeconds) {
    log(`recording stopped at ${REC.maxSeconds / 60} minutes`);
    recordStop();
  }
  if (REC.end !== null && part === "model" && idx + x.length >= REC.end) recordFinish();
}

function recordStop() {
  if (!REC.on) return;
  REC.on = false; REC.end = S.sent;
  $("record").setAttribute("aria-pressed", "false");
  $("rec-time").textContent = "";
  if (S.received >= REC.end || !S.running) recordFinish();
  else REC.timer = setTimeout(recordFinish, 3000);
}

function concat(chunks, n) {
  const out = new Float32Array(n);
  let off = 0;
  for (const c of chunks) { if (off >= n) break; out.set(c.subarray(0, n - off), off); off += c.length; }
  return out;
}

function recordFinish() {
  if (REC.end === null) return;
  clearTimeout(REC.timer);
  const n = REC.input.reduce((p, c) => p + c.length, 0);
  const input = concat(REC.input, n), model = concat(REC.model, n);  // missing answers: silence
  Object.assign(REC, { end: null, input: [], model: [] });
  if (!n) { log("nothing was recorded"); return; }
  const mix = new Float32Array(n);
  for (let i = 0; i < n; i++) mix[i] = Math.max(-1, Math.min(1, 0.5 * (input[i] + model[i])));
  addTake(n / S.sr, { input, model, mix });
}

function wav(x, rate) {  // -> Blob: RIFF/WAVE, PCM 16-bit mono
  const buf = new ArrayBuffer(44 + 2 * x.length);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + 2 * x.length, true); str(8, "WAVE");
  str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, 2 * rate, true); v.setUint16(32, 2, true);
  v.setUint16(34, 16, true);
  str(36, "data"); v.setUint32(40, 2 * x.length, true);
  for (let i = 0; i < x.length; i++) {
    const s = Math.max(-1, Math.min(1, x[i]));
    v.setInt16(44 + 2 * i, Math.round(s * 32767), true);
  }
  return new Blob([buf], { type: "audio/wav" });
}

function addTake(seconds, parts) {
  const k = ++REC.takes;
  const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
  const li = document.createElement("li");
  li.className = "take";
  const title = document.createElement("strong");
  title.textContent = `Take ${k}`;
  const info = document.createElement("span");
  info.className = "hint";
  info.textContent = `${seconds.toFixed(1)} s`;
  li.append(title, info);
  const names = { input: "your part", model: "model's part", mix: "mix" };
  let mixUrl = null;
  for (const part of ["input", "model", "mix"]) {
    const blob = wav(parts[part], S.sr);
    const url = URL.createObjectURL(blob);
    if (part === "mix") mixUrl = url;
    const a = document.createElement("a");
    a.className = "button download"; a.href = url; a.dataset.part = part; a.dataset.bytes = blob.size;
    a.download = `jam-${stamp}-take${k}-${part}.wav`;
    a.textContent = `⬇ ${names[part]}`;
    a.setAttribute("aria-label", `download take ${k}, ${names[part]} (WAV, ${(blob.size / 1e6).toFixed(1)} MB)`);
    li.append(a);
  }
  const player = document.createElement("audio");
  player.controls = true; player.preload = "none"; player.src = mixUrl;
  player.setAttribute("aria-label", `take ${k}, the mix`);
  li.append(player);
  $("takes").prepend(li);
  $("rec-hint").hidden = true;
  log(`take ${k}: ${seconds.toFixed(1)} s recorded`);
}

// -------------------------------------------------------------------------------- readouts

function measurements() {
  const lat = stats(S.latencies.slice(-200));
  const ps = S.playStatus;
  const outLat = S.ctx ? (S.ctx.outputLatency || 0) + (S.ctx.baseLatency || 0) : 0;
  return {
    roundTripMs: lat, pingMs: stats(S.pings.slice(-20)),
    heardMs: lat && ps ? lat.mean + 1000 * (ps.queuedSeconds + outLat) : null,
    serverDelaySeconds: S.delaySeconds, serverDelayParts: S.delayParts,
    firstGeneratedAfterMs: S.firstGeneratedT !== null && S.firstSendT !== null
      ? S.firstGeneratedT - S.firstSendT : null,
    sentSeconds: S.sent / S.sr, receivedSeconds: S.received / S.sr,
    generatedNonzeroSamples: S.generatedNonzero, generatedMaxAbs: S.generatedMax,
    inputRms: Math.sqrt(S.inSq / Math.max(S.sent, 1)),
    outputRms: Math.sqrt(S.outSq / Math.max(S.outGen, 1)),
    meterDb: { input: Number($("db_in").dataset.db), model: Number($("db_out").dataset.db) },
    setup: S.setupSummary,
    player: ps, server: S.serverStats, contextSampleRate: S.ctx ? S.ctx.sampleRate : null,
    outputLatencyMs: 1000 * outLat, errors: S.errors.slice(-10),
  };
}

function render() {
  const m = measurements();
  const rt = m.roundTripMs;
  $("r_rt").textContent = rt ? `${fmtMs(rt.last)} (mean ${fmtMs(rt.mean)}, min ${fmtMs(rt.min)}, max ${fmtMs(rt.max)})` : "–";
  $("r_heard").textContent = fmtMs(m.heardMs);
  const dp = m.serverDelayParts;
  $("r_delay").textContent = m.serverDelaySeconds == null ? "–" : `${fmtMs(1000 * m.serverDelaySeconds)}`
    + (dp ? ` (${dp.blocks} × ${fmtMs(1000 * dp.blockSeconds)} + decoder ${fmtMs(1000 * dp.decoderSeconds)})` : "");
  $("r_ping").textContent = m.pingMs ? `${m.pingMs.last.toFixed(1)} ms (max ${m.pingMs.max.toFixed(1)} ms)` : "–";
  const p = m.player;
  $("r_play").textContent = p ? `${fmtMs(1000 * p.queuedSeconds)} buffered; ${p.underruns} under-runs `
    + `(${(1000 * p.underrunSeconds).toFixed(0)} ms of silence)` : "–";
  const s = m.server;
  if (s) {
    $("r_srv").textContent = `${s.blocks} / ${s.deadline_misses} / ${s.underruns} (${(1000 * s.underrun_seconds).toFixed(0)} ms)`;
    $("r_compute").textContent = `${(1000 * s.mean_block_compute_s).toFixed(0)} / ${(1000 * s.max_block_compute_s).toFixed(0)} ms `
      + `per ${(1000 * s.block_seconds).toFixed(0)} ms block (${s.real_time_factor.toFixed(1)}x real time)`;
    $("r_handle").textContent = `${s.frame_handling_ms_mean.toFixed(2)} / ${s.frame_handling_ms_max.toFixed(2)} ms`;
  }
  $("r_io").textContent = `${m.sentSeconds.toFixed(1)} s / ${m.receivedSeconds.toFixed(1)} s`;
  $("r_level").textContent = `${fmtDb(toDb(m.inputRms))} / ${fmtDb(toDb(m.outputRms))}`;
  $("r_setup").textContent = S.setupSummary || "–";
  if (REC.on) {
    const t = Math.max(S.sent - REC.start, 0) / S.sr;
    $("rec-time").textContent = ` ${Math.floor(t / 60)}:${String(Math.floor(t % 60)).padStart(2, "0")}`;
  }
  const now = performance.now();
  meterReadout(METERS.in, now); meterReadout(METERS.out, now);
  tickSetup();
}

let lastFrame = performance.now();
function animate() {
  const now = performance.now(), dt = Math.min((now - lastFrame) / 1000, 0.5);
  lastFrame = now;
  meterUpdate(METERS.in, now, dt); meterUpdate(METERS.out, now, dt);
  drawScope();
  requestAnimationFrame(animate);
}

// -------------------------------------------------------------------------------- autotest

function autotestStart() {
  if (params.get("prompt") !== null) $("prompt").value = params.get("prompt");
  if (params.get("delay")) $("delay").value = params.get("delay");
  if (params.get("steps")) $("steps").value = params.get("steps");
  if (params.get("cfg")) $("cfg").value = params.get("cfg");
  start();
}

function autotestTick() {  // after `seconds` of audio, once generated audio came back
  const seconds = Number(params.get("seconds") || 5);
  const most = Number(params.get("max_seconds") || 4 * seconds);
  const t = S.sent / S.sr;
  if (!S.reported && t >= seconds && (S.generatedNonzero >= 0.5 * S.sr || t >= most)) sendReport();
}

function sendReport() {
  if (S.reported) return;
  S.reported = true;
  render();
  send({ type: "report", autotest: true, userAgent: navigator.userAgent, ...measurements() });
  setTimeout(stop, 200);
  document.title = "jam: reported";
}

window.addEventListener("error", (e) => {
  S.errors.push({ code: "client", error: String(e.message) });
  log(`page error: ${e.message}`, true);
});
window.addEventListener("unhandledrejection", (e) => {
  S.errors.push({ code: "client", error: String(e.reason) });
  log(`page error: ${e.reason}`, true);
});

function applyPrompt() { send({ type: "prompt", prompt: $("prompt").value }); }

$("start").onclick = start;
$("stop").onclick = stop;
$("record").onclick = () => (REC.on ? recordStop() : recordStart());
$("apply").onclick = applyPrompt;
$("prompt").oninput = () => { S.promptEdited = true; };
$("examples").onclick = (e) => {
  const b = e.target.closest("button[data-prompt]");
  if (!b) return;
  $("prompt").value = b.dataset.prompt; S.promptEdited = true;
  if (S.sessionStarted) applyPrompt();
};
$("monitor").onchange = () => { if (S.monitorGain) S.monitorGain.gain.value = $("monitor").checked ? 1 : 0; };
$("device").onchange = switchInput;
if (navigator.mediaDevices && navigator.mediaDevices.addEventListener)
  navigator.mediaDevices.addEventListener("devicechange", listDevices);
listDevices();
setInterval(() => { send({ type: "ping", t: performance.now() }); }, 1000);
setInterval(render, 250);
requestAnimationFrame(animate);
connect();
