"""Per-block latency of the streaming regimes: naive window recompute vs enc-dec vs block-causal.

Prints a markdown table: ms per block (median), real-time factor (block duration / latency; the
latent rate is SAO's 21.53 frames/s), token-passes and FLOPs per block from the model shapes,
achieved GFLOP/s and its share of a matmul peak measured in the same run, and the speed-up of
each regime over the naive baseline measured side by side.

  python3 bench/streaming.py                       # tiny: 6 and 8 steps, with/without CFG
  python3 bench/streaming.py --config saos --steps 8 --cfg on --batch 1,4 --reps 3
  python3 bench/streaming.py --config saos --dtype bfloat16     # on an accelerator

Per block, the DiT alone and end to end with the decode (``--modes``: the rows of issue 17):
``cfg8`` is 8 steps with CFG (scale 3), ``arc4`` the ARC-Forcing setting (4 steps, no CFG);
each at every ``--batch`` and ``--dtypes``, block_causal. The DiT column runs ``sampling.Stream``
(the block program without a decoder); the end-to-end column runs the System's stream at batch 1
(``System.stream``: the block program with the codec's decode inside when the codec has a block
decoder, else the host stream decoder) and the block program with the decoder at larger
batches. x real time is per stream (block seconds / seconds per block); "streams x RT" is
batch x that. % peak: the DiT's FLOPs per second against a matmul of the same dtype (measured
in the run, on random data). ``--loops fori,unroll`` adds rows of the DiT with the step loop
unrolled (``UnrolledStream``: a fixed step count, no ``while`` in the program) beside the
``fori_loop`` over the runtime step count that ``sampling.Stream`` runs. ``scripts/gpu_bench.sh``
runs every GPU row in one call (docs/STREAMING.md).

  python3 bench/streaming.py --config demo --modes cfg8,arc4 --batch 1 --dtypes float32
  python3 bench/streaming.py --config saos --modes cfg8,arc4 --batch 1,8 \
      --dtypes float32,bfloat16 --codec oobleck-random          # every row: a GPU
  python3 bench/streaming.py --config saos --steps 4 --cfg off --regimes block_causal \
      --quantize none,int8     # fp32 and dynamic-int8 weights side by side, interleaved
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lmdm_jax import quantize as Q  # noqa: E402
from lmdm_jax import sampling as S  # noqa: E402
from lmdm_jax.config import DiTConfig, load_cli_config  # noqa: E402
from lmdm_jax.nn.dit import DiT  # noqa: E402

FRAME_RATE = 44100 / 2048  # SAO latent frames per second (a config's `codec` overrides it)
CROSS_LEN = 65
REGIMES = ("naive", "enc_dec", "block_causal")


def passes(cfg: DiTConfig, regime: str, steps: int):
  """[(query tokens, key tokens)] of every transformer pass in one block (steady state)."""
  cs, K, W = cfg.chunk, cfg.context_chunks, cfg.window_chunks
  if regime == "naive":
    n = (W + 1) * cs + 1
    return [(n, n)] * steps
  if regime == "enc_dec":
    return [(W * cs, W * cs)] + [(cs + 1, W * cs + cs + 1)] * steps
  fused = (2 * cs + 1, K * cs + 2 * cs + 1)
  return [fused] + [(cs + 1, K * cs + cs + 1)] * (steps - 1)


def flops_per_block(cfg: DiTConfig, regime: str, steps: int, batch: int, cfg_on: bool) -> float:
  d, L = cfg.embed_dim, cfg.depth
  per_tok_matmul = L * (3 * d * d + d * d + d * d + d * d + 3 * d * cfg.ff_mult * d)
  per_tok_io = cfg.io_channels * d * 2 + cfg.input_add_dim * d
  total = 0.0
  for nq, nk in passes(cfg, regime, steps):
    total += 2 * nq * (per_tok_matmul + per_tok_io)
    total += L * 4 * nq * nk * d  # QK^T and PV
    total += L * 4 * nq * CROSS_LEN * d  # cross-attention
  return total * batch * (2 if cfg_on else 1)


def matmul_peak(dtype, n: int | None = None) -> float:
  """GFLOP/s of a large (n x n, default 2048 on CPU, 8192 on an accelerator) square matmul of
  ``dtype`` on the default device, on random data (never
  zeros): the median of 5 timings, each of ``inner`` products dispatched back to back and
  synchronized once (on a GPU one 8192^3 product is about a millisecond, so one host round trip
  per product would be in the number). float32 runs at the backend's default matmul precision,
  as the model's float32 matmuls do (TF32 on NVIDIA GPUs since Ampere)."""
  cpu = jax.default_backend() == "cpu"
  n, inner = (n or 2048, 1) if cpu else (n or 8192, 10)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  ts = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = f(a, b)
    out.block_until_ready()
    ts.append((time.perf_counter() - t0) / inner)
  return 2 * n ** 3 / np.median(ts) / 1e9


