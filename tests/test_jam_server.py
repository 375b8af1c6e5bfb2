"""The jam server (lmdm_jax/apps/server.py) and its page, end to end.

One server subprocess (`python3 -m lmdm_jax.apps.server`) for the module: a tiny-width model
with the spectral codec's latents and accompaniment channels (input_add_dim =
1 + 2 * io_channels + 1), random weights. Python WebSocket clients check the protocol and its
robustness (malformed JSON, unknown types, bad binary frames, an oversized message closing only
its own connection, abrupt disconnects); headless Chromium (fake microphone playing a WAV file)
checks the page: audio goes in, generated audio comes back, round-trip latency measured.
"""
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile as sf

websockets = pytest.importorskip("websockets", reason="the jam server needs the `websockets` "
                                 "package (requirements.txt)")
from websockets.asyncio.client import connect  # noqa: E402

from tests.test_sample_cli import ACC, write_config  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MESSAGE = 256 << 10
FRAME = 1024


class Server:
  def __init__(self, proc):
    self.proc = proc
    self.lines: list[str] = []
    self.cond = threading.Condition()
    self.port = None
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      with self.cond:
        self.lines.append(line.rstrip("\n"))
        self.cond.notify_all()
    with self.cond:
      self.cond.notify_all()

  def wait_line(self, pred, timeout, start=0):
    end = time.time() + timeout
    with self.cond:
      while True:
        for line in self.lines[start:]:
          if pred(line):
            return line
        left = end - time.time()
        if left <= 0 or (self.proc.poll() is not None and not any(pred(x) for x in self.lines)):
          return None
        self.cond.wait(min(left, 0.5))

  def output(self, tail=60):
    with self.cond:
      return "\n".join(self.lines[-tail:])

  @property
  def http(self):
    return f"http://127.0.0.1:{self.port}"

  @property
  def ws(self):
    return f"ws://127.0.0.1:{self.port}/ws"


