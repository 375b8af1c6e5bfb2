"""Jam server: a WebSocket server that streams PCM both ways, and the browser page that uses it.

  python3 -m lmdm_jax.apps.server --config CONFIG_WITH_ACCOMP [--checkpoint DIR] [--port 8765]
  then open http://127.0.0.1:8765/ (microphone or an audio file in, the model's part out)

One HTTP port serves the page (``/``, ``/jam.js``, ``/worklet.js``) and the WebSocket (``/ws``).
It binds 127.0.0.1 unless ``--host`` says otherwise (the browser only grants the microphone to a
secure context: localhost, or https). The model, codec and text encoder are loaded once; every
connection's ``JamSession`` takes one of ``--slots`` fixed slots of one ``serving.SlotServer``:
one sampler thread advances every session due on the block clock in one batched step (its own
prompt, steps, CFG scale, seed, delay and accompaniment input per slot); sessions join and
leave without recompiling. When every slot is taken a start gets ``{"type": "error", "code":
"busy", ...}`` saying so (the hello message says ``slots`` and ``free_slots``).

Protocol (``/ws``):
- server -> client, first: ``{"type": "hello", "sample_rate", "channels": 1, "block_samples",
  "frame_samples", "max_frame_samples", "max_message_bytes", "defaults", ...}``.
- client -> server, JSON text: ``{"type": "start", "prompt", "delay_blocks", "steps", "cfg"}``
  (all optional; ``delay_blocks`` 0 = auto, see ``JamSession``) -> ``{"type": "started",
  "delay_blocks", "delay_seconds", "delay_samples", "decoder_latency_samples", "lead_seconds",
  ...}`` (``delay_samples = delay_blocks * block_samples + decoder_latency_samples``);
  ``{"type": "prompt", "prompt", "steps"?, "cfg"?}`` (mid-stream, no recompilation) ->
  ``{"type": "prompt_ok"}``; ``{"type": "stop"}`` -> ``{"type": "stopped", "stats"}``;
  ``{"type": "ping", "t"}`` -> ``{"type": "pong", "t"}``; ``{"type": "report", ...}`` (the
  page's measurements, logged by the server) -> ``{"type": "report_ok"}``.
- while a session is set up (before ``started``): ``{"type": "progress", "stage", "elapsed_s"}``
  each time the set-up enters a stage (waiting for another session's set-up, encoding the prompt,
  compiling the block step, compiling the decoder, warming up the encoder, measuring the block
  compute); ``elapsed_s`` counts
  from the start request.
- binary, both ways: little-endian float32 mono PCM at ``sample_rate``. The client is the clock:
  every binary frame of n samples it sends (the partner, live) is answered by one binary frame of
  n samples, the next n samples of the model's part. Output sample i is the model's music for the
  moment of input sample i - ``delay_samples`` (the fixed generative delay; the first
  ``delay_samples`` are silence). Samples the sampler has not produced in time are silence and
  counted as server under-runs.
- ``{"type": "stats", ...}`` every ``--stats-interval`` seconds while a session runs: the
  session's delay, blocks, deadline misses, under-runs, block compute time, and the server's
  per-frame handling time.
- bad input never ends the connection or the session: malformed JSON or JSON nested over
  ``MAX_JSON_DEPTH`` levels, unknown types, bad start values (numbers out of range, prompts that
  are not valid Unicode), binary frames that are not a whole number of float32 samples, that hold
  NaN/inf or are too long, or that run ahead of real time, get ``{"type": "error", "error": "...",
  "code": "..."}`` and are dropped. Finite samples beyond [-1, 1] are clipped to it and the frame
  is answered; the connection gets ``{"type": "warning", "code": "clipped", ...}`` (at most one a
  second; the stats count ``clipped_samples``). A message over ``--max-message-bytes`` closes that
  connection only (close code 1009, "message too big"); a vanished client's session and sampler
  thread are stopped.
- who may connect: requests must name an allowed ``Host`` (localhost, 127.0.0.1, [::1] on the
  server's port, the ``--host`` address, ``--allow-host`` entries; else 421), and a WebSocket
  handshake's ``Origin``, when sent, must be http(s) on an allowed host (else 403, unless
  ``--any-origin``); see ``host_policy``.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import math
import mimetypes
import os
import signal
import sys
import threading
import time
import traceback
import urllib.parse

import numpy as np

from lmdm_jax.apps.host_policy import HostPolicy, parse_allow_host

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
STATIC = {"/": "index.html", "/index.html": "index.html", "/jam.js": "jam.js",
          "/worklet.js": "worklet.js"}
PROTOCOL_VERSION = 1
MAX_PROMPT_CHARS = 500
MAX_JSON_DEPTH = 32  # nesting of a control message (a report's measurements need a few levels)
CLIP_WARNING_SECONDS = 1.0  # at most one "clipped" warning per connection per this long


class BadMessage(ValueError):
  """A client message the server refuses (answered with an error JSON, connection kept)."""

  def __init__(self, code: str, message: str):
    super().__init__(message)
    self.code = code


def _log(*a):
  # client text can hold lone surrogates, which a strict UTF-8 stdout cannot print
  text = " ".join(str(x) for x in a).encode("utf-8", "backslashreplace").decode("utf-8")
  print("[server]", text, flush=True)


# ------------------------------------------------------------------------------ shared state


class JamServer:
  """What all connections share: the System (model, conditioning, codec), and the limits."""

  def __init__(self, system, *, config_name: str = "?", random_weights: bool = True,
               prompt: str = "", delay_blocks: int = 2, steps: int = 8, cfg_scale: float = 1.0,
               plus_plus: bool = False, pingpong: bool = True, seed: int = 0,
               slots: int = 4, max_message_bytes: int = 1 << 20,
               stats_interval: float = 0.5, idle_timeout: float = 30.0, any_origin: bool = False,
               allow_hosts=(), log=_log):
    cfg, codec = system.cfg, system.codec
    if codec is None:
      raise ValueError("jamming needs a codec that decodes this model's latents")
    if cfg.extra_dim < 1 + codec.latent_dim:
      raise ValueError(f"jamming needs accompaniment channels: the model has extra_dim="
                       f"{cfg.extra_dim}, it needs >= 1 + latent_dim = {1 + codec.latent_dim} "
                       f"(input_add_dim = 1 + io_channels + {1 + codec.latent_dim})")
    self.system, self.codec = system, codec
    self.config_name, self.random_weights = config_name, random_weights
    self.defaults = dict(prompt=prompt, delay_blocks=int(delay_blocks), steps=int(steps),
                         cfg=float(cfg_scale))
    self.plus_plus, self.pingpong, self.seed = plus_plus, pingpong, seed
    self.sr, self.codec_channels = codec.sample_rate, codec.channels
    self.block_samples = cfg.chunk * codec.hop
    self.frame_samples = 1024
    self.max_frame_samples = self.sr  # one second per binary frame at most
    if int(slots) < 1:
      raise ValueError(f"--slots must be at least 1, got {slots}")
    self.max_sessions, self.max_message_bytes = int(slots), int(max_message_bytes)
    self.stats_interval, self.idle_timeout = float(stats_interval), float(idle_timeout)
    self.any_origin = any_origin
    self.allow_hosts = tuple(allow_hosts)
    for entry in self.allow_hosts:  # a bad entry is the caller's error, before any listening
      try:
        parse_allow_host(entry)
      except ValueError as e:
        raise ValueError(f"--allow-host {entry!r}: {e}") from None
    self.hosts = None  # HostPolicy of the listening address, set by listening()
    self.log = log
    from lmdm_jax.serving import SlotServer
    self.slot_server = SlotServer(system, self.max_sessions, log=log)
    self.sessions = 0  # live JamSessions (the event loop's thread only)
    self.connections = 0
    self.reports: list[dict] = []
    # sessions are built one at a time (tracing the shared model, compiling its stream), in
    # worker threads so the event loop keeps serving other connections meanwhile
    self.setup_lock = threading.Lock()
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, self.max_sessions),
                                                      thread_name_prefix="jam-setup")

  def hello(self) -> dict:
    return dict(type="hello", version=PROTOCOL_VERSION, sample_rate=self.sr, channels=1,
                encoding="float32le", block_samples=self.block_samples,
                block_seconds=self.block_samples / self.sr, frame_samples=self.frame_samples,
                max_frame_samples=self.max_frame_samples,
                max_message_bytes=self.max_message_bytes, config=self.config_name,
                random_weights=self.random_weights, defaults=self.defaults,
                active_sessions=self.sessions, max_sessions=self.max_sessions,
                slots=self.max_sessions, free_slots=max(self.max_sessions - self.sessions, 0))

  # ---------------------------------------------------------------------------- sessions

  def make_session(self, prompt: str, delay_blocks: int, steps: int, cfg: float, progress=None):
    """Build a JamSession in a slot of the server's ``SlotServer`` (worker thread). The slots'
    state is guarded by the SlotServer's lock, so a prompt or sampler change from the event loop
    never races the sampler thread's donated state. ``progress(stage)`` (called from this thread)
    names each set-up stage as it begins."""
    from lmdm_jax.jamming import JamSession
    progress = progress or (lambda stage: None)
    if self.setup_lock.locked():
      progress("waiting for another session's set-up")
    with self.setup_lock:
      sess = JamSession(self.system, prompt, delay_blocks=delay_blocks or "auto", steps=steps,
                        cfg_scale=cfg, plus_plus=self.plus_plus, pingpong=self.pingpong,
                        seed=self.seed, progress=progress, server=self.slot_server)
    sess.stream_lock = self.slot_server.lock
    return sess

  def encode_prompt(self, prompt: str):
    """-> (cross tokens, global conditioning) of ``prompt`` for this server's model."""
    return self.system.condition(prompt)

  # ------------------------------------------------------------------------------- HTTP

  def listening(self, host: str, port: int):
    """The server now listens on ``host``:``port``: the Host/Origin allowlist follows from it."""
    self.hosts = HostPolicy(port, self.allow_hosts, bind_host=host)
    self.log(f"answering Host {self.hosts.describe()}"
             + (", WebSocket pages of any origin" if self.any_origin else ""))

  def _refuse(self, connection, status: int, why: str):
    why = " ".join(why.split())  # one line
    peer = getattr(connection, "remote_address", None)
    self.log(f"refused a request from {peer}: {status} {why}")
    return connection.respond(status, why + "\n")

  def process_request(self, connection, request):
    """Static files over plain HTTP; the WebSocket handshake only on /ws. Both only for an allowed
    ``Host`` (421 otherwise), the handshake only from an allowed ``Origin`` or none (403); a
    request with two Host or Origin headers gets 400. Each refusal logs one line."""
    try:
      return self._process_request(connection, request)
    except Exception as e:  # noqa: BLE001 - a request we did not foresee: refused, no traceback
      return self._refuse(connection, 400, f"bad request: {type(e).__name__}: {e}")

  def _process_request(self, connection, request):
    headers = request.headers
    hosts = headers.get_all("Host")
    if len(hosts) != 1:
      return self._refuse(connection, 400, f"a request needs exactly one Host header, it has "
                          f"{len(hosts)}")
    problem = self.hosts.host_problem(hosts[0])
    if problem is not None:
      return self._refuse(connection, 421, problem)
    path = urllib.parse.urlsplit(request.path).path
    upgrade = any(v.strip().lower() == "websocket"
                  for h in headers.get_all("Upgrade") for v in h.split(","))
    if upgrade:
      if path != "/ws":
        return connection.respond(404, "the WebSocket is at /ws\n")
      origins = headers.get_all("Origin")
      if len(origins) > 1:
        return self._refuse(connection, 400, f"a WebSocket handshake has at most one Origin "
                            f"header, this one has {len(origins)}")
      problem = None if not origins or self.any_origin else self.hosts.origin_problem(origins[0])
      if problem is not None:
        return self._refuse(connection, 403, problem)
      return None
    name = STATIC.get(path)
    if name is None:
      return connection.respond(404, "not found\n")
    try:
      with open(os.path.join(WEB_DIR, name), "rb") as f:
        body = f.read()
    except OSError as e:
      return connection.respond(500, f"cannot read {name}: {e}\n")
    from websockets.datastructures import Headers
    from websockets.http11 import Response
    ctype = {"html": "text/html; charset=utf-8",
             "js": "text/javascript; charset=utf-8"}.get(name.rsplit(".", 1)[-1]) \
        or mimetypes.guess_type(name)[0] or "application/octet-stream"
    headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                       ("Connection", "close")])
    return Response(200, "OK", headers, body)

  async def handler(self, ws):
    self.connections += 1
    try:
      await Connection(self, ws).run()
    finally:
      self.connections -= 1


