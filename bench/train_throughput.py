"""Training throughput: tokens/s and model FLOP utilisation (MFU) of stage 1 and ARC-Forcing.

For each config, compute dtype and kind it builds a random model (parameters and optimizer state
in float32, compute in the row's dtype: ``DiTConfig.dtype``), jits the real update step
(``Stage1.train_step``; ARC-Forcing's generator and discriminator steps ``g_step``/``d_step``),
compiles and warms it up on a fixed device-resident random batch, then times ``--steps`` steps.
One script for every backend: it runs on the default JAX device (CPU, GPU or TPU).

- tokens/s: latent frames of the batch per second, batch x frames per item (stage 1: the
  training sequence; ARC: K context chunks + the rollout's chunks).
- model FLOPs are counted analytically from the shapes (``stage1_flops``, ``arc_flops``), not by
  XLA: every matmul of the DiT (projections, LoRA factors, attention over the dense
  query x key rectangle that the masked attention computes, cross-attention, embeddings). Stage 1
  counts forward + backward as 3x the forward. ARC counts what the step needs: the rollout's
  forward passes for the step counts k actually drawn by that step's key, the gradient pass's
  backward without base-weight gradients (activations 1x, attention 2x, LoRA 2x), the
  discriminator's forward and (G step) its backward to the input. Rematerialized recomputation,
  elementwise work, the optimizer and the ConvNeXt head are not model FLOPs. For stage 1 the
  table also gives XLA's own count of the compiled step (``cost_analysis``: all HLO flops,
  elementwise and optimizer included) as a check on the analytic count.
- MFU: achieved model FLOP/s over the matmul peak of the row's dtype, measured right after the
  row's timed steps (``bench/streaming.py``'s ``matmul_peak``: a large square matmul), so that a
  shared machine's load hits both alike; ``--peak-tflops`` adds a column against a datasheet peak.

  python3 bench/train_throughput.py                               # CPU: tiny, demo, saos depth 2
  python3 bench/train_throughput.py --configs tiny --steps 2 --kinds stage1,arc
  python3 bench/train_throughput.py --configs saos,saos@8 --batch 16 --steps 10 \\
      --peak-tflops bfloat16=989,float32=67                        # an H100/H200
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

from bench.streaming import matmul_peak  # noqa: E402
from lmdm_jax import layouts  # noqa: E402
from lmdm_jax.config import DiTConfig, load_cli_config, load_config, registered_configs  # noqa: E402
from lmdm_jax.nn import adapters  # noqa: E402
from lmdm_jax.nn.discriminator import HeadConfig  # noqa: E402
from lmdm_jax.testing import random_model  # noqa: E402
from lmdm_jax.training.arc_forcing import ARCConfig, ARCForcing, make_head  # noqa: E402
from lmdm_jax.training.arc_run import sections  # noqa: E402
from lmdm_jax.training.stage1 import Stage1, Stage1Config  # noqa: E402

# ------------------------------------------------------------------------------ FLOP model


@dataclasses.dataclass
class Flops:
  """Forward FLOPs of a pass by kind: dense projections, attention (QK^T and PV), LoRA factors."""

  linear: float = 0.0
  attn: float = 0.0
  lora: float = 0.0

  def __add__(self, o):
    return Flops(self.linear + o.linear, self.attn + o.attn, self.lora + o.lora)

  def __mul__(self, s):
    return Flops(self.linear * s, self.attn * s, self.lora * s)

  __rmul__ = __mul__

  @property
  def total(self) -> float:
    return self.linear + self.attn + self.lora

  def frozen_backward(self) -> float:
    """Backward FLOPs when no weight gradients are needed (a frozen base under a LoRA adapter):
    input gradients of every projection (1x), attention's two matmuls per product (2x), the LoRA
    factors' input and weight gradients (2x)."""
    return self.linear + 2 * self.attn + 2 * self.lora


def _lora_dims(cfg: DiTConfig, ad) -> dict:
  """(din, dout) of each adaptable token projection of a block."""
  d, inner, cd = cfg.embed_dim, cfg.embed_dim * cfg.ff_mult, cfg.cross_dim
  dims = {"self_attn.to_qkv": (d, 3 * d), "self_attn.to_out": (d, d), "ff_in": (d, 2 * inner),
          "ff_out": (inner, d)}
  if cfg.cond_token_dim:
    dims.update({"cross_attn.to_q": (d, d), "cross_attn.to_out": (d, d)})
  return {k: v for k, v in dims.items() if ad is not None and k in ad.projections}


def _adapted_layers(cfg: DiTConfig, ad, depth: int) -> int:
  if ad is None:
    return 0
  layers = range(cfg.depth) if ad.layers is None else ad.layers
  return sum(1 for i in layers if i < depth)


