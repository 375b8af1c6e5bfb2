"""The T5 encoder (Hugging Face ``T5EncoderModel``) in Flax NNX, and the prompt conditioner.

Architecture (t5-base: d_model 768, 12 layers, 12 heads of 64, d_ff 3072, ReLU FF): token
embedding; per layer a pre-norm self-attention and a pre-norm feed-forward, each added to the
residual stream; a final norm. Norms are T5's RMS LayerNorm (scale only, no mean, no bias).
Attention scores are NOT scaled by 1/sqrt(d); they get a learned relative-position bias
(bucketed, bidirectional), owned by the first layer and shared by all. No linear has a bias.
The FF is ``wo(act(wi x))`` or, for ``gated-*`` configs, ``wo(act(wi_0 x) * wi_1 x)``.

``T5Conditioner`` is the LMDM prompt encoder (reference ``T5Conditioner``): prompts are padded
and truncated to 64 tokens, encoded with the attention mask, and padded positions are
multiplied by 0. It runs in float32 (the reference runs T5 in float16).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_HIGHEST = jax.lax.Precision.HIGHEST
_ACTIVATIONS = {
  "relu": jax.nn.relu,
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Encoder hyper-parameters, named as in Hugging Face ``config.json``.

  ``activation``/``gated`` are derived from ``feed_forward_proj`` ("relu", "gated-gelu", ...)
  as transformers does ("gated-gelu" means the tanh-approximate gelu).
  """
  vocab_size: int = 32128
  d_model: int = 768
  d_kv: int = 64
  d_ff: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  pad_token_id: int = 0
  eos_token_id: int = 1

  @classmethod
  def from_hf(cls, cfg: dict[str, Any]) -> "T5Config":
    """Builds from a Hugging Face T5 ``config.json`` dict (unknown keys are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = cls(**{k: v for k, v in cfg.items() if k in names and v is not None})
    out.activation  # validates feed_forward_proj
    return out

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj.split("-")[0] == "gated"

  @property
  def activation(self) -> str:
    name = "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split(
      "-")[-1]
    if name not in _ACTIVATIONS:
      raise ValueError(f"unsupported feed_forward_proj {self.feed_forward_proj!r}")
    return name


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """(q_len, k_len) int32 bucket of (key pos - query pos), bidirectional, as T5 computes it
  (float32 log, truncated toward zero)."""
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = max_exact + np.nan_to_num(scaled, neginf=0).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class RMSNorm(nnx.Module):
  """T5 LayerNorm: x / sqrt(mean(x^2) + eps) * ``weight`` (d,)."""

  def __init__(self, dim: int, eps: float):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x):
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return self.weight[...] * (x * jax.lax.rsqrt(var + self.eps))


def _linear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(cin, cout, use_bias=False, precision=_HIGHEST, rngs=rngs)


class T5Layer(nnx.Module):
  """One encoder layer: ``attn_norm``, ``q``/``k``/``v``/``o``, ``ff_norm``, and ``wi`` (or
  ``wi_0``/``wi_1`` when gated) and ``wo``."""

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.cfg = cfg
    inner = cfg.num_heads * cfg.d_kv
    self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
    self.q = _linear(cfg.d_model, inner, rngs)
    self.k = _linear(cfg.d_model, inner, rngs)
    self.v = _linear(cfg.d_model, inner, rngs)
    self.o = _linear(inner, cfg.d_model, rngs)
    self.ff_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
    if cfg.gated:
      self.wi_0 = _linear(cfg.d_model, cfg.d_ff, rngs)
      self.wi_1 = _linear(cfg.d_model, cfg.d_ff, rngs)
    else:
      self.wi = _linear(cfg.d_model, cfg.d_ff, rngs)
    self.wo = _linear(cfg.d_ff, cfg.d_model, rngs)

  def __call__(self, x, bias):
    """x (B, T, d); bias (B or 1, H, T, T) = position bias + additive key mask."""
    b, t, _ = x.shape
    h = self.attn_norm(x)
    split = lambda y: y.reshape(b, t, self.cfg.num_heads, self.cfg.d_kv)
    q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST) + bias
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    att = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_HIGHEST).reshape(b, t, -1)
    x = x + self.o(att)
    h = self.ff_norm(x)
    act = _ACTIVATIONS[self.cfg.activation]
    h = act(self.wi_0(h)) * self.wi_1(h) if self.cfg.gated else act(self.wi(h))
    return x + self.wo(h)


class T5Encoder(nnx.Module):
  """``embed`` (vocab, d), ``rel_bias`` (buckets, heads; HF's layer-0 relative_attention_bias),
  ``layers``, ``final_norm``."""

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.rel_bias = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (cfg.relative_attention_num_buckets,
                                               cfg.num_heads), jnp.float32))
    self.layers = nnx.List([T5Layer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

  def __call__(self, input_ids, mask=None):
    """input_ids (B, T) int; mask (B, T), true/1 for real tokens -> last_hidden_state (B, T, d)."""
    t = input_ids.shape[1]
    buckets = relative_position_buckets(t, t, self.cfg.relative_attention_num_buckets,
                                        self.cfg.relative_attention_max_distance)
    bias = jnp.transpose(self.rel_bias[...][buckets], (2, 0, 1))[None]  # (1, H, T, T)
    if mask is not None:
      neg = jnp.finfo(jnp.float32).min
      bias = bias + jnp.where(jnp.asarray(mask, bool), 0.0, neg)[:, None, None, :]
    x = self.embed(input_ids)
    for layer in self.layers:
      x = layer(x, bias)
    return self.final_norm(x)


class T5Conditioner:
  """Prompts -> (tokens (B, max_length, d_model) float32, mask (B, max_length) bool).

  Holds ``encoder`` (``T5Encoder``), ``tokenizer`` (any callable ``prompts -> (ids, mask)``
  padded/truncated to ``max_length``, see ``lmdm_jax.convert.t5.load_tokenizer``) and
  ``max_length`` (64 for LMDM); ``lmdm_jax.convert.t5.load_conditioner`` builds one from a local
  Hugging Face T5 directory. Padded positions of the output are zeros. The encoder's
  parameters are captured (for one jitted call) when the conditioner is built.
  """

  def __init__(self, encoder: T5Encoder, tokenizer, max_length: int = 64):
    self.encoder = encoder
    self.tokenizer = tokenizer
    self.max_length = max_length
    graphdef, state = nnx.split(encoder)

    @jax.jit
    def _encode(state, ids, mask):
      out = nnx.merge(graphdef, state)(ids, mask)
      return out * mask[..., None].astype(out.dtype)

    self._encode = lambda ids, mask: _encode(state, ids, mask)

  def encode_ids(self, ids, mask) -> tuple[jax.Array, jax.Array]:
    """Already tokenized (B, max_length) ids and mask -> (tokens, bool mask)."""
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.asarray(mask, bool)
    return self._encode(ids, mask), mask

  def __call__(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    ids, mask = self.tokenizer(list(prompts))
    return self.encode_ids(ids, mask)
