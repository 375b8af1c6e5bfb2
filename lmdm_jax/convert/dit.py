"""stable-audio-tools / LMDM checkpoints <-> our Flax ``DiT`` (+ number conditioners, + VAE).

Inputs: a model config JSON (``model_type`` ``diffusion_cond``; ``model.diffusion.config`` holds
the DiT hyper-parameters, ``model.conditioning.configs`` the conditioners, ``model.pretransform``
the VAE) and a checkpoint: a Lightning ``.ckpt`` (``state_dict``, keys under ``diffusion.``), a
plain ``.ckpt``/``.pt``/``.pth`` state_dict, or a ``.safetensors`` file. Key routing after a
leading ``diffusion.`` is stripped (LMDM_REFERENCE.md §1.1, §1.7):
  ``model.model.*``                    -> the DiT (``DiTWrapper.model``)
  ``conditioner.conditioners.<id>.*``  -> number conditioners (``seconds_total``, ...)
  ``pretransform.model.*``             -> the Oobleck VAE (``lmdm_jax.convert.oobleck``)
A bare ``DiffusionTransformer`` state_dict (keys ``transformer.*``, ``timestep_features.*``) is
accepted too. Both self-attention layouts load: the fused ``to_qkv`` and the split ``to_q`` +
``to_kv`` of ARC / KV-cache checkpoints (rows [q; k; v] either way). The rotary ``inv_freq`` and the
LayerNorm ``beta`` buffers are loaded, not recomputed.

Nothing is skipped silently: unknown, missing or wrongly shaped keys raise a ValueError listing
them, unless ``allow_missing`` / ``allow_unexpected`` is given (or ``ignore_prefixes`` names key
prefixes to drop on purpose). The other networks a training checkpoint of the authors' code holds
are dropped by name, always, and counted in the report under ``dropped``: ``DROPPED_PREFIXES``
(the ARC-Forcing discriminator and its head, an ODE-warmup teacher, the EMA copy).

``save_converted`` writes an orbax checkpoint (params + the config as JSON, atomically);
``load_converted`` restores ``(DiTConfig, DiT, conditioners)``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdm_jax import file_checks as fc
from lmdm_jax.config import DiTConfig
from lmdm_jax.nn.conditioners import NumberConditioner, NumberConditionerConfig
from lmdm_jax.nn.dit import DiT
from lmdm_jax.convert.keys import check_keys

DIT_PREFIX = "model.model."
COND_PREFIX = "conditioner.conditioners."
PRETRANSFORM_PREFIX = "pretransform."
# Top-level modules of the authors' Lightning training wrappers that are not the generator:
# prefix -> what it is (one report line names them).
DROPPED_PREFIXES = {
    "discriminator.": "ARC-Forcing discriminator",
    "discriminator_head.": "ARC-Forcing discriminator head",
    "teacher_model.": "ODE-warmup teacher",
    "diffusion_ema.": "EMA copy (the diffusion.* weights are converted)",
}

# DiffusionTransformer / ContinuousTransformer / TransformerBlock keyword arguments that do not
# change the computation of a converted model (their value is irrelevant or checked below).
_HARMLESS_KEYS = {"transformer_type", "zero_init_branch_outputs", "use_checkpointing", "split_qkv",
                  "postpend", "input_add_dims", "io_channels", "embed_dim", "depth", "num_heads",
                  "cond_token_dim", "project_cond_tokens", "global_cond_dim", "project_global_cond",
                  "timestep_features_dim", "attn_kwargs", "ff_kwargs", "global_cond_type",
                  "patch_size", "input_concat_dim", "prepend_cond_dim", "timestep_cond_type",
                  "timestep_features_type", "timestep_features_logsnr", "rotary_pos_emb",
                  "diffusion_objective", "norm_type", "layer_scale", "conformer",
                  "num_memory_tokens", "use_sinusoidal_emb", "use_abs_pos_emb",
                  "cross_attn_rotary_pos_emb", "sliding_window", "final_cross_attn_ix", "causal",
                  "local_add_cond_dim", "modular_local_cond_configs", "norm_kwargs",
                  "timestep_embed_dim"}
# key -> the only value we implement (the reference's default).
_REQUIRED = {"transformer_type": "continuous_transformer", "global_cond_type": "prepend",
             "patch_size": 1, "input_concat_dim": 0, "prepend_cond_dim": 0,
             "timestep_cond_type": "global", "timestep_features_type": "learned",
             "timestep_features_logsnr": False, "rotary_pos_emb": True, "norm_type": "layer_norm",
             "layer_scale": False, "conformer": False, "num_memory_tokens": 0,
             "use_sinusoidal_emb": False, "use_abs_pos_emb": False,
             "cross_attn_rotary_pos_emb": False, "sliding_window": None,
             "final_cross_attn_ix": -1, "causal": False, "local_add_cond_dim": None,
             "modular_local_cond_configs": None, "norm_kwargs": {}}


# ------------------------------------------------------------------------------------- config


def _load_json(config) -> dict:
  if isinstance(config, (str, os.PathLike)):
    with open(config) as f:
      return json.load(f)
  return dict(config)


def _lmdm_style(dc: dict) -> bool:
  return bool(dc.get("postpend") or dc.get("input_add_dims") or dc.get("split_qkv"))


def rope_base_from_inv_freq(inv_freq) -> float:
  """The base b of inv_freq_j = b^(-2j/r) (rounded to 6 significant digits)."""
  inv = np.asarray(inv_freq, np.float64)
  if inv.ndim != 1 or inv.shape[0] < 2 or not np.all(inv > 0):
    raise ValueError(f"inv_freq must be a positive vector of length >= 2, got shape {inv.shape}")
  r = 2 * inv.shape[0]
  return float(f"{inv[1] ** (-r / 2):.6g}")


def dit_config_from_json(config, *, inv_freq=None, rope_base: float | None = None,
                         dtype: str = "float32") -> DiTConfig:
  """``DiTConfig`` from a stable-audio-tools / LMDM model config (dict or path).

  rope_base: explicit; else derived from a checkpoint's ``inv_freq`` when given; else the code
  default of the reference that wrote the config (1e6 for LMDM-style configs, 1e4 otherwise).
  The loaded ``inv_freq`` is what the model uses either way.
  Raises ValueError on model types or DiT options this port does not implement.
  """
  cfg = _load_json(config)
  if cfg.get("model_type") not in ("diffusion_cond", "diffusion_cond_inpaint"):
    raise ValueError(f"model_type must be 'diffusion_cond', got {cfg.get('model_type')!r}")
  diff = cfg["model"].get("diffusion") or {}
  if diff.get("type") != "dit":
    raise ValueError(f"model.diffusion.type must be 'dit', got {diff.get('type')!r}")
  dc = dict(diff.get("config") or {})
  unknown = sorted(set(dc) - _HARMLESS_KEYS)
  if unknown:
    raise ValueError(f"model.diffusion.config: unsupported keys {unknown}")
  bad = [f"{k}={dc[k]!r} (supported: {v!r})" for k, v in _REQUIRED.items()
         if k in dc and not (dc[k] == v or (not dc[k] and not v))]
  if bad:
    raise ValueError(f"model.diffusion.config: unsupported settings {bad}")
  if diff.get("modular_local_cond_configs"):
    raise ValueError("model.diffusion.modular_local_cond_configs is not supported")
  attn = dict(dc.get("attn_kwargs") or {})
  qk_norm = attn.pop("qk_norm", "none")
  if qk_norm not in ("ln", "none"):
    raise ValueError(f"attn_kwargs.qk_norm {qk_norm!r} is not supported (only 'ln' or 'none')")
  eps = attn.pop("qk_norm_eps", 1e-6)
  for k, v in (("differential", False), ("feat_scale", False), ("causal", False)):
    if attn.pop(k, v) != v:
      raise ValueError(f"attn_kwargs.{k} is not supported")
  if attn or eps != 1e-6:
    raise ValueError(f"unsupported attn_kwargs {sorted(attn) + (['qk_norm_eps'] if eps != 1e-6 else [])}")
  ff = dict(dc.get("ff_kwargs") or {})
  ff_mult = ff.pop("mult", 4)
  for k, v in (("glu", True), ("no_bias", False), ("use_conv", False), ("sinusoidal", False),
               ("zero_init_output", None)):
    if k in ff and (v is not None and ff.pop(k) != v):
      raise ValueError(f"ff_kwargs.{k} is not supported")
    ff.pop(k, None)
  if ff:
    raise ValueError(f"unsupported ff_kwargs {sorted(ff)}")
  if int(ff_mult) != ff_mult:
    raise ValueError(f"ff_kwargs.mult must be an integer, got {ff_mult}")
  io = int(dc.get("io_channels", 32))
  embed = int(dc.get("embed_dim", 768))
  global_dim = int(dc.get("global_cond_dim", 0))
  if global_dim and not dc.get("project_global_cond", True) and global_dim != embed:
    raise ValueError("project_global_cond=False needs global_cond_dim == embed_dim")
  if dc.get("timestep_embed_dim") not in (None, embed):
    raise ValueError("timestep_embed_dim only applies to timestep_cond_type 'input_concat'")
  groups = [tuple(g) for g in (dc.get("input_add_dims") or [])]
  input_add = int(sum(int(d) for _, d in groups))
  if groups and (int(groups[0][1]) != 1 or len(groups) < 2 or int(groups[1][1]) != io):
    raise ValueError(f"input_add_dims {groups}: expected [mask (1), masked input ({io}), extra...]")
  if rope_base is None:
    rope_base = (rope_base_from_inv_freq(inv_freq) if inv_freq is not None
                 else (1_000_000.0 if _lmdm_style(dc) else 10000.0))
  geo = {}
  mk = ((cfg.get("training") or {}).get("inpainting") or {}).get("mask_kwargs") or {}
  if "block_causal_chunk_size" in mk:
    geo["chunk"] = int(mk["block_causal_chunk_size"])
  if "block_causal_window_chunks" in mk:
    geo["context_chunks"] = int(mk["block_causal_window_chunks"]) - 1
  if "fixed_mask_size" in mk and "chunk" in geo:
    geo["window_chunks"] = int(mk["fixed_mask_size"]) // geo["chunk"]
  return DiTConfig(
      io_channels=io, embed_dim=embed, depth=int(dc.get("depth", 12)),
      num_heads=int(dc.get("num_heads", 8)), cond_token_dim=int(dc.get("cond_token_dim", 0)),
      project_cond_tokens=bool(dc.get("project_cond_tokens", True)), global_cond_dim=global_dim,
      input_add_dim=input_add, global_token="postpend" if dc.get("postpend") else "prepend",
      qk_norm=qk_norm, rope_base=float(rope_base), ff_mult=int(ff_mult),
      timestep_features_dim=int(dc.get("timestep_features_dim", 256)), dtype=dtype,
      param_dtype="float32", **geo)


def conditioner_configs_from_json(config) -> dict[str, NumberConditionerConfig]:
  """Number conditioners of ``model.conditioning`` by id. Other types (t5, ...) hold no weights
  in the checkpoint (T5 is loaded separately, lmdm_jax.convert.t5) and are left out here."""
  cfg = _load_json(config)
  cond = cfg["model"].get("conditioning") or {}
  out = {}
  for entry in cond.get("configs", []):
    if entry.get("type") == "number":
      out[entry["id"]] = NumberConditionerConfig.from_conditioning(entry, cond["cond_dim"])
  return out


# ---------------------------------------------------------------------------- key mapping


def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, np.float32)


class _Entry(NamedTuple):
  key: str  # PyTorch key (relative to its module prefix)
  var: nnx.Variable
  kind: str  # "linear": torch (out, in) <-> kernel (in, out); "conv": (out, in, 1) <-> (in, out)


def _linear_entries(name: str, lin: nnx.Linear) -> list[_Entry]:
  out = [_Entry(f"{name}.weight", lin.kernel, "linear")]
  if lin.bias is not None:
    out.append(_Entry(f"{name}.bias", lin.bias, "plain"))
  return out


def _norm_entries(name: str, norm, gamma: str, beta: str) -> list[_Entry]:
  return [_Entry(f"{name}.{gamma}", norm.scale, "plain"), _Entry(f"{name}.{beta}", norm.bias, "plain")]


def dit_entries(model: DiT) -> list[_Entry]:
  """Every PyTorch key of a DiT (fused ``to_qkv`` layout) with its Flax variable."""
  cfg = model.cfg
  e = [_Entry("timestep_features.weight", model.timestep_features, "plain")]
  e += _linear_entries("to_timestep_embed.0", model.to_timestep_embed_0)
  e += _linear_entries("to_timestep_embed.2", model.to_timestep_embed_2)
  if cfg.cond_token_dim:
    e += _linear_entries("to_cond_embed.0", model.to_cond_embed_0)
    e += _linear_entries("to_cond_embed.2", model.to_cond_embed_2)
  if cfg.global_cond_dim:
    e += _linear_entries("to_global_embed.0", model.to_global_embed_0)
    e += _linear_entries("to_global_embed.2", model.to_global_embed_2)
  if cfg.input_add_dim:
    e += _linear_entries("to_input_add_embed", model.to_input_add_embed)
  e += [_Entry("preprocess_conv.weight", model.preprocess_conv, "conv"),
        _Entry("postprocess_conv.weight", model.postprocess_conv, "conv")]
  e += _linear_entries("transformer.project_in", model.project_in)
  e += _linear_entries("transformer.project_out", model.project_out)
  e.append(_Entry("transformer.rotary_pos_emb.inv_freq", model.inv_freq, "plain"))
  for i, blk in enumerate(model.layers):
    p = f"transformer.layers.{i}"
    e += _norm_entries(f"{p}.pre_norm", blk.pre_norm, "gamma", "beta")
    e += _linear_entries(f"{p}.self_attn.to_qkv", blk.self_attn.to_qkv)
    e += _linear_entries(f"{p}.self_attn.to_out", blk.self_attn.to_out)
    if cfg.qk_norm == "ln":
      e += _norm_entries(f"{p}.self_attn.q_norm", blk.self_attn.q_norm, "weight", "bias")
      e += _norm_entries(f"{p}.self_attn.k_norm", blk.self_attn.k_norm, "weight", "bias")
    if cfg.cond_token_dim:
      e += _norm_entries(f"{p}.cross_attend_norm", blk.cross_attend_norm, "gamma", "beta")
      for n in ("to_q", "to_kv", "to_out"):
        e += _linear_entries(f"{p}.cross_attn.{n}", getattr(blk.cross_attn, n))
      if cfg.qk_norm == "ln":
        e += _norm_entries(f"{p}.cross_attn.q_norm", blk.cross_attn.q_norm, "weight", "bias")
        e += _norm_entries(f"{p}.cross_attn.k_norm", blk.cross_attn.k_norm, "weight", "bias")
    e += _norm_entries(f"{p}.ff_norm", blk.ff_norm, "gamma", "beta")
    e += _linear_entries(f"{p}.ff.ff.0.proj", blk.ff_in)
    e += _linear_entries(f"{p}.ff.ff.2", blk.ff_out)
  return e


def conditioner_entries(cond: NumberConditioner) -> list[_Entry]:
  return [_Entry("embedder.embedding.0.weights", cond.freqs, "plain"),
          *_linear_entries("embedder.embedding.1", cond.proj)]


def _from_torch(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear" and value.ndim == 2:
    return value.T
  if kind == "conv" and value.ndim == 3 and value.shape[2] == 1:
    return value[:, :, 0].T
  return value  # wrong ndim: reported as a shape mismatch by the caller


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(value.T)
  if kind == "conv":
    return np.ascontiguousarray(value.T[:, :, None])
  return np.array(value)


# -------------------------------------------------------------------------- state_dict I/O


def split_state_dict(state_dict: Mapping[str, Any], ignore_prefixes=()) -> dict[str, dict]:
  """Routes keys (after stripping a leading ``diffusion.``) to ``dit``, ``conditioners`` (by id),
  ``pretransform`` (keys kept under ``pretransform.model.``), ``ignored``, ``unexpected`` and
  ``dropped`` ({prefix of ``DROPPED_PREFIXES``: number of keys})."""
  keys = list(state_dict)
  bare = not any(k.removeprefix("diffusion.").startswith(DIT_PREFIX) for k in keys)
  out = {"dit": {}, "conditioners": {}, "pretransform": {}, "ignored": {}, "unexpected": {},
         "dropped": {}}
  for k in keys:
    v = state_dict[k]
    drop = next((p for p in DROPPED_PREFIXES if k.startswith(p)), None)
    if drop is not None:
      out["dropped"][drop] = out["dropped"].get(drop, 0) + 1
      continue
    if any(k.startswith(p) for p in ignore_prefixes):
      out["ignored"][k] = v
      continue
    s = k.removeprefix("diffusion.")
    if s.startswith(DIT_PREFIX):
      out["dit"][s[len(DIT_PREFIX):]] = (k, v)
    elif s.startswith(COND_PREFIX):
      cid, _, rest = s[len(COND_PREFIX):].partition(".")
      out["conditioners"].setdefault(cid, {})[rest] = (k, v)
    elif s.startswith(PRETRANSFORM_PREFIX):
      out["pretransform"][s] = v
    elif bare and s.startswith(("transformer.", "timestep_features.", "to_timestep_embed.",
                                "to_cond_embed.", "to_global_embed.", "to_input_add_embed.",
                                "preprocess_conv.", "postprocess_conv.")):
      out["dit"][s] = (k, v)
    else:
      out["unexpected"][k] = v
  return out


class _Loader:
  """Collects values for variables; applies them only if the whole load is valid."""

  def __init__(self):
    self.updates, self.missing, self.bad_shape, self.used = [], [], [], set()

  def take(self, sub: dict, key: str, var: nnx.Variable, kind: str, value=None):
    if value is None:
      if key not in sub:
        self.missing.append(key)
        return
      full, raw = sub[key]
      self.used.add(full)
      value = _from_torch(_to_numpy(raw), kind)
      label = full
    else:
      label = key
    want = tuple(var.get_value().shape)
    if tuple(value.shape) != want:
      self.bad_shape.append(f"{label}: got {tuple(value.shape)} in Flax layout, expected {want}")
    else:
      self.updates.append((var, value))


def _take_self_attn_qkv(ld: _Loader, sub: dict, p: str, var: nnx.Variable, prefix_of):
  """Fused ``to_qkv`` or split ``to_q`` + ``to_kv`` (rows [q; k; v] either way)."""
  fused, q, kv = f"{p}.to_qkv.weight", f"{p}.to_q.weight", f"{p}.to_kv.weight"
  if fused in sub:
    if q in sub or kv in sub:
      raise ValueError(f"{prefix_of(p)}: both the fused to_qkv and split to_q/to_kv are present")
    ld.take(sub, fused, var, "linear")
  elif q in sub or kv in sub:
    if q not in sub or kv not in sub:
      ld.missing.append(kv if q in sub else q)
      for k in (q, kv):
        if k in sub:
          ld.used.add(sub[k][0])
      return
    (fq, wq), (fkv, wkv) = sub[q], sub[kv]
    ld.used.update((fq, fkv))
    wq, wkv = _to_numpy(wq), _to_numpy(wkv)
    if wq.ndim != 2 or wkv.ndim != 2 or wq.shape[1] != wkv.shape[1]:
      ld.bad_shape.append(f"{fq} {wq.shape} / {fkv} {wkv.shape}: not two (out, in) matrices")
      return
    ld.take(sub, f"{fq} + {fkv}", var, "linear", np.concatenate([wq, wkv], 0).T)
  else:
    ld.missing.append(fused)


def _report(what: str, ld: _Loader, unexpected, allow_missing, allow_unexpected):
  check_keys(what, ld.bad_shape, ld.missing, unexpected, allow_missing, allow_unexpected)


class Converted(NamedTuple):
  """A converted checkpoint: config, DiT, number conditioners by id, VAE (or None), report."""

  config: DiTConfig
  model: DiT
  conditioners: dict
  pretransform: Any
  report: dict


def load_dit_state_dict(model: DiT, sub: Mapping[str, tuple[str, Any]], ld: _Loader) -> None:
  """Fills ``ld`` from DiT keys ``sub`` (relative key -> (full key, value))."""
  for ent in dit_entries(model):
    if ent.key.endswith("self_attn.to_qkv.weight"):
      _take_self_attn_qkv(ld, sub, ent.key[:-len(".to_qkv.weight")], ent.var, lambda p: p)
    else:
      ld.take(sub, ent.key, ent.var, ent.kind)


def convert_state_dict(config, state_dict: Mapping[str, Any], *, allow_missing: bool = False,
                       allow_unexpected: bool = False, ignore_prefixes=(),
                       pretransform: bool = True, rope_base: float | None = None,
                       dtype: str = "float32", seed: int = 0) -> Converted:
  """Builds our DiT (+ number conditioners, + Oobleck VAE) from a model config and a PyTorch
  state_dict. All or nothing: on any problem a ValueError lists every offending key.

  pretransform: convert ``pretransform.model.*`` through ``lmdm_jax.convert.oobleck`` (when the
  config has a pretransform); False drops those keys (reported under ``ignored``).
  Returns ``Converted``; its ``report`` has ``used`` (every consumed key), ``missing``,
  ``unexpected``, ``ignored`` and ``dropped`` (see ``split_state_dict``).
  """
  cfg_json = _load_json(config)
  parts = split_state_dict(state_dict, ignore_prefixes)
  inv = parts["dit"].get("transformer.rotary_pos_emb.inv_freq")
  dit_cfg = dit_config_from_json(cfg_json, inv_freq=None if inv is None else _to_numpy(inv[1]),
                                 rope_base=rope_base, dtype=dtype)
  ccfgs = conditioner_configs_from_json(cfg_json)

  def scan(abstract: bool):
    """Matches keys to the variables of a fresh model. Abstract (``nnx.eval_shape``, no init
    compute) when every key is present; concrete (initialized) to keep missing ones at init."""
    build = nnx.eval_shape if abstract else (lambda f: nnx.jit(f)())  # one compile, not dozens
    model = build(lambda: DiT(dit_cfg, rngs=nnx.Rngs(seed)))
    conds = {cid: build(lambda c=c, i=i: NumberConditioner(c, rngs=nnx.Rngs(seed + 1 + i)))
             for i, (cid, c) in enumerate(ccfgs.items())}
    ld = _Loader()
    load_dit_state_dict(model, parts["dit"], ld)
    for cid, cond in conds.items():
      sub = parts["conditioners"].get(cid, {})
      for ent in conditioner_entries(cond):
        full = f"{COND_PREFIX}{cid}.{ent.key}"
        ld.take({full: sub[ent.key]} if ent.key in sub else {}, full, ent.var, ent.kind)
    return model, conds, ld

  model, conds, ld = scan(abstract=True)
  if ld.missing and allow_missing:
    model, conds, ld = scan(abstract=False)
  unexpected = [full for full, _ in parts["dit"].values() if full not in ld.used]
  unexpected += list(parts["unexpected"])
  for cid, sub in parts["conditioners"].items():
    unexpected += [full for full, _ in sub.values() if full not in ld.used]
  vae, ignored = None, sorted(parts["ignored"])
  pt_cfg = cfg_json["model"].get("pretransform")
  if parts["pretransform"]:
    if not pretransform:
      ignored += sorted(parts["pretransform"])
    elif pt_cfg is None:
      unexpected += sorted(parts["pretransform"])
    else:
      from lmdm_jax.convert import oobleck as conv_oobleck
      from lmdm_jax.nn.oobleck import OobleckVAE
      vae = OobleckVAE.from_pretransform(pt_cfg, nnx.Rngs(seed))
      pt_sd = {k: v for k, v in parts["pretransform"].items() if k.startswith("pretransform.model.")}
      unexpected += sorted(set(parts["pretransform"]) - set(pt_sd))
      # The VAE converter validates its own keys (all or nothing), with the same permissions.
      pt_report = conv_oobleck.load_torch_state_dict(vae, pt_sd, allow_missing=allow_missing,
                                                     allow_unexpected=allow_unexpected)
      ld.used.update(k for k in pt_sd if k.removeprefix("pretransform.model.") not in
                     pt_report["unexpected"])
      ld.missing += [f"pretransform.model.{k}" for k in pt_report["missing"]]
      unexpected += [f"pretransform.model.{k}" for k in pt_report["unexpected"]]
  elif pretransform and pt_cfg is not None and not allow_missing:
    ld.missing.append("pretransform.model.* (the config has a pretransform; pass "
                      "pretransform=False / --no-pretransform to convert the DiT alone)")
  _report("DiT checkpoint", ld, unexpected, allow_missing, allow_unexpected)
  for var, value in ld.updates:
    var.set_value(jnp.asarray(value, var.get_value().dtype))
  for what, mod in [("DiT", model)] + [(f"conditioner {k}", v) for k, v in conds.items()]:
    left = [p for p, v in nnx.to_flat_state(nnx.state(mod))
            if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if left:  # every variable has a key; this would be a bug in the key map
      raise AssertionError(f"{what}: variables without a value after loading: {left}")
  # Map used keys back to their original names (with a possible "diffusion." prefix).
  orig = {k.removeprefix("diffusion."): k for k in state_dict}
  used = sorted(orig.get(k, k) if k.startswith("pretransform.") else k for k in ld.used)
  report = {"used": used, "missing": ld.missing, "unexpected": sorted(unexpected),
            "ignored": ignored, "dropped": parts["dropped"]}
  return Converted(dit_cfg, model, conds, vae, report)


def to_torch_state_dict(model: DiT, conditioners: Mapping[str, NumberConditioner] | None = None,
                        *, split_qkv: bool = False, prefix: str = DIT_PREFIX,
                        cond_prefix: str = COND_PREFIX) -> dict[str, np.ndarray]:
  """Flax -> PyTorch state_dict of float32 numpy arrays (``torch.from_numpy`` to load).

  split_qkv: write ``self_attn.to_q`` + ``self_attn.to_kv`` (the ARC / KV-cache layout) instead
  of the fused ``to_qkv``. ``prefix=""`` gives a bare ``DiffusionTransformer`` state_dict.
  """
  out: dict[str, np.ndarray] = {}
  d = model.cfg.embed_dim
  for ent in dit_entries(model):
    w = _to_torch(np.asarray(ent.var[...], np.float32), ent.kind)
    if split_qkv and ent.key.endswith("self_attn.to_qkv.weight"):
      base = ent.key[:-len("to_qkv.weight")]
      out[prefix + base + "to_q.weight"] = np.ascontiguousarray(w[:d])
      out[prefix + base + "to_kv.weight"] = np.ascontiguousarray(w[d:])
    else:
      out[prefix + ent.key] = w
  for cid, cond in (conditioners or {}).items():
    for ent in conditioner_entries(cond):
      out[f"{cond_prefix}{cid}.{ent.key}"] = _to_torch(np.asarray(ent.var[...], np.float32),
                                                       ent.kind)
  return out


# ------------------------------------------------------------------------------ checkpoints


def read_checkpoint(path: str, *, trust_pickle: bool = False) -> dict[str, Any]:
  """A state_dict from ``.safetensors`` (no torch needed) or a torch ``.ckpt``/``.pt``/``.pth``
  (Lightning checkpoints: their ``state_dict`` entry). Pickles load with ``weights_only=True``
  unless ``trust_pickle`` (only for files you trust: unpickling runs code)."""
  if not os.path.isfile(path):
    raise ValueError(f"checkpoint {path!r} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file as np_load
    try:
      return dict(np_load(path))
    except (TypeError, ValueError):  # bfloat16 and other non-numpy dtypes
      from safetensors.flax import load_file as jax_load
      return {k: np.asarray(v, np.float32) for k, v in jax_load(path).items()}
  try:
    import torch
  except ImportError as e:
    raise ValueError(f"reading {path!r} needs torch ({e}); or convert it to .safetensors") from e
  try:
    ckpt = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except Exception as e:  # noqa: BLE001 - torch raises many types here
    if trust_pickle:
      raise
    raise ValueError(f"cannot read {path!r} with weights_only=True ({type(e).__name__}: {e}); "
                     "if you trust the file, pass trust_pickle=True (--trust-pickle)") from e
  if isinstance(ckpt, Mapping) and "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
    ckpt = ckpt["state_dict"]
  if not isinstance(ckpt, Mapping):
    raise ValueError(f"{path!r} holds a {type(ckpt).__name__}, not a state_dict")
  return dict(ckpt)


def convert_checkpoint(config, checkpoint: str, **kw) -> Converted:
  """``convert_state_dict(config, read_checkpoint(checkpoint))``; ``trust_pickle`` goes to the
  reader, everything else to ``convert_state_dict``."""
  trust = kw.pop("trust_pickle", False)
  return convert_state_dict(config, read_checkpoint(checkpoint, trust_pickle=trust), **kw)


# ---------------------------------------------------------------------------- orbax format

_FORMAT = "lmdm_jax.convert.dit/1"


def _pure(module) -> dict:
  return nnx.to_pure_dict(nnx.state(module))


def save_converted(path: str, cfg: DiTConfig, model: DiT,
                   conditioners: Mapping[str, NumberConditioner] | None = None,
                   pretransform=None, pretransform_config: dict | None = None,
                   source: dict | None = None, overwrite: bool = False,
                   extra: dict | None = None) -> str:
  """Writes an orbax checkpoint directory: ``params`` (DiT, conditioners, optional VAE) and
  ``config`` (JSON: the DiTConfig, conditioner configs, pretransform config, source info, and
  the JSON-able entries of ``extra``: what ``lmdm_jax.convert.load`` needs to sample).
  Atomic: orbax writes a temporary directory and renames it when complete."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise ValueError(f"{path!r} exists; pass overwrite=True (--overwrite) to replace it")
  conditioners = dict(conditioners or {})
  if pretransform is not None and pretransform_config is None:
    raise ValueError("saving a pretransform needs its config (pretransform_config)")
  params = {"dit": _pure(model), "conditioners": {k: _pure(v) for k, v in conditioners.items()}}
  if pretransform is not None:
    params["pretransform"] = _pure(pretransform)
  meta = {"format": _FORMAT, "dit": dataclasses.asdict(cfg),
          "conditioners": {k: dataclasses.asdict(v.cfg) for k, v in conditioners.items()},
          "pretransform": pretransform_config if pretransform is not None else None,
          "source": source or {}}
  for k, v in (extra or {}).items():
    if k in meta:
      raise ValueError(f"extra metadata {k!r} would replace a converter entry")
    meta[k] = v
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, ocp.args.Composite(params=ocp.args.PyTreeSave(params),
                                        config=ocp.args.JsonSave(meta)), force=overwrite)
  return path


