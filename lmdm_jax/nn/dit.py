"""The Stable Audio Open (Small) diffusion transformer in Flax NNX, with the LMDM streaming inputs.

Parameter for parameter the architecture of stable-audio-tools' ``DiffusionTransformer`` +
``ContinuousTransformer`` (LMDM_REFERENCE.md §1): Fourier timestep features, a global token,
cross-attention to conditioning tokens, ``input_add`` channels, pre-norm blocks with qk-LayerNorm
and partial rotary embedding, SwiGLU feed-forward and residual 1x1 pre/post convs.

The model is used through three small pieces so that every regime shares one code path:
- embeddings: ``embed_clean`` / ``embed_noisy`` (frames -> tokens), ``embed_global`` (global token),
  ``conditioning`` (prompt tokens -> per-layer cross-attention K/V, the global embedding);
- ``forward_tokens``: the transformer over a set of *fresh* tokens that may also attend to *past*
  keys/values (a KV cache), with an explicit boolean mask and rotary tables; it returns the
  fresh tokens' per-layer keys (before rotation) and values so callers can cache them;
- ``velocity``: project the noisy tokens' outputs back to latent velocity.
``__call__`` is the reference-style window forward (x, t, conditioning -> v), used for parity
with PyTorch and by the naive window-recompute baseline.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdm_jax.config import DiTConfig
from lmdm_jax.nn import attention as A


class Buffer(nnx.Variable):
  """A loaded, non-trained array (LayerNorm's zero bias, rotary inverse frequencies)."""


def _torch_linear_init(fan_in):
  """PyTorch's default Linear init (Kaiming-uniform with a=sqrt(5)): U(-1/sqrt(fan_in), ...)."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def linear(din, dout, *, bias, rngs, cfg: DiTConfig, zero=False):
  init = nnx.initializers.zeros if zero else _torch_linear_init(din)
  return nnx.Linear(din, dout, use_bias=bias, kernel_init=init,
                    bias_init=nnx.initializers.zeros if zero else _torch_linear_init(din),
                    dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


def layer_norm(x, scale, bias, eps):
  """Two-pass LayerNorm in float32 (as torch.nn.functional.layer_norm)."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias
  return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with a learned ``scale``; ``bias`` is a learned Param or a zero Buffer."""

  def __init__(self, dim, *, eps, learned_bias, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.bias = (nnx.Param if learned_bias else Buffer)(jnp.zeros((dim,), param_dtype))

  def __call__(self, x):
    return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class SelfAttention(nnx.Module):
  """Self-attention with a fused qkv projection (rows [q; k; v], head-major), qk-LN, partial RoPE."""

  def __init__(self, cfg: DiTConfig, rngs):
    d, hd = cfg.embed_dim, cfg.head_dim
    self.cfg = cfg
    self.to_qkv = linear(d, 3 * d, bias=False, rngs=rngs, cfg=cfg)
    self.to_out = linear(d, d, bias=False, rngs=rngs, cfg=cfg, zero=True)
    if cfg.qk_norm == "ln":
      self.q_norm = LayerNorm(hd, eps=1e-6, learned_bias=True, param_dtype=cfg.param_dtype)
      self.k_norm = LayerNorm(hd, eps=1e-6, learned_bias=True, param_dtype=cfg.param_dtype)

  def qkv(self, x):
    """x (B, N, D) -> q, k, v (B, N, H, hd), q and k normalized (not rotated)."""
    b, n, _ = x.shape
    h, hd = self.cfg.num_heads, self.cfg.head_dim
    q, k, v = jnp.split(self.to_qkv(x).reshape(b, n, 3, h, hd), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    if self.cfg.qk_norm == "ln":
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v


class CrossAttention(nnx.Module):
  """Cross-attention to conditioning tokens; grouped KV heads when tokens are not projected."""

  def __init__(self, cfg: DiTConfig, rngs):
    d, hd = cfg.embed_dim, cfg.head_dim
    self.cfg = cfg
    self.to_q = linear(d, d, bias=False, rngs=rngs, cfg=cfg)
    self.to_kv = linear(cfg.cross_dim, 2 * cfg.cross_dim, bias=False, rngs=rngs, cfg=cfg)
    self.to_out = linear(d, d, bias=False, rngs=rngs, cfg=cfg, zero=True)
    if cfg.qk_norm == "ln":
      self.q_norm = LayerNorm(hd, eps=1e-6, learned_bias=True, param_dtype=cfg.param_dtype)
      self.k_norm = LayerNorm(hd, eps=1e-6, learned_bias=True, param_dtype=cfg.param_dtype)

  def kv(self, c):
    """Conditioning tokens (B, S, Dc) -> k, v (B, S, Hkv, hd), k normalized."""
    b, s, _ = c.shape
    k, v = jnp.split(self.to_kv(c).reshape(b, s, 2, self.cfg.cross_kv_heads, self.cfg.head_dim),
                     2, axis=2)
    k, v = k[:, :, 0], v[:, :, 0]
    if self.cfg.qk_norm == "ln":
      k = self.k_norm(k)
    return k, v

  def __call__(self, x, k, v):
    b, n, _ = x.shape
    q = self.to_q(x).reshape(b, n, self.cfg.num_heads, self.cfg.head_dim)
    if self.cfg.qk_norm == "ln":
      q = self.q_norm(q)
    return self.to_out(A.attend(q, k, v).reshape(b, n, -1))


class Block(nnx.Module):
  """Pre-norm transformer block: self-attention, cross-attention, SwiGLU feed-forward."""

  def __init__(self, cfg: DiTConfig, rngs):
    d, pd = cfg.embed_dim, cfg.param_dtype
    inner = d * cfg.ff_mult
    self.pre_norm = LayerNorm(d, eps=1e-5, learned_bias=False, param_dtype=pd)
    self.self_attn = SelfAttention(cfg, rngs)
    if cfg.cond_token_dim:
      self.cross_attend_norm = LayerNorm(d, eps=1e-5, learned_bias=False, param_dtype=pd)
      self.cross_attn = CrossAttention(cfg, rngs)
    self.ff_norm = LayerNorm(d, eps=1e-5, learned_bias=False, param_dtype=pd)
    self.ff_in = linear(d, 2 * inner, bias=True, rngs=rngs, cfg=cfg)
    self.ff_out = linear(inner, d, bias=True, rngs=rngs, cfg=cfg, zero=True)

  def feed_forward(self, x):
    a, gate = jnp.split(self.ff_in(x), 2, axis=-1)
    return self.ff_out(a * jax.nn.silu(gate))


class CrossKV(NamedTuple):
  """Per-layer cross-attention keys/values of the conditioning tokens: (L, B, S, Hkv, hd)."""

  k: jax.Array
  v: jax.Array


class PastKV(NamedTuple):
  """Keys (before rotation) and values that fresh tokens may attend to: (L, B, P, H, hd)."""

  k: jax.Array
  v: jax.Array


class DiT(nnx.Module):
  """The diffusion transformer. See the module docstring for how it is called."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, pd = cfg.embed_dim, cfg.param_dtype
    half = cfg.timestep_features_dim // 2
    self.timestep_features = nnx.Param(jax.random.normal(rngs.params(), (half, 1), pd))
    self.to_timestep_embed_0 = linear(cfg.timestep_features_dim, d, bias=True, rngs=rngs, cfg=cfg)
    self.to_timestep_embed_2 = linear(d, d, bias=True, rngs=rngs, cfg=cfg)
    if cfg.cond_token_dim:
      self.to_cond_embed_0 = linear(cfg.cond_token_dim, cfg.cross_dim, bias=False, rngs=rngs, cfg=cfg)
      self.to_cond_embed_2 = linear(cfg.cross_dim, cfg.cross_dim, bias=False, rngs=rngs, cfg=cfg)
    if cfg.global_cond_dim:
      self.to_global_embed_0 = linear(cfg.global_cond_dim, d, bias=False, rngs=rngs, cfg=cfg)
      self.to_global_embed_2 = linear(d, d, bias=False, rngs=rngs, cfg=cfg)
    if cfg.input_add_dim:
      self.to_input_add_embed = linear(cfg.input_add_dim, d, bias=False, rngs=rngs, cfg=cfg)
    c = cfg.io_channels
    self.preprocess_conv = nnx.Param(jnp.zeros((c, c), pd))  # (in, out) of the 1x1 conv
    self.postprocess_conv = nnx.Param(jnp.zeros((c, c), pd))
    self.project_in = linear(c, d, bias=False, rngs=rngs, cfg=cfg)
    self.project_out = linear(d, c, bias=False, rngs=rngs, cfg=cfg)
    self.inv_freq = Buffer(jnp.asarray(rope_inv_freq(cfg)))
    self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.depth)])

  # ------------------------------------------------------------------------------ embeddings

  @property
  def compute_dtype(self):
    return jnp.dtype(self.cfg.dtype)

  def timestep_embed(self, t):
    """t (B,) -> (B, D): [cos, sin] Fourier features -> Linear -> SiLU -> Linear."""
    w = self.timestep_features[...].astype(jnp.float32)
    phi = 2 * np.pi * t.astype(jnp.float32)[:, None] * w[:, 0][None, :]
    f = jnp.concatenate([jnp.cos(phi), jnp.sin(phi)], axis=-1).astype(self.compute_dtype)
    return self.to_timestep_embed_2(jax.nn.silu(self.to_timestep_embed_0(f)))

  def embed_global(self, global_embed, t):
    """Global token (B, D) = projected global conditioning (precomputed) + timestep embedding."""
    tau = self.timestep_embed(t)
    return tau if global_embed is None else tau + global_embed

  def project_global(self, global_cond):
    """(B, global_cond_dim) -> (B, D); None when the model has no global conditioning."""
    if not self.cfg.global_cond_dim or global_cond is None:
      return None
    g = global_cond.astype(self.compute_dtype)
    return self.to_global_embed_2(jax.nn.silu(self.to_global_embed_0(g)))

  def cross_kv(self, cond_tokens) -> CrossKV:
    """Conditioning tokens (B, S, cond_token_dim) -> per-layer cross-attention K/V."""
    c = cond_tokens.astype(self.compute_dtype)
    c = self.to_cond_embed_2(jax.nn.silu(self.to_cond_embed_0(c)))
    ks, vs = zip(*(blk.cross_attn.kv(c) for blk in self.layers))
    return CrossKV(jnp.stack(ks), jnp.stack(vs))

  def _input_add(self, mask_value, context, extra):
    """input_add embedding of frames: A . [mask | context | extra]; shapes (B, N, *)."""
    b, n = context.shape[:2]
    parts = [jnp.full((b, n, 1), mask_value, context.dtype), context]
    if self.cfg.extra_dim:
      if extra is None:
        extra = jnp.zeros((b, n, self.cfg.extra_dim), context.dtype)
      parts.append(extra.astype(context.dtype))
    return self.to_input_add_embed(jnp.concatenate(parts, -1).astype(self.compute_dtype))

  def embed_clean(self, x0, extra=None):
    """Clean context frames (B, N, C) -> tokens. The noisy input is zeroed there by the router
    mask, so a clean token is only the input_add embedding of [1 | x0 | extra]."""
    return self._input_add(1.0, x0, extra)

  def embed_noisy(self, x, extra=None):
    """Noisy frames (B, N, C) -> tokens: project_in(x + conv(x)) + input_add([0 | 0 | extra])."""
    xc = x.astype(self.compute_dtype)
    xc = xc + xc @ self.preprocess_conv[...].astype(xc.dtype)
    h = self.project_in(xc)
    if self.cfg.input_add_dim:
      h = h + self._input_add(0.0, jnp.zeros_like(x), extra)
    return h

  def velocity(self, h):
    """Transformer outputs of noisy tokens (B, N, D) -> velocity (B, N, C) in float32."""
    out = self.project_out(h)
    out = out + out @ self.postprocess_conv[...].astype(out.dtype)
    return out.astype(jnp.float32)

  # --------------------------------------------------------------------------- transformer

  def forward_tokens(self, h, rope_q, mask, cross: CrossKV | None, past: PastKV | None = None,
                     rope_past=None, exit_layer: int | None = None):
    """Run the blocks over fresh tokens ``h`` (B, N, D).

    rope_q: (cos, sin) for the fresh tokens; past/rope_past: cached keys (before rotation) and
    values with their rotary tables; mask: bool (N, P + N) over [past | fresh] keys.
    Returns (hidden (B, N, D), PastKV of the fresh tokens (L, B, N, H, hd)); with ``exit_layer``
    the hidden states after that block (0-based) and the K/V of the blocks run so far.
    """
    ks, vs = [], []
    for li, blk in enumerate(self.layers):
      q, k, v = blk.self_attn.qkv(blk.pre_norm(h))
      ks.append(k)
      vs.append(v)
      qr = A.apply_rope(q, *rope_q)
      kr = A.apply_rope(k, *rope_q)
      if past is not None:
        kp = A.apply_rope(past.k[li], *rope_past)
        kr = jnp.concatenate([kp, kr], axis=1)
        v = jnp.concatenate([past.v[li], v], axis=1)
      att = A.attend(qr, kr, v, mask)
      h = h + blk.self_attn.to_out(att.reshape(h.shape[0], h.shape[1], -1))
      if self.cfg.cond_token_dim and cross is not None:
        h = h + blk.cross_attn(blk.cross_attend_norm(h), cross.k[li], cross.v[li])
      h = h + blk.feed_forward(blk.ff_norm(h))
      if exit_layer is not None and li == exit_layer:
        break
    return h, PastKV(jnp.stack(ks), jnp.stack(vs))

  # --------------------------------------------------------------- reference window forward

  def __call__(self, x, t, cond_tokens=None, global_cond=None, input_add=None,
               context_mask=None, mask=None, exit_layer: int | None = None):
    """Reference-style forward over one window, as stable-audio-tools' DiT.

    x: (B, T, C) noisy latents (frame-major); t: (B,); cond_tokens: (B, S, cond_token_dim);
    global_cond: (B, global_cond_dim); input_add: (B, T, input_add_dim); context_mask: (B, T)
    with 1 on context frames (the router mask zeroes the noisy input there); mask: bool (T+1, T+1)
    self-attention mask over the token order of the model (global token first for "prepend",
    last for "postpend"). Returns the velocity (B, T, C), or the hidden states (B, T+1, D) after
    block ``exit_layer``.
    """
    cfg = self.cfg
    b, n, c = x.shape
    if c != cfg.io_channels:
      raise ValueError(f"x has {c} latent channels; the model expects {cfg.io_channels}")
    dt = self.compute_dtype
    xc = x.astype(dt)
    xc = xc + xc @ self.preprocess_conv[...].astype(dt)
    r = None if context_mask is None else (1.0 - context_mask.astype(dt))[..., None]
    if r is not None:
      xc = xc * r
    h = self.project_in(xc)
    if r is not None:
      h = h * r
    if input_add is not None and not cfg.input_add_dim:
      raise ValueError("input_add was given but this model has no input_add channels "
                       "(input_add_dim=0)")
    if global_cond is not None and not cfg.global_cond_dim:
      raise ValueError("global_cond was given but this model has no global conditioning "
                       "(global_cond_dim=0)")
    if cfg.input_add_dim:
      if input_add is None:
        raise ValueError("this model has input_add channels; pass input_add (B, T, "
                         f"{cfg.input_add_dim})")
      h = h + self.to_input_add_embed(input_add.astype(dt))
    g = self.embed_global(self.project_global(global_cond), t)[:, None, :]
    prepend = cfg.global_token == "prepend"
    h = jnp.concatenate([g, h] if prepend else [h, g], axis=1)
    pos = np.concatenate([[0], np.arange(1, n + 1)]) if prepend else np.arange(1, n + 2) % (n + 1)
    rope = A.rope_tables(self.inv_freq[...], pos)
    cross = self.cross_kv(cond_tokens) if cfg.cond_token_dim and cond_tokens is not None else None
    h, _ = self.forward_tokens(h, rope, mask, cross, exit_layer=exit_layer)
    if exit_layer is not None:
      return h
    frames = h[:, 1:] if prepend else h[:, :-1]
    return self.velocity(frames)


