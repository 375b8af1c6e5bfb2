"""Long-stream drift: base model vs ARC-forced model, per block index (ARC issue, item 5).

On held-out data, each model is primed with the real context (K chunks) and streams --seconds
past it (cached block-causal streaming, the same noise for both models). Per block index:
- Frechet distance between the generated latent frames of that block (all items x frames of the
  block) and the real held-out latent frames (the continuations, pooled); the "floor" column is the
  FD between two disjoint real samples of the same size (the estimator's bias at that size);
- drift indicators: RMS of the latents (real: the held-out RMS); with --codec whose latent_dim
  matches the model, decoded-audio spectral centroid (Hz) and chroma entropy (bits, 0..log2 12).
Prints a table (rows of --row-seconds), writes <out>/drift.json with every block's numbers and
<out>/drift.png (matplotlib, when installed).

  python3 bench/drift.py --config arc_tiny --arc runs/arc_tiny            # base + ARC run
  python3 bench/drift.py --config arc_tiny --base runs/tiny --seconds 60    # base only
  python3 bench/drift.py --config configs/demo.py --base runs/demo --arc runs/arc_demo \\
      --data data_cache/latents --codec default

Without --base the base model has random weights (a smoke run). Without --arc only the base is
streamed. Time is counted at the codec's frame rate (--codec) or --frame-rate (default SAO's
21.53 frames/s).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lmdm_jax import sampling as S  # noqa: E402
from lmdm_jax.config import DiTConfig, load_cli_config  # noqa: E402
from lmdm_jax.nn.dit import DiT  # noqa: E402
from lmdm_jax.testing import random_model  # noqa: E402
from lmdm_jax.training.data import Batcher, make_source  # noqa: E402

FRAME_RATE = 44100 / 2048


def _int_list(s: str) -> list:
  return [int(x) for x in str(s).split(",") if x.strip()]


# ------------------------------------------------------------------------------- metrics


def _sqrtm_psd(a):
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gauss_stats(x):
  """(mean, covariance) of samples x (n, d), float64: the reusable side of ``frechet``."""
  x = np.asarray(x, np.float64)
  return x.mean(0), np.cov(x, rowvar=False)


def frechet(x, y) -> float:
  """Frechet distance between Gaussians fitted to samples x (n, d) and y (m, d); either may be
  given as its ``gauss_stats`` (mean, covariance) instead."""
  mu1, s1 = x if isinstance(x, tuple) else gauss_stats(x)
  mu2, s2 = y if isinstance(y, tuple) else gauss_stats(y)
  s1h = _sqrtm_psd(np.atleast_2d(s1))
  m = s1h @ np.atleast_2d(s2) @ s1h
  tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(np.atleast_2d(s1)) + np.trace(np.atleast_2d(s2))
               - 2 * tr_cross)


def audio_indicators(audio, sr, n_fft=2048, hop=512):
  """(spectral centroid in Hz, chroma entropy in bits) of mono/stereo audio (channels, samples)."""
  x = np.asarray(audio, np.float64).mean(0)
  if x.shape[0] < n_fft:
    x = np.pad(x, (0, n_fft - x.shape[0]))
  frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
  mag = np.abs(np.fft.rfft(frames, axis=-1))
  freqs = np.fft.rfftfreq(n_fft, 1 / sr)
  power = mag ** 2
  tot = power.sum(-1)
  centroid = float(np.mean((power * freqs).sum(-1) / np.maximum(tot, 1e-12)))
  ok = (freqs >= 27.5) & (freqs <= 4200)
  pc = np.mod(np.round(12 * np.log2(freqs[ok] / 440.0)) + 9, 12).astype(int)
  chroma = np.zeros((power.shape[0], 12))
  for c in range(12):
    chroma[:, c] = power[:, ok][:, pc == c].sum(-1)
  p = chroma.sum(0)
  p = p / max(p.sum(), 1e-12)
  ent = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
  return centroid, ent


def real_audio_indicators(codec, lat, valid, cs: int) -> dict:
  """Mean (spectral centroid, chroma entropy) of the decoded real continuations, per block of
  ``cs`` frames as for the generated streams (whole valid blocks only)."""
  ind = []
  for i in range(lat.shape[0]):
    m = int(valid[i].sum()) // cs * cs
    if m >= cs:
      a = codec.decode(lat[i, :m])
      ind += [audio_indicators(a[:, j * cs * codec.hop:(j + 1) * cs * codec.hop], codec.sample_rate)
              for j in range(m // cs)]
  ind = np.asarray(ind) if ind else np.full((1, 2), np.nan)
  return {"centroid_hz": float(ind[:, 0].mean()), "chroma_entropy": float(ind[:, 1].mean())}


def _quarter_fds(lat, real_frames, q_frames):
  c = lat.shape[-1]
  return (frechet(lat[:, :q_frames].reshape(-1, c), real_frames),
          frechet(lat[:, -q_frames:].reshape(-1, c), real_frames))


def growth_summary(gens, real_frames, n_blocks, cs, n_boot, seed, ref) -> dict:
  """Per model: the FD of the pooled frames of the first and of the last quarter of the blocks
  (all streams) to the real continuations, their ratio (growth), a 90% interval of the growth
  from ``n_boot`` bootstrap resamples of the streams (the same resamples for every model, so
  differences are paired), the growth on the even and on the odd streams, and for models other
  than ``ref`` the paired difference of growth to ``ref``'s with its interval and the share of
  resamples in which it grows less than ``ref``."""
  q_frames = max(1, n_blocks // 4) * cs
  real_frames = gauss_stats(real_frames)  # computed once for every comparison below
  b = next(iter(gens.values())).shape[0]
  rng = np.random.default_rng(seed + 1)
  boots = [rng.integers(0, b, b) for _ in range(n_boot)]
  out, ratios = {}, {}
  for n, lat in gens.items():
    f0, f1 = _quarter_fds(lat, real_frames, q_frames)
    halves = [_quarter_fds(lat[h::2], real_frames, q_frames) for h in (0, 1)] if b >= 2 else []
    r = np.array([np.divide(*_quarter_fds(lat[ix], real_frames, q_frames)[::-1])
                  for ix in boots]) if n_boot else np.full(1, np.nan)
    ratios[n] = r
    nq = max(1, n_blocks // 4)
    quarters = [frechet(lat[:, i * nq * cs:(i + 1) * nq * cs].reshape(-1, lat.shape[-1]),
                        real_frames) for i in range(4)] if n_blocks >= 4 else []
    out[n] = {"fd_first": f0, "fd_last": f1, "growth": f1 / f0, "fd_quarters": quarters,
              "growth_ci90": [float(np.percentile(r, 5)), float(np.percentile(r, 95))],
              "growth_halves": [h1 / h0 for h0, h1 in halves]}
  for n in gens:
    if n != ref and ref in ratios and n_boot:
      d = ratios[n] - ratios[ref]
      out[n].update(d_growth_vs_ref=out[n]["growth"] - out[ref]["growth"],
                    d_growth_ci90=[float(np.percentile(d, 5)), float(np.percentile(d, 95))],
                    p_less_growth=float(np.mean(d < 0)))
  return out


# ------------------------------------------------------------------------------- models


def load_models(args, conf, log=print):
  """{"base": DiT[, "arc": DiT]}. With --arc and no --base, the base is the ARC run's own (its
  recorded --base, or the same random weights it was trained on)."""
  cfg = DiTConfig.from_config(conf.model)
  models = {}
  if args.arc:
    from lmdm_jax.training.arc_run import load_arc_model
    from lmdm_jax.nn import adapters
    adapted = load_arc_model(args.arc, base=args.base, merge=False)
    if not args.base:
      models["base"] = adapters.strip_adapters(adapted)
      log(f"[drift] base: the base of the ARC run {args.arc}")
    models["arc"] = adapters.merge_adapters(adapted)
    log(f"[drift] ARC adapter from {args.arc} (merged into the base kernels)")
  if args.base:
    from lmdm_jax.training.arc_run import load_base_params
    from lmdm_jax.training.checkpoints import run_layout
    cfg = run_layout(cfg, args.base)  # the rotary layout the base was trained in
    params, rest, step = load_base_params(args.base, cfg)
    models["base"] = nnx.merge(nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))),
                                         nnx.Param, ...)[0], params, rest)
    log(f"[drift] base: {args.base} step {step}")
  elif "base" not in models:
    models["base"] = random_model(cfg, seed=conf.get("seed", 0))
    log("[drift] no --base: the base model has RANDOM weights (a smoke run)")
  if not args.arc:
    log("[drift] no --arc: streaming the base model only")
  return cfg, {k: models[k] for k in ("base", "arc") if k in models}


def stream_all(models, cfg, ctx, cond, gen_frames, steps, cfg_scale, seed, log=print):
  """{name: (B, gen_frames, C) latents}: one compiled Stream, parameters swapped per model.
  ``steps``: an int, or {name: int} (the step count is a runtime value: no recompilation)."""
  b = ctx.shape[0]
  guided = cfg_scale != 1.0
  steps = steps if isinstance(steps, dict) else {n: steps for n in models}
  first = next(iter(models.values()))
  stream = S.Stream(first, batch=b, regime="block_causal", cfg_guidance=guided,
                    cross_len=cond.shape[1], seed=seed)
  out = {}
  for name, model in models.items():
    stream.sampler = S.SamplerParams.make(steps=steps[name], cfg_scale=cfg_scale, plus_plus=False,
                                          pingpong=True)
    stream.params = nnx.split(model)[1]
    stream.state = S.init_state(cfg, "block_causal", b, guided, cond.shape[1], seed)
    stream.set_prompt(cond)
    stream.prime(ctx)
    t0 = time.perf_counter()
    lat = np.asarray(stream.generate(gen_frames))
    log(f"[drift] {name}: {gen_frames} frames x {b} streams in {time.perf_counter() - t0:.1f} s"
        " (first includes compilation)")
    out[name] = lat
  return out


# ---------------------------------------------------------------------------------- main


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default="arc_tiny")
  ap.add_argument("--base")
  ap.add_argument("--arc", help="an arc.py workdir")
  ap.add_argument("--data", default="synthetic")
  ap.add_argument("--seconds", type=float, default=60.0)
  ap.add_argument("--frame-rate", type=float, default=FRAME_RATE)
  ap.add_argument("--codec", help="codec name for audio indicators (lmdm_jax.codecs.get_codec)")
  ap.add_argument("--batch", type=int, default=8, help="held-out streams per model")
  ap.add_argument("--steps", type=_int_list,
                  help="denoising steps of the ARC model (default: the config's sampler); a "
                  "comma list (e.g. 4,2) streams one variant per value, named arc@4, arc@2")
  ap.add_argument("--base-steps", type=_int_list,
                  help="the base model's steps (default: --steps); a comma list (e.g. 8,4) "
                  "streams base@8, base@4")
  ap.add_argument("--arc-only", action="store_true",
                  help="stream only the ARC model (quick probes of a run against known base numbers)")
  ap.add_argument("--bootstrap", type=int, default=200,
                  help="bootstrap resamples of the held-out streams for the growth intervals")
  ap.add_argument("--cfg-scale", type=float, default=1.0)
  ap.add_argument("--row-seconds", type=float, default=5.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="bench_out/drift")
  args = ap.parse_args(argv)

  conf = load_cli_config(args.config)
  cfg, models = load_models(args, conf)
  if args.arc_only and "arc" in models:
    models.pop("base")
  cs, K, C = cfg.chunk, cfg.context_chunks, cfg.io_channels
  codec = None
  rate = args.frame_rate
  if args.codec:
    from lmdm_jax.codecs import get_codec
    codec = get_codec(args.codec)
    if codec.latent_dim != C:
      print(f"[drift] codec {args.codec}: latent_dim {codec.latent_dim} != the model's {C}; "
            "audio indicators skipped")
      codec = None
    else:
      rate = codec.frame_rate
  n_blocks = int(np.ceil(args.seconds * rate / cs))
  gen_frames = n_blocks * cs
  arc_steps = args.steps or [int(conf.sampler.steps)]
  base_steps = args.base_steps or arc_steps
  variants, steps = {}, {}
  for name, model in models.items():
    lst = base_steps if name == "base" else arc_steps
    for k in lst:
      v = name if len(lst) == 1 else f"{name}@{k}"
      variants[v], steps[v] = model, k
  models = variants
  print(f"[drift] {n_blocks} blocks of {cs} frames = {gen_frames / rate:.1f} s at {rate:.2f} "
        f"frames/s past {K * cs} context frames; {args.batch} held-out streams; {steps} steps, "
        f"cfg {args.cfg_scale}")

  held = make_source(args.data, K * cs + gen_frames, cfg, conf.get("seed", 0), holdout=True)
  # held-out captions through the config's text encoder; plain continuations of the mix
  raw = Batcher.for_config(held, conf, cfg, p_jam=0.0, p_sketch=0.0)(0, args.batch)
  lat_real = raw["latents"]
  valid = raw["frame_mask"][:, K * cs:] > 0
  ctx = jnp.asarray(lat_real[:, :K * cs])
  cond = jnp.asarray(raw["cond"]) if "cond" in raw else jnp.zeros((args.batch, 1, cfg.cond_token_dim))
  real_frames = lat_real[:, K * cs:][valid]  # (N, C) pooled held-out continuation frames
  gens = stream_all(models, cfg, ctx, cond, gen_frames, steps, args.cfg_scale, args.seed)

  rng = np.random.default_rng(args.seed)
  per_block = {"t_end_s": [], "fd_floor": [], "rms_real": float(np.sqrt(np.mean(real_frames ** 2))),
               "steps": steps}
  n_per = args.batch * cs
  for j in range(n_blocks):
    per_block["t_end_s"].append((j + 1) * cs / rate)
    idx = rng.permutation(len(real_frames))
    per_block["fd_floor"].append(frechet(real_frames[idx[:n_per]], real_frames[idx[n_per:]])
                                 if len(real_frames) > 2 * n_per else float("nan"))
  for name, lat in gens.items():
    fd, rms, cen, ent = [], [], [], []
    audio = [codec.decode(lat[i]) for i in range(lat.shape[0])] if codec else None
    for j in range(n_blocks):
      blk = lat[:, j * cs:(j + 1) * cs].reshape(-1, C)
      fd.append(frechet(blk, real_frames))
      rms.append(float(np.sqrt(np.mean(blk ** 2))))
      if audio is not None:
        seg = [a[:, j * cs * codec.hop:(j + 1) * cs * codec.hop] for a in audio]
        ind = np.array([audio_indicators(s, codec.sample_rate) for s in seg])
        cen.append(float(ind[:, 0].mean()))
        ent.append(float(ind[:, 1].mean()))
    per_block[name] = {"fd": fd, "rms": rms}
    if audio is not None:
      per_block[name].update(centroid_hz=cen, chroma_entropy=ent)

  # table: one row per --row-seconds
  per_row = max(1, int(round(args.row_seconds * rate / cs)))
  names = list(gens)
  head = ["t (s)", "blocks"] + [f"FD {n}" for n in names] + ["FD floor"] + \
         [f"RMS {n}" for n in names] + ["RMS real"]
  if codec:
    head += [f"centroid {n}" for n in names] + [f"chroma H {n}" for n in names]
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for r0 in range(0, n_blocks, per_row):
    sl = slice(r0, min(n_blocks, r0 + per_row))
    row = [f"{per_block['t_end_s'][sl.stop - 1]:.1f}", f"{sl.start}-{sl.stop - 1}"]
    row += [f"{np.mean(per_block[n]['fd'][sl]):.3f}" for n in names]
    row += [f"{np.nanmean(per_block['fd_floor'][sl]):.3f}"]
    row += [f"{np.mean(per_block[n]['rms'][sl]):.3f}" for n in names]
    row += [f"{per_block['rms_real']:.3f}"]
    if codec:
      row += [f"{np.mean(per_block[n]['centroid_hz'][sl]):.0f}" for n in names]
      row += [f"{np.mean(per_block[n]['chroma_entropy'][sl]):.3f}" for n in names]
    print("| " + " | ".join(row) + " |")
  for n in names:
    fd = np.asarray(per_block[n]["fd"])
    q = max(1, n_blocks // 4)
    print(f"[drift] {n}: FD first quarter {fd[:q].mean():.3f} -> last quarter {fd[-q:].mean():.3f}"
          f" (x{fd[-q:].mean() / max(fd[:q].mean(), 1e-12):.2f})")
  if codec:
    per_block["real_audio"] = real_audio_indicators(codec, lat_real[:, K * cs:], valid, cs)
    print(f"[drift] real continuations: centroid {per_block['real_audio']['centroid_hz']:.0f} Hz, "
          f"chroma entropy {per_block['real_audio']['chroma_entropy']:.3f} bits")
  per_block["summary"] = growth_summary(gens, real_frames, n_blocks, cs, args.bootstrap,
                                        args.seed, names[0])
  for n, sm in per_block["summary"].items():
    extra = ""
    if "d_growth_vs_ref" in sm:
      extra = (f"; growth - {names[0]}'s: {sm['d_growth_vs_ref']:+.3f} "
               f"[{sm['d_growth_ci90'][0]:+.3f}, {sm['d_growth_ci90'][1]:+.3f}], "
               f"P(less growth) {sm['p_less_growth']:.2f}")
    print(f"[drift] {n} ({steps[n]} steps): pooled-quarter FD {sm['fd_first']:.2f} -> "
          f"{sm['fd_last']:.2f}, growth x{sm['growth']:.3f} (90% bootstrap over streams "
          f"[{sm['growth_ci90'][0]:.3f}, {sm['growth_ci90'][1]:.3f}]; stream halves "
          f"x{sm['growth_halves'][0]:.3f} / x{sm['growth_halves'][1]:.3f}){extra}")
    print(f"[drift] {n}: pooled FD per quarter "
          + " / ".join(f"{x:.2f}" for x in sm["fd_quarters"])
          + f"; per-block FD blocks 0-3 {np.mean(per_block[n]['fd'][:4]):.2f}, "
          f"blocks 4-15 {np.mean(per_block[n]['fd'][4:16]):.2f}")

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "drift.json"), "w") as f:
    json.dump({"args": vars(args), "frame_rate": rate, "chunk": cs, **per_block}, f)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("[drift] matplotlib is not installed: no plot (numbers are in drift.json)")
    return
  panels = 2 + (2 if codec else 0)
  fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels), sharex=True)
  t = np.asarray(per_block["t_end_s"])
  for n in names:
    axes[0].plot(t, per_block[n]["fd"], label=n)
    axes[1].plot(t, per_block[n]["rms"], label=n)
    if codec:
      axes[2].plot(t, per_block[n]["centroid_hz"], label=n)
      axes[3].plot(t, per_block[n]["chroma_entropy"], label=n)
  axes[0].plot(t, per_block["fd_floor"], ":", color="gray", label="real vs real (floor)")
  axes[1].axhline(per_block["rms_real"], ls=":", color="gray", label="real")
  axes[0].set_ylabel("Frechet distance")
  axes[1].set_ylabel("latent RMS")
  if codec:
    axes[2].set_ylabel("centroid (Hz)")
    axes[3].set_ylabel("chroma entropy (bits)")
  axes[-1].set_xlabel("seconds past the context")
  for a in axes:
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(args.out, "drift.png")
  fig.savefig(path, dpi=110)
  print(f"[drift] wrote {path} and drift.json")


if __name__ == "__main__":
  main()
