"""Time to first audio of the bundled model, cold and warm: what `lmdm sample` / `sample.py` does
before the first decoded samples, each phase timed, in fresh processes side by side.

  python3 bench/startup.py [--warm-runs 2] [--config CONFIG --checkpoint PATH]

- cold: an empty compilation cache (every program compiles);
- warm: a second process (and more with --warm-runs) with the cache the cold run filled;
- off:  the cache turned off (LMDM_NO_COMPILE_CACHE=1), for comparison (--no-off to skip).

Each run is a child process doing sample's steps (default config -> bundled model, codec, MiniLM
text encoder, prompt encoding, the KV-cached stream and its block step, the decoder warm-up, the
first block decoded; "model" includes the default config's check that its codec and text encoder
load, so the text encoder is ready before its own phase). The tables give wall seconds from the
parent's spawn to the end of each phase, the seconds spent in each, and the child's CPU seconds
(all threads). On a machine shared with other work the wall times grow with the load; CPU
seconds much less so. The cache lives in a temporary folder (the user cache is not touched).
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
PHASES = [("start", "python up"), ("import", "imports"), ("system", "system load"),
          ("stream", "1st block"), ("decoder", "decoder"), ("first_audio", "1st audio")]


def child(args) -> None:
  """One start-up, timed; prints one JSON line: phase -> seconds since the parent's spawn."""
  marks = {"start": time.time() - args.t0}
  cpu = {"start": time.process_time()}

  def mark(name):
    marks[name] = time.time() - args.t0
    cpu[name] = time.process_time()

  import numpy as np

  from lmdm_jax import compile_cache
  from lmdm_jax.system import DEFAULT_PROMPT, load_system
  cache = compile_cache.enable()
  mark("import")
  system = load_system(args.checkpoint, config=args.config, log=lambda *_: None)
  if system.codec is None:
    raise SystemExit("startup: the model has no codec here: nothing to time")
  mark("system")  # model, codec, text encoder
  stream = system.stream(DEFAULT_PROMPT, seed=0)  # prompt encoded, block step compiled
  first = stream.next_latents()
  mark("stream")
  warm = system.codec.stream_decoder()  # compiles the decoder, as sample does before timing
  warm.push(np.zeros((4 * system.cfg.chunk, system.cfg.io_channels), np.float32))
  warm.flush()
  mark("decoder")
  audio = stream.decoder.push(first)
  while audio.shape[-1] == 0:
    audio = stream.next_block()
  mark("first_audio")
  marks["cpu"] = cpu
  marks["cache"] = cache
  print("STARTUP " + json.dumps(marks), flush=True)


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
  print(f"[startup] {label}: first audio after {rec['first_audio']:.2f} s", file=sys.stderr,
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
  print("wall seconds from spawn at the end of each phase; CPU = the child's CPU seconds\n")
  head = f"{'run':<10}" + "".join(f"{name:>13}" for _, name in PHASES) + f"{'CPU':>8}"
  print(head)
  print("-" * len(head))
  for r in runs:
    print(f"{r['label']:<10}" + "".join(f"{r[k]:>13.2f}" for k, _ in PHASES)
          + f"{r['cpu']['first_audio']:>8.1f}")
  print("\nper phase: wall seconds (CPU seconds)")
  print(head[:-8])
  for r in runs:
    prev, prev_cpu, row = 0.0, 0.0, []
    for k, _ in PHASES:
      row.append(f"{r[k] - prev:.2f} ({r['cpu'][k] - prev_cpu:.1f})")
      prev, prev_cpu = r[k], r["cpu"][k]
    print(f"{r['label']:<10}" + "".join(f"{x:>13}" for x in row))


if __name__ == "__main__":
  main()