# ------------------------------------------------------------------------------ connection


def _no_constant(name):
  raise ValueError(f"{name} is not JSON")


def _json_depth(obj) -> int:
  """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion)."""
  deepest, todo = 0, [(obj, 1)]
  while todo:
    v, d = todo.pop()
    if isinstance(v, (list, dict)):
      deepest = max(deepest, d)
      if d > MAX_JSON_DEPTH:
        break
      todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
  return deepest


def parse_message(text: str) -> dict:
  """A control message: a JSON object with a string 'type', nested at most MAX_JSON_DEPTH deep
  (a deeper one would break whatever walks it later); anything else -> BadMessage."""
  try:
    msg = json.loads(text, parse_constant=_no_constant)
  except RecursionError:
    raise BadMessage("bad_json", f"JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)") \
        from None
  except ValueError as e:
    raise BadMessage("bad_json", f"malformed JSON: {e}") from None
  if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
    raise BadMessage("bad_message", "a control message is a JSON object with a string 'type'")
  if _json_depth(msg) > MAX_JSON_DEPTH:
    raise BadMessage("bad_json", f"JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)")
  return msg


def _show(v) -> str:
  """A client's value for an error message: short, and its repr never fails."""
  if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10 ** 30:
    try:
      return f"an integer of {len(str(abs(v)))} digits"
    except ValueError:  # beyond Python's int -> str digit limit
      return "an integer of thousands of digits"
  r = repr(v)
  return r if len(r) <= 60 else r[:57] + "..."


