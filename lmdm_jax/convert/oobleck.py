"""PyTorch state_dict <-> Flax ``OobleckVAE`` parameters.

Accepted key prefixes: ``pretransform.model.`` (inside a full stable-audio-tools model),
``diffusion.pretransform.model.`` (a Lightning checkpoint) or none (``encoder.``/``decoder.``).
Conv weights may come in any of three layouts, folded into one plain kernel here:
  * ``weight_g`` / ``weight_v`` (``torch.nn.utils.weight_norm``, what stable-audio-tools uses),
  * ``parametrizations.weight.original0`` / ``original1`` (``torch.nn.utils.parametrizations``),
  * ``weight`` (weight norm already removed).
Weight norm is w = g * v / ||v||, the norm taken over every axis but 0 (dim=0, the default).

Nothing is skipped silently: unknown, missing or wrongly shaped keys raise a ValueError that lists
them, unless ``allow_unexpected`` / ``allow_missing`` is given.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from lmdm_jax.nn.oobleck import ConvTranspose1d, OobleckVAE, SnakeBeta
from lmdm_jax.convert.keys import check_keys

PREFIXES = ("diffusion.pretransform.model.", "pretransform.model.")
_G, _V = "weight_g", "weight_v"
_P0, _P1 = "parametrizations.weight.original0", "parametrizations.weight.original1"


def _to_numpy(x: Any) -> np.ndarray:
  """A torch tensor (any device/dtype) or array-like -> float32 numpy array."""
  if hasattr(x, "detach"):
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, np.float32)


def _wn_norm(v: np.ndarray) -> np.ndarray:
  """||v|| over every axis but 0, keepdims, as float32 (the weight-norm ``g`` for ``v``)."""
  axes = tuple(range(1, v.ndim))
  return np.sqrt(np.sum(np.square(v.astype(np.float64)), axis=axes, keepdims=True)).astype(
    np.float32)


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
  """w = v * (g / ||v||), in float32. Exact (w == v) when g == ``_wn_norm(v)``."""
  return (v * (g.astype(np.float32) / _wn_norm(v))).astype(np.float32)


def _strip(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Removes a known prefix; keys under no prefix are kept as they are."""
  out = {}
  for k, v in state_dict.items():
    for p in PREFIXES:
      if k.startswith(p):
        k = k[len(p):]
        break
    if k in out:
      raise ValueError(f"key {k!r} appears twice (with and without a prefix)")
    out[k] = v
  return out


def _param_modules(model: OobleckVAE):
  """Yields (torch module name, module) for every module that holds parameters."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Conv, ConvTranspose1d, SnakeBeta)):
      yield ".".join(str(p) for p in path), node


def _has_bias(mod) -> bool:
  return isinstance(getattr(mod, "bias", None), nnx.Param)


def _plain(sd: dict[str, Any], key: str, used: set[str]) -> np.ndarray | None:
  """``sd[key]`` as float32 numpy (marked used), or None if absent."""
  if key not in sd:
    return None
  used.add(key)
  return _to_numpy(sd[key])


def _torch_weight(sd: dict[str, Any], name: str, used: set[str]) -> np.ndarray | None:
  """The (folded) PyTorch conv weight of module ``name`` in any layout, or None if absent."""
  for g_key, v_key in ((_G, _V), (_P0, _P1)):
    g, v = f"{name}.{g_key}", f"{name}.{v_key}"
    if g in sd or v in sd:
      if g not in sd or v not in sd:
        raise ValueError(f"weight norm of {name!r} needs both {g!r} and {v!r}")
      used.update((g, v))
      return fold_weight_norm(_to_numpy(sd[g]), _to_numpy(sd[v]))
  if f"{name}.weight" in sd:
    used.add(f"{name}.weight")
    return _to_numpy(sd[f"{name}.weight"])
  return None


def load_torch_state_dict(model: OobleckVAE, state_dict: Mapping[str, Any], *,
                          allow_missing: bool = False,
                          allow_unexpected: bool = False) -> dict[str, list[str]]:
  """Writes ``state_dict`` into ``model`` in place (all or nothing).

  Returns ``{"missing": [...], "unexpected": [...]}`` (both empty unless allowed).
  """
  sd = _strip(state_dict)
  used: set[str] = set()
  missing, bad_shape, updates = [], [], []

  def take(var, name: str, value: np.ndarray | None):
    if value is None:
      missing.append(name)
    elif value.shape != var[...].shape:
      bad_shape.append(f"{name}: got {value.shape}, expected {var[...].shape} (Flax layout)")
    else:
      updates.append((var, value))

  for name, mod in _param_modules(model):
    if isinstance(mod, SnakeBeta):
      take(mod.alpha, f"{name}.alpha", _plain(sd, f"{name}.alpha", used))
      take(mod.beta, f"{name}.beta", _plain(sd, f"{name}.beta", used))
      continue
    w = _torch_weight(sd, name, used)
    if w is not None:
      # Conv1d (out, in, k) -> (k, in, out); ConvTranspose1d (in, out, k) -> (k, in, out).
      w = w.transpose(2, 0, 1) if isinstance(mod, ConvTranspose1d) else w.transpose(2, 1, 0)
    take(mod.kernel, f"{name}.weight", w)
    if _has_bias(mod):
      take(mod.bias, f"{name}.bias", _plain(sd, f"{name}.bias", used))

  unexpected = sorted(set(sd) - used)
  check_keys("Oobleck state_dict", bad_shape, missing, unexpected, allow_missing, allow_unexpected)
  for var, value in updates:
    var[...] = value
  return {"missing": missing, "unexpected": unexpected}


def to_torch_state_dict(model: OobleckVAE, *, layout: str = "weight_norm",
                        prefix: str = "") -> dict[str, np.ndarray]:
  """Flax -> PyTorch state_dict of numpy arrays (wrap with ``torch.from_numpy`` to load).

  layout: ``"weight_norm"`` emits ``weight_g`` = ||w|| and ``weight_v`` = w (loads into the
  stable-audio-tools modules, and converting back gives the Flax kernels bit for bit);
  ``"parametrizations"`` the same under ``parametrizations.weight.original0/1``;
  ``"plain"`` a single ``weight`` (for modules with weight norm removed).
  """
  if layout not in ("weight_norm", "parametrizations", "plain"):
    raise ValueError(f"unknown layout {layout!r}")
  out: dict[str, np.ndarray] = {}
  for name, mod in _param_modules(model):
    base = prefix + name
    if isinstance(mod, SnakeBeta):
      out[f"{base}.alpha"] = np.asarray(mod.alpha[...], np.float32)
      out[f"{base}.beta"] = np.asarray(mod.beta[...], np.float32)
      continue
    k = np.asarray(mod.kernel[...], np.float32)
    w = k.transpose(1, 2, 0) if isinstance(mod, ConvTranspose1d) else k.transpose(2, 1, 0)
    w = np.ascontiguousarray(w)
    if layout == "plain":
      out[f"{base}.weight"] = w
    else:
      g_key, v_key = (_G, _V) if layout == "weight_norm" else (_P0, _P1)
      out[f"{base}.{g_key}"] = _wn_norm(w)
      out[f"{base}.{v_key}"] = w
    if _has_bias(mod):
      out[f"{base}.bias"] = np.asarray(mod.bias[...], np.float32)
  return out
