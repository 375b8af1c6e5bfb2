"""Time to first audio of the bundled model, cold and warm: what `lmdm sample` / `sample.py` does
before the first decoded samples, each phase timed, in fresh processes side by side.

  python3 bench/startup.py [--warm-runs 2] [--config CONFIG --checkpoint PATH]

- cold: an empty compilation cache (every program compiles);
- warm: a second process (and more with --warm-runs) with the cache the cold run filled;
- off:  the cache turned off (LMDM_NO_COMPILE_CACHE=1), for comparison (--no-off to skip).

Each run is a child process doing what `python3 sample.py` does up to its first audio:
``load_system()`` (the bundled model, its MiniLM text encoder and codec), ``system.stream()``
(the prompt encoded, the block program and the prompt program compiled: with the cache warm,
loaded from the exported programs and the persistent compilation cache) and blocks until the
first one with audio (the decoder holds back its look-ahead: with the bundled model the second
block is the first with audio). The table gives, per phase, wall seconds and the child's CPU
seconds (all threads); the indented phases are parts of the one above them (timed by wrapping
the functions that do them). On a machine shared with other work the wall times grow with the
load; CPU seconds much less so. The cache lives in a temporary folder (the user cache is not
touched).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (key, label): the phases in the order they run; the nested ones (indented labels) are parts of
# the one above them, timed by wrapping the functions that do them
PHASES = [("start", "python up"), ("numpy", "import numpy"), ("jax", "import jax"),
          ("flax", "import flax"), ("lmdm", "import lmdm_jax"), ("system", "load_system()"),
          ("model", "  model (bundle)"), ("text", "  text encoder"), ("codec", "  codec"),
          ("stream", "system.stream()"), ("prompt", "  prompt encode"),
          ("block_program", "  block program"), ("prompt_program", "  prompt program"),
          ("block1", "1st block"), ("first_audio", "to 1st audio")]
NESTED = {"model", "text", "codec", "prompt", "block_program", "prompt_program"}


def child(args) -> None:
  """One start-up, timed; prints one JSON line: phase -> (wall, CPU) seconds, "total" -> wall
  seconds from the parent's spawn to the first audio."""
  out = {"start": (time.time() - args.t0, time.process_time())}
  last = [time.perf_counter(), time.process_time()]

  def mark(name):
    t, c = time.perf_counter(), time.process_time()
    out[name] = (t - last[0], c - last[1])
    last[:] = [t, c]

  def timed(module, attr, name):
    fn = getattr(module, attr)

    def wrapper(*a, **kw):
      t, c = time.perf_counter(), time.process_time()
      try:
        return fn(*a, **kw)
      finally:
        w, u = out.get(name, (0.0, 0.0))
        out[name] = (w + time.perf_counter() - t, u + time.process_time() - c)
    setattr(module, attr, wrapper)

  import numpy  # noqa: F401
  mark("numpy")
  import jax  # noqa: F401
  mark("jax")
  import lmdm_jax  # noqa: F401 - its import hook must be in place before flax
  from flax import nnx  # noqa: F401
  mark("flax")
  from lmdm_jax import checkpoint_io, compile_cache, sources
  from lmdm_jax.system import DEFAULT_PROMPT, System, load_system
  cache = compile_cache.enable()
  mark("lmdm")
  timed(checkpoint_io, "load_model", "model")
  timed(sources, "text_encoder", "text")
  timed(sources, "codec_for", "codec")
  timed(System, "condition", "prompt")
  programs = compile_cache.compile_program

  def compile_program(name, *a, **kw):
    t, c = time.perf_counter(), time.process_time()
    try:
      return programs(name, *a, **kw)
    finally:
      out[f"{name}_program"] = (time.perf_counter() - t, time.process_time() - c)
  compile_cache.compile_program = compile_program
  system = load_system(args.checkpoint, config=args.config, log=lambda *_: None)
  if system.codec is None:
    raise SystemExit("startup: the model has no codec here: nothing to time")
  mark("system")
  stream = system.stream(DEFAULT_PROMPT, seed=0)  # prompt encoded, block program compiled
  mark("stream")
  audio = stream.next_block()
  mark("block1")
  while audio.shape[-1] == 0:
    audio = stream.next_block()
  mark("first_audio")
  out["total"] = time.time() - args.t0
  out["cache"] = cache
  out["programs"] = dict(compile_cache.COMPILES)
  out["fused"] = stream.fused is not None
  print("STARTUP " + json.dumps(out), flush=True)