def make_stream(model, regime, steps, cfg_on, batch, warm=1):
  sp = S.SamplerParams.make(steps=steps, cfg_scale=3.0 if cfg_on else 1.0)
  s = S.Stream(model, batch=batch, regime=regime, cfg_guidance=cfg_on, cross_len=CROSS_LEN,
               sampler=sp)
  cfg = model.cfg
  s.set_prompt(jnp.ones((batch, CROSS_LEN, cfg.cond_token_dim)) * 0.1,
               jnp.ones((batch, cfg.global_cond_dim)) * 0.1)
  for _ in range(warm + 1):  # the first block has no pending commit: not steady state
    s.next_block().block_until_ready()
  return s


def time_interleaved(streams: dict, reps: int) -> dict:
  """Median seconds per block of each stream, timed round-robin (one block of each per round) so
  that load from other processes hits every regime alike."""
  ts = {k: [] for k in streams}
  for _ in range(reps):
    for k, s in streams.items():
      t0 = time.perf_counter()
      s.next_block().block_until_ready()
      ts[k].append(time.perf_counter() - t0)
  return {k: float(np.median(v)) for k, v in ts.items()}


MODES = {"cfg8": (8, True), "arc4": (4, False)}  # steps, CFG
LOOPS = ("fori", "unroll")


class UnrolledStream:
  """The DiT's block program (commit fused into step 0, every denoising step; no decoder) with
  the step count a Python int, so that ``sampling._denoise`` unrolls the step loop into one
  straight program (no ``while``: XLA's default command buffers can capture all of it), where
  ``sampling.Stream`` runs steps 1.. in a ``fori_loop`` over the runtime step count. It is
  ``cached_step(..., stop=steps)``: the same schedule and numbers (entries past ``steps`` are
  already 0). ``next_block()`` as ``Stream``'s; the first block is a fresh stream's."""

  def __init__(self, model, steps: int, cfg_on: bool, batch: int):
    gd, self.params = nnx.split(model)
    self.tables = S.rope_window_tables(model)
    self.sampler = S.SamplerParams.make(steps=steps, cfg_scale=3.0 if cfg_on else 1.0)
    cfg = model.cfg
    state = S.init_state(cfg, "block_causal", batch, cfg_on, CROSS_LEN)
    cond = jnp.ones((batch, CROSS_LEN, cfg.cond_token_dim)) * 0.1
    glob = jnp.ones((batch, cfg.global_cond_dim)) * 0.1 if cfg.global_cond_dim else None
    self.state = jax.jit(lambda p, st, c, g: S.set_prompt(nnx.merge(gd, p), st, c, g))(
        self.params, state, cond, glob)
    self._extra = jnp.zeros((batch, cfg.chunk, cfg.extra_dim), jnp.float32)

    def program(params, tables, state, extra, sp):
      m = nnx.merge(gd, params)
      blk, state, _ = S.cached_step(m, tables, S.start_stream(m, tables, state), extra, sp,
                                    stop=steps)
      return blk, state

    self._program = jax.jit(program, donate_argnums=(2,))

  def next_block(self):
    blk, self.state = self._program(self.params, self.tables, self.state, self._extra,
                                    self.sampler)
    return blk