@contextlib.contextmanager
def launch(d, *extra, xla=None):
  """A server subprocess for a tiny accompaniment model in folder `d` (its config), with `extra`
  command-line flags and the compilation cache `xla` (default: in `d`); stopped with SIGINT at
  the end, which must exit 0 with no traceback in its output."""
  cfg = write_config(d / "acc.py", extra=ACC)  # input_add_dim = 1 + LAT + (1 + LAT)
  xla = d / "xla" if xla is None else xla
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONUNBUFFERED"] = "1"
  proc = subprocess.Popen(
      [sys.executable, "-m", "lmdm_jax.apps.server", "--config", cfg, "--port", "0", "--steps",
       "2", "--cfg-scale", "1", "--delay-blocks", "2", "--max-message-bytes", str(MAX_MESSAGE),
       "--stats-interval", "0.25", "--compile-cache", str(xla), *extra],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
  srv = Server(proc)
  try:
    line = srv.wait_line(lambda s: "listening on http://" in s, timeout=180)
    assert line is not None, "the server did not start:\n" + srv.output()
    srv.port = int(line.split("listening on http://127.0.0.1:")[1].split("/")[0])
    yield srv
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGINT)
      try:
        proc.wait(30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
  out = srv.output(100000)
  assert proc.returncode == 0, f"server exit code {proc.returncode}:\n{srv.output()}"
  assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  # one compilation cache for the test run: another module's server (tests/test_jam_page.py,
  # tests/test_server_security.py) loads the session's compiled steps instead of compiling them
  xla = tmp_path_factory.getbasetemp() / "jam_server_xla"
  with launch(tmp_path_factory.mktemp("jam_server"), xla=xla) as srv:
    yield srv


def alive(server):
  assert server.proc.poll() is None, "the server died:\n" + server.output()


class Reader:
  """Reads every message of a connection: binary frames to .audio, JSON messages queued."""

  def __init__(self, ws):
    self.ws = ws
    self.audio: list[np.ndarray] = []
    self.msgs: asyncio.Queue = asyncio.Queue()
    self.stats: list[dict] = []
    self.closed = None
    self.task = asyncio.create_task(self._run())

  async def _run(self):
    try:
      async for m in self.ws:
        if isinstance(m, bytes):
          self.audio.append(np.frombuffer(m, "<f4"))
        else:
          msg = json.loads(m)
          if msg["type"] == "stats":
            self.stats.append(msg)
          else:
            await self.msgs.put(msg)
    except websockets.ConnectionClosed as e:
      self.closed = e
    self.closed = self.closed or True

  async def get(self, kind, timeout=30.0):
    end = asyncio.get_running_loop().time() + timeout
    while True:
      left = end - asyncio.get_running_loop().time()
      assert left > 0, f"no {kind!r} message within {timeout} s"
      msg = await asyncio.wait_for(self.msgs.get(), left)
      if msg["type"] == kind:
        return msg
      assert msg["type"] != "error" or kind == "error", f"unexpected error {msg}"

  @property
  def received(self):
    return sum(a.size for a in self.audio)


async def feed(ws, seconds, sr, freq=330.0, start=0):
  """Send `seconds` of a sine in FRAME-sample frames, paced in real time; -> samples sent."""
  loop = asyncio.get_running_loop()
  n = int(seconds * sr) // FRAME
  t0 = loop.time()
  for k in range(n):
    i = start + k * FRAME + np.arange(FRAME)
    await ws.send((0.3 * np.sin(2 * np.pi * freq * i / sr)).astype("<f4").tobytes())
    await asyncio.sleep(max(0.0, t0 + (k + 1) * FRAME / sr - loop.time()))
  return n * FRAME


async def feed_until_generated(ws, reader, sr, delay_samples, start=0, max_seconds=20.0):
  """Feed until generated (non-silent) audio has come back: on a busy machine the sampler can
  miss its first deadlines (those samples are silence, counted as under-runs)."""
  sent = 0
  while sent < max_seconds * sr:
    sent += await feed(ws, 0.5, sr, start=start + sent)
    got = np.concatenate(reader.audio) if reader.audio else np.zeros(0, np.float32)
    if np.abs(got[delay_samples:]).max(initial=0) > 0:
      break
  return sent


async def wait_until(cond, timeout, what):
  end = time.time() + timeout
  while not cond():
    assert time.time() < end, f"timed out waiting for {what}"
    await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------ tests


def test_http_page_and_handshake_rules(server):
  page = urllib.request.urlopen(server.http + "/", timeout=10)
  body = page.read().decode()
  assert page.headers["Content-Type"].startswith("text/html") and 'src="jam.js"' in body
  for name in ("jam.js", "worklet.js"):
    r = urllib.request.urlopen(f"{server.http}/{name}", timeout=10)
    assert r.headers["Content-Type"].startswith("text/javascript") and r.read()
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(server.http + "/../server.py", timeout=10)
  assert e.value.code == 404

  async def handshakes():
    with pytest.raises(websockets.InvalidStatus) as e:  # the WebSocket lives at /ws only
      async with connect(f"ws://127.0.0.1:{server.port}/other"):
        pass
    assert e.value.response.status_code == 404
    with pytest.raises(websockets.InvalidStatus) as e:  # another site's page may not connect
      async with connect(server.ws, origin="http://evil.example"):
        pass
    assert e.value.response.status_code == 403
    async with connect(server.ws, origin=f"http://127.0.0.1:{server.port}") as ws:
      hello = json.loads(await ws.recv())
    assert hello["type"] == "hello" and hello["sample_rate"] == 22050
    assert hello["block_samples"] == 16 * 512 and hello["channels"] == 1
    assert hello["max_message_bytes"] == MAX_MESSAGE and hello["random_weights"] is True

  asyncio.run(handshakes())
  alive(server)


def test_malformed_control_messages_keep_the_connection(server):
  async def run():
    async with connect(server.ws) as ws:
      r = Reader(ws)
      await r.get("hello")
      cases = [("{not json", "bad_json"), ("[1, 2]", "bad_message"), ('{"kind": 1}', "bad_message"),
               ('{"type": 7}', "bad_message"), ('{"type": "dance"}', "unknown_type"),
               ('{"type": "prompt", "prompt": "x"}', "no_session"),
               ('{"type": "stop"}', "no_session"),
               ('{"type": "start", "delay_blocks": "two"}', "bad_value"),
               ('{"type": "start", "steps": 0}', "bad_value"),
               ('{"type": "start", "steps": true}', "bad_value"),
               ('{"type": "start", "cfg": 1e999}', "bad_value"),
               ('{"type": "start", "prompt": ' + json.dumps("x" * 5000) + "}", "bad_value"),
               ('{"type": "ping", "t": "now"}', "bad_value"), ('{"type": "ping", "t": NaN}', "bad_json"),
               ('{"type": "report", "x": Infinity}', "bad_json"),
               (b"\x00\x00\x00", "bad_frame"), (b"", "bad_frame"),
               (np.zeros(FRAME, "<f4").tobytes(), "no_session"),
               (b"\xff\xff\xc0\x7f" * 8, "bad_frame")]  # NaNs
      for msg, code in cases:
        await ws.send(msg)
        e = await r.get("error")
        assert e["code"] == code, (msg[:60], e)
        assert e["error"]
      await ws.send(json.dumps({"type": "ping", "t": 1.5}))
      assert (await r.get("pong"))["t"] == 1.5
      await ws.send(json.dumps({"type": "status"}))
      assert (await r.get("status"))["session"] is None
      assert r.closed is None

  asyncio.run(run())
  alive(server)


def test_session_streams_and_survives_bad_frames_oversized_and_abrupt_clients(server):
  async def run():
    sr = 22050
    async with connect(server.ws, max_size=None) as a:
      ra = Reader(a)
      await ra.get("hello")
      await a.send(json.dumps({"type": "start", "prompt": "solo piano", "delay_blocks": 2}))
      await a.send(json.dumps({"type": "ping", "t": 2}))  # answered while the session builds
      assert (await ra.get("pong", timeout=60))["t"] == 2
      started = await ra.get("started", timeout=180)
      dly = started["delay_samples"]
      assert started["delay_blocks"] == 2 and started["steps"] == 2
      assert dly == round(2 * 16 * 512) + started["decoder_latency_samples"]
      await a.send(json.dumps({"type": "start"}))
      assert (await ra.get("error"))["code"] == "already_started"
      sent = await feed(a, 0.5, sr)
      # bad binary frames: refused with an error, the session goes on
      nan = np.zeros(FRAME, "<f4")
      nan[7] = np.nan
      inf = np.zeros(FRAME, "<f4")
      inf[0] = np.inf
      for bad in (b"\x00" * 1023, nan.tobytes(), inf.tobytes(), np.zeros(sr + 1, "<f4").tobytes()):
        await a.send(bad)
        assert (await ra.get("error"))["code"] == "bad_frame"
      # a second client sends an oversized message: only its own connection is closed
      async with connect(server.ws, max_size=None) as b:
        rb = Reader(b)
        await rb.get("hello")
        await b.send(b"\x00" * (MAX_MESSAGE + 4))
        await asyncio.wait_for(rb.task, 10)
      assert isinstance(rb.closed, websockets.ConnectionClosed), rb.closed
      assert rb.closed.rcvd is not None and rb.closed.rcvd.code == 1009, rb.closed
      print(f"oversized message: closed with {rb.closed.rcvd.code} {rb.closed.rcvd.reason!r}")
      # the first client keeps streaming, changes its prompt mid-stream
      sent += await feed(a, 1.0, sr, start=sent)
      await a.send(json.dumps({"type": "prompt", "prompt": "string quartet, lively", "steps": 1}))
      assert (await ra.get("prompt_ok", timeout=60))["steps"] == 1
      sent += await feed_until_generated(a, ra, sr, dly, start=sent)
      await wait_until(lambda: ra.received >= sent, 20, "the answers to every frame")
      out = np.concatenate(ra.audio)
      assert out.size == sent and np.all(np.isfinite(out))
      assert not out[:dly].any(), "the delay prefix is silence"
      assert np.abs(out[dly:]).max() > 0, f"no generated audio came back: {ra.stats[-1:]}"
      await wait_until(lambda: len(ra.stats) >= 2, 10, "stats")
      st = ra.stats[-1]
      for k in ("delay_seconds", "blocks", "deadline_misses", "underruns", "mean_block_compute_s",
                "frame_handling_ms_mean", "input_rms"):
        assert k in st, k
      assert st["blocks"] >= 1 and st["input_rms"] > 0.1 and st["rejected_messages"] == 5
      print(f"python client: {sent / sr:.1f} s in, delay {started['delay_seconds']:.3f} s, "
            f"stats {json.dumps({k: st[k] for k in ('blocks', 'deadline_misses', 'underruns')})}")
      # abrupt disconnect mid-stream: no close frame, the TCP connection just goes
      a.transport.abort()
    # ... and one that leaves while its session is still being built
    async with connect(server.ws) as c:
      await c.recv()
      await c.send(json.dumps({"type": "start"}))
      await asyncio.sleep(0.05)
      c.transport.abort()
    # the server cleans both up and serves a new connection
    async with connect(server.ws, max_size=None) as d:
      rd = Reader(d)
      await rd.get("hello")
      for _ in range(300):
        await d.send(json.dumps({"type": "status"}))
        if (await rd.get("status"))["active_sessions"] == 0:
          break
        await asyncio.sleep(0.1)
      else:
        raise AssertionError("the sessions of the vanished clients were not cleaned up")
      await d.send(json.dumps({"type": "start", "steps": 1, "delay_blocks": 0}))  # 0: auto
      started = await rd.get("started", timeout=120)
      k = started["delay_blocks"]  # chosen from the measured block compute
      assert k in (1, 2) and 0 < started["lead_seconds"] <= started["block_seconds"] + 1e-9
      assert started["delay_samples"] == k * 16 * 512 + started["decoder_latency_samples"]
      assert k == 1 or abs(started["lead_seconds"] - started["block_seconds"]) < 1e-9
      sent = await feed(d, 1.0, sr)
      sent += await feed_until_generated(d, rd, sr, started["delay_samples"], start=sent)
      await wait_until(lambda: rd.received >= sent, 20, "answers")
      out = np.concatenate(rd.audio)
      assert np.abs(out[started["delay_samples"]:]).max() > 0
      await d.send(json.dumps({"type": "stop"}))
      stopped = await rd.get("stopped")
      assert stopped["stats"]["blocks"] >= 1

  asyncio.run(run())
  alive(server)
  assert server.wait_line(lambda s: "stopped (connection closed" in s, 10), server.output()
  assert server.wait_line(lambda s: "stopped (stopped while starting)" in s, 10), server.output()
  assert "still running" not in server.output(100000)


def test_sessions_share_the_slots_and_a_full_server_says_so(server):
  """Every slot taken (4, the default): a further start gets 'busy' naming the slots, the
  sessions already running keep streaming, together, from the one batched sampler."""
  async def run():
    sr = 22050
    clients = []
    for i in range(4):
      ws = await connect(server.ws, max_size=None)
      r = Reader(ws)
      hello = await r.get("hello")
      assert hello["slots"] == 4
      await ws.send(json.dumps({"type": "start", "steps": 1 + i % 2, "prompt": f"voice {i}"}))
      clients.append((ws, r))
    kept = [0] * 4  # frames sent by the keep-alive (a session gets no audio for 30 s: idle)
    started = [None] * 4

    async def keep_alive():
      while True:
        for i, (ws, _) in enumerate(clients):
          if started[i] is not None:
            await ws.send(np.zeros(FRAME, "<f4").tobytes())
            kept[i] += FRAME
        await asyncio.sleep(1.0)

    alive_task = asyncio.create_task(keep_alive())
    for i, (_, r) in enumerate(clients):
      started[i] = await r.get("started", timeout=180)
    async with connect(server.ws) as extra:
      rx = Reader(extra)
      hello = await rx.get("hello")
      assert hello["free_slots"] == 0
      await extra.send(json.dumps({"type": "start"}))
      e = await rx.get("error")
      assert e["code"] == "busy" and "all 4 session slots" in e["error"], e
    alive_task.cancel()
    (a, ra), (b, rb) = clients[:2]
    sent = await asyncio.gather(feed(a, 1.0, sr, start=kept[0]),
                                feed(b, 1.0, sr, freq=440.0, start=kept[1]))
    sent = [n + k for n, k in zip(sent, kept)]
    for (ws, r), n, st in zip(clients[:2], sent, started[:2]):
      n += await feed_until_generated(ws, r, sr, st["delay_samples"], start=n)
      await wait_until(lambda: r.received >= n, 20, "answers")
      assert np.abs(np.concatenate(r.audio)[st["delay_samples"]:]).max() > 0
    for ws, r in clients:
      await ws.send(json.dumps({"type": "stop"}))
      await r.get("stopped")
      await ws.close()
      r.task.cancel()

  asyncio.run(run())
  alive(server)


# ------------------------------------------------------------------------- headless Chromium


def find_chromium():
  for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
    path = shutil.which(name)
    if path:
      return path
  return None


@pytest.mark.parametrize("delay", [1, 2])
def test_browser_page_end_to_end(server, tmp_path, capsys, record_property, delay):
  """The page in headless Chromium; prints the measured round trip (input captured -> the
  model's output for that moment back in the page) against the server's delay, which must be
  accounted as delay blocks + the jam decoder's hold-back."""
  browser = find_chromium()
  if browser is None:
    pytest.skip("no Chromium on PATH (chromium, chromium-browser, google-chrome): scripts/test.sh "
                "installs Debian's `chromium` package with apt-get; it could not be installed here")
  sr = 48000
  t = np.arange(int(4 * sr)) / sr
  notes = np.array([262.0, 330.0, 392.0, 523.0])[(t * 4).astype(int) % 4]
  wav = tmp_path / "partner.wav"
  sf.write(str(wav), 0.3 * np.sin(2 * np.pi * np.cumsum(notes) / sr), sr, subtype="PCM_16")
  seconds = 4.0
  url = (f"{server.http}/?autotest=1&seconds={seconds}&max_seconds=30&delay={delay}&steps=2&cfg=1"
         "&prompt=solo%20piano")
  mark = len(server.lines)
  cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", f"--user-data-dir={tmp_path / 'profile'}",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
         "--enable-logging=stderr", "--v=0", url]
  log_path = tmp_path / "chromium.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  try:
    line = server.wait_line(lambda s: "client report " in s, timeout=150, start=mark)
  finally:
    try:
      os.killpg(proc.pid, signal.SIGTERM)
      proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      proc.wait()
  browser_log = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
  where = f"\n--- server ---\n{server.output(30)}\n--- chromium ---\n{browser_log}"
  assert line is not None, "the page sent no report" + where
  rep = json.loads(line.split("client report ", 1)[1])
  rt, srv_stats, player = rep["roundTripMs"], rep["server"], rep["player"]
  delay_ms = 1000 * rep["serverDelaySeconds"]
  parts = rep["serverDelayParts"]
  summary = (f"headless Chromium jam, delay {delay} block(s): measured round-trip latency (input "
             f"captured -> the model's output for that moment back in the page) mean "
             f"{rt['mean']:.0f} ms, min {rt['min']:.0f}, max {rt['max']:.0f} over {rt['n']} "
             f"frames; server delay {delay_ms:.0f} ms = {parts['blocks']} x "
             f"{1000 * parts['blockSeconds']:.0f} ms + decoder "
             f"{1000 * parts['decoderSeconds']:.0f} ms; heard (+ playback buffer + output) {rep['heardMs']:.0f} ms; "
             f"WebSocket ping {rep['pingMs']['median']:.1f} ms; page under-runs "
             f"{player['underruns']}; server blocks {srv_stats['blocks']}, deadline misses "
             f"{srv_stats['deadline_misses']}, under-runs {srv_stats['underruns']}; "
             f"context {rep['contextSampleRate']} Hz")
  with capsys.disabled():
    print("\n" + summary)
  record_property(f"round_trip_latency_ms_delay{delay}", round(rt["mean"], 1))
  record_property(f"server_delay_ms_delay{delay}", round(delay_ms, 1))
  # the latency accounting: the delay is the chosen blocks plus the jam decoder's hold-back
  from lmdm_jax.codecs.spectral import HOP, SAMPLE_RATE, SpectralCodec
  hold = SpectralCodec().low_latency(16).hold_back(16) * HOP / SAMPLE_RATE
  assert parts["blocks"] == delay and abs(parts["blockSeconds"] - 16 * HOP / SAMPLE_RATE) < 1e-6
  assert abs(parts["decoderSeconds"] - hold) < 1e-6, summary
  assert abs(delay_ms - 1000 * (delay * parts["blockSeconds"] + hold)) < 1000 / SAMPLE_RATE
  assert not rep["errors"], f"{rep['errors']}\n{summary}{where}"
  # audio went in: the fake microphone's WAV reached the server
  assert rep["inputRms"] > 0.05 and srv_stats["input_rms"] > 0.05, summary
  assert rep["sentSeconds"] >= seconds - 0.1, summary
  # generated audio came back and was played by the AudioWorklet
  assert rep["generatedNonzeroSamples"] > 0.5 * 22050 and rep["generatedMaxAbs"] > 0, summary
  assert player["playedSeconds"] > 1.0, summary
  # the measured round trip is the fixed delay plus a frame of capture and the network
  assert rt["n"] >= 10, summary
  assert delay_ms <= rt["mean"] <= delay_ms + 1500, summary
  alive(server)
