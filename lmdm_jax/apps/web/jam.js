// The jam page: capture -> WebSocket (float32 PCM at the server's rate) -> the model's part back
// -> AudioWorklet playback; latency and under-run readouts. No build step, no dependencies.
// URL parameters: ?autotest=1&seconds=5&max_seconds=20&prompt=...&delay=2&steps=2&cfg=1 starts by
// itself with the microphone and sends a {"type": "report"} with its measurements after `seconds`
// of audio once 0.5 s of generated audio came back (or after `max_seconds`), then stops.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const AUTOTEST = params.get("autotest") === "1";

const S = {
  ws: null, hello: null, ctx: null, capture: null, player: null, source: null, media: null,
  begin: null,
  monitorGain: null, running: false, sessionStarted: false,
  sr: 22050, delaySamples: 0, delaySeconds: null,
  sent: 0, received: 0, sendLog: [],  // [{idx, n, t}] of frames sent (t: performance.now())
  firstSendT: null, firstGeneratedT: null, generatedNonzero: 0, generatedMax: 0,
  inSq: 0, outSq: 0, outGen: 0,
  latencies: [], rttLast: null, pings: [], playStatus: null, serverStats: null,
  errors: [], reported: false,
};

function log(msg) {
  const el = $("log");
  el.textContent += msg + "\n";
  el.scrollTop = el.scrollHeight;
  console.log("[jam] " + msg);
}
function setStatus(s) { $("status").textContent = s; }
function fmtMs(x) { return x == null ? "–" : `${x.toFixed(0)} ms`; }
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
  ws.onopen = () => setStatus("connected");
  ws.onclose = (e) => {
    setStatus(`disconnected (${e.code}${e.reason ? ": " + e.reason : ""})`);
    $("start").disabled = true; $("stop").disabled = true; $("apply").disabled = true;
    stopAudio();
  };
  ws.onerror = () => log("WebSocket error");
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
    case "hello":
      S.hello = m; S.sr = m.sample_rate;
      $("r_server").textContent = `config ${m.config}${m.random_weights ? " (random weights)" : ""}, `
        + `${m.sample_rate} Hz, blocks of ${(1000 * m.block_seconds).toFixed(0)} ms, `
        + `${m.active_sessions}/${m.max_sessions} sessions busy`;
      $("delay").value = m.defaults.delay_blocks; $("steps").value = m.defaults.steps;
      $("cfg").value = m.defaults.cfg; if (!$("prompt").value) $("prompt").value = m.defaults.prompt;
      $("start").disabled = false;
      setStatus("ready");
      if (AUTOTEST) autotestStart();
      break;
    case "started":
      S.delaySamples = m.delay_samples; S.delaySeconds = m.delay_seconds;
      S.sessionStarted = true;
      S.capture.port.postMessage({ type: "enable" });
      if (S.begin) { S.begin(); S.begin = null; }  // a file starts playing with the session
      setStatus(`jamming (set up in ${m.setup_seconds.toFixed(1)} s)`);
      $("apply").disabled = false;
      break;
    case "stats": S.serverStats = m; break;
    case "pong":
      if (typeof m.t === "number") { S.rttLast = performance.now() - m.t; S.pings.push(S.rttLast); }
      break;
    case "prompt_ok": log(`prompt changed at block ${m.block}`); break;
    case "stopped":
      if (m.reason && S.running) {
        log(`server stopped the session: ${m.reason}`);
        stopAudio(); setStatus("stopped by the server");
        $("stop").disabled = true; $("apply").disabled = true; $("start").disabled = false;
      }
      break;
    case "error": S.errors.push(m); log(`server: ${m.code}: ${m.error}`); break;
    case "warning": log(`server warning: ${m.code}: ${m.error}`); break;
    case "report_ok": break;
    default: log(`unknown message ${m.type}`);
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
  if (S.player) S.player.port.postMessage({ type: "audio", data: y }, [y.buffer]);
}

function onCaptureFrame(e) {
  if (e.data.type !== "frame" || !S.running || !S.sessionStarted) return;
  const x = e.data.data;
  const t = performance.now();
  for (let i = 0; i < x.length; i++) S.inSq += x[i] * x[i];
  S.sendLog.push({ idx: S.sent, n: x.length, t });
  if (S.firstSendT === null) S.firstSendT = t;
  S.sent += x.length;
  if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(x.buffer);
  if (AUTOTEST) autotestTick();
}