def run_child(label: str, env: dict, args) -> dict:
  t0 = time.time()
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--t0", repr(t0)]
  if args.config:
    cmd += ["--config", args.config]
  if args.checkpoint:
    cmd += ["--checkpoint", args.checkpoint]
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  line = [ln for ln in r.stdout.splitlines() if ln.startswith("STARTUP ")]
  if r.returncode or not line:
    raise SystemExit(f"startup: the {label} run failed ({r.returncode}):\n{r.stdout}\n"
                     f"{r.stderr[-3000:]}")
  rec = json.loads(line[-1][len("STARTUP "):])
  rec["label"] = label
  print(f"[startup] {label}: first audio after {rec['total']:.2f} s", file=sys.stderr,
        flush=True)
  return rec


def load_average() -> str:
  try:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    return "?"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default=None, help="as sample.py (default: demo + the bundled model)")
  ap.add_argument("--checkpoint", default=None, help="as sample.py (default: the bundled model)")
  ap.add_argument("--warm-runs", type=int, default=2, help="warm processes after the cold one")
  ap.add_argument("--no-off", action="store_true", help="skip the run with the cache turned off")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    return child(args)
  cache = tempfile.mkdtemp(prefix="lmdm_startup_cache_")
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # the checkout
  env = dict(os.environ, LMDM_COMPILE_CACHE=cache, PYTHONUNBUFFERED="1", PYTHONPATH=path)
  env.pop("LMDM_NO_COMPILE_CACHE", None)
  loads = [load_average()]
  try:
    runs = [run_child("cold", env, args)]
    for i in range(args.warm_runs):
      runs.append(run_child(f"warm {i + 1}" if args.warm_runs > 1 else "warm", env, args))
    loads.append(load_average())
    n_files = sum(len(f) for _, _, f in os.walk(cache))
    size = sum(os.path.getsize(os.path.join(d, x)) for d, _, f in os.walk(cache) for x in f)
    if not args.no_off:
      runs.append(run_child("cache off", dict(env, LMDM_NO_COMPILE_CACHE="1"), args))
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  loads.append(load_average())
  print(f"time to first audio, {args.checkpoint or 'bundled model'}; {os.cpu_count()} CPUs, load "
        f"average (1/5/15 min) {' -> '.join(loads)}; cache {n_files} files, {size / 2**20:.1f} MiB")
  print("per phase: wall seconds (CPU seconds of the child, all threads); indented phases are "
        "parts of the one above\n")
  head = f"{'phase':<20}" + "".join(f"{r['label']:>16}" for r in runs)
  print(head)
  print("-" * len(head))
  for key, name in PHASES:
    cells = []
    for r in runs:
      w, c = r.get(key, (0.0, 0.0))
      cells.append(f"{w:.2f} ({c:.2f})" if key != "start" else f"{w:.2f}")
    print(f"{name:<20}" + "".join(f"{x:>16}" for x in cells))
  print("-" * len(head))
  print(f"{'first audio (wall)':<20}" + "".join(f"{r['total']:>16.2f}" for r in runs))
  print(f"{'CPU to 1st audio':<20}" + "".join(
      f"{sum(r[k][1] for k, _ in PHASES if k not in NESTED):>16.2f}"
      for r in runs))
  print(f"{'programs':<20}" + "".join(
      f"{'%d traced %d exp' % (r['programs']['traced'], r['programs']['exported']):>16}"
      for r in runs))


if __name__ == "__main__":
  main()
