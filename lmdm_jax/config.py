"""Model hyper-parameters as a frozen dataclass, built from an ml-collections config.

Config files under ``configs/`` return a ``ConfigDict`` whose ``model`` entry holds the fields of
``DiTConfig``. Config files are Python and are run to build the config, so which files may run is
kept narrow:

- ``load_config("tiny")``, ``load_config("saos:enc_dec")``: a registered config (a file in
  ``configs/``, by name, with an optional ``:arg`` for its ``get_config``). Nothing else.
- ``load_config_file("path/to/my.py[:arg]")``: a config file the user named on the command line
  (their own choice); ``load_cli_config`` takes either form, as a ``--config`` value.
- ``config_named_by_file(value, field, file)``: a config named inside a file we load (a bundle's
  ``__meta__``, a work directory's ``config.json``, an ARC run's ``arc_config.json``). Those files
  are untrusted data: the value is looked up among the registered configs only, never run as a path.
  The fields a run set on its command line (``--config.train.batch_size=4``) are recorded next to
  that name as data, ``{"train.batch_size": 4}``, and put back by ``apply_overrides``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import numbers
import os
import re
from typing import Literal

import ml_collections


def _config_dir() -> str:
  """The config files: ``lmdm_jax/configs`` in an installed package (the wheel carries the
  checkout's top-level ``configs/`` there, see pyproject.toml), else the checkout's ``configs/``."""
  here = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(here, "configs")
  return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(here), "configs")


CONFIG_DIR = _config_dir()


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
  ``dtype``: the compute dtype of every matmul and of the residual stream and KV cache;
  ``param_dtype``: the parameters' (and so the optimizer state's). Mixed-precision training is
  ``dtype="bfloat16"``, ``param_dtype="float32"``: LayerNorm statistics, rotary embedding,
  attention logits and softmax, timestep features, the velocity output and the loss stay float32
  (docs/TRAINING.md, "Mixed precision").
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
    _check_values(self)
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
    if self.qk_norm not in ("ln", "none"):
      raise ValueError(f"qk_norm must be 'ln' or 'none', got {self.qk_norm!r}")
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


# Bounds on DiTConfig's numbers: the configs read from model files (bundles, work directories,
# converted checkpoints) are untrusted, and these sizes decide what building a model allocates.
# Every real configuration is far inside them (saos: embed_dim 1024, depth 16, chunk 48).
_INT_RANGE = dict(io_channels=(1, 4096), embed_dim=(1, 16384), depth=(1, 256), num_heads=(1, 256),
                  cond_token_dim=(0, 16384), global_cond_dim=(0, 16384), input_add_dim=(0, 65536),
                  ff_mult=(1, 16), timestep_features_dim=(2, 16384), chunk=(1, 4096),
                  context_chunks=(0, 256), window_chunks=(1, 256))
_DTYPES = ("float32", "bfloat16", "float16")


def _check_values(cfg: "DiTConfig") -> None:
  """Types and ranges of every field, as one-line ValueErrors naming the field."""
  for name, (lo, hi) in _INT_RANGE.items():
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= v <= hi:
      raise ValueError(f"model config field {name} must be an integer in [{lo}, {hi}], "
                       f"got {_short(v)}")
  if not isinstance(cfg.project_cond_tokens, bool):
    raise ValueError(f"model config field project_cond_tokens must be true or false, got "
                     f"{_short(cfg.project_cond_tokens)}")
  v = cfg.rope_base
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 1):
    raise ValueError(f"model config field rope_base must be a finite number > 1, got {_short(v)}")
  for name in ("dtype", "param_dtype"):
    if getattr(cfg, name) not in _DTYPES:
      raise ValueError(f"model config field {name} must be one of {list(_DTYPES)}, got "
                       f"{_short(getattr(cfg, name))}")


def _short(v, n: int = 80) -> str:
  """repr(v), cut to ``n`` characters: values from files go into one-line messages."""
  r = repr(v)
  return r if len(r) <= n else r[:n] + "..."


def check_fields(cls, cfg, what: str) -> dict:
  """The config as a dict, after rejecting fields the dataclass ``cls`` does not have, by name."""
  try:
    d = dict(cfg)
  except (TypeError, ValueError):
    raise ValueError(f"{what} config must be a mapping of fields, got {_short(cfg)}") from None
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"unknown {what} config fields {unknown}; known: {sorted(names)}")
  return d


def dataclass_from_config(cls, cfg, what: str):
  """A frozen config dataclass from a ConfigDict/dict, rejecting unknown fields by name."""
  return cls(**check_fields(cls, cfg, what))


def registered_configs() -> list[str]:
  """Names of the registered configs: the files ``configs/<name>.py``."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and _NAME.match(f[:-3]) and f != "__init__.py")


_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A registered config: ``tiny``, ``saos:enc_dec`` -> ``configs/<name>.py``'s ``get_config(arg)``.

  Only the files in ``configs/`` are run; any other name (a path, ``../x``) is a ValueError. A
  config file of the user's own choosing goes through ``load_config_file``.
  """
  name, _, arg = str(spec).partition(":")
  known = registered_configs()
  if name not in known:
    raise ValueError(f"config {_short(spec)}: not a registered config; known: {known} (a config "
                     "file of your own: --config path/to/file.py)")
  return _run_config(os.path.join(CONFIG_DIR, name + ".py"), arg)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``path/to/config.py[:arg]`` -> that file's ``get_config(arg)``. The file is RUN: call this
  only with a path the user gave on the command line, never with a value read from a file."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config {spec!r}: no file {path}; registered configs: {registered_configs()}")
  return _run_config(path, arg)


def load_cli_config(value: str) -> ml_collections.ConfigDict:
  """A ``--config`` value: a registered name (``demo``, ``tiny:enc_dec``) or a path to a ``.py``
  config file (``configs/demo.py``, ``my_configs/x.py:arg``), which is run (the user's choice)."""
  path = value.partition(":")[0]
  if path.endswith(".py") or "/" in path or os.sep in path:
    return load_config_file(value)
  return load_config(value)


_RECORDED_PATH = re.compile(r"^(?:.*[/\\])?configs[/\\]([A-Za-z0-9_]+)\.py$")


def registered_spec(value) -> str | None:
  """The registered config that a value recorded in a file names, as ``name[:arg]``, or None.

  ``name[:arg]`` with a registered name is itself. A recorded command-line path to one of the
  registered files (``configs/demo.py:arg``, as ``train.py --config configs/demo.py`` records it)
  is read as that name: the registered file is what runs, never the path. Anything else is None.
  """
  if not isinstance(value, str):
    return None
  head, colon, arg = value.partition(":")
  m = _RECORDED_PATH.match(head)
  name = m.group(1) if m else head
  return name + colon + arg if name in registered_configs() else None


def config_named_by_file(value, field: str, file: str,
                         overrides=None) -> ml_collections.ConfigDict:
  """The config named by ``field`` of ``file`` (a bundle's ``__meta__``, a work directory's
  ``config.json``, an ARC run's ``arc_config.json``): untrusted data, so a registered config only
  (``registered_spec``); anything else is a one-line ValueError naming the field and the file.
  ``overrides``: the fields the run set on its command line, as the file records them (``None``
  for files written before they were recorded), put back with ``apply_overrides``."""
  spec = registered_spec(value)
  if spec is None:
    raise ValueError(f"{file}: field {field!r} = {_short(value)} is not a registered config "
                     f"(known: {registered_configs()}); a config named by a file is only looked "
                     "up by name, never run from a path")
  conf = load_config(spec)
  return conf if overrides is None else apply_overrides(conf, overrides, f"{file} overrides")


_FIELD_PATH = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*$")
_MAX_OVERRIDES = 256


def _data_value(v, depth: int = 0) -> bool:
  """A JSON scalar, or a (nested, short) list of them: what a recorded override may hold."""
  if v is None or isinstance(v, (bool, int, float, str)):
    return True
  return isinstance(v, (list, tuple)) and depth < 2 and len(v) <= 256 and all(
      _data_value(x, depth + 1) for x in v)


def apply_overrides(conf: ml_collections.ConfigDict, overrides,
                    where: str) -> ml_collections.ConfigDict:
  """``conf`` with the recorded command-line fields ``{"train.batch_size": 4, ...}`` set, as data
  (``where`` names the file for errors). The values were checked against the config when the run
  started; a field the config does not define (one that training filled in with its default, such
  as ``train.stage1.ema_decay`` on a config that does not list it) is added. A malformed record
  (not a mapping, a bad field path, a value that is not a number / string / bool / list of them,
  a value of another type than the config's field) is a one-line ValueError."""
  if not isinstance(overrides, dict) or len(overrides) > _MAX_OVERRIDES:
    raise ValueError(f"{where}: expected a mapping of at most {_MAX_OVERRIDES} config fields, got "
                     f"{_short(overrides)}")
  for path, value in overrides.items():
    if not isinstance(path, str) or not _FIELD_PATH.match(path) or len(path) > 200:
      raise ValueError(f"{where}: {_short(path)} is not a config field path (a.b.c)")
    if not _data_value(value):
      raise ValueError(f"{where}: {path} = {_short(value)} is not a number, string, bool or list")
    *parents, leaf = path.split(".")
    node = conf
    with conf.unlocked():
      for i, name in enumerate(parents):
        if name not in node:
          node[name] = ml_collections.ConfigDict()
        node = node[name]
        if not isinstance(node, ml_collections.ConfigDict):
          raise ValueError(f"{where}: {path}: {'.'.join(parents[:i + 1])} is not a section")
      if isinstance(value, list):
        value = tuple(value)  # JSON has no tuples; the configs' sequences are tuples
      try:
        node[leaf] = value
      except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {path} = {_short(value)}: {one_line(e)}") from None
  return conf


def fill_defaults(conf: ml_collections.ConfigDict, defaults: dict) -> ml_collections.ConfigDict:
  """``conf`` with every field of ``defaults`` (nested dicts: sections) that it does not set added,
  so each can be set on the command line. A default that is a typed placeholder
  (``ml_collections.config_dict.placeholder(str)``) also types a field the config sets to None."""
  with conf.unlocked():
    for key, d in defaults.items():
      if isinstance(d, dict):
        if key not in conf or conf[key] is None:
          conf[key] = ml_collections.ConfigDict()
        fill_defaults(conf[key], d)
      elif isinstance(d, ml_collections.FieldReference):
        if conf.get(key, None) is None:
          conf[key] = ml_collections.config_dict.placeholder(d.get_type())
      elif key not in conf:
        conf[key] = d
  return conf


def flat_fields(conf, prefix: str = "") -> list[tuple[str, object]]:
  """``[("model.depth", 2), ...]``: every field of a config by its dotted path, in order."""
  out = []
  for key, v in conf.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += flat_fields(v, f"{prefix}{key}.")
    else:
      out.append((prefix + key, v))
  return out


def one_line(msg) -> str:
  return " ".join(str(msg).split())


def _run_config(path: str, arg: str) -> ml_collections.ConfigDict:
  spec_ = importlib.util.spec_from_file_location("lmdm_config", path)
  mod = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(mod)
  try:
    return mod.get_config(arg) if arg else mod.get_config()
  except TypeError as e:  # e.g. an argument the config does not take
    raise ValueError(f"config {path}{':' + arg if arg else ''}: {one_line(e)}") from None
