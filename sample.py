"""Stream music latents block by block with the jitted, KV-cached sampler.

Until the bundled demo model and its codec land (training issue), the default is the `tiny`
config with random weights from a fixed seed: it exercises the whole streaming path (AOT-compiled
block step, KV cache, CFG, real-time factor) and writes the latents to a .npy file; it does not
make music yet, and says so.

  python3 sample.py                                   # tiny, random weights, 30 s of latents
  python3 sample.py --config saos --seconds 10 --steps 8 --cfg-scale 0.95 --plus-plus
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdm_jax import sampling as S
from lmdm_jax.config import DiTConfig, load_config
from lmdm_jax.nn.dit import DiT

FRAME_RATE = 44100 / 2048  # SAO latent frames per second (the tiny config borrows it)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default="tiny", help="tiny | saos | path/to/config.py[:arg]")
  ap.add_argument("--checkpoint", default=None,
                  help="a train.py work directory or a converted checkpoint (python3 -m lmdm_jax.convert)")
  ap.add_argument("--prompt", default="solo piano, calm")
  ap.add_argument("--seconds", type=float, default=30.0)
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--cfg-scale", type=float, default=None)
  ap.add_argument("--plus-plus", action="store_true", help="CFG++ update")
  ap.add_argument("--sampler", choices=["pingpong", "euler"], default=None)
  ap.add_argument("--regime", default=None, choices=list(S.REGIMES))
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="outputs/sample_latents.npy")
  args = ap.parse_args(argv)

  conf = load_config(args.config)
  cfg = DiTConfig.from_config(conf.model)
  if args.checkpoint:
    from lmdm_jax.checkpoint_io import load_model
    cfg, model, extras = load_model(args.checkpoint)
    if "meta" in extras:  # a train.py run: its config names its text encoder and sampler
      conf = load_config(extras["meta"]["config"])
    print(f"[sample] loaded {args.checkpoint} ({cfg.depth}x{cfg.embed_dim}, step "
          f"{extras.get('step', '?')})")
  else:
    print(f"[sample] config {conf.name}: RANDOM WEIGHTS from seed {args.seed} (no trained "
          "checkpoint is bundled yet): this exercises the streaming sampler; it does not make "
          "music.")
    model = DiT(cfg, rngs=nnx.Rngs(args.seed))
  sc = conf.sampler
  steps = args.steps or sc.steps
  cfg_scale = sc.cfg_scale if args.cfg_scale is None else args.cfg_scale
  pingpong = (args.sampler or ("pingpong" if sc.pingpong else "euler")) == "pingpong"
  regime = args.regime or sc.regime
  from lmdm_jax import text as text_lib
  text = text_lib.from_config(conf) if cfg.cond_token_dim else None
  n_tok = text.max_tokens if text is not None else 1
  t0 = time.perf_counter()
  stream = S.Stream(model, batch=1, regime=regime, cfg_guidance=cfg_scale != 1.0, cross_len=n_tok,
                    seed=args.seed, sampler=S.SamplerParams.make(steps, cfg_scale, args.plus_plus,
                                                                 pingpong))
  stream.set_prompt(text([args.prompt]) if text is not None else jnp.zeros((1, 1, 0)),
                    jnp.zeros((1, cfg.global_cond_dim)) if cfg.global_cond_dim else None)
  print(f"[sample] compiled the block step ahead of time in {time.perf_counter() - t0:.1f} s "
        f"(regime {regime}, {steps} steps, CFG {cfg_scale}{'++' if args.plus_plus else ''})")
  block_s = cfg.chunk / FRAME_RATE
  n_blocks = max(1, int(np.ceil(args.seconds / block_s)))
  blocks, t_gen = [], 0.0
  for i in range(n_blocks):
    t1 = time.perf_counter()
    blk = np.asarray(stream.next_block())
    t_gen += time.perf_counter() - t1
    blocks.append(blk)
    rtf = (i + 1) * block_s / t_gen
    sys.stdout.write(f"\r[sample] block {i + 1}/{n_blocks}  real-time factor {rtf:.1f}x")
    sys.stdout.flush()
  print()
  lat = np.concatenate(blocks, axis=1)[0]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.save(args.out, lat)
  print(f"[sample] wrote {lat.shape[0]} latent frames x {lat.shape[1]} channels "
        f"({lat.shape[0] / FRAME_RATE:.1f} s) to {args.out}")


if __name__ == "__main__":
  main()