def bench_codec(name: str, conf, latent_dim: int):
  """The codec the end-to-end column decodes with: the config's ('config'), none ('none'),
  Stable Audio Open's VAE with random weights ('oobleck-random', for timing; 64-dim latents:
  ``saos``), or a small random Oobleck VAE with ``latent_dim`` latents ('oobleck-tiny': the
  same decode path at a size for CPU smoke runs of the plumbing)."""
  if name == "none":
    return None
  if name in ("oobleck-random", "oobleck-tiny"):
    import copy

    from lmdm_jax.codecs.oobleck import OobleckCodec
    from lmdm_jax.nn.oobleck import STABLE_AUDIO_OPEN_VAE, OobleckVAE, VAEConfig
    pre = copy.deepcopy(STABLE_AUDIO_OPEN_VAE)
    if name == "oobleck-tiny":
      ae = pre["config"]
      for part, lat in (("encoder", 2 * latent_dim), ("decoder", latent_dim)):
        ae[part]["config"].update(channels=8, c_mults=[1, 2], strides=[2, 2], latent_dim=lat)
      ae.update(latent_dim=latent_dim, downsampling_ratio=4)
    vae_cfg = VAEConfig.from_pretransform(pre)
    if vae_cfg.latent_dim != latent_dim:
      raise SystemExit(f"streaming: --codec {name} decodes {vae_cfg.latent_dim}-dim latents; "
                       f"this model's are {latent_dim}-dim (use --codec oobleck-tiny or none)")
    return OobleckCodec(OobleckVAE(vae_cfg, nnx.Rngs(0)))
  if name != "config":
    raise SystemExit(f"streaming: --codec {name!r}: choose config, none, oobleck-random or "
                     "oobleck-tiny")
  if not conf.get("codec"):
    return None
  from lmdm_jax.codecs import get_codec
  return get_codec(conf.codec)


