"""How far dynamic-int8 weights (``lmdm_jax.quantize``) move a stream from the float model's.

For a model (the bundled one by default, or a config with random weights), streams ``--blocks``
blocks with the float model and with its int8 view from the same seed and prompt, and prints per
block the relative L2 error (||a - b|| / ||b||, b the float model's) of
  velocity:  the first denoising step's velocity, both models run on the float stream's state
             (identical inputs: the error of one forward pass);
  latents:   the blocks of the two free-running streams (errors compound through the context).

  python3 bench/quant_error.py                         # the bundled model, its sampler settings
  python3 bench/quant_error.py --config saos --steps 4 --cfg-scale 1 --blocks 3
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lmdm_jax import quantize as Q  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--checkpoint", default=None, help="model source (default: the bundled model)")
  ap.add_argument("--config", default=None,
                  help="a config with random weights (testing.random_model)")
  ap.add_argument("--blocks", type=int, default=6)
  ap.add_argument("--steps", type=int, default=None, help="default: the model's")
  ap.add_argument("--cfg-scale", type=float, default=None, help="default: the model's (1: no CFG)")
  args = ap.parse_args(argv)
  if args.config and not args.checkpoint:
    from lmdm_jax.config import DiTConfig, load_cli_config
    from lmdm_jax.system import SamplerDefaults
    from lmdm_jax.testing import random_model
    conf = load_cli_config(args.config)
    model = random_model(DiTConfig.from_config(conf.model), seed=0, scale=0.02)
    d = SamplerDefaults.from_config(conf.sampler)
    cfg = model.cfg
    k1, k2 = jax.random.split(jax.random.key(7))
    cond = jax.random.normal(k1, (1, 65, cfg.cond_token_dim))
    glob = jax.random.normal(k2, (1, cfg.global_cond_dim)) if cfg.global_cond_dim else None
    name = f"config {conf.name}, random weights (testing.random_model, scale 0.02)"
  else:
    from lmdm_jax.system import DEFAULT_PROMPT, load_system
    system = load_system(args.checkpoint, config=args.config, codec="none", log=lambda *_: None)
    model, d = system.model, system.defaults
    cond, glob = system.condition(DEFAULT_PROMPT)
    cond = jnp.asarray(cond)
    glob = None if glob is None else jnp.asarray(glob)
    name = system.description
  steps = args.steps or d.steps
  scale = d.cfg_scale if args.cfg_scale is None else args.cfg_scale
  errs = Q.stream_errors(model, cond, glob, blocks=args.blocks, steps=steps, cfg_scale=scale,
                       pingpong=d.pingpong, plus_plus=d.plus_plus)
  print(f"# int8 vs float: {name}; {steps} steps, CFG scale {scale:g}, "
        f"{'pingpong' if d.pingpong else 'euler'}; rel L2 error per block\n")
  print("| block | velocity (same inputs) | latents (free-running streams) |")
  print("|---|---|---|")
  for i, (ev, el) in enumerate(errs):
    print(f"| {i} | {ev:.4f} | {el:.4f} |")
  ev, el = np.array(errs).T
  print(f"| max | {ev.max():.4f} | {el.max():.4f} |")


if __name__ == "__main__":
  main()