def pass_flops(cfg: DiTConfig, nq: int, nk: int, cross_len: int, depth: int | None = None,
               ad=None) -> Flops:
  """Forward FLOPs of ``DiT.forward_tokens`` for one item: ``nq`` fresh tokens attending to
  ``nk`` keys (dense), ``depth`` blocks (default all), with the adapter ``ad`` (an AdapterConfig)."""
  L = cfg.depth if depth is None else depth
  d, inner = cfg.embed_dim, cfg.embed_dim * cfg.ff_mult
  per_tok = 3 * d * d + d * d + 2 * d * inner + inner * d  # qkv, out, SwiGLU in/out
  attn = 4 * nq * nk * d  # QK^T and PV
  if cfg.cond_token_dim:
    per_tok += 2 * d * d  # cross-attention q and out
    attn += 4 * nq * cross_len * d
  lora_tok = sum(ad.rank * (a + b) for a, b in _lora_dims(cfg, ad).values()) if ad else 0
  return Flops(linear=2 * nq * per_tok * L, attn=attn * L,
               lora=2 * nq * lora_tok * _adapted_layers(cfg, ad, L))


def cross_flops(cfg: DiTConfig, cross_len: int, ad=None) -> Flops:
  """``DiT.cross_kv`` for one item: the conditioning MLP and every block's K/V projection."""
  if not cfg.cond_token_dim:
    return Flops()
  cd = cfg.cross_dim
  lin = 2 * cross_len * (cfg.cond_token_dim * cd + cd * cd + cfg.depth * cd * 2 * cd)
  lora = 0
  if ad is not None and "cross_attn.to_kv" in ad.projections:
    lora = 2 * cross_len * ad.rank * 3 * cd * _adapted_layers(cfg, ad, cfg.depth)
  return Flops(linear=lin, lora=lora)


def embed_flops(cfg: DiTConfig, clean: int = 0, noisy: int = 0, glob: int = 0,
                out: int = 0) -> Flops:
  """Token embeddings of ``clean``/``noisy`` frames, ``glob`` global tokens (timestep MLP) and
  the velocity projection of ``out`` frames."""
  c, d, ia = cfg.io_channels, cfg.embed_dim, cfg.input_add_dim
  return Flops(linear=2 * (clean * ia * d + noisy * (c * c + c * d + ia * d)
                           + glob * (cfg.timestep_features_dim * d + d * d) + out * (d * c + c * c)))


def stage1_flops(cfg: DiTConfig, chunks: int, batch: int, cross_len: int) -> float:
  """Model FLOPs of one stage-1 update: 3x the forward of the teacher-forcing sequence."""
  cs = cfg.chunk
  n_tok = chunks * cs + chunks * (cs + 1)
  fwd = (pass_flops(cfg, n_tok, n_tok, cross_len) + cross_flops(cfg, cross_len)
         + embed_flops(cfg, clean=chunks * cs, noisy=chunks * cs, glob=chunks, out=chunks * cs))
  return 3 * fwd.total * batch


def arc_flops(tr: ARCForcing, ad, ks, batch: int, cross_len: int, phase: str) -> float:
  """Model FLOPs of one ARC-Forcing update (``phase`` "g" or "d") whose rollout draws the step
  counts ``ks`` (one per block); see the module docstring for what is counted."""
  cfg, ac, dc = tr.cfg, tr.ac, tr.disc_cfg
  cs, K = cfg.chunk, cfg.context_chunks
  ring = K * cs
  n0 = max(layouts.start_chunks(cfg) - K, 0) + K  # chunks primed into the ring
  roll = (pass_flops(cfg, n0 * cs, n0 * cs, cross_len, ad=ad) + embed_flops(cfg, clean=n0 * cs)
          + cross_flops(cfg, cross_len, ad))
  fused = (pass_flops(cfg, 2 * cs + 1, ring + 2 * cs + 1, cross_len, ad=ad)
           + embed_flops(cfg, clean=cs, noisy=cs, glob=1, out=cs))
  step = (pass_flops(cfg, cs + 1, ring + cs + 1, cross_len, ad=ad)
          + embed_flops(cfg, noisy=cs, glob=1, out=cs))
  total = 0.0
  for k in np.asarray(ks).tolist():
    roll = roll + fused + step * (max(k - 2, 0) + 1)  # fused step 0, steps 1..k-2, the last step
    if phase == "g":
      total += step.frozen_backward()  # the gradient step's backward
  total = (total + roll.total) * batch
  T = tr.frames + 1  # the discriminator's sequence: frames + the global token
  disc = (pass_flops(dc, T, T, cross_len, depth=ac.disc_exit_layer + 1)
          + embed_flops(dc, noisy=tr.frames, glob=1))
  disc_fwd = disc.total + cross_flops(dc, cross_len).total
  if phase == "g":  # the prompt's cross K/V need no backward
    return total + 2 * batch * (disc_fwd + disc.frozen_backward())
  contrastive = batch > 1 and cfg.cond_token_dim > 0 and ac.w_contrastive != 0
  return total + (3 if contrastive else 2) * batch * disc_fwd


