"""Why small passes run below the matmul peak: time one transformer pass per shape.

For each pass shape the streaming regimes use (query rows x key rows) at the `saos` width, prints
the time of the whole pass (``DiT.forward_tokens`` with ``--depth`` blocks), its GFLOP/s, and the
GFLOP/s of a bare (rows x D) @ (D x D) matmul with the same row count, all measured in this run.
The bare matmul shows how much of the shortfall is the matrix shape itself (few rows) rather
than attention, normalization or data movement.

  python3 bench/pass_profile.py --depth 2 --batch 2      # batch 2 = one stream with CFG
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

from lmdm_jax.config import DiTConfig, load_cli_config  # noqa: E402
from lmdm_jax.nn.dit import DiT, PastKV  # noqa: E402


def _median_time(f, *args, reps=7):
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default="saos")
  ap.add_argument("--depth", type=int, default=2)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--reps", type=int, default=7)
  args = ap.parse_args(argv)
  cfg = dataclasses.replace(DiTConfig.from_config(load_cli_config(args.config).model), depth=args.depth)
  model = DiT(cfg, rngs=nnx.Rngs(0))
  gd, state = nnx.split(model)
  b, d, cs, K, W = args.batch, cfg.embed_dim, cfg.chunk, cfg.context_chunks, cfg.window_chunks
  cross = model.cross_kv(jnp.ones((b, 65, cfg.cond_token_dim)))
  shapes = [("naive window", (W + 1) * cs + 1, 0), ("enc-dec context", W * cs, 0),
            ("fused first step", 2 * cs + 1, K * cs), ("target step", cs + 1, K * cs),
            ("enc-dec target step", cs + 1, W * cs)]
  per_tok = 2 * cfg.depth * (3 + 1 + 1 + 1 + 3 * cfg.ff_mult) * d * d
  mm = jax.jit(lambda a, w: a @ w)
  w = jnp.ones((d, d), jnp.dtype(cfg.dtype))
  peak_a = jnp.ones((2048, d), jnp.dtype(cfg.dtype))
  peak = 2 * 2048 * d * d / _median_time(mm, peak_a, w, reps=args.reps) / 1e9
  print(f"# pass profile: {args.config} width {d}, depth {cfg.depth}, batch {b}, "
        f"{jax.devices()[0].device_kind}; bare matmul (2048 x {d}) @ ({d} x {d}): {peak:.1f} GFLOP/s\n")
  print("| pass | query rows | key rows | ms | GFLOP/s | bare matmul GFLOP/s at these rows |")
  print("|---|---|---|---|---|---|")
  for name, nq, npast in shapes:
    h = jnp.ones((b, nq, d))
    rope = (jnp.ones((nq, cfg.rotary_dim // 2)), jnp.zeros((nq, cfg.rotary_dim // 2)))
    mask = jnp.ones((nq, npast + nq), bool)
    past = None if not npast else PastKV(
        jnp.ones((cfg.depth, b, npast, cfg.num_heads, cfg.head_dim)),
        jnp.ones((cfg.depth, b, npast, cfg.num_heads, cfg.head_dim)))
    rp = None if not npast else (jnp.ones((npast, cfg.rotary_dim // 2)),
                                 jnp.zeros((npast, cfg.rotary_dim // 2)))
    f = jax.jit(lambda st, h: nnx.merge(gd, st).forward_tokens(h, rope, mask, cross, past, rp)[0])
    t = _median_time(f, state, h, reps=args.reps)
    keys = npast + nq
    fl = b * (nq * per_tok + cfg.depth * 4 * nq * keys * d + cfg.depth * 4 * nq * 65 * d)
    a = jnp.ones((b * nq, d), jnp.dtype(cfg.dtype))
    t_mm = _median_time(mm, a, w, reps=args.reps)
    print(f"| {name} | {nq} | {keys} | {t * 1000:.1f} | {fl / t / 1e9:.1f} | "
          f"{2 * b * nq * d * d / t_mm / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
  main()