def _finite(v) -> float | None:
  """A JSON number as a finite float, or None (not a number, a bool, inf/NaN, or an integer
  beyond float range: JSON integers are unbounded)."""
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  try:
    f = float(v)
  except OverflowError:
    return None
  return f if math.isfinite(f) else None


def _int_field(msg, key, default, lo, hi):
  v = msg.get(key, default)
  if isinstance(v, int) and not isinstance(v, bool) and not lo <= v <= hi:  # JSON ints: any size
    raise BadMessage("bad_value", f"{key!r} must be in [{lo}, {hi}], got {_show(v)}")
  f = _finite(v)
  if f is None or not f.is_integer():
    raise BadMessage("bad_value", f"{key!r} must be an integer, got {_show(v)}")
  if not lo <= f <= hi:
    raise BadMessage("bad_value", f"{key!r} must be in [{lo}, {hi}], got {_show(v)}")
  return int(f)


def _float_field(msg, key, default, lo, hi):
  v = msg.get(key, default)
  if isinstance(v, int) and not isinstance(v, bool) and not lo <= v <= hi:  # JSON ints: any size
    raise BadMessage("bad_value", f"{key!r} must be in [{lo}, {hi}], got {_show(v)}")
  f = _finite(v)
  if f is None:
    raise BadMessage("bad_value", f"{key!r} must be a finite number, got {_show(v)}")
  if not lo <= f <= hi:
    raise BadMessage("bad_value", f"{key!r} must be in [{lo}, {hi}], got {_show(v)}")
  return f


