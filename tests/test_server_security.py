"""The jam server against foreign sites and hostile input (issue 16, items 2, 6 and 7).

- DNS rebinding / foreign pages: only allowed ``Host`` names (localhost, 127.0.0.1, [::1] on the
  server's port, ``--allow-host`` entries) get the page, the static files or the WebSocket; a
  handshake's ``Origin`` must be one of them; duplicated headers are refused, never an HTTP 500.
- Bad input gets an error reply naming the problem and the session goes on (a valid request
  right after it works): JSON nested 100,000 deep, integers beyond float range, a lone surrogate
  in a prompt, samples of 3e38 / inf / NaN.
- A seeded, bounded fuzz of random messages (text, binary, sizes, orders, abrupt disconnects)
  never ends another client's session and never crashes the server.

One server subprocess for the module (the tiny model of test_jam_server, random weights), on
127.0.0.1 only; every loop is bounded in count and time.
"""
import asyncio
import contextlib
import json
import random
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a server process and (page) headless Chromium

websockets = pytest.importorskip("websockets", reason="the jam server needs the `websockets` "
                                 "package (requirements.txt)")
from websockets.asyncio.client import connect  # noqa: E402

from lmdm_jax.apps.host_policy import ANY_PORT, HostPolicy, parse_allow_host  # noqa: E402
from tests.test_jam_server import (FRAME, MAX_MESSAGE, Reader, alive, feed,  # noqa: E402
                                   feed_until_generated, launch, wait_until)
from tests.test_sample_cli import ROOT, child_env  # noqa: E402