def time_blocks(step, reps: int, warm: int = 2) -> float:
  """Median seconds of ``step()`` (which must block until its result is ready)."""
  for _ in range(warm):
    step()
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    step()
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def per_block_rows(args, conf, cfg, codec) -> None:
  """The ``--modes`` table (see the module docstring)."""
  from lmdm_jax.system import System
  block_s = cfg.chunk / FRAME_RATE
  loops = args.loops.split(",")
  for lp in loops:
    if lp not in LOOPS:
      raise SystemExit(f"streaming: --loops {lp!r}: choose from {list(LOOPS)}")
  print(f"# per block: {cfg.chunk} frames = {block_s * 1000:.0f} ms of audio; codec "
        f"{type(codec).__name__ if codec is not None else 'none'}; median of {args.reps} blocks "
        f"after {args.warmup} warm-up blocks")
  print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  dtypes = args.dtypes.split(",")
  peaks = {dtype: matmul_peak(jnp.dtype(dtype), args.peak_n) for dtype in dtypes}
  for dtype, peak in peaks.items():
    print(f"# {dtype}: measured matmul peak {peak:,.0f} GFLOP/s")
  print("\n| mode | steps | CFG | batch | dtype | loop | DiT ms/block | DiT x RT | DiT % peak | "
        "e2e ms/block | e2e x RT | streams x RT (e2e) | fused decode |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
  for dtype in dtypes:
    c = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    model = DiT(c, rngs=nnx.Rngs(0))

    def cond(prompts, start, total, c=c):
      return (np.full((len(prompts), CROSS_LEN, c.cond_token_dim), 0.1, np.float32),
              np.full((len(prompts), c.global_cond_dim), 0.1, np.float32)
              if c.global_cond_dim else None)

    system = System(model, conditioner=cond, cross_len=CROSS_LEN, codec=codec)
    for mode in args.modes.split(","):
      if mode not in MODES:
        raise SystemExit(f"streaming: unknown mode {mode!r}; choose from {sorted(MODES)}")
      steps, cfg_on = MODES[mode]
      scale = 3.0 if cfg_on else 1.0
      for batch in [int(b) for b in args.batch.split(",")]:
        for lp in loops:
          print(_per_block_row(args, c, model, system, codec, cond, peaks[dtype], block_s, mode,
                               steps, cfg_on, scale, batch, dtype, lp), flush=True)


def _per_block_row(args, c, model, system, codec, cond, peak, block_s, mode, steps, cfg_on,
                   scale, batch, dtype, loop) -> str:
  """One row of the ``--modes`` table: the DiT alone (``loop``: its step loop) and, for the
  fori loop with a codec, end to end with the decode."""
  warm = args.warmup
  if loop == "unroll":
    dit = UnrolledStream(model, steps, cfg_on, batch)
    dit.next_block().block_until_ready()  # the fresh stream's first block (no pending commit)
  else:
    dit = make_stream(model, "block_causal", steps, cfg_on, batch, warm=0)
  sec = time_blocks(lambda: dit.next_block().block_until_ready(), args.reps, warm)
  dit = None  # its state freed before the end-to-end stream's
  fl = flops_per_block(c, "block_causal", steps, batch, cfg_on)
  e2e, fused = None, "-"
  if codec is not None and loop == "fori":
    if batch == 1:
      audio = system.stream("bench", steps=steps, cfg_scale=scale, seed=0)
      fused = "yes" if audio.fused is not None else "no (host decoder)"
      e2e = time_blocks(audio.next_block, args.reps, warm)
    else:
      dec = codec.block_decoder(c.chunk)
      if dec is not None:
        st = S.Stream(model, batch=batch, cfg_guidance=cfg_on, cross_len=CROSS_LEN,
                      sampler=S.SamplerParams.make(steps, scale), decoder=dec)
        st.set_prompt(*cond(["x"] * batch, 0, 0))
        e2e = time_blocks(lambda: jax.block_until_ready(st.step()), args.reps, warm)
        fused = "yes"
      else:
        st = make_stream(model, "block_causal", steps, cfg_on, batch, warm=0)
        decs = [codec.stream_decoder() for _ in range(batch)]

        def host_step():
          blk = np.asarray(st.next_block())
          for i, d in enumerate(decs):
            d.push(blk[i])
        e2e = time_blocks(host_step, args.reps, warm)
        fused = "no (host decoder)"
  gfs = fl / sec / 1e9
  cells = ([f"{e2e * 1000:.1f}", f"{block_s / e2e:.2f}", f"{batch * block_s / e2e:.2f}"]
           if e2e else ["-", "-", "-"])
  return (f"| {mode} | {steps} | {'on' if cfg_on else 'off'} | {batch} | {dtype} | {loop} | "
         f"{sec * 1000:.2f} | {block_s / sec:.2f} | {100 * gfs / peak:.1f}% | "
         + " | ".join(cells) + f" | {fused} |")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default="tiny")
  ap.add_argument("--steps", default="6,8")
  ap.add_argument("--cfg", default="off,on", help="classifier-free guidance: off,on")
  ap.add_argument("--batch", default="1")
  ap.add_argument("--regimes", default=",".join(REGIMES))
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--peak-n", type=int, default=None,
                  help="size of the square matmul the peak is measured with (default: 2048 on "
                  "CPU, 8192 on an accelerator; smaller only for smoke runs)")
  ap.add_argument("--warmup", type=int, default=2,
                  help="--modes: blocks run before timing, after the first (default: 2)")
  ap.add_argument("--loops", default="fori",
                  help="--modes: the DiT's step loop: fori (the runtime step count in a "
                  "fori_loop, as sampling.Stream), unroll (a fixed step count, unrolled: "
                  "UnrolledStream; DiT column only), or both: fori,unroll (default: fori)")
  ap.add_argument("--dtype", default=None, help="compute dtype override (e.g. bfloat16)")
  ap.add_argument("--modes", default=None,
                  help="per-block table instead: cfg8 (8 steps + CFG), arc4 (4 steps, no CFG)")
  ap.add_argument("--dtypes", default="float32", help="--modes: dtypes (float32,bfloat16)")
  ap.add_argument("--codec", default="config",
                  help="--modes: the end-to-end decode: config (the config's codec; default), "
                  "none, oobleck-random (SAO's VAE with random weights, for timing)")
  ap.add_argument("--quantize", default="none",
                  help="weight modes to compare, interleaved in one run: none,int8 "
                       "(lmdm_jax.quantize; the speed-up column is then vs none)")
  args = ap.parse_args(argv)

  conf = load_cli_config(args.config)
  cfg = DiTConfig.from_config(conf.model)
  global FRAME_RATE
  if conf.get("codec"):  # latent rate of the config's codec (SAO's 21.53 frames/s otherwise)
    from lmdm_jax.codecs import get_codec
    FRAME_RATE = get_codec(conf.codec).frame_rate
  if args.dtype:
    cfg = dataclasses.replace(cfg, dtype=args.dtype, param_dtype=args.dtype)
  dev = jax.devices()[0]
  print(f"# streaming benchmark: config {args.config} ({cfg.depth}x{cfg.embed_dim}, chunk "
        f"{cfg.chunk}, K={cfg.context_chunks}, window {cfg.window_chunks}), dtype "
        f"{args.dtypes if args.modes else cfg.dtype}, "
        f"device {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  if args.modes:
    from lmdm_jax import compile_cache
    compile_cache.enable()
    return per_block_rows(args, conf, cfg, bench_codec(args.codec, conf, cfg.io_channels))
  model = DiT(cfg, rngs=nnx.Rngs(0))
  quants = args.quantize.split(",")
  for q in quants:
    if q not in Q.QUANTIZE_MODES:
      ap.error(f"--quantize {q!r}: choose from {list(Q.QUANTIZE_MODES)}")
  models = {q: Q.quantize_model(model, q) for q in quants}
  peak = matmul_peak(jnp.dtype(cfg.dtype), args.peak_n)
  print(f"# measured matmul peak: {peak:.1f} GFLOP/s; block = {cfg.chunk} frames = "
        f"{cfg.chunk / FRAME_RATE * 1000:.0f} ms of audio at {FRAME_RATE:.2f} frames/s\n")
  vs = "naive" if len(quants) == 1 else quants[0]
  print("| regime | weights | steps | CFG | batch | token-passes | GFLOP/block | ms/block | RTF "
        f"| GFLOP/s | % peak | speed-up vs {vs} |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  block_s = cfg.chunk / FRAME_RATE
  for batch in [int(b) for b in args.batch.split(",")]:
    for steps in [int(s) for s in args.steps.split(",")]:
      for cfg_on in [c == "on" for c in args.cfg.split(",")]:
        regimes = args.regimes.split(",")
        keys = [(r, q) for r in regimes for q in quants]
        streams = {k: make_stream(models[k[1]], k[0], steps, cfg_on, batch) for k in keys}
        secs = time_interleaved(streams, args.reps)
        del streams
        for regime, q in keys:
          sec = secs[(regime, q)]
          base = secs.get(("naive", q)) if len(quants) == 1 else secs[(regime, quants[0])]
          fl = flops_per_block(cfg, regime, steps, batch, cfg_on)
          tok = sum(n for n, _ in passes(cfg, regime, steps))
          gfs = fl / sec / 1e9
          speed = f"{base / sec:.2f}x" if base else "-"
          print(f"| {regime} | {q if q != 'none' else cfg.param_dtype} | {steps} | "
                f"{'on' if cfg_on else 'off'} | {batch} | {tok} | {fl / 1e9:.2f} | "
                f"{sec * 1000:.1f} | {block_s / sec:.2f} | {gfs:.1f} | {100 * gfs / peak:.0f}% | "
                f"{speed} |", flush=True)


if __name__ == "__main__":
  main()