# ------------------------------------------------------------------------------- building


def parse_config(spec: str):
  """``name[@depth]`` -> (label, ml-collections config, DiTConfig): a registered config or a
  config file, with its depth optionally reduced."""
  name, _, depth = spec.partition("@")
  if depth and not depth.isdigit():
    raise ValueError(f"--configs {spec!r}: the depth after '@' must be a positive integer")
  conf = load_cli_config(name)
  cfg = DiTConfig.from_config(conf.model)
  if depth:
    cfg = dataclasses.replace(cfg, depth=int(depth))
  return spec, conf, cfg


def cross_len_of(conf) -> int:
  cond = conf.get("conditioner", None)
  return int(cond.max_tokens) if cond is not None and "max_tokens" in cond else 16


def arc_sections(name: str, cfg: DiTConfig):
  """(AdapterConfig, HeadConfig, ARCConfig) for ``name``: the registered ``arc_<name>`` config's
  when there is one, else the reference's ARC settings (as ``bench/arc_memory.py``); the
  discriminator exit layer is kept inside a reduced depth."""
  base = name.partition("@")[0]
  if "arc_" + base in registered_configs():
    ad, hc, ac, _ = sections(load_config("arc_" + base))
  else:
    ad, hc, ac = (adapters.AdapterConfig(), HeadConfig() if cfg.embed_dim >= 512
                  else HeadConfig(16, (1, 2), (1, 2), (1, 1)), ARCConfig(steps=6, max_k=5))
  return ad, hc, dataclasses.replace(ac, disc_exit_layer=min(ac.disc_exit_layer, cfg.depth - 1))