def _read_meta(path: str) -> dict:
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"{path!r} is not a converted checkpoint directory")
  item = os.path.join(path, "config", "metadata")  # where orbax's JSON handler keeps it
  if os.path.isfile(item):
    meta = fc.read_json(item, "converted checkpoint config")  # bounded size, one-line errors
  else:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      meta = ckptr.restore(path, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
    raise ValueError(f"{path!r}: unknown format {meta.get('format')!r} (expected {_FORMAT})")
  return meta


def _restore(path: str, meta: dict, with_pretransform: bool):
  """Everything is built as shapes first (``nnx.eval_shape``) from the stored config, and those
  shapes must be the stored arrays' (orbax metadata) before any array is read: the directory is
  untrusted data, and a config it declares cannot make this allocate more than it stores."""
  import orbax.checkpoint as ocp
  where = f"converted checkpoint {path!r}"
  cfg = fc.model_config(meta.get("dit"), f"{where} config dit")
  model = fc.abstract_model(cfg, where)
  try:
    conds = {k: nnx.eval_shape(lambda c=c: NumberConditioner(NumberConditionerConfig(**c),
                                                           rngs=nnx.Rngs(0)))
             for k, c in meta["conditioners"].items()}
    target = {"dit": _pure(model), "conditioners": {k: _pure(v) for k, v in conds.items()}}
    vae = None
    if with_pretransform and meta.get("pretransform") is not None:
      from lmdm_jax.nn.oobleck import OobleckVAE
      vae = nnx.eval_shape(lambda: OobleckVAE.from_pretransform(meta["pretransform"], nnx.Rngs(0)))
      target["pretransform"] = _pure(vae)
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    raise fc.ModelFileError(f"{where}: bad conditioner or pretransform config "
                            f"({type(e).__name__}: {str(e)[:160]})") from None
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
  stored = fc.orbax_shapes(os.path.join(os.path.abspath(path), "params"), where)
  fc.compare(fc.flat_shapes(abstract),
             {k: v for k, v in stored.items() if k.split("/")[0] in abstract}, where)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(os.path.abspath(path), ocp.args.Composite(
        params=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True)))["params"]

  def fill(module, pure):
    state = nnx.state(module)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)
    return module

  model = fill(model, restored["dit"])
  conds = {k: fill(v, restored["conditioners"][k]) for k, v in conds.items()}
  if vae is not None:
    vae = fill(vae, restored["pretransform"])
  return cfg, model, conds, vae


def load_converted(path: str):
  """-> (DiTConfig, DiT, {conditioner id: NumberConditioner}) from ``save_converted``."""
  cfg, model, conds, _ = _restore(path, _read_meta(path), with_pretransform=False)
  return cfg, model, conds


def load_converted_pretransform(path: str):
  """The Oobleck VAE saved with ``save_converted`` (None if none was saved)."""
  meta = _read_meta(path)
  if meta.get("pretransform") is None:
    return None
  return _restore(path, meta, with_pretransform=True)[3]