def count_params(model_or_state) -> int:
  """Number of trainable parameters (nnx.Param leaves), as PyTorch counts nn.Parameters."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def abstract_model(cfg: DiTConfig) -> DiT:
  """The model with ShapeDtypeStruct leaves (no memory): ``jax.eval_shape`` of its construction."""
  return nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))


def rope_inv_freq(cfg: DiTConfig) -> np.ndarray:
  """The rotary inverse frequencies (rotary_dim // 2,) float32, from float64."""
  r = cfg.rotary_dim
  return (1.0 / (cfg.rope_base ** (np.arange(0, r, 2, dtype=np.float64) / r))).astype(np.float32)


def model_with_params(abstract: DiT, params) -> DiT:
  """A concrete model from its abstract one (``abstract_model``) and its parameters, without
  random initialisation (which costs about a second of start-up): ``params`` is the pure dict of
  the ``nnx.Param`` state (``nnx.to_pure_dict``); the buffers get their defined values (the
  rotary ``inv_freq``, zeros for the LayerNorms' fixed bias)."""
  graphdef, pstate, bstate = nnx.split(abstract, nnx.Param, Buffer)
  nnx.replace_by_pure_dict(pstate, params)
  inv_freq = rope_inv_freq(abstract.cfg)

  def value(path, leaf):  # device_put: no per-shape programs compiled, as jnp.zeros would
    if path and getattr(path[-1], "key", None) == "inv_freq":
      return jax.device_put(inv_freq)
    return jax.device_put(np.zeros(leaf.shape, leaf.dtype))

  buffers = jax.tree_util.tree_map_with_path(value, nnx.to_pure_dict(bstate))
  nnx.replace_by_pure_dict(bstate, buffers)
  return nnx.merge(graphdef, pstate, bstate)
