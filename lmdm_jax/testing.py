"""Small helpers shared by tests and benchmarks: models with non-degenerate random weights.

A freshly initialized DiT has zero-initialized output projections (as the reference), which makes
every block an identity and would let wrong masks pass unnoticed; ``random_model`` perturbs every
parameter so attention patterns matter.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmdm_jax.config import DiTConfig, load_config
from lmdm_jax.nn.dit import DiT


def random_model(cfg: DiTConfig | str = "tiny", seed: int = 0, scale: float = 0.05) -> DiT:
  """A DiT whose nnx.Param leaves are init + scale * N(0, 1) (buffers untouched)."""
  if isinstance(cfg, str):
    cfg = DiTConfig.from_config(load_config(cfg).model)
  model = DiT(cfg, rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


def rel_err(a, b) -> float:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))
