"""Low-rank adapters (LoRA) on the DiT's projections, for ARC-Forcing post-training.

``add_adapters(model, AdapterConfig(...))`` swaps the selected ``nnx.Linear`` projections of every
(selected) block for ``AdaptedLinear``: the same ``kernel``/``bias`` Variables (so the base
parameters keep their paths and a base checkpoint loads unchanged) plus two low-rank factors

    y = x W + b + (alpha / rank) * (x A) B,     A: (din, rank) ~ U(+-1/sqrt(din)),  B: (rank, dout) = 0

held as ``AdapterParam``, an ``nnx.Variable`` that is *not* an ``nnx.Param``: every existing
``nnx.split(model, nnx.Param, ...)`` (stage-1 training, checkpoints, ``count_params``) still sees
only the base parameters, and ``nnx.split(model, AdapterParam, nnx.Param, ...)`` separates the
adapter. B = 0 makes the adapted model start exactly equal to the base.

For inference, ``merge_adapters`` folds W + (alpha/rank) A B into the kernels and returns a plain
``DiT`` (same graph as an unadapted model: nothing changes for the sampler, the Stream API or the
converters); ``strip_adapters`` returns the base model (adapter off).

Projection names (per block): ``self_attn.to_qkv``, ``self_attn.to_out``, ``cross_attn.to_q``,
``cross_attn.to_kv``, ``ff_in``, ``ff_out``. At the ``saos`` scale the default (all six, all 16
blocks, rank 144) adds 16 * 144 * (4096 + 2048 + 2048 + 3072 + 9216 + 5120) = 58,982,400
parameters (0.059B; ``tests/test_arc_forcing.py`` checks it with ``jax.eval_shape``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdm_jax.nn.dit import DiT
from lmdm_jax.config import check_fields

PROJECTIONS = ("self_attn.to_qkv", "self_attn.to_out", "cross_attn.to_q", "cross_attn.to_kv",
               "ff_in", "ff_out")


class AdapterParam(nnx.Variable):
  """A trainable adapter weight. Deliberately not an ``nnx.Param`` (see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  rank: int = 144
  alpha: float = 144.0  # scale = alpha / rank
  projections: tuple = PROJECTIONS
  layers: tuple | None = None  # block indices; None = every block

  def __post_init__(self):
    bad = sorted(set(self.projections) - set(PROJECTIONS))
    if bad:
      raise ValueError(f"unknown adapter projections {bad}; known: {list(PROJECTIONS)}")
    if self.rank < 1:
      raise ValueError(f"adapter rank must be >= 1, got {self.rank}")

  @property
  def scale(self) -> float:
    return float(self.alpha) / float(self.rank)

  @classmethod
  def from_config(cls, c) -> "AdapterConfig":
    d = check_fields(cls, c, "adapter")
    if "projections" in d:
      d["projections"] = tuple(d["projections"])
    if d.get("layers") is not None:
      d["layers"] = tuple(int(i) for i in d["layers"])
    return cls(**d)


class AdaptedLinear(nnx.Linear):
  """An ``nnx.Linear`` (the base's own kernel/bias Variables) plus a LoRA term."""

  def __init__(self, base: nnx.Linear, rank: int, scale: float, *, rngs: nnx.Rngs):
    # Not calling nnx.Linear.__init__: the base's Variables are reused, nothing is re-initialized.
    for name in ("in_features", "out_features", "use_bias", "dtype", "param_dtype", "precision",
                 "dot_general", "promote_dtype", "preferred_element_type"):
      setattr(self, name, getattr(base, name))
    self.kernel = base.kernel
    self.bias = base.bias if base.bias is not None else nnx.data(None)
    din, dout = base.in_features, base.out_features
    bound = 1.0 / np.sqrt(din)
    self.lora_a = AdapterParam(jax.random.uniform(rngs.params(), (din, rank), base.param_dtype,
                                                  -bound, bound))
    self.lora_b = AdapterParam(jnp.zeros((rank, dout), base.param_dtype))
    self.lora_scale = float(scale)

  def __call__(self, x, out_sharding=None):
    y = super().__call__(x)
    dt = y.dtype
    a, b = self.lora_a[...].astype(dt), self.lora_b[...].astype(dt)
    return y + (self.lora_scale * ((x.astype(dt) @ a) @ b)).astype(dt)


def _get(obj, dotted):
  for part in dotted.split("."):
    obj = getattr(obj, part, None)
    if obj is None:
      return None
  return obj


def _set(obj, dotted, value):
  *parents, last = dotted.split(".")
  for part in parents:
    obj = getattr(obj, part)
  setattr(obj, last, value)


def add_adapters(model: DiT, ac: AdapterConfig, seed: int = 0) -> DiT:
  """Wrap the selected projections of ``model`` in place (and return it)."""
  rngs = nnx.Rngs(seed)
  layers = range(len(model.layers)) if ac.layers is None else ac.layers
  for li in layers:
    blk = model.layers[li]
    for name in ac.projections:
      lin = _get(blk, name)
      if lin is None:  # e.g. no cross-attention in this configuration
        continue
      if isinstance(lin, AdaptedLinear):
        raise ValueError(f"layers.{li}.{name} already has an adapter")
      _set(blk, name, AdaptedLinear(lin, ac.rank, ac.scale, rngs=rngs))
  return model


def adapted_model(cfg, ac: AdapterConfig, seed: int = 0, adapter_seed: int = 0) -> DiT:
  return add_adapters(DiT(cfg, rngs=nnx.Rngs(seed)), ac, adapter_seed)


def abstract_adapted_model(cfg, ac: AdapterConfig) -> DiT:
  """ShapeDtypeStruct leaves (no memory), e.g. to count parameters at the ``saos`` scale."""
  return nnx.eval_shape(lambda: adapted_model(cfg, ac))


def count_adapter_params(model_or_state) -> int:
  state = (model_or_state if isinstance(model_or_state, nnx.State)
           else nnx.state(model_or_state, AdapterParam))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def split(model: DiT):
  """(graphdef, adapter, base params, rest) of an adapted model."""
  return nnx.split(model, AdapterParam, nnx.Param, ...)


def _adapted_modules(model: DiT):
  for path, mod in nnx.iter_graph(model):
    if isinstance(mod, AdaptedLinear):
      yield path, mod


def plain_graphdef(cfg):
  """The graphdef of an unadapted DiT of ``cfg`` (its Param/rest paths equal an adapted one's)."""
  gd, _, _ = nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
  return gd


def merge_adapters(model: DiT) -> DiT:
  """A plain DiT whose kernels are W + scale * A B (the adapted model's function, adapter-free
  graph). The input model is not modified."""
  _, _, params, rest = split(model)
  params = jax.tree.map(lambda x: x, params)  # a copy of the containers
  flat = dict(nnx.to_flat_state(params))
  for path, mod in _adapted_modules(model):
    k = tuple(path) + ("kernel",)
    w = flat[k]
    delta = mod.lora_scale * (mod.lora_a[...].astype(jnp.float32) @ mod.lora_b[...].astype(jnp.float32))
    flat[k] = w.replace((w[...].astype(jnp.float32) + delta).astype(w[...].dtype))
  params = nnx.from_flat_state(flat)
  return nnx.merge(plain_graphdef(model.cfg), params, rest)


def strip_adapters(model: DiT) -> DiT:
  """The base model (adapter off), sharing the base arrays."""
  _, _, params, rest = split(model)
  return nnx.merge(plain_graphdef(model.cfg), params, rest)


def load_into(model: DiT, adapter: nnx.State) -> DiT:
  """Replace the adapter weights of an adapted model (e.g. from an adapter-only checkpoint)."""
  gd, _, params, rest = split(model)
  return nnx.merge(gd, adapter, params, rest)
