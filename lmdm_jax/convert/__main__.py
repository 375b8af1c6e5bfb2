"""Convert a stable-audio-tools / LMDM checkpoint into an orbax checkpoint for lmdm_jax.

  python3 -m lmdm_jax.convert MODEL_CONFIG.json CHECKPOINT(.ckpt|.safetensors) OUT_DIR
      [--t5 DIR] [--vae PATH] [--allow-missing] [--allow-unexpected] [--ignore-prefix P ...]
      [--no-pretransform] [--rope-base B] [--trust-pickle] [--overwrite]

Every layout the authors' code writes converts without flags: a Lightning ``.ckpt``
(``state_dict`` under ``diffusion.``), an ``export_model`` ``.ckpt`` or ``.safetensors``, and an
ARC-Forcing checkpoint (split self-attention ``to_q``/``to_kv``; its ``discriminator.*`` and
``discriminator_head.*`` keys are dropped by name, with one report line).

The output records what sampling needs (``python3 sample.py --checkpoint OUT_DIR``): the model
config with its conditioners, the text encoder (the T5 model name; its local folder from --t5,
or at sampling time) and the codec (the checkpoint's VAE when it has ``pretransform.*`` keys, or
--vae). ``lmdm_jax.convert.load.load(OUT_DIR)`` restores all of it; ``python3 -m
lmdm_jax.convert.export OUT_DIR DIR`` writes a stable-audio-tools checkpoint back. Any unknown,
missing or wrongly shaped key is an error that lists the keys, unless allowed by the flags.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from lmdm_jax.convert import dit as conv
from lmdm_jax.convert.conditioning import conditioning_spec


def sampling_record(cfg: dict, spec: dict, vae, t5: str | None, vae_path: str | None) -> dict:
  """The converter's record of what sampling needs (read by ``lmdm_jax.convert.load``)."""
  if vae is not None:
    codec = {"source": "pretransform"}
  elif vae_path:
    codec = {"source": "vae", "path": os.path.abspath(vae_path)}
  else:
    codec = None
  return {"model_config": cfg, "conditioning": spec,
          "t5_dir": os.path.abspath(t5) if t5 else None, "codec": codec}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python3 -m lmdm_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", help="stable-audio-tools model config JSON (model_type diffusion_cond)")
  p.add_argument("checkpoint", help=".ckpt (Lightning or plain state_dict) or .safetensors")
  p.add_argument("out", help="output directory (orbax checkpoint)")
  p.add_argument("--t5", default=None, metavar="DIR",
                 help="local Hugging Face T5 folder of the prompt encoder, recorded for sampling "
                      "(default: none recorded; give it to sample.py --t5 instead)")
  p.add_argument("--vae", default=None, metavar="PATH",
                 help="VAE to record for sampling when the checkpoint has none: a converted "
                      "directory holding one, or a VAE .safetensors/.ckpt (default: the "
                      "checkpoint's own pretransform.* VAE, else none)")
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
    spec = conditioning_spec(cfg)
    for opt, path, isdir in (("--t5", a.t5, True), ("--vae", a.vae, False)):
      if path and not (os.path.isdir(path) if isdir else os.path.exists(path)):
        raise ValueError(f"{opt} {path!r} does not exist")
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
        overwrite=a.overwrite, extra=sampling_record(cfg, spec, out.pretransform, a.t5, a.vae))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyError as e:
    print(f"error: {a.config}: the model config has no {e} entry", file=sys.stderr)
    return 2
  r = out.report
  print(f"converted {len(r['used'])} keys -> {path}")
  if r.get("dropped"):
    print("  dropped by name (not the generator): " + ", ".join(
        f"{p}* ({n} keys, {conv.DROPPED_PREFIXES[p]})" for p, n in r["dropped"].items()))
  for what in ("missing", "unexpected", "ignored"):
    if r[what]:
      print(f"  {what} ({len(r[what])}): {r[what][:20]}{' ...' if len(r[what]) > 20 else ''}")
  print(f"  DiT: {out.config}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
