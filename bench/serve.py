"""How many concurrent sessions one process serves in real time with batched slots
(``lmdm_jax.serving``): for N = 1, 2, 3, 4, 6, 8, ... sessions in N slots, every block of every
session is made by one batched step per block, on a simulated clock.

Simulated clock: tick j (every session's next block) is due to start at j B (B = one block of
audio) and starts at max(j B, the end of tick j - 1); it takes the measured wall time of its
work; a block finished after (j + 1) B is an under-run (the jam session's deadline: its block k
starts at (k + d - 1) B and is due at (k + d) B). N is real time when no block of any session
under-runs over ``--seconds`` of simulated clock. The clock never waits, so a run takes the
compute time, not the simulated time.

Modes:
- ``jam`` (default when the model can jam: the bundled model): N ``JamSession``s in a
  ``SlotServer`` (delay 2 blocks, each its own prompt, seed and partner, a sine melody): a tick
  is every session's partner encode + the batched step + every session's stream decode;
- ``text``: N text streams of the DiT alone (``SlotStreams``, no codec): a tick is the batched
  step; with ``--config`` (e.g. ``saos`` on a GPU) the model has random weights and random
  conditioning tokens.

``--shared-pool`` (text mode): one pool of ``--max-sessions`` slots serves every count, its
programs compiled once (as a server's; a count runs at the narrowest compiled width, a power of
two, that holds it), instead of a pool of exactly N slots compiled per count (at ``saos`` scale
on a GPU the compiles would take most of the run).

The first tick of each count is a warm-up (each program's first call at that width) and is
not counted. Prints a table and, last, ``real-time sessions: N`` (0 when even one session is not).

  python3 bench/serve.py                                  # the bundled model, 60 s per N
  python3 bench/serve.py --seconds 10 --max-sessions 8    # quick
  python3 bench/serve.py --config saos --mode text --steps 8 --cfg-scale 3 --dtype bfloat16 \\
      --max-sessions 256                                  # SAO scale, on a GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PROMPTS = ("String quartet playing a lively piece. G major, 4/4 time, 120 BPM.",
           "Solo piano, calm and slow.", "Jazz trio with upright bass and brushes.",
           "Electronic beat with a warm synth pad.", "Acoustic guitar folk song.")


def simulate(tick_seconds, block_seconds: float) -> tuple[int, float]:
  """-> (late ticks, worst lateness s) of ticks of these durations on the simulated clock."""
  end, late, worst = 0.0, 0, 0.0
  for j, c in enumerate(tick_seconds):
    end = max(j * block_seconds, end) + c
    over = end - (j + 1) * block_seconds
    worst = max(worst, over)
    late += over > 0
  return late, worst


def partner(sr: int, seconds: float, i: int) -> np.ndarray:
  t = np.arange(int(seconds * sr)) / sr
  notes = np.array([262.0, 330.0, 392.0, 523.0]) * (1 + 0.1 * i)
  f = notes[(t * 4).astype(int) % 4]
  return (0.3 * np.sin(2 * np.pi * np.cumsum(f) / sr)).astype(np.float32)[None]


def run_jams(system, n: int, args, lone: bool = False):
  """N jam sessions in one SlotServer (``lone``: one session on its own ``sampling.Stream``, the
  unbatched reference): the wall time of every tick (encode, step, decode) and of its step."""
  from lmdm_jax.serving import SlotServer
  srv = None if lone else SlotServer(system, n)
  if srv is not None:
    srv.pool(args.cfg_scale != 1.0).step(active=np.zeros(n, bool))  # first-call warm-up
  sessions = [system.jam(PROMPTS[i % len(PROMPTS)], server=srv, delay_blocks=2, seed=i,
                         steps=args.steps, cfg_scale=args.cfg_scale) for i in range(n)]
  sr = system.codec.sample_rate
  for i, s in enumerate(sessions):
    s.render_begin(partner(sr, args.seconds, i))
  ticks, steps = [], []
  while any(s.render_pending() for s in sessions):
    t0 = time.perf_counter()
    due = [s for s in sessions if s.render_pending()]
    items = [(s.stream, s.render_input()) for s in due]
    t1 = time.perf_counter()
    if srv is None:
      blocks = [np.asarray(st.next_block(extra))[0] for st, extra in items]
    else:
      blocks = srv.step(items)
    steps.append(time.perf_counter() - t1)
    for s, blk in zip(due, blocks):
      s.render_output(blk, 0.0)
    ticks.append(time.perf_counter() - t0)
  for s in sessions:
    s.close()
  # the first tick makes each program's and decoder's first call at this width (a warm-up a
  # live server pays once, at a session's set-up or join): steady state is the rest
  return ticks[1:], steps[1:]


def run_texts(model, cross_len: int, n: int, args, block_seconds: float, pool=None):
  """N text streams of the DiT in one SlotStreams: the wall time of every batched step. ``pool``:
  a SlotStreams of at least N slots to serve them in (sessions join slots 0..N-1, the rest stay
  inactive, and leave at the end; the step runs its narrowest compiled width that holds N);
  None: a pool of exactly N slots, built (and compiled) for this count."""
  import jax
  from lmdm_jax import sampling as S
  from lmdm_jax.serving import SlotStreams
  if pool is None:
    pool = SlotStreams(model, n, cfg_guidance=args.cfg_scale != 1.0, cross_len=cross_len)
  active = np.arange(pool.slots) < n
  cfg = model.cfg
  sp = S.SamplerParams.make(args.steps, args.cfg_scale, False, True)
  for i in range(n):
    key = jax.random.key(100 + i)
    cond = jax.random.normal(key, (1, cross_len, cfg.cond_token_dim))
    glob = jax.random.normal(key, (1, cfg.global_cond_dim)) if cfg.global_cond_dim else None
    pool.join(i, cond, glob, seed=i, sampler=sp)
  pool.step(active=active)  # warm-up (and each slot's start context)
  ticks = []
  for _ in range(int(np.ceil(args.seconds / block_seconds))):
    t0 = time.perf_counter()
    pool.step(active=active)
    ticks.append(time.perf_counter() - t0)
  for i in range(n):
    pool.leave(i)
  return ticks, ticks


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--checkpoint", default=None, help="model source (default: the bundled model)")
  ap.add_argument("--config", default=None,
                  help="a config for RANDOM weights (e.g. saos), text mode (default: none)")
  ap.add_argument("--mode", choices=("jam", "text"), default=None,
                  help="jam sessions or text streams (default: jam when the model can jam)")
  ap.add_argument("--seconds", type=float, default=60.0,
                  help="simulated seconds per session count (default: 60)")
  ap.add_argument("--max-sessions", type=int, default=64,
                  help="largest session count tried (default: 64)")
  ap.add_argument("--steps", type=int, default=None, help="steps (default: the model's)")
  ap.add_argument("--cfg-scale", type=float, default=None,
                  help="CFG scale; 1 = no guidance (default: the model's)")
  ap.add_argument("--dtype", default=None, help="compute dtype with --config (e.g. bfloat16)")
  ap.add_argument("--blas-threads", type=int, default=1,
                  help="threads per NumPy BLAS call, as the jam server sets them (the codec's "
                  "encoder: small matrices; more threads only contend); 0 = leave as is "
                  "(default: 1)")
  ap.add_argument("--shared-pool", action="store_true",
                  help="text mode: one SlotStreams of --max-sessions slots serves every count "
                  "(sessions join and leave; its programs compile once, as a server's, and a "
                  "count runs at the narrowest compiled width, a power of two, that holds it) "
                  "instead of a pool of exactly N slots compiled per count (default: per count)")
  ap.add_argument("--keep-going", action="store_true",
                  help="try every count up to --max-sessions, not stopping at the first that "
                  "is not real time (default: stop)")
  args = ap.parse_args(argv)
  if not args.seconds > 0 or args.max_sessions < 1:
    print("error: --seconds must be > 0 and --max-sessions >= 1", file=sys.stderr)
    return 2
  if args.blas_threads > 0:
    try:
      import threadpoolctl
      threadpoolctl.threadpool_limits(limits=args.blas_threads, user_api="blas")
    except ImportError:
      pass
  import jax

  from lmdm_jax import compile_cache
  compile_cache.enable()
  log = lambda m: print(f"[serve] {m}", flush=True)  # noqa: E731
  if args.config is not None and args.checkpoint is None:
    from flax import nnx

    from lmdm_jax.config import DiTConfig, load_cli_config
    from lmdm_jax.nn.dit import DiT
    from lmdm_jax.system import SAO_FRAME_RATE, SamplerDefaults
    conf = load_cli_config(args.config)
    cfg = DiTConfig.from_config(conf.model)
    if args.dtype:
      cfg = dataclasses.replace(cfg, dtype=args.dtype, param_dtype=args.dtype)
    model, system = DiT(cfg, rngs=nnx.Rngs(0)), None
    d = SamplerDefaults.from_config(conf.sampler)
    steps = d.steps if args.steps is None else args.steps
    cfg_scale = d.cfg_scale if args.cfg_scale is None else args.cfg_scale
    block_seconds, name = cfg.chunk / SAO_FRAME_RATE, f"{args.config} (random weights)"
    cross_len = int(conf.get("conditioner", {}).get("max_tokens", 64))
    if args.mode == "jam":
      print("error: --config builds a DiT alone: use --mode text", file=sys.stderr)
      return 2
    mode = "text"
  else:
    from lmdm_jax.system import load_system
    try:
      system = load_system(args.checkpoint, config=args.config, log=log)
      d = system.sampler_settings(steps=args.steps, cfg_scale=args.cfg_scale)
    except ValueError as e:
      print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
      return 2
    model, cross_len, name = system.model, system.cross_len, system.name
    block_seconds = system.block_seconds
    steps, cfg_scale = d.steps, d.cfg_scale
    can_jam = system.codec is not None and system.cfg.extra_dim >= 1 + system.codec.latent_dim
    mode = args.mode or ("jam" if can_jam else "text")
    if mode == "jam" and not can_jam:
      print("error: this model cannot jam (no codec or no accompaniment channels): --mode text",
            file=sys.stderr)
      return 2
  args.steps, args.cfg_scale = steps, cfg_scale
  dev = jax.devices()[0]
  log(f"{name} on {dev.platform} ({dev.device_kind}): {mode} sessions, {steps} steps, CFG "
      f"{cfg_scale:g}, blocks of {1000 * block_seconds:.0f} ms, {args.seconds:g} s simulated "
      f"per count")
  if args.shared_pool and mode != "text":
    print("error: --shared-pool is for --mode text (jam sessions use the jam server's pool)",
          file=sys.stderr)
    return 2
  best = 0
  counts = [c for c in COUNTS if c <= args.max_sessions]
  pool = None
  if args.shared_pool:
    from lmdm_jax.serving import SlotStreams
    t0 = time.perf_counter()
    pool = SlotStreams(model, max(counts), cfg_guidance=args.cfg_scale != 1.0,
                       cross_len=cross_len)
    log(f"shared pool: {pool.slots} slots, widths {pool.widths}, {pool.compiles} programs "
        f"compiled in {time.perf_counter() - t0:.1f} s")
  print("| sessions | ticks | ms per tick (mean) | p90 | max | of it the step | x real time | "
        "late ticks | worst late ms | real time |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
  for n in (["1 alone"] if mode == "jam" else []) + counts:
    if n == "1 alone":  # the reference: one session on its own stream, no slots
      ticks, steps = run_jams(system, 1, args, lone=True)
    elif mode == "jam":
      ticks, steps = run_jams(system, n, args)
    else:
      ticks, steps = run_texts(model, cross_len, n, args, block_seconds, pool)
    late, worst = simulate(ticks, block_seconds)
    t = np.asarray(ticks)
    ok = late == 0
    print(f"| {n} | {len(t)} | {1000 * t.mean():.1f} | {1000 * np.percentile(t, 90):.1f} | "
          f"{1000 * t.max():.1f} | {1000 * np.mean(steps):.1f} | {block_seconds / t.mean():.2f} | "
          f"{late} | {1000 * max(worst, 0.0):.0f} | {'yes' if ok else 'no'} |", flush=True)
    if isinstance(n, str):
      continue
    if ok:
      best = max(best, n)
    elif not args.keep_going:
      break
  print(f"real-time sessions: {best}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
