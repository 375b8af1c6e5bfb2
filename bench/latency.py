"""Latency budget of the applications on this machine: block step, stream decode, partner encode,
the real-time factor with decoding, and the jam session's fixed delay.

  python3 bench/latency.py [--config demo] [--blocks 40] [--steps 8] [--cfg-scale 3]
Random weights (timings only).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="demo")
  ap.add_argument("--blocks", type=int, default=40)
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--cfg-scale", type=float, default=3.0)
  args = ap.parse_args()
  import jax

  from lmdm_jax import sampling as S
  from lmdm_jax.apps import common as C
  conf, cfg, model = C.load(args.config, None, 0, tag="[latency]")
  codec = C.load_codec(conf, cfg, None, tag="[latency]")
  text = C.text_encoder(conf, cfg)
  n_tok = text.max_tokens if text is not None else 1
  stream = S.Stream(model, cross_len=n_tok, cfg_guidance=args.cfg_scale != 1.0,
                    sampler=S.SamplerParams.make(args.steps, args.cfg_scale))
  cond = (np.asarray(text(["solo piano, calm"])) if text is not None
          else np.zeros((1, 1, cfg.cond_token_dim), np.float32))
  stream.set_prompt(cond, np.zeros((1, cfg.global_cond_dim), np.float32) if cfg.global_cond_dim else None)
  fr = C.frame_rate(codec)
  block_s = cfg.chunk / fr
  jax.block_until_ready(stream.next_block())
  dec = None
  if codec is not None:
    C.warm_decoder(codec, 4 * cfg.chunk)
    dec = codec.stream_decoder()
  t_step, t_dec, t_enc = [], [], []
  for _ in range(args.blocks):
    t0 = time.perf_counter()
    blk = np.asarray(stream.next_block())[0]
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
  print(f"[latency] {conf.name} on {jax.devices()[0].platform}: {cfg.chunk}-frame blocks = "
        f"{1000 * block_s:.0f} ms of audio; {args.steps} steps, CFG {args.cfg_scale}")
  print(f"[latency] block step {ms(t_step)}")
  if dec is not None:
    total = np.asarray(t_step) + np.asarray(t_dec)
    print(f"[latency] stream decode {ms(t_dec)}; partner encode (jam) {ms(t_enc)}")
    print(f"[latency] real-time factor: generate+decode {block_s / np.median(total):.2f}x, "
          f"+encode {block_s / np.median(total + np.asarray(t_enc)):.2f}x")
    from lmdm_jax.apps.jam import JamSession
    lat = JamSession._decoder_latency.__get__(type("X", (), dict(
        codec=codec, cs=cfg.chunk, hop=codec.hop))())()
    for d in (1, 2, 3):
      print(f"[latency] jam delay with delay_blocks={d}: "
            f"{d * block_s + lat / codec.sample_rate:.2f} s (decoder hold-back "
            f"{lat / codec.sample_rate:.2f} s)")


if __name__ == "__main__":
  main()