// ----------------------------------------------------------------------------------- audio

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
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia)
    throw new Error("no microphone API here (the page needs http://localhost or https)");
  S.media = await navigator.mediaDevices.getUserMedia({ audio: {
    echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 } });
  return { node: ctx.createMediaStreamSource(S.media), begin: () => {} };
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
    const src = await getSource(S.ctx);
    S.source = src.node;
    S.source.connect(S.capture);
    S.monitorGain = S.ctx.createGain();
    S.monitorGain.gain.value = $("monitor").checked ? 1 : 0;
    S.source.connect(S.monitorGain).connect(S.ctx.destination);
    S.begin = src.begin;
    await S.ctx.resume();
    Object.assign(S, { sent: 0, received: 0, sendLog: [], latencies: [], firstSendT: null,
      firstGeneratedT: null, generatedNonzero: 0, generatedMax: 0, inSq: 0, outSq: 0, outGen: 0,
      sessionStarted: false, running: true });
    send({ type: "start", prompt: $("prompt").value, delay_blocks: Number($("delay").value),
      steps: Number($("steps").value), cfg: Number($("cfg").value) });
    setStatus("starting the session (compiling)…");
    $("stop").disabled = false;
  } catch (err) {
    log(`could not start: ${err.message || err}`);
    S.errors.push({ code: "client", error: String(err.message || err) });
    stopAudio();
    $("start").disabled = !S.hello;
    if (AUTOTEST) sendReport();
  }
}

function stopAudio() {
  S.running = false; S.sessionStarted = false;
  if (S.capture) S.capture.port.postMessage({ type: "disable" });
  if (S.media) S.media.getTracks().forEach((t) => t.stop());
  if (S.ctx) S.ctx.close().catch(() => {});
  Object.assign(S, { ctx: null, capture: null, player: null, source: null, media: null,
    begin: null });
}

function stop() {
  send({ type: "stop" });
  stopAudio();
  $("stop").disabled = true; $("apply").disabled = true;
  $("start").disabled = !(S.ws && S.ws.readyState === WebSocket.OPEN);
  setStatus("stopped");
}

// -------------------------------------------------------------------------------- readouts

function measurements() {
  const lat = stats(S.latencies.slice(-200));
  const ps = S.playStatus;
  const outLat = S.ctx ? (S.ctx.outputLatency || 0) + (S.ctx.baseLatency || 0) : 0;
  return {
    roundTripMs: lat, pingMs: stats(S.pings.slice(-20)),
    heardMs: lat && ps ? lat.mean + 1000 * (ps.queuedSeconds + outLat) : null,
    serverDelaySeconds: S.delaySeconds,
    firstGeneratedAfterMs: S.firstGeneratedT !== null && S.firstSendT !== null
      ? S.firstGeneratedT - S.firstSendT : null,
    sentSeconds: S.sent / S.sr, receivedSeconds: S.received / S.sr,
    generatedNonzeroSamples: S.generatedNonzero, generatedMaxAbs: S.generatedMax,
    inputRms: Math.sqrt(S.inSq / Math.max(S.sent, 1)),
    outputRms: Math.sqrt(S.outSq / Math.max(S.outGen, 1)),
    player: ps, server: S.serverStats, contextSampleRate: S.ctx ? S.ctx.sampleRate : null,
    outputLatencyMs: 1000 * outLat, errors: S.errors.slice(-10),
  };
}

function render() {
  const m = measurements();
  const rt = m.roundTripMs;
  $("r_rt").textContent = rt ? `${fmtMs(rt.last)} (mean ${fmtMs(rt.mean)}, min ${fmtMs(rt.min)}, max ${fmtMs(rt.max)})` : "–";
  $("r_heard").textContent = fmtMs(m.heardMs);
  $("r_delay").textContent = m.serverDelaySeconds == null ? "–" : fmtMs(1000 * m.serverDelaySeconds);
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
  $("r_level").textContent = `${m.inputRms.toFixed(3)} / ${m.outputRms.toFixed(3)}`;
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
  log(`page error: ${e.message}`);
});
window.addEventListener("unhandledrejection", (e) => {
  S.errors.push({ code: "client", error: String(e.reason) });
  log(`page error: ${e.reason}`);
});

$("start").onclick = start;
$("stop").onclick = stop;
$("apply").onclick = () => send({ type: "prompt", prompt: $("prompt").value });
$("monitor").onchange = () => { if (S.monitorGain) S.monitorGain.gain.value = $("monitor").checked ? 1 : 0; };
setInterval(() => { send({ type: "ping", t: performance.now() }); }, 1000);
setInterval(render, 250);
connect();
