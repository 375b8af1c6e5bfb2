"""Model hyper-parameters as a frozen dataclass, built from an ml-collections config.

Config files under ``configs/`` return a ``ConfigDict`` whose ``model`` entry holds the fields of
``DiTConfig``; ``load_config(name_or_path)`` resolves ``tiny``/``saos``/``demo`` (optionally with
``:arg``) or a path to a config file.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Literal

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Architecture of the (Stable Audio Open / LMDM) diffusion transformer.

  ``global_token``: "prepend" (base SAO: global token first) or "postpend" (LMDM: global token
  last); rotary positions are the same in both cases (global token at 0, frame i at i+1).
  ``input_add_dim``: channels added to every frame through ``to_input_add_embed``
  (0 for the base model; 1 + io_channels for [context mask | clean context]; more for extra groups
  such as accompaniment or sketch features, which follow in that order).
  ``chunk``, ``context_chunks`` (K) and ``window_chunks`` (W) set the streaming geometry: a noisy
  chunk sees K previous clean chunks; the enc-dec regime and the naive baseline use a window of
  W context chunks.
  ``positions``: the rotary layout the model was trained with (``lmdm_jax.layouts``). "authors":
  a noisy chunk's window is W context chunks, itself and the global token (at 0), its frames
  from W * chunk + 1, and a stream starts from W zero-latent context chunks, as the authors'
  code. "legacy": the window is K chunks (frames from K * chunk + 1) and a stream starts from
  an empty cache: models trained before the field existed. New models get "authors"; stored
  models without the field load as "legacy" (``from_stored``).
  """

  io_channels: int = 64
  embed_dim: int = 1024
  depth: int = 16
  num_heads: int = 8
  cond_token_dim: int = 768
  project_cond_tokens: bool = True
  global_cond_dim: int = 768
  input_add_dim: int = 65
  global_token: Literal["prepend", "postpend"] = "postpend"
  qk_norm: Literal["ln", "none"] = "ln"
  rope_base: float = 10000.0
  ff_mult: int = 4
  timestep_features_dim: int = 256
  chunk: int = 48
  context_chunks: int = 3
  window_chunks: int = 4
  dtype: str = "float32"  # compute dtype ("bfloat16" on accelerators)
  param_dtype: str = "float32"
  positions: Literal["authors", "legacy"] = "authors"

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
    if self.cond_token_dim and not self.project_cond_tokens and self.cond_token_dim % self.head_dim:
      raise ValueError(f"cond_token_dim {self.cond_token_dim} must be a multiple of head_dim "
                       f"{self.head_dim} when conditioning tokens are not projected")
    if self.input_add_dim and self.input_add_dim < 1 + self.io_channels:
      raise ValueError(f"input_add_dim {self.input_add_dim} must be 0 or >= 1 + io_channels "
                       f"({1 + self.io_channels}): [context mask | clean context | extra]")
    if self.global_token not in ("prepend", "postpend"):
      raise ValueError(f"global_token must be 'prepend' or 'postpend', got {self.global_token!r}")
    if self.positions not in ("authors", "legacy"):
      raise ValueError(f"positions must be 'authors' or 'legacy', got {self.positions!r}")
    if self.positions == "authors" and self.window_chunks < self.context_chunks:
      raise ValueError(f"window_chunks {self.window_chunks} < context_chunks "
                       f"{self.context_chunks}: the authors' window holds the attended context")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def rotary_dim(self) -> int:
    """Rotated dims per head: max(head_dim // 2, 32), as stable-audio-tools."""
    return max(self.head_dim // 2, 32)

  @property
  def cross_dim(self) -> int:
    """Width of the conditioning tokens seen by cross-attention."""
    return self.embed_dim if self.project_cond_tokens else self.cond_token_dim

  @property
  def cross_kv_heads(self) -> int:
    return self.cross_dim // self.head_dim

  @property
  def extra_dim(self) -> int:
    """Extra input_add channels after [mask | context] (sketch, accompaniment, ...)."""
    return max(0, self.input_add_dim - 1 - self.io_channels)

  @property
  def streaming(self) -> bool:
    return self.input_add_dim > 0

  @classmethod
  def from_config(cls, cfg) -> "DiTConfig":
    return dataclass_from_config(cls, cfg, "model")

  @classmethod
  def from_stored(cls, d) -> "DiTConfig":
    """The config of a stored model (a bundle's, a work directory's or a converted checkpoint's
    recorded fields). Models stored before ``positions`` existed were trained in the legacy
    layout and keep it: the one place that rule lives."""
    d = dict(d)
    d.setdefault("positions", "legacy")
    return cls.from_config(d)


def check_fields(cls, cfg, what: str) -> dict:
  """The config as a dict, after rejecting fields the dataclass ``cls`` does not have, by name."""
  d = dict(cfg)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"unknown {what} config fields {unknown}; known: {sorted(names)}")
  return d


def dataclass_from_config(cls, cfg, what: str):
  """A frozen config dataclass from a ConfigDict/dict, rejecting unknown fields by name."""
  return cls(**check_fields(cls, cfg, what))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``tiny``, ``saos:block_causal``, ``configs/demo.py`` ... -> the file's ``get_config(arg)``."""
  path, _, arg = spec.partition(":")
  if not path.endswith(".py"):
    path = os.path.join(CONFIG_DIR, path + ".py")
  if not os.path.exists(path):
    known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "__init__.py")
    raise ValueError(f"config {spec!r}: no file {path}; known configs: {known}")
  spec_ = importlib.util.spec_from_file_location("lmdm_config", path)
  mod = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()
