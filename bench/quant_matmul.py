"""Dense-layer microbenchmark on this device: fp32 vs bf16 vs dynamic int8 at the streaming shapes.

For each model width (``demo``: the bundled model's; ``saos``: the paper's) and each row count of
a streaming pass (batch 1: chunk + 1 query rows; CFG: twice that; the fused first step: a clean
chunk more), times the block's dense layers (qkv, out, cross-q, cross-out, ff_in, ff_out) chained
``--layers`` times inside one jit, for:
  fp32       x @ W, both float32
  bf16       x and W in bfloat16 (float32 accumulation)
  bf16-w     W stored in bfloat16, upcast to float32 at use (weights-only)
  int8       W int8 per output channel, x quantised per row at run time, int8 x int8 -> int32
             ``dot_general``, then rescaled to float32 (``lmdm_jax.quantize``)
Prints wall ms per call, GFLOP/s, process CPU ms per call (all threads: on a shared machine the
wall time includes waiting for a core, the CPU time does not) and the speed-ups over fp32.

  python3 bench/quant_matmul.py                  # demo and saos shapes
  python3 bench/quant_matmul.py --configs saos --layers 4 --reps 5
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lmdm_jax import quantize as Q  # noqa: E402
from lmdm_jax.config import DiTConfig, load_cli_config  # noqa: E402


def layer_shapes(cfg: DiTConfig):
  d, inner = cfg.embed_dim, cfg.embed_dim * cfg.ff_mult
  return [(d, 3 * d), (d, d), (d, d), (d, d), (d, 2 * inner), (inner, d)]


def make_fn(kind, shapes, n_layers):
  """A jitted (x, weights) -> x after ``n_layers`` block layer sets (residual adds, SwiGLU)."""

  def apply(x, w):
    if kind == "fp32":
      return x @ w
    if kind == "bf16":
      return jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
    if kind == "bf16-w":
      return x @ w.astype(jnp.float32)
    return Q.int8_matmul(x, *w)

  def f(x, ws):
    qkv, out, cq, cout, ff_in, ff_out = ws
    d = x.shape[-1]
    for _ in range(n_layers):  # the block's order and data flow (attention itself left out)
      x = x + apply(apply(x, qkv)[:, :d], out)
      x = x + apply(apply(x, cq), cout)
      a, g = jnp.split(apply(x, ff_in), 2, axis=-1)
      x = x + apply(a * jax.nn.silu(g), ff_out)
    return x

  return jax.jit(f)


def weights(kind, shapes, key):
  out = []
  for i, (din, dout) in enumerate(shapes):
    w = jax.random.normal(jax.random.fold_in(key, i), (din, dout), jnp.float32) / np.sqrt(din)
    if kind in ("bf16", "bf16-w"):
      w = w.astype(jnp.bfloat16)
    elif kind == "int8":
      w = Q.quantize_weight(w)
    out.append(w)
  return out


def timed(f, *args):
  """(wall seconds, process CPU seconds) of one call."""
  t0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(f(*args))
  return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--configs", default="demo,saos")
  ap.add_argument("--kinds", default="fp32,bf16,bf16-w,int8")
  ap.add_argument("--layers", type=int, default=2, help="layer sets chained in one jit")
  ap.add_argument("--reps", type=int, default=7)
  args = ap.parse_args(argv)
  kinds = args.kinds.split(",")
  print(f"# dense layers: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
        f"{jax.__version__}, {args.layers} chained layer sets (qkv, out, cross-q, cross-out, "
        "ff_in, ff_out) per call; interleaved, median\n")
  print("| config | rows | " + " | ".join(f"{k} ms (CPU ms) | {k} GFLOP/s" for k in kinds)
        + " | " + " | ".join(f"{k} vs fp32 (CPU)" for k in kinds[1:]) + " |")
  print("|---|---|" + "---|---|" * len(kinds) + "---|" * (len(kinds) - 1))
  for name in args.configs.split(","):
    cfg = DiTConfig.from_config(load_cli_config(name).model)
    shapes = layer_shapes(cfg)
    flop_row = 2 * args.layers * sum(a * b for a, b in shapes)
    cs = cfg.chunk
    for label, rows in [("batch 1", cs + 1), ("CFG", 2 * (cs + 1)),
                        ("fused 1st, CFG", 2 * (2 * cs + 1))]:
      x = jax.random.normal(jax.random.key(1), (rows, cfg.embed_dim), jnp.float32)
      fs = {k: (make_fn(k, shapes, args.layers), weights(k, shapes, jax.random.key(0)))
            for k in kinds}
      ts = {k: [] for k in kinds}
      for k, (f, w) in fs.items():
        jax.block_until_ready(f(x, w))
      for _ in range(args.reps):  # round-robin: machine load hits every kind alike
        for k, (f, w) in fs.items():
          ts[k].append(timed(f, x, w))
      med = {k: np.median(np.array(v), axis=0) for k, v in ts.items()}
      cells = " | ".join(f"{med[k][0] * 1e3:.2f} ({med[k][1] * 1e3:.2f}) | "
                         f"{flop_row * rows / med[k][0] / 1e9:.0f}" for k in kinds)
      ratio = " | ".join(f"{med['fp32'][0] / med[k][0]:.2f}x ({med['fp32'][1] / med[k][1]:.2f}x)"
                         for k in kinds[1:])
      print(f"| {name} | {rows} ({label}) | {cells} | {ratio} |", flush=True)


if __name__ == "__main__":
  main()
