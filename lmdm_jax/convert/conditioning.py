"""What a stable-audio-tools model config says about conditioning, checked for sampling here.

``conditioning_spec(model_config)`` reads ``model.conditioning`` (the conditioners by id) and the
ids of ``model.diffusion`` (``cross_attention_cond_ids``, ``global_cond_ids``) into a JSON-able
dict that the converter records and the loader (``lmdm_jax.convert.load``) turns into an
``lmdm_jax.nn.conditioners.Conditioning``:

  {"cond_dim": 768,
   "text": {"prompt": {"type": "t5", "t5_model_name": "t5-base", "max_length": 64,
                       "model_path": None}},
   "numbers": {"seconds_total": {"output_dim": 768, "min_val": 0.0, "max_val": 256.0, "dim": 256}},
   "cross_ids": ["prompt", "seconds_total"], "global_ids": ["seconds_total"],
   "unsupported": {}}

Conditioner types other than ``t5`` and ``number`` are listed under ``unsupported`` (id -> type):
converting such a checkpoint still works, sampling from it is refused by the loader when the
model uses them.
"""
from __future__ import annotations

import dataclasses

from lmdm_jax.nn.conditioners import NumberConditionerConfig

_T5_KEYS = {"t5_model_name", "max_length", "model_path", "enable_grad", "project_out",
            "padding_mode"}


def _t5_entry(entry: dict) -> dict:
  cid = entry.get("id")
  c = dict(entry.get("config") or {})
  unknown = sorted(set(c) - _T5_KEYS)
  if unknown:
    raise ValueError(f"T5 conditioner {cid!r}: unsupported config keys {unknown}")
  if c.get("project_out"):
    raise ValueError(f"T5 conditioner {cid!r}: project_out (a learned projection of the T5 "
                     "tokens) is not supported; only T5 tokens used as they are")
  if c.get("padding_mode", "zero") != "zero":
    raise ValueError(f"T5 conditioner {cid!r}: padding_mode {c['padding_mode']!r} is not "
                     "supported (only 'zero': padded tokens are zeros)")
  return {"type": "t5", "t5_model_name": str(c.get("t5_model_name", "t5-base")),
          "max_length": int(c.get("max_length", 128)), "model_path": c.get("model_path")}


def conditioning_spec(model_config: dict) -> dict:
  """The conditioning of a model config (see the module docstring). Raises ValueError on a
  malformed entry or an id used by the diffusion model that names no conditioner."""
  model = model_config.get("model") or {}
  cond = model.get("conditioning") or {}
  diff = model.get("diffusion") or {}
  cond_dim = int(cond.get("cond_dim", 0))
  text, numbers, unsupported = {}, {}, {}
  for entry in cond.get("configs", []):
    cid, kind = entry.get("id"), entry.get("type")
    if not isinstance(cid, str):
      raise ValueError(f"model.conditioning.configs: an entry without an id: {entry}")
    if kind == "t5":
      text[cid] = _t5_entry(entry)
    elif kind == "number":
      numbers[cid] = dataclasses.asdict(NumberConditionerConfig.from_conditioning(entry, cond_dim))
    else:
      unsupported[cid] = str(kind)
  cross_ids = [str(i) for i in diff.get("cross_attention_cond_ids", [])]
  global_ids = [str(i) for i in diff.get("global_cond_ids", [])]
  known = set(text) | set(numbers) | set(unsupported)
  stray = [i for i in cross_ids + global_ids if i not in known]
  if stray:
    raise ValueError(f"model.diffusion names conditioners {stray} that model.conditioning does "
                     f"not define (defined: {sorted(known)})")
  return {"cond_dim": cond_dim, "text": text, "numbers": numbers, "cross_ids": cross_ids,
          "global_ids": global_ids, "unsupported": unsupported}