def _prompt_field(msg, default):
  v = msg.get("prompt", default)
  if not isinstance(v, str):
    raise BadMessage("bad_value", f"'prompt' must be a string, got {type(v).__name__}")
  if len(v) > MAX_PROMPT_CHARS:
    raise BadMessage("bad_value", f"'prompt' is {len(v)} characters, at most "
                     f"{MAX_PROMPT_CHARS} are allowed")
  try:
    v.encode("utf-8")
  except UnicodeEncodeError as e:  # JSON's \ud800 escapes can name half a surrogate pair
    raise BadMessage("bad_value", f"'prompt' is not valid Unicode text: a lone surrogate "
                     f"U+{ord(v[e.start]):04X} at character {e.start}") from None
  return v


class Connection:
  """One client: its messages in order, its JamSession, its stats task."""

  def __init__(self, server: JamServer, ws):
    self.srv, self.ws = server, ws
    self.sess = None
    self.starting = False
    self.abandon_start = False
    self.start_task = None
    self.counted = False  # this connection holds one of the server's session slots
    self.pushed = 0  # input samples pushed into the session
    self.frames = 0
    self.rejected = 0
    self.clipped = 0  # input samples beyond [-1, 1], clipped
    self.clip_warned = -math.inf  # when this connection last got a "clipped" warning
    self.handle_ms: list[float] = []
    self.in_sq = 0.0  # sum of squares of the input (is anything coming in?)
    self.out_sq = 0.0
    self.last_audio = time.monotonic()
    self.peer = getattr(ws, "remote_address", None)

  async def send_json(self, **msg):
    await self.ws.send(json.dumps(msg, allow_nan=False))

  async def error(self, code: str, message: str):
    self.rejected += 1
    await self.send_json(type="error", code=code, error=message)

  async def run(self):
    import websockets
    srv = self.srv
    srv.log(f"connection from {self.peer} ({srv.connections} open)")
    stats_task = asyncio.create_task(self._stats_loop())
    reason = "closed"
    try:
      await self.send_json(**srv.hello())
      async for msg in self.ws:
        try:
          if isinstance(msg, str):
            await self.on_text(msg)
          else:
            await self.on_binary(msg)
        except BadMessage as e:
          await self.error(e.code, str(e))
        except websockets.ConnectionClosed:
          raise
        except Exception as e:  # noqa: BLE001 - a server-side failure ends the session only
          srv.log(f"error handling a message from {self.peer}: {type(e).__name__}: {e}\n"
                  + traceback.format_exc())
          await self.error("internal", f"{type(e).__name__}: {e}")
          await self._stop_session("server error")
    except websockets.ConnectionClosed as e:
      reason = f"connection closed ({e.rcvd.code if e.rcvd else 'no close frame'})"
    finally:
      stats_task.cancel()
      if self.start_task is not None and not self.start_task.done():
        self.abandon_start = True
        await asyncio.wait([self.start_task])  # its session, once built, is closed there
      await self._stop_session(reason)
      proto = getattr(self.ws, "protocol", self.ws)  # (close_code: websockets >= 13 keeps it there)
      code, why = getattr(proto, "close_code", None), getattr(proto, "close_reason", "")
      srv.log(f"connection from {self.peer} ended: close code {code} {why or ''}".rstrip())

  # ----------------------------------------------------------------------------- control

  async def on_text(self, text: str):
    msg = parse_message(text)
    kind = msg["type"]
    handler = {"start": self.on_start, "prompt": self.on_prompt, "stop": self.on_stop,
               "ping": self.on_ping, "report": self.on_report, "status": self.on_status
               }.get(kind)
    if handler is None:
      raise BadMessage("unknown_type", f"unknown message type {kind[:40]!r}; expected start, "
                       "prompt, stop, ping, status or report")
    await handler(msg)

  async def on_start(self, msg):
    srv = self.srv
    if self.starting:
      raise BadMessage("already_started", "a session is still being set up on this connection")
    if self.sess is not None:
      raise BadMessage("already_started", "a session is already running on this connection; "
                       "send stop first")
    d = srv.defaults
    prompt = _prompt_field(msg, d["prompt"])
    delay = _int_field(msg, "delay_blocks", d["delay_blocks"], 0, 16)  # 0: auto
    steps = _int_field(msg, "steps", d["steps"], 1, 64)
    cfg = _float_field(msg, "cfg", d["cfg"], 0.0, 20.0)
    if srv.sessions >= srv.max_sessions:
      raise BadMessage("busy", f"all {srv.max_sessions} session slots of this server are taken "
                       f"(--slots {srv.max_sessions}): try again when a session ends")
    srv.sessions += 1
    self.counted = True
    self.starting = True
    self.abandon_start = False
    # built in a worker thread while this connection's other messages (ping, stop, ...) go on
    self.start_task = asyncio.create_task(self._start(prompt, delay, steps, cfg))

  async def _start(self, prompt, delay, steps, cfg):
    import websockets
    srv = self.srv
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()

    async def send_progress(stage, elapsed):
      try:
        await self.send_json(type="progress", stage=stage, elapsed_s=elapsed)
      except websockets.ConnectionClosed:
        pass  # run() cleans up

    sending = set()  # (the loop keeps only weak references to tasks)

    def send_soon(stage, elapsed):
      task = loop.create_task(send_progress(stage, elapsed))
      sending.add(task)
      task.add_done_callback(sending.discard)

    def progress(stage):  # (the set-up's worker thread)
      loop.call_soon_threadsafe(send_soon, stage, time.perf_counter() - t0)

    try:
      sess = await loop.run_in_executor(srv.pool, srv.make_session, prompt, delay, steps, cfg,
                                        progress)
    except Exception as e:  # noqa: BLE001
      self.starting = False
      self._release()
      srv.log(f"session for {self.peer} failed to start: {type(e).__name__}: {e}")
      try:
        await self.error("start_failed", f"could not start a session: {type(e).__name__}: {e}")
      except websockets.ConnectionClosed:
        pass
      return
    self.starting = False
    self.sess, self.pushed, self.frames, self.handle_ms = sess, 0, 0, []
    if self.abandon_start:  # stop arrived, or the client left, while it was being built
      await self._stop_session("stopped while starting")
      return
    self.in_sq = self.out_sq = 0.0
    self.last_audio = time.monotonic()
    setup = time.perf_counter() - t0
    srv.log(f"session started for {self.peer}: prompt {prompt!r}, delay {sess.delay_seconds:.3f} s"
            f" ({sess.delay_blocks} blocks{' (auto)' if not delay else ''} + decoder"
            f" {sess.decoder_latency / srv.sr:.3f} s), {steps} steps, cfg {cfg:g}, set up in"
            f" {setup:.1f} s")
    try:
      await self.send_json(type="started", prompt=prompt, delay_blocks=sess.delay_blocks,
                           steps=steps, cfg=cfg, delay_seconds=sess.delay_seconds,
                           delay_samples=sess.delay_samples, lead_seconds=sess.lead_seconds,
                           decoder_latency_samples=sess.decoder_latency,
                           block_seconds=sess.block_seconds, sample_rate=srv.sr,
                           setup_seconds=setup)
    except websockets.ConnectionClosed:
      pass  # run() stops the session

  def _release(self):
    if self.counted:
      self.counted = False
      self.srv.sessions -= 1

  async def on_prompt(self, msg):
    sess = self._need_session()
    srv = self.srv
    prompt = _prompt_field(msg, None) if "prompt" in msg else None
    steps = _int_field(msg, "steps", 0, 1, 64) if "steps" in msg else None
    cfg = _float_field(msg, "cfg", 0, 0.0, 20.0) if "cfg" in msg else None
    if cfg is not None and not sess.stream.cfg_guidance and cfg != 1.0:
      raise BadMessage("bad_value", "this session runs without classifier-free guidance (it "
                       "started with cfg 1); start a new one with cfg != 1 to change it")
    loop = asyncio.get_running_loop()

    def apply():
      cond = srv.encode_prompt(prompt) if prompt is not None else None
      with sess.stream_lock:
        if cond is not None:
          sess.stream.set_prompt(*cond)
        kw = {}
        if steps is not None:
          kw["steps"] = steps
        if cfg is not None:
          kw["cfg_scale"] = cfg
        if kw:
          sess.stream.set_sampler(**kw)

    await loop.run_in_executor(srv.pool, apply)
    await self.send_json(type="prompt_ok", prompt=prompt, steps=steps, cfg=cfg,
                         block=int(sess.blocks))

  async def on_stop(self, msg):
    if self.starting:
      self.abandon_start = True
      await self.send_json(type="stopped", reason="stopped while starting", stats=None)
      return
    if self.sess is None:
      raise BadMessage("no_session", "no session to stop")
    stats = self._stats()
    await self._stop_session("stop")
    await self.send_json(type="stopped", stats=stats)

  async def on_ping(self, msg):
    t = msg.get("t")
    if t is not None and _finite(t) is None:
      raise BadMessage("bad_value", f"'t' must be a finite number within float range, got "
                       f"{_show(t)}")
    await self.send_json(type="pong", t=t, server_time=time.time())

  async def on_status(self, msg):
    await self.send_json(type="status", active_sessions=self.srv.sessions,
                         connections=self.srv.connections,
                         session=None if self.sess is None else self._stats())

  async def on_report(self, msg):
    text = json.dumps(msg, allow_nan=False, default=str)
    if len(text) > 64 << 10:
      raise BadMessage("bad_value", "a report is at most 64 KiB")
    self.srv.reports.append(msg)
    del self.srv.reports[:-20]
    self.srv.log("client report " + text)
    await self.send_json(type="report_ok")

  def _need_session(self):
    if self.sess is None:
      if self.starting:
        raise BadMessage("starting", "the session is still being set up: wait for \"started\"")
      raise BadMessage("no_session", "no session: send {\"type\": \"start\"} first")
    return self.sess

  # ------------------------------------------------------------------------------- audio

  async def on_binary(self, data: bytes):
    t0 = time.perf_counter()
    srv = self.srv
    n_bytes = len(data)
    if n_bytes == 0 or n_bytes % 4:
      raise BadMessage("bad_frame", f"a binary frame is little-endian float32 mono PCM: "
                       f"{n_bytes} bytes is not a positive multiple of 4")
    n = n_bytes // 4
    if n > srv.max_frame_samples:
      raise BadMessage("bad_frame", f"a frame of {n} samples is too long: at most "
                       f"{srv.max_frame_samples} ({srv.max_frame_samples / srv.sr:.2f} s) per frame")
    x = np.frombuffer(data, "<f4")
    if not np.all(np.isfinite(x)):
      raise BadMessage("bad_frame", f"the frame holds {int((~np.isfinite(x)).sum())} NaN/inf "
                       "samples; dropped")
    sess = self._need_session()
    now = sess.now()
    ahead = (self.pushed + n) / srv.sr - now
    slack = max(2.0, 2 * sess.block_seconds)
    if self.pushed and ahead > slack:
      raise BadMessage("ahead", f"input runs {ahead:.2f} s ahead of real time (allowed "
                       f"{slack:.2f} s): send audio as it is played; frame dropped")
    peak = float(np.abs(x).max())
    if peak > 1.0:  # finite but out of range (3e38 overflows the codec): clipped, and said so
      over = int(np.count_nonzero(np.abs(x) > 1.0))
      x = np.clip(x, -1.0, 1.0)
      self.clipped += over
      if time.monotonic() - self.clip_warned >= CLIP_WARNING_SECONDS:
        self.clip_warned = time.monotonic()
        await self.send_json(type="warning", code="clipped", clipped_samples=self.clipped,
                             error=f"{over} samples of this frame lie beyond [-1, 1] (peak "
                             f"{peak:.3g}): clipped to [-1, 1] (float PCM is in [-1, 1]); "
                             f"{self.clipped} so far")
    audio = np.repeat(x[None].astype(np.float32), srv.codec_channels, axis=0)
    try:
      sess.push(audio)
      y = sess.pull(n)
    except RuntimeError as e:
      cause = e.__cause__ or e
      await self._stop_session("sampler failed")
      raise BadMessage("sampler_failed", f"the session's sampler failed: "
                       f"{type(cause).__name__}: {cause}; session stopped") from None
    y = y.mean(axis=0) if y.shape[0] > 1 else y[0]
    self.pushed += n
    self.frames += 1
    self.in_sq += float(np.dot(x, x))
    self.out_sq += float(np.dot(y, y))
    self.last_audio = time.monotonic()
    await self.ws.send(np.ascontiguousarray(y, "<f4").tobytes())
    self.handle_ms.append(1000 * (time.perf_counter() - t0))
    if len(self.handle_ms) > 2000:
      del self.handle_ms[:1000]

  # ------------------------------------------------------------------------- stats, stop

  def _stats(self) -> dict:
    sess, srv = self.sess, self.srv
    st = {k: (float(v) if isinstance(v, (float, np.floating)) else v)
          for k, v in sess.stats().items()}
    hm = np.asarray(self.handle_ms[-500:]) if self.handle_ms else np.zeros(1)
    n = max(self.pushed, 1)
    st.update(type="stats", delay_samples=sess.delay_samples, frames=self.frames,
              input_seconds=self.pushed / srv.sr, session_clock=sess.now(),
              input_lead_seconds=self.pushed / srv.sr - sess.now(),
              input_rms=math.sqrt(self.in_sq / n), output_rms=math.sqrt(self.out_sq / n),
              frame_handling_ms_mean=float(hm.mean()), frame_handling_ms_max=float(hm.max()),
              rejected_messages=self.rejected, clipped_samples=self.clipped,
              active_sessions=srv.sessions)
    for k, v in list(st.items()):
      if isinstance(v, float) and not math.isfinite(v):
        st[k] = None
    return st

  async def _stats_loop(self):
    import websockets
    srv = self.srv
    try:
      while True:
        await asyncio.sleep(srv.stats_interval)
        if self.sess is None:
          continue
        if time.monotonic() - self.last_audio > srv.idle_timeout:
          await self._stop_session("idle")
          await self.send_json(type="stopped", reason=f"no audio for {srv.idle_timeout:g} s")
          continue
        await self.send_json(**self._stats())
    except websockets.ConnectionClosed:
      pass  # run() cleans up

  async def _stop_session(self, why: str):
    sess, self.sess = self.sess, None
    if not self.starting:
      self._release()
    if sess is None:
      return

    def close():
      try:
        sess.close()
      except Exception as e:  # noqa: BLE001 - the sampler's own failure, already reported
        return f"{type(e).__name__}: {e.__cause__ or e}"
      return None

    err = await asyncio.get_running_loop().run_in_executor(None, close)
    alive = sess._thread is not None and sess._thread.is_alive()
    self.srv.log(f"session of {self.peer} stopped ({why}): {sess.blocks} blocks, "
                 f"{sess.deadline_misses} deadline misses, {sess.underruns} under-runs"
                 + (f", sampler error {err}" if err else "")
                 + (" - WARNING: its sampler thread is still running" if alive else ""))


