"""Compiled memory of one ARC-Forcing generator (and discriminator) step vs rollout length.

XLA's buffer assignment of the jitted step (``compiled.memory_analysis()``, compile only: nothing
runs, so the paper's scale fits on a CPU): temp = activations + residuals kept for the backward
pass + workspace. The growth from n = 2 to n = 6 blocks, per block, is compared with what a block
must keep for the backward pass when its gradient step is rematerialized: its input x, and the K/V
ring it attended to (2 x layers x batch x K*chunk x heads x head_dim floats), plus the growth of
the discriminator's sequence ((K + n) * chunk frames, full attention).

  python3 bench/arc_memory.py                          # tiny
  python3 bench/arc_memory.py --config saos --batch 1  # the paper's scale (compile only)
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
from flax import nnx  # noqa: E402

from lmdm_jax.config import DiTConfig, load_cli_config  # noqa: E402
from lmdm_jax.nn import adapters  # noqa: E402
from lmdm_jax.nn.dit import Buffer, DiT  # noqa: E402
from lmdm_jax.nn.discriminator import HeadConfig  # noqa: E402
from lmdm_jax.training.arc_forcing import ARCConfig, ARCForcing, make_head  # noqa: E402

OPTS = {"xla_backend_optimization_level": 0}  # codegen only: buffer assignment is unchanged


def measure(cfg, ac_kw, adapter_cfg, head_cfg, batch, n, remat, phase):
  ac = ARCConfig(**dict(ac_kw, rollout_blocks=n, remat=remat))
  model = nnx.eval_shape(lambda: adapters.add_adapters(DiT(cfg, rngs=nnx.Rngs(0)), adapter_cfg))
  r = cfg.rotary_dim  # the rotary tables are built from concrete inverse frequencies
  model.inv_freq = Buffer(jnp.asarray(1.0 / (cfg.rope_base ** (np.arange(0, r, 2) / r)),
                                      jnp.float32))
  head = nnx.eval_shape(lambda: make_head(cfg, head_cfg))
  tr = ARCForcing(model, ac, head)
  state, frozen = jax.eval_shape(lambda: tr.init(model, head))
  sds = jax.ShapeDtypeStruct
  b = {"latents": sds((batch, tr.frames, cfg.io_channels), jnp.float32),
       "cond": sds((batch, 16, cfg.cond_token_dim), jnp.float32),
       "global_cond": sds((batch, cfg.global_cond_dim), jnp.float32)}
  fn = tr.g_step if phase == "g" else tr.d_step
  t0 = time.perf_counter()
  comp = jax.jit(fn).lower(state, frozen, b, jax.random.key(0)).compile(compiler_options=OPTS)
  ma = comp.memory_analysis()
  return ma.temp_size_in_bytes, ma.argument_size_in_bytes, time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default="tiny")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--blocks", default="2,6")
  ap.add_argument("--rank", type=int)
  ap.add_argument("--phases", default="g,d")
  args = ap.parse_args(argv)
  conf = load_cli_config(args.config)
  cfg = DiTConfig.from_config(conf.model)
  if "arc" in conf:
    ac_kw = dict(conf.arc)
    adapter_cfg = adapters.AdapterConfig.from_config(conf.adapter)
    head_cfg = HeadConfig.from_config(conf.head)
  else:  # the reference's ARC settings at the model's depth
    ac_kw = dict(steps=6, max_k=5, disc_exit_layer=min(12, cfg.depth - 1))
    adapter_cfg = adapters.AdapterConfig()
    head_cfg = HeadConfig() if cfg.embed_dim >= 512 else HeadConfig(16, (1, 2), (1, 2), (1, 1))
  if args.rank:
    adapter_cfg = adapters.AdapterConfig(rank=args.rank, alpha=float(args.rank))
  ns = [int(x) for x in args.blocks.split(",")]
  ring = 2 * cfg.depth * args.batch * cfg.context_chunks * cfg.chunk * cfg.embed_dim * 4
  print(f"{args.config}: batch {args.batch}, chunk {cfg.chunk}, K {cfg.context_chunks}, depth "
        f"{cfg.depth}, D {cfg.embed_dim}; adapter rank {adapter_cfg.rank}; K/V ring per block "
        f"{ring / 2**20:.2f} MiB")
  print("| phase | remat | " + " | ".join(f"temp n={n} (MiB)" for n in ns)
        + " | per extra block (MiB) |")
  print("|---|---|" + "---|" * len(ns) + "---|")
  for phase in args.phases.split(","):
    for remat in ((True, False) if phase == "g" else (True,)):
      temps = []
      for n in ns:
        temp, _, dt = measure(cfg, ac_kw, adapter_cfg, head_cfg, args.batch, n, remat, phase)
        temps.append(temp)
        print(f"  [{phase} remat={remat} n={n}: compiled in {dt:.0f} s]", file=sys.stderr)
      slope = (temps[-1] - temps[0]) / max(ns[-1] - ns[0], 1)
      print(f"| {phase.upper()} | {'on' if remat else 'off'} | "
            + " | ".join(f"{t / 2**20:.2f}" for t in temps) + f" | {slope / 2**20:.2f} |",
            flush=True)


if __name__ == "__main__":
  main()