SR = 22050
KEY = ("Upgrade: websocket\r\nConnection: Upgrade\r\n"
       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  with launch(tmp_path_factory.mktemp("jam_security"), "--allow-host", "jam.test",
              "--allow-host", "proxy.test:*",
              xla=tmp_path_factory.getbasetemp() / "jam_server_xla") as srv:
    yield srv


def status_of(port, request: str) -> int:
  """Send one raw HTTP request to 127.0.0.1:port; -> the response's status code."""
  with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
    s.sendall(request.encode("latin-1"))
    head = b""
    while b"\r\n" not in head:
      chunk = s.recv(4096)
      assert chunk, f"no response to {request[:60]!r}"
      head += chunk
  return int(head.split(b" ", 2)[1])


def get(path, host, port):
  return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"


def handshake(host, *origins):
  return (f"GET /ws HTTP/1.1\r\nHost: {host}\r\n{KEY}"
          + "".join(f"Origin: {o}\r\n" for o in origins) + "\r\n")


async def start_session(ws, reader, **kw):
  await ws.send(json.dumps({"type": "start", **kw}))
  return await reader.get("started", timeout=180)


async def still_streams(ws, reader, seconds=0.5):
  """The session goes on: a ping is answered and every frame sent now is answered."""
  await ws.send(json.dumps({"type": "ping", "t": 7}))
  assert (await reader.get("pong"))["t"] == 7
  before = reader.received
  n = await feed(ws, seconds, SR)
  await wait_until(lambda: reader.received >= before + n, 30, "answers to the frames")
  await ws.send(json.dumps({"type": "status"}))
  assert (await reader.get("status"))["session"] is not None, "the session ended"


# --------------------------------------------------------------------------- Host and Origin


def test_host_policy_rules():
  p = HostPolicy(8765, ["jam.test", "Proxy.Test:*", "lan.test:9000", "fe80::1"],
                 bind_host="192.168.1.5")
  for host in ("localhost:8765", "LocalHost:8765", "127.0.0.1:8765", "[::1]:8765",
               "[0:0:0:0:0:0:0:1]:8765", "192.168.1.5:8765", "jam.test:8765", "proxy.test",
               "proxy.test:1234", "lan.test:9000", "[fe80::1]:8765"):
    assert p.host_problem(host) is None, host
  for host in ("evil.example:8765", "localhost", "localhost:80", "127.0.0.1:8766", "jam.test",
               "lan.test:8765", "evil@127.0.0.1:8765", "127.0.0.1:8765/x", "127.0.0.1:99999",
               "", "[::1", "[zz::1]:8765", "localhost.:8765", "127.0.0.1 :8765", "0.0.0.0:8765"):
    problem = p.host_problem(host)
    assert problem is not None and "\n" not in problem, host
  for origin in ("http://127.0.0.1:8765", "https://localhost:8765", "http://[::1]:8765",
                 "https://proxy.test", "http://jam.test:8765"):
    assert p.origin_problem(origin) is None, origin
  for origin in ("http://evil.example:8765", "null", "file://", "ws://127.0.0.1:8765",
                 "http://127.0.0.1:8765/", "http://localhost:3000", "http://localhost",
                 "http://127.0.0.1:*", "http://jam.test"):
    assert p.origin_problem(origin) is not None, origin
  # a wildcard bind (0.0.0.0) adds no name; entries are checked
  assert HostPolicy(1, bind_host="0.0.0.0").allowed.keys() == {"localhost", "127.0.0.1", "::1"}
  assert parse_allow_host("h.test:*") == ("h.test", ANY_PORT)
  assert parse_allow_host("[::1]:80") == ("::1", 80)
  for bad in ("", "a b", "h:0", "h:x", "http://h", "h/x", "[::1]:*x"):
    with pytest.raises(ValueError):
      parse_allow_host(bad)


@pytest.mark.slow
def test_foreign_host_is_refused_for_page_static_files_and_websocket(server):
  """DNS rebinding: a request naming another host is refused (421) for every path and the
  handshake, even with a matching Origin; allowed names (and --allow-host ones) are served."""
  port = server.port
  mark = len(server.lines)
  evil = f"evil.example:{port}"
  for path in ("/", "/index.html", "/jam.js", "/worklet.js", "/nothing"):
    assert status_of(port, get(path, evil, port)) == 421, path
  assert status_of(port, handshake(evil, f"http://{evil}")) == 421
  assert status_of(port, handshake(evil)) == 421
  assert status_of(port, get("/", "localhost", port)) == 421  # no port: not this server's
  assert status_of(port, get("/", f"127.0.0.1:{port + 1}", port)) == 421
  for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"jam.test:{port}",
               "proxy.test", "proxy.test:443"):
    assert status_of(port, get("/", host, port)) == 200, host
  assert status_of(port, handshake(f"jam.test:{port}", f"http://jam.test:{port}")) == 101
  assert status_of(port, handshake(f"127.0.0.1:{port}", f"http://localhost:{port}")) == 101
  assert status_of(port, handshake(f"127.0.0.1:{port}")) == 101  # no Origin: not a browser
  # a foreign page's Origin, or a page that is no http(s) page
  for origin in (f"http://{evil}", "null", f"http://127.0.0.1:{port + 1}", "file://"):
    assert status_of(port, handshake(f"127.0.0.1:{port}", origin)) == 403, origin
  # two Origin headers (was: HTTP 500), two Host headers or none: refused, no traceback
  ok = f"http://127.0.0.1:{port}"
  assert status_of(port, handshake(f"127.0.0.1:{port}", ok, ok)) == 400
  assert status_of(port, handshake(f"127.0.0.1:{port}", ok, f"http://{evil}")) == 400
  assert status_of(port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: {evil}\r\n\r\n") == 400
  assert status_of(port, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n") == 400
  # each refusal is one log line naming the problem
  assert server.wait_line(lambda s: "refused" in s and "421" in s and "evil.example" in s, 10, mark)
  assert server.wait_line(lambda s: "refused" in s and "at most one Origin header" in s, 10, mark)
  log = server.output(100000)
  assert "Traceback" not in log and "process_request failed" not in log, log
  alive(server)


# ---------------------------------------------------------------------- bad input, session kept


@pytest.mark.slow
def test_deep_json_and_huge_numbers_get_errors_and_keep_the_session(server):
  async def run():
    async with connect(server.ws, max_size=None) as ws:
      r = Reader(ws)
      await r.get("hello")
      await start_session(ws, r)
      deep_ok_parse = {"type": "report", "x": json.loads("[" * 40 + "]" * 40)}
      huge = "9" * 400
      cases = [("[" * 100000 + "]" * 100000, "bad_json"),  # was: RecursionError, traceback
               ('{"type": "report", "x": ' + "{\"a\": " * 30000 + "1" + "}" * 30001, "bad_json"),
               (json.dumps(deep_ok_parse), "bad_json"),
               ('{"type": "prompt", "steps": ' + huge + "}", "bad_value"),  # was: OverflowError
               ('{"type": "prompt", "cfg": -' + huge + "}", "bad_value"),
               ('{"type": "ping", "t": ' + huge + "}", "bad_value"),
               ('{"type": "prompt", "steps": ' + huge + ".5}", "bad_value"),  # parses as inf
               ('{"type": "ping", "t": ' + "9" * 5000 + "}", "bad_json")]  # beyond int digits
      for text, code in cases:
        assert len(text) < MAX_MESSAGE
        await ws.send(text)
        e = await r.get("error")
        assert e["code"] == code, (text[:50], e)
        assert e["error"] and len(e["error"]) < 300, e
      await still_streams(ws, r)
      assert r.closed is None

  asyncio.run(run())
  alive(server)


@pytest.mark.slow
def test_lone_surrogate_prompt_is_refused_and_the_session_goes_on(server):
  async def run():
    async with connect(server.ws, max_size=None) as ws:
      r = Reader(ws)
      await r.get("hello")
      await ws.send(json.dumps({"type": "start", "prompt": "piano \ud800"}))  # JSON: "\ud800"
      e = await r.get("error")
      assert e["code"] == "bad_value" and "surrogate" in e["error"] and "U+D800" in e["error"], e
      await start_session(ws, r, prompt="piano")
      await still_streams(ws, r, 0.3)
      for bad in ("a\udc00b", "\ud83c"):  # a lone low half; a high half without its pair
        await ws.send(json.dumps({"type": "prompt", "prompt": bad}))  # was: stopped the session
        e = await r.get("error")
        assert e["code"] == "bad_value" and "surrogate" in e["error"], e
      await ws.send(json.dumps({"type": "prompt", "prompt": "brass \U0001F3BA"}))  # a real pair
      assert (await r.get("prompt_ok", timeout=60))["prompt"] == "brass \U0001F3BA"
      await still_streams(ws, r)

  asyncio.run(run())
  alive(server)


@pytest.mark.slow
def test_out_of_range_samples_are_clipped_or_refused_and_the_stream_goes_on(server):
  """3e38 (finite, but it overflows the codec: was `sampler_failed`, session stopped) is clipped
  to [-1, 1], answered, and warned about; inf/NaN frames are refused; the stream goes on and
  still produces generated audio."""
  async def run():
    async with connect(server.ws, max_size=None) as ws:
      r = Reader(ws)
      await r.get("hello")
      started = await start_session(ws, r)
      sent = await feed(ws, 0.3, SR)
      loud = np.full(FRAME, 3e38, "<f4")
      loud[::2] = -3e38
      await ws.send(loud.tobytes())
      w = await r.get("warning")
      assert w["code"] == "clipped" and w["clipped_samples"] == FRAME and "3e+38" in w["error"], w
      sent += FRAME
      for value in (np.inf, -np.inf, np.nan):
        bad = np.zeros(FRAME, "<f4")
        bad[3] = value
        await ws.send(bad.tobytes())
        e = await r.get("error")
        assert e["code"] == "bad_frame" and "NaN/inf" in e["error"], e
      sent += await feed_until_generated(ws, r, SR, started["delay_samples"], start=sent)
      await wait_until(lambda: r.received >= sent, 30, "answers to every accepted frame")
      out = np.concatenate(r.audio)
      assert out.size == sent and np.all(np.isfinite(out))
      assert np.abs(out[started["delay_samples"]:]).max() > 0, "no generated audio after 3e38"
      await ws.send(json.dumps({"type": "status"}))
      st = (await r.get("status"))["session"]
      assert st is not None and st["clipped_samples"] == FRAME and st["rejected_messages"] == 3
      await ws.send(json.dumps({"type": "stop"}))
      assert (await r.get("stopped"))["stats"]["blocks"] >= 1

  asyncio.run(run())
  alive(server)
  assert "sampler failed" not in server.output(100000)


# ------------------------------------------------------------------------------------- fuzz

FUZZ_MESSAGES = 300
FUZZ_SECONDS = 40.0
FUZZ_SEED = 16
EXPECTED_CODES = {"bad_json", "bad_message", "unknown_type", "bad_value", "bad_frame",
                  "no_session", "starting", "already_started", "busy", "ahead"}


def _value(rng: random.Random, depth=0):
  kind = rng.randrange(12 if depth < 4 else 8)
  if kind == 0:
    return rng.randint(-3, 70)
  if kind == 1:
    return rng.choice([0, -1, 2 ** 31, 2 ** 63, 10 ** rng.randint(20, 400), -(10 ** 300)])
  if kind == 2:
    return rng.choice([0.5, -0.0, 1e-320, 1e308, -1e308, 3e38, rng.uniform(-30, 30)])
  if kind == 3:
    return rng.choice([True, False, None])
  if kind in (4, 5):
    alphabet = "ab \u00e9\u4e2d\U0001F3B9\ud800\udfff\x00\n\"\\"
    return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 3, 40, 600])))
  if kind == 6:
    return rng.choice(["", "start", "prompt", "stop", "ping", "status", "report"])
  if kind == 7:
    return "x" * rng.choice([1, 100, 5000])
  if kind in (8, 9):
    return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
  nested = {}
  for _ in range(rng.randrange(4)):
    nested[rng.choice(["type", "prompt", "steps", "k", "\ud800"])] = _value(rng, depth + 1)
  return nested