# ------------------------------------------------------------------------------------ main


async def serve(srv: JamServer, host: str, port: int, ready=None):
  """Serve until cancelled (or SIGINT/SIGTERM). ``ready(port)`` is called once listening."""
  from websockets.asyncio.server import serve as ws_serve
  stop = asyncio.get_running_loop().create_future()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGINT, signal.SIGTERM):
    try:
      loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    except (NotImplementedError, RuntimeError, ValueError):
      pass
  async with ws_serve(srv.handler, host, port, process_request=srv.process_request,
                      max_size=srv.max_message_bytes, compression=None, max_queue=64,
                      ping_interval=20, ping_timeout=20, close_timeout=5) as server:
    bound = server.sockets[0].getsockname()[1]
    srv.listening(host, bound)
    shown = f"[{host}]" if ":" in host else host
    srv.log(f"listening on http://{shown}:{bound}/ (WebSocket at ws://{shown}:{bound}/ws)")
    if ready is not None:
      ready(bound)
    await stop
    srv.log("shutting down")


def main(argv=None):
  ap = argparse.ArgumentParser(prog="lmdm serve", description=__doc__,
                               formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--checkpoint", default=None, metavar="SOURCE",
                  help="the model (a bundle, work directory or converted checkpoint) with "
                       "accompaniment channels (default: the bundled trained model)")
  ap.add_argument("--config", default=None,
                  help="a config with accompaniment channels: without --checkpoint, RANDOM "
                       "weights; with one, overrides the config it records (default: none)")
  ap.add_argument("--prompt", default="",
                  help="the page's default prompt (default: the page's own caption-style prompt)")
  ap.add_argument("--codec", default=None, help="codec name (default: the model's)")
  ap.add_argument("--delay-blocks", type=int, default=0,
                  help="default generative delay in blocks; the page can change it; 0 = auto: 1 "
                  "when the measured block compute allows, else 2 (default: 0)")
  ap.add_argument("--steps", type=int, default=None,
                  help="default denoising steps (default: the model's)")
  ap.add_argument("--cfg-scale", type=float, default=None,
                  help="default guidance scale (default: the model's)")
  ap.add_argument("--seed", type=int, default=0, help="noise seed of every session (default: 0)")
  ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: "
                  "this machine only)")
  ap.add_argument("--port", type=int, default=8765, help="port; 0 picks a free one (default: 8765)")
  ap.add_argument("--slots", "--max-sessions", type=int, default=4, dest="slots",
                  help="session slots: at most this many concurrent jam sessions, all advanced "
                  "in one batched block step (each step computes every slot of a pool, used "
                  "or not; guided (cfg != 1) and unguided sessions have a pool each); a start "
                  "when all are taken gets a 'busy' error (default: 4; --max-sessions is the "
                  "old name)")
  ap.add_argument("--max-message-bytes", type=int, default=1 << 20,
                  help="a larger message closes its connection with code 1009 (default: 1 MiB)")
  ap.add_argument("--stats-interval", type=float, default=0.5,
                  help="seconds between stats messages to the page (default: 0.5)")
  ap.add_argument("--idle-timeout", type=float, default=30.0,
                  help="stop a session that gets no audio for this long, in seconds (default: 30)")
  ap.add_argument("--any-origin", action="store_true",
                  help="accept WebSocket connections from pages of other origins (the Host "
                  "header is still checked; default: off)")
  ap.add_argument("--allow-host", action="append", default=[], metavar="NAME[:PORT]",
                  help="also answer requests for this host name or address (repeatable): NAME "
                  "on the server's port, NAME:PORT, or NAME:* for any port (behind a reverse "
                  "proxy). Always answered: localhost, 127.0.0.1, [::1] and the --host address. "
                  "Other names are refused (421), so that a site that points its name at this "
                  "machine (DNS rebinding) cannot drive the server")
  ap.add_argument("--compile-cache", default=None,
      help="JAX's persistent compilation cache folder (default: $LMDM_COMPILE_CACHE, else "
      "~/.cache/lmdm_jax/jax): the server compiles its slots' batched block step once (and "
      "the other CFG kind's when a session first needs it), the cache turns a restart's "
      "compiles into loads (seconds -> a fraction); 'none' or "
      "LMDM_NO_COMPILE_CACHE=1 = off")
  ap.add_argument("--quantize", choices=["none", "int8"], default="none",
                  help="int8: run the DiT's block linears as dynamic int8 (int8 weights per output "
                  "channel, activations per token; a CPU speed option, see docs/STREAMING.md); "
                  "default: none (the model's dtype)")
  ap.add_argument("--blas-threads", type=int, default=1,
                  help="threads per NumPy BLAS call (the codec's encoder: small matrices, called "
                  "from every session's thread; more threads than 1 only contend, and on a busy "
                  "machine slow the encoder down by 10x or more); 0 = leave as is")
  args = ap.parse_args(argv)
  from lmdm_jax import compile_cache
  from lmdm_jax.apps import common as C
  tag = "[server]"
  for entry in args.allow_host:  # checked before the model loads
    try:
      parse_allow_host(entry)
    except ValueError as e:
      print(f"{tag} error: --allow-host {entry!r}: {e}", file=sys.stderr)
      return 2
  t0 = time.perf_counter()
  if args.blas_threads > 0:
    try:
      import threadpoolctl
      threadpoolctl.threadpool_limits(limits=args.blas_threads, user_api="blas")
    except ImportError:
      pass
  compile_cache.enable(args.compile_cache, log=lambda m: print(f"{tag} {m}"))
  from lmdm_jax.system import load_system
  try:
    system = load_system(args.checkpoint, config=args.config, codec=args.codec, seed=args.seed,
                         quantize=args.quantize, log=lambda m: print(f"{tag} {m}"))
    d = system.sampler_settings(steps=args.steps, cfg_scale=args.cfg_scale)
    srv = JamServer(system, config_name=system.name,
                    random_weights=not args.checkpoint and args.config is not None,
                    prompt=args.prompt, delay_blocks=args.delay_blocks, steps=d.steps,
                    cfg_scale=d.cfg_scale, plus_plus=d.plus_plus, pingpong=d.pingpong,
                    seed=args.seed, slots=args.slots,
                    max_message_bytes=args.max_message_bytes,
                    stats_interval=args.stats_interval, idle_timeout=args.idle_timeout,
                    any_origin=args.any_origin, allow_hosts=args.allow_host)
  except ValueError as e:
    print(f"{tag} error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  codec, cfg = system.codec, system.cfg
  srv.slot_server.pool(d.cfg_scale != 1.0)  # the default sessions' slots, compiled now
  C.warm_decoder(codec.low_latency(cfg.chunk), cfg.chunk)  # the sessions' decoder
  print(f"{tag} model ready in {time.perf_counter() - t0:.1f} s: {codec.sample_rate} Hz, blocks "
        f"of {srv.block_samples / srv.sr:.3f} s", flush=True)
  try:
    asyncio.run(serve(srv, args.host, args.port))
  except OSError as e:
    print(f"{tag} error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
    return 2
  finally:
    srv.pool.shutdown(wait=False, cancel_futures=True)
    srv.slot_server.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
