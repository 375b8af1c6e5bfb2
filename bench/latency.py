"""Latency budget of the applications on this machine: block step, stream decode, partner encode,
the real-time factor with decoding, and the jam session's fixed delay.

  python3 bench/latency.py                       # the bundled model at its own settings
  python3 bench/latency.py --checkpoint runs/demo --steps 8 --cfg-scale 3 --blocks 40
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--checkpoint", default=None,
                  help="model source (default: the bundled trained model)")
  ap.add_argument("--config", default=None, help="a config for RANDOM weights (default: none)")
  ap.add_argument("--blocks", type=int, default=40, help="blocks timed (default: 40)")
  ap.add_argument("--steps", type=int, default=None, help="steps (default: the model's)")
  ap.add_argument("--cfg-scale", type=float, default=None, help="CFG scale (default: the model's)")
  args = ap.parse_args(argv)
  import jax

  from lmdm_jax import compile_cache
  from lmdm_jax.jamming import JamSession
  from lmdm_jax.system import load_system
  compile_cache.enable()
  system = load_system(args.checkpoint, config=args.config, log=lambda m: print(f"[latency] {m}"))
  cfg, codec = system.cfg, system.codec
  stream = system.stream("solo piano, calm", steps=args.steps, cfg_scale=args.cfg_scale,
                         decode=False)
  st = stream.settings
  block_s = system.block_seconds
  stream.next_latents()  # compiled ahead of time; the first call still warms caches
  dec = None
  if codec is not None:  # the jam's decoder
    dec = codec.low_latency(cfg.chunk).stream_decoder()
    dec.push(np.zeros((4 * cfg.chunk, codec.latent_dim), np.float32))
    dec = codec.low_latency(cfg.chunk).stream_decoder()
  t_step, t_dec, t_enc = [], [], []
  for _ in range(args.blocks):
    t0 = time.perf_counter()
    blk = stream.next_latents()
    t1 = time.perf_counter()
    if dec is not None:
      dec.push(blk)
      t2 = time.perf_counter()
      codec.encode(np.zeros((codec.channels, (cfg.chunk + 12) * codec.hop), np.float32) + 1e-3)
      t3 = time.perf_counter()
      t_dec.append(t2 - t1)
      t_enc.append(t3 - t2)
    t_step.append(t1 - t0)
  ms = lambda x: f"{1000 * np.median(x):.1f} ms (p90 {1000 * np.percentile(x, 90):.1f})"  # noqa: E731
  print(f"[latency] {system.name} on {jax.devices()[0].platform}: {cfg.chunk}-frame blocks = "
        f"{1000 * block_s:.0f} ms of audio; {st.steps} steps, CFG {st.cfg_scale}")
  print(f"[latency] block step {ms(t_step)}")
  if dec is not None:
    total = np.asarray(t_step) + np.asarray(t_dec)
    print(f"[latency] stream decode {ms(t_dec)}; partner encode (jam) {ms(t_enc)}")
    print(f"[latency] real-time factor: generate+decode {block_s / np.median(total):.2f}x, "
          f"+encode {block_s / np.median(total + np.asarray(t_enc)):.2f}x")
    def hold(dec_codec):
      return JamSession._decoder_latency.__get__(type("X", (), dict(
          codec=codec, dec_codec=dec_codec, cs=cfg.chunk, hop=codec.hop))())() / codec.sample_rate
    lat, lat_default = hold(codec.low_latency(cfg.chunk)), hold(codec)
    for d in (1, 2, 3):
      print(f"[latency] jam delay with delay_blocks={d}: {d * block_s + lat:.3f} s (jam decoder "
            f"hold-back {lat:.3f} s; {d * block_s + lat_default:.3f} s with the default "
            f"decoder's {lat_default:.3f} s)")
    c = float(np.median(total + np.asarray(t_enc)))
    print(f"[latency] delay_blocks='auto' would take {1 if 2 * c <= block_s else 2} block(s): "
          f"twice the block compute is {2000 * c:.0f} ms against {1000 * block_s:.0f} ms")


if __name__ == "__main__":
  main()
