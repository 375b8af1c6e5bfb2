"""Convert a stable-audio-tools / LMDM checkpoint into an orbax checkpoint for lmdm_jax.

  python3 -m lmdm_jax.convert MODEL_CONFIG.json CHECKPOINT(.ckpt|.safetensors) OUT_DIR
      [--allow-missing] [--allow-unexpected] [--ignore-prefix discriminator. ...]
      [--no-pretransform] [--rope-base B] [--trust-pickle] [--overwrite]

The result restores with ``lmdm_jax.convert.dit.load_converted(OUT_DIR)`` ->
(DiTConfig, DiT, {conditioner id: NumberConditioner}); the VAE, when converted, with
``load_converted_pretransform(OUT_DIR)``. Any unknown, missing or wrongly shaped key is an error
that lists the keys, unless allowed by the flags.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from lmdm_jax.convert import dit as conv


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python3 -m lmdm_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", help="stable-audio-tools model config JSON (model_type diffusion_cond)")
  p.add_argument("checkpoint", help=".ckpt (Lightning or plain state_dict) or .safetensors")
  p.add_argument("out", help="output directory (orbax checkpoint)")
  p.add_argument("--allow-missing", action="store_true", help="accept missing keys (kept at init)")
  p.add_argument("--allow-unexpected", action="store_true", help="accept unknown keys (dropped)")
  p.add_argument("--ignore-prefix", action="append", default=[], metavar="PREFIX",
                 help="drop keys starting with PREFIX on purpose (e.g. 'discriminator.'); repeatable")
  p.add_argument("--no-pretransform", action="store_true",
                 help="do not convert the VAE (pretransform.model.* keys are dropped, reported)")
  p.add_argument("--rope-base", type=float, default=None,
                 help="RoPE base recorded in the config (default: derived from inv_freq)")
  p.add_argument("--trust-pickle", action="store_true",
                 help="load .ckpt with weights_only=False (runs pickled code: trusted files only)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUT directory")
  a = p.parse_args(argv)
  try:
    with open(a.config) as f:
      cfg = json.load(f)
    out = conv.convert_checkpoint(cfg, a.checkpoint, allow_missing=a.allow_missing,
                                  allow_unexpected=a.allow_unexpected,
                                  ignore_prefixes=tuple(a.ignore_prefix),
                                  pretransform=not a.no_pretransform, rope_base=a.rope_base,
                                  trust_pickle=a.trust_pickle)
    path = conv.save_converted(
        a.out, out.config, out.model, out.conditioners, out.pretransform,
        cfg["model"].get("pretransform") if out.pretransform is not None else None,
        source={"config": os.path.basename(a.config),  # file names only: no local folders
                "checkpoint": os.path.basename(a.checkpoint),
                "report": {k: v for k, v in out.report.items() if k != "used"}},
        overwrite=a.overwrite)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  r = out.report
  print(f"converted {len(r['used'])} keys -> {path}")
  for what in ("missing", "unexpected", "ignored"):
    if r[what]:
      print(f"  {what} ({len(r[what])}): {r[what][:20]}{' ...' if len(r[what]) > 20 else ''}")
  print(f"  DiT: {out.config}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
