"""Export one of our models as a stable-audio-tools checkpoint: ``model.safetensors`` +
``model_config.json`` in OUT_DIR.

  python3 -m lmdm_jax.convert.export SOURCE OUT_DIR [--ema] [--overwrite]

SOURCE is a converted directory (``python3 -m lmdm_jax.convert``: its recorded model config,
number conditioners and VAE are written back), a model bundle ``.npz`` (``lmdm_jax.bundle``, the
bundled default model is one) or a ``train.py`` work directory (its latest checkpoint).

The safetensors holds the keys of stable-audio-tools' ``ConditionedDiffusionModelWrapper``:
``model.model.*`` (the DiT, fused self-attention ``to_qkv``, float32), ``conditioner.
conditioners.<id>.*`` (number conditioners) and ``pretransform.model.*`` (the VAE, weight-norm
layout ``weight_g``/``weight_v``). Converting the export again gives the same arrays bit for bit.
For our own models the config is built from the DiT hyper-parameters (LMDM keys ``postpend`` and
``input_add_dims`` for streaming models; the streaming geometry under
``training.inpainting.mask_kwargs``). Their prompt encoders (MiniLM, bytes) and codecs (the
spectral codec) have no stable-audio-tools equivalent: they are named under the config's
``lmdm_jax`` entry, and ``model.conditioning`` is written only for a T5 prompt encoder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from lmdm_jax.config import DiTConfig

SAFETENSORS, CONFIG_JSON = "model.safetensors", "model_config.json"
_T5_NAMES = {512: "t5-small", 768: "t5-base", 1024: "t5-large"}


def dit_model_config(cfg: DiTConfig, *, sample_rate: int = 44100, regime: str = "block_causal",
                     conditioning: dict | None = None) -> dict:
  """A stable-audio-tools model config for ``cfg`` that ``convert.dit.dit_config_from_json``
  maps back to the same DiTConfig (the rotary base is read back from ``inv_freq``)."""
  dc = dict(io_channels=cfg.io_channels, embed_dim=cfg.embed_dim, depth=cfg.depth,
            num_heads=cfg.num_heads, cond_token_dim=cfg.cond_token_dim,
            project_cond_tokens=cfg.project_cond_tokens, global_cond_dim=cfg.global_cond_dim,
            timestep_features_dim=cfg.timestep_features_dim,
            transformer_type="continuous_transformer", ff_kwargs={"mult": cfg.ff_mult})
  if cfg.qk_norm == "ln":
    dc["attn_kwargs"] = {"qk_norm": "ln"}
  diffusion = {"type": "dit", "diffusion_objective": "rectified_flow", "config": dc}
  if cfg.global_token == "postpend":
    dc["postpend"] = True
  if cfg.input_add_dim:
    groups = [["inpaint_mask", 1], ["inpaint_masked_input", cfg.io_channels]]
    if cfg.extra_dim:
      groups.append(["extra", cfg.extra_dim])
    dc["input_add_dims"] = groups
    diffusion["input_add_ids"] = [list(g) for g in groups]
  model = {"io_channels": cfg.io_channels, "diffusion": diffusion}
  if conditioning:
    model["conditioning"] = conditioning["conditioning"]
    diffusion["cross_attention_cond_ids"] = conditioning["cross_ids"]
    diffusion["global_cond_ids"] = conditioning.get("global_ids", [])
  mask = {"fixed_mask_size": cfg.window_chunks * cfg.chunk,
          "block_causal_chunk_size": cfg.chunk,
          "block_causal_window_chunks": cfg.context_chunks + 1,
          "context_router_attention_pattern": "block-causal" if regime.startswith("block_causal")
          else "enc-dec"}
  return {"model_type": "diffusion_cond", "sample_rate": int(sample_rate), "model": model,
          "training": {"inpainting": {"mask_kwargs": mask}}}


def _own_model_config(cfg: DiTConfig, meta: dict, source: str) -> dict:
  """The config of a bundle / work directory model, from its recorded config name."""
  from lmdm_jax.config import load_config
  conf = load_config(meta["config"]) if meta.get("config") else None
  cond = dict(conf.conditioner) if conf is not None and "conditioner" in conf else {}
  codec = conf.get("codec") if conf is not None else None
  sample_rate = 44100
  if codec:
    try:
      from lmdm_jax import codecs
      sample_rate = codecs.get_codec(codec).sample_rate
    except Exception:  # noqa: BLE001 - a codec that does not load here: keep the default
      pass
  conditioning = None
  if cond.get("type") == "t5" and cfg.cond_token_dim in _T5_NAMES:
    t5 = {"t5_model_name": _T5_NAMES[cfg.cond_token_dim], "max_length": int(cond.get("max_tokens", 64))}
    if cond.get("path"):
      t5["model_path"] = os.path.abspath(cond["path"])
    conditioning = {"conditioning": {"cond_dim": cfg.cond_token_dim, "configs": [
        {"id": "prompt", "type": "t5", "config": t5}]}, "cross_ids": ["prompt"]}
  regime = conf.sampler.regime if conf is not None and "sampler" in conf else "block_causal"
  out = dit_model_config(cfg, sample_rate=sample_rate, regime=regime, conditioning=conditioning)
  out["lmdm_jax"] = {"source": os.path.abspath(source), "config": meta.get("config"),
                     "step": meta.get("step"), "text_encoder": cond or None, "codec": codec,
                     "note": "global conditioning was zeros in lmdm_jax; the prompt encoder and "
                             "codec named here are lmdm_jax's own unless model.conditioning / "
                             "model.pretransform say otherwise"}
  return out


def collect(source: str, use_ema: bool = False):
  """-> (state_dict {key: float32 numpy}, model config dict) for SOURCE (see the module docstring)."""
  from lmdm_jax.convert import dit as conv
  from lmdm_jax.convert import oobleck as conv_oobleck
  from lmdm_jax.convert.load import is_converted
  if is_converted(source):
    meta = conv._read_meta(source)
    cfg, model, numbers = conv.load_converted(source)
    sd = conv.to_torch_state_dict(model, numbers)
    model_config = meta.get("model_config") or dit_model_config(cfg)
    if meta.get("pretransform") is not None:
      vae = conv.load_converted_pretransform(source)
      sd.update(conv_oobleck.to_torch_state_dict(vae, prefix="pretransform.model."))
    return sd, model_config
  from lmdm_jax.checkpoint_io import load_model
  cfg, model, extras = load_model(source, use_ema=use_ema)
  return conv.to_torch_state_dict(model), _own_model_config(cfg, extras.get("meta") or {}, source)


def export(source: str, out_dir: str, *, use_ema: bool = False, overwrite: bool = False) -> str:
  """Writes ``OUT_DIR/model.safetensors`` and ``OUT_DIR/model_config.json``; returns OUT_DIR.
  Both files are written to a temporary folder first and moved in place when complete."""
  from safetensors.numpy import save_file
  out_dir = os.path.abspath(out_dir)
  targets = [os.path.join(out_dir, n) for n in (SAFETENSORS, CONFIG_JSON)]
  if any(os.path.exists(t) for t in targets) and not overwrite:
    raise ValueError(f"{out_dir!r} already holds an export; pass --overwrite to replace it")
  if not os.path.exists(source):
    raise ValueError(f"source {source!r} does not exist")
  sd, model_config = collect(source, use_ema)
  os.makedirs(out_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export_", dir=out_dir)
  try:
    save_file(sd, os.path.join(tmp, SAFETENSORS))
    with open(os.path.join(tmp, CONFIG_JSON), "w") as f:
      json.dump(model_config, f, indent=2)
    for t in targets:
      os.replace(os.path.join(tmp, os.path.basename(t)), t)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python3 -m lmdm_jax.convert.export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("source", help="a converted directory, a model bundle .npz or a train.py work "
                                "directory")
  p.add_argument("out", help="output directory (model.safetensors + model_config.json)")
  p.add_argument("--ema", action="store_true",
                 help="a train.py work directory: export the EMA weights (default: the raw ones)")
  p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
  a = p.parse_args(argv)
  try:
    out = export(a.source, a.out, use_ema=a.ema, overwrite=a.overwrite)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"exported {a.source} -> {os.path.join(out, SAFETENSORS)} + {CONFIG_JSON}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