def fuzz_message(rng: random.Random, max_frame_bytes: int):
  """One random message: ('text' or 'start' (a valid start), str), ('binary', bytes),
  ('abort', None) or ('oversize', bytes)."""
  kind = rng.random()
  if kind < 0.05:  # a valid start: the fuzz also runs inside sessions
    return "start", json.dumps({"type": "start", "steps": rng.randint(1, 2),
                                "delay_blocks": rng.randint(1, 2),
                                "prompt": rng.choice(["", "piano", "\u00e9t\u00e9 \U0001F3B9"])})
  if kind < 0.4:  # a control message of a known or random type with random fields
    msg = {"type": rng.choice(["start", "prompt", "stop", "ping", "status", "report", "dance",
                               "START", ""])}
    for key in rng.sample(["prompt", "steps", "cfg", "delay_blocks", "t", "x", "type"],
                          rng.randrange(4)):
      msg[key] = _value(rng)
    return "text", json.dumps(msg)
  if kind < 0.55:  # text that is no valid message
    choices = [
        lambda: "[" * rng.randint(1, 200000),
        lambda: "{\"type\": " * rng.randint(30, 3000),
        lambda: json.dumps({"type": "ping", "t": 1})[:rng.randint(0, 20)],
        lambda: "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 300))),
        lambda: '{"type": "ping", "t": NaN}',
        lambda: '{"type": "start", "steps": ' + "7" * rng.randint(300, 6000) + "}",
        lambda: '{"type": "report", "x": ' + "[" * rng.randint(30, 990) + "]" * 990 + "}",
        lambda: json.dumps(_value(rng)),
    ]
    return "text", rng.choice(choices)()
  if kind < 0.95:  # binary frames: sizes, alignment, magnitudes, NaN/inf
    n_bytes = rng.choice([0, 1, 3, 4, 4096, rng.randint(1, 8192), max_frame_bytes,
                          max_frame_bytes + 4, rng.randint(1, 2 * max_frame_bytes)])
    n = n_bytes // 4
    scale = rng.choice([0.3, 1.0, 1e3, 3e38])
    with np.errstate(over="ignore"):  # 3e38 * N(0, 1) overflows float32 to inf: intended
      x = (np.random.default_rng(rng.randrange(1 << 30)).standard_normal(n) * scale).astype("<f4")
    if n and rng.random() < 0.2:
      x[rng.randrange(n)] = rng.choice([np.nan, np.inf, -np.inf])
    data = x.tobytes() + bytes(n_bytes % 4)
    if rng.random() < 0.1:
      data = rng.randbytes(n_bytes)
    return "binary", data
  if kind < 0.98:
    return "abort", None
  return "oversize", bytes(MAX_MESSAGE + rng.choice([4, 1000]))