def _batch(cfg: DiTConfig, b: int, frames: int, cross_len: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  out = dict(latents=rng.normal(size=(b, frames, cfg.io_channels)),
             cond=rng.normal(size=(b, cross_len, max(cfg.cond_token_dim, 1))))
  if cfg.global_cond_dim:
    out["global_cond"] = rng.normal(size=(b, cfg.global_cond_dim))
  return jax.device_put({k: jnp.asarray(v, jnp.float32) for k, v in out.items()})


def _xla_flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float((ca or {}).get("flops", float("nan")))


def _peak(cfg: DiTConfig) -> float:
  """Matmul peak (FLOP/s) of the compute dtype, measured now."""
  return matmul_peak(jnp.dtype(cfg.dtype)) * 1e9


def _time(fn, state, args, keys):
  """Seconds per step over ``keys`` (state threaded through, donated)."""
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for k in keys:
    state, m = fn(state, *args, k)
  jax.block_until_ready((state, m))
  return (time.perf_counter() - t0) / len(keys), state


def bench_stage1(label, conf, cfg, batch, steps, chunks, cross_len):
  model = random_model(cfg)
  tc = Stage1Config(chunks=chunks, lr=1e-4, clip_norm=1.0)
  tr = Stage1(model, tc)
  state = jax.device_put(tr.init_state(model))
  b = _batch(cfg, batch, tr.frames, cross_len)
  t0 = time.perf_counter()
  compiled = jax.jit(tr.train_step, donate_argnums=0).lower(state, b, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  state, _ = compiled(state, b, jax.random.key(0))  # warm-up
  sec, _ = _time(compiled, state, (b,), [jax.random.key(i + 1) for i in range(steps)])
  fl = stage1_flops(cfg, chunks, batch, cross_len)
  return [dict(kind="stage1", sec=sec, tokens=batch * tr.frames, flops=fl, peak=_peak(cfg),
               xla=_xla_flops(compiled), compile_s=compile_s)]


def bench_arc(label, conf, cfg, batch, steps, rollout_blocks, cross_len):
  ad, hc, ac = arc_sections(label, cfg)
  if rollout_blocks:
    ac = dataclasses.replace(ac, rollout_blocks=rollout_blocks)
  model = adapters.add_adapters(random_model(cfg), ad, seed=1)
  head = make_head(cfg, hc, seed=3)
  tr = ARCForcing(model, ac, head)
  state, frozen = jax.device_put(tr.init(model, head))
  b = _batch(cfg, batch, tr.frames, cross_len)
  rows = []
  for phase in ("g", "d"):
    fn = tr.g_step if phase == "g" else tr.d_step
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=0).lower(state, frozen, b, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    state, _ = compiled(state, frozen, b, jax.random.key(0))  # warm-up
    keys = [jax.random.key(i + 1) for i in range(steps)]
    sec, state = _time(compiled, state, (frozen, b), keys)
    # the step counts each timed step drew (g_step/d_step: rollout key = split(key)[0])
    fl = np.mean([arc_flops(tr, ad, tr.draw(jax.random.split(k)[0], batch)[0], batch, cross_len,
                            phase) for k in keys])
    rows.append(dict(kind=f"arc {phase.upper()}", sec=sec, tokens=batch * tr.frames, flops=fl,
                     peak=_peak(cfg), xla=float("nan"), compile_s=compile_s,
                     note=f"{ac.rollout_blocks} blocks, k<={ac.max_k}"))
  return rows


# ----------------------------------------------------------------------------------- main


def _peaks(spec: str) -> dict:
  """``bfloat16=989,float32=67`` -> {dtype: FLOP/s}."""
  out = {}
  for item in filter(None, spec.split(",")):
    k, eq, v = item.partition("=")
    try:
      out[k.strip()] = float(v) * 1e12 if eq else None
    except ValueError:
      out[k.strip()] = None
    if out[k.strip()] is None:
      raise ValueError(f"--peak-tflops {spec!r}: expected dtype=TFLOPs[,dtype=TFLOPs]")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--configs", default="tiny,demo,saos@2",
                  help="comma-separated name[@depth] (a registered config or a config file)")
  ap.add_argument("--kinds", default="stage1,arc", help="stage1, arc or both")
  ap.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes")
  ap.add_argument("--batch", type=int, default=2, help="items per update")
  ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
  ap.add_argument("--chunks", type=int, default=None,
                  help="stage-1 chunks per sequence (default: the config's, else 8)")
  ap.add_argument("--rollout-blocks", type=int, default=None,
                  help="ARC rollout blocks (default: the ARC config's)")
  ap.add_argument("--peak-tflops", default="", help="datasheet peaks, e.g. bfloat16=989,float32=67")
  args = ap.parse_args(argv)
  kinds = [k for k in args.kinds.split(",") if k]
  if not kinds or set(kinds) - {"stage1", "arc"}:
    ap.error(f"--kinds {args.kinds!r}: stage1, arc or stage1,arc")
  if args.batch < 1 or args.steps < 1:
    ap.error("--batch and --steps must be >= 1")
  dtypes = [d for d in args.dtypes.split(",") if d]
  if not dtypes or set(dtypes) - {"float32", "bfloat16", "float16"}:
    ap.error(f"--dtypes {args.dtypes!r}: float32, bfloat16 or float16, comma-separated")
  try:
    sheet = _peaks(args.peak_tflops)
    specs = [parse_config(s) for s in args.configs.split(",") if s]
  except ValueError as e:
    ap.error(str(e))
  dev = jax.devices()[0]
  print(f"# training throughput: {dev.device_kind} ({jax.default_backend()}), jax "
        f"{jax.__version__}; batch {args.batch}, {args.steps} timed steps; parameters and "
        "optimizer state float32")
  print("# model FLOPs counted analytically (see the module docstring); XLA = cost_analysis of "
        "the compiled stage-1 step; peak = a square matmul in the row's dtype, measured right "
        "after the row\n", flush=True)
  extra = " | MFU vs datasheet" if sheet else ""
  print("| kind | config | layers x width | dtype | tokens/step | ms/step | tokens/s | "
        f"model GFLOP/step | XLA GFLOP/step | GFLOP/s | peak GFLOP/s | MFU{extra} | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if sheet else "") + "---|")
  for label, conf, cfg0 in specs:
    cross_len = cross_len_of(conf)
    train = conf.get("train", None)
    chunks = args.chunks or (int(train.stage1.chunks) if train is not None and "stage1" in train
                             and "chunks" in train.stage1 else 8)
    for d in dtypes:
      cfg = dataclasses.replace(cfg0, dtype=d, param_dtype="float32")
      rows = []
      if "stage1" in kinds:
        rows += bench_stage1(label, conf, cfg, args.batch, args.steps, chunks, cross_len)
      if "arc" in kinds:
        rows += bench_arc(label, conf, cfg, args.batch, args.steps, args.rollout_blocks,
                          cross_len)
      for r in rows:
        rate, peak = r["flops"] / r["sec"], r["peak"]
        xla = "-" if np.isnan(r["xla"]) else f"{r['xla'] / 1e9:.2f}"
        ds = f" | {100 * rate / sheet[d]:.1f}%" if d in sheet else (" | -" if sheet else "")
        print(f"| {r['kind']} | {label} | {cfg.depth} x {cfg.embed_dim} | {d} | {r['tokens']} | "
              f"{r['sec'] * 1000:.1f} | {r['tokens'] / r['sec']:.0f} | {r['flops'] / 1e9:.2f} | "
              f"{xla} | {rate / 1e9:.1f} | {peak / 1e9:.1f} | {100 * rate / peak:.1f}%{ds} | "
              f"{r['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