@pytest.mark.slow
def test_fuzz_messages_never_end_another_clients_session_or_the_server(server):
  """A bounded, seeded fuzz: random messages (text and binary, valid and not, random sizes and
  orders, abrupt disconnects, oversized messages) on one connection while another client
  streams. That client's session never ends and all its frames are answered; the fuzzing
  connection only ever gets error replies from the known set (never "internal") and is only
  closed for its oversized messages; afterwards a new client completes a normal exchange and
  the page is served."""
  rng = random.Random(FUZZ_SEED)
  codes: dict[str, int] = {}
  replies: dict[str, int] = {}
  kinds: dict[str, int] = {}
  unexpected_closes = []

  async def fuzz(max_frame_bytes):
    ws = None
    reader = None
    end = time.monotonic() + FUZZ_SECONDS
    sent = 0

    def count(m):
      replies[m["type"]] = replies.get(m["type"], 0) + 1
      if m["type"] == "error":
        codes[m["code"]] = codes.get(m["code"], 0) + 1
      return m

    async def drain(r):
      while not r.msgs.empty():
        count(r.msgs.get_nowait())

    async def until_started(r):  # or refused: the fuzz then goes on inside a running session
      with contextlib.suppress(asyncio.TimeoutError):
        while count(await asyncio.wait_for(r.msgs.get(), 120))["type"] not in ("started", "error"):
          pass

    for _ in range(FUZZ_MESSAGES):
      if time.monotonic() > end:
        break
      if ws is None:
        ws = await connect(server.ws, max_size=None)
        reader = Reader(ws)
        await reader.get("hello")
      what, data = fuzz_message(rng, max_frame_bytes)
      kinds[what] = kinds.get(what, 0) + 1
      await drain(reader)
      if reader.closed is not None:
        unexpected_closes.append(repr(reader.closed))
        ws = None
        continue
      if what == "abort":  # gone without a close frame, maybe mid-start or mid-stream
        ws.transport.abort()
        ws = None
        continue
      try:
        await ws.send(data)
      except websockets.ConnectionClosed as e:
        unexpected_closes.append(repr(e))
        ws = None
        continue
      sent += 1
      if what == "start" and rng.random() < 0.7:
        await until_started(reader)
      if what == "oversize":  # closes this connection only, with 1009
        await asyncio.wait_for(reader.task, 30)
        assert reader.closed.rcvd is not None and reader.closed.rcvd.code == 1009, reader.closed
        ws = None
        continue
      await asyncio.sleep(rng.choice([0, 0.01, 0.05, 0.2]))  # ~20 s in all: sessions start
    if ws is not None:
      await asyncio.sleep(1.0)
      await drain(reader)
      if reader.closed is not None:
        unexpected_closes.append(repr(reader.closed))
      await ws.close()
    return sent

  async def run():
    async with connect(server.ws, max_size=None) as a:
      ra = Reader(a)
      hello = await ra.get("hello")
      started = await start_session(a, ra, prompt="steady partner")
      streaming = True
      fed = 0

      async def partner():
        nonlocal fed
        while streaming:
          fed += await feed(a, 0.25, SR, start=fed)

      task = asyncio.create_task(partner())
      t0 = time.monotonic()
      n_fuzz = await fuzz(4 * hello["max_frame_samples"])
      fuzz_s = time.monotonic() - t0
      streaming = False
      await task
      await wait_until(lambda: ra.received >= fed, 60, "answers to all of the partner's frames")
      assert ra.closed is None and ra.msgs.empty(), (ra.closed, list(ra.msgs._queue))
      await a.send(json.dumps({"type": "status"}))
      st = (await ra.get("status"))["session"]
      assert st is not None and st["rejected_messages"] == 0, st
      out = np.concatenate(ra.audio)
      assert out.size == fed and np.all(np.isfinite(out))
      assert np.abs(out[started["delay_samples"]:]).max() > 0
      print(f"fuzz: {n_fuzz} messages in {fuzz_s:.1f} s ({kinds}), replies {replies}, error "
            f"codes {codes}; the "
            f"partner streamed {fed / SR:.1f} s, blocks {st['blocks']}, deadline misses "
            f"{st['deadline_misses']}, under-runs {st['underruns']}")
      assert n_fuzz >= 50, kinds
    assert not unexpected_closes, unexpected_closes
    assert set(codes) <= EXPECTED_CODES, codes  # never "internal", "sampler_failed", ...
    # a well-behaved new client completes a normal exchange (once the sessions of the fuzzing
    # connections, some abandoned while being built, are cleaned up)
    async with connect(server.ws, max_size=None) as b:
      rb = Reader(b)
      await rb.get("hello")
      for _ in range(600):
        await b.send(json.dumps({"type": "status"}))
        if (await rb.get("status"))["active_sessions"] == 0:
          break
        await asyncio.sleep(0.1)
      else:
        raise AssertionError("the fuzzing connections' sessions were not cleaned up")
      started = await start_session(b, rb, prompt="after the fuzz", steps=1)
      sent = await feed_until_generated(b, rb, SR, started["delay_samples"])
      await wait_until(lambda: rb.received >= sent, 30, "answers")
      assert np.abs(np.concatenate(rb.audio)[started["delay_samples"]:]).max() > 0
      await b.send(json.dumps({"type": "stop"}))
      assert (await rb.get("stopped"))["stats"]["blocks"] >= 1

  asyncio.run(run())
  alive(server)
  page = urllib.request.urlopen(server.http + "/", timeout=10)
  assert page.status == 200 and b"jam.js" in page.read()
  log = server.output(100000)
  assert "Traceback" not in log and "error handling a message" not in log, log[-3000:]


def test_bad_allow_host_entry_exits_2_before_the_model_loads():
  r = subprocess.run([sys.executable, "-m", "lmdm_jax.apps.server", "--allow-host", "jam test",
                      "--port", "0"], capture_output=True, text=True, env=child_env(), cwd=ROOT,
                     timeout=120)
  assert r.returncode == 2, r.stdout + r.stderr
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and "--allow-host 'jam test'" in err[0], r.stderr
  assert "RANDOM WEIGHTS" not in r.stdout and "model ready" not in r.stdout, r.stdout
