"""Dynamic int8 quantisation of the DiT's dense layers (a CPU inference option).

Weights are stored int8 with one float32 scale per output channel (symmetric, max-abs / 127);
activations are quantised per row (token) at run time the same way; the product is an
int8 x int8 -> int32 ``dot_general``, rescaled to float32 by (row scale x channel scale).

``quantize_model(model)`` returns a *view* of a DiT whose transformer-block linears (self-attention
qkv and output, cross-attention query and output, both feed-forward layers) are ``Int8Linear``;
everything else (embeddings, the velocity projection, LayerNorms, the cross-attention K/V of the
prompt, attention itself) stays in the model's dtype and shares the original arrays. The given
model is not changed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

QUANTIZE_MODES = ("none", "int8")


class Quantized(nnx.Variable):
  """An array derived from a trained parameter for inference (not trained, not saved)."""


def quantize_weight(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A (din, dout) kernel -> (int8 kernel (din, dout), float32 scale (dout,)), per output channel:
  w ~= q * scale, |q| <= 127."""
  w = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=0)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return q, scale


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Activations (..., din) -> (int8 (..., din), float32 scale (..., 1)) per row (token)."""
  xf = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  return jnp.clip(jnp.round(xf / scale), -127, 127).astype(jnp.int8), scale


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
  """x (..., din) float @ (q (din, dout) int8, scale (dout,)) -> (..., dout) float32, with x
  quantised per row and an int32-accumulated int8 product."""
  xq, xs = quantize_rows(x)
  acc = jax.lax.dot_general(xq, q, (((xq.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * xs * scale


class Int8Linear(nnx.Module):
  """``nnx.Linear`` with an int8 kernel (``quantize_weight``) and dynamic per-row activation
  quantisation; the bias stays float. Output in ``dtype``."""

  def __init__(self, linear: nnx.Linear):
    q, s = quantize_weight(linear.kernel[...])
    self.kernel_q = Quantized(q)
    self.kernel_scale = Quantized(s)
    self.bias = linear.bias  # shared with the float model (None without a bias)
    self.dtype = linear.dtype or linear.kernel[...].dtype

  def __call__(self, x):
    y = int8_matmul(x, self.kernel_q[...], self.kernel_scale[...])
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def quantize_model(model, mode: str = "int8"):
  """A view of DiT ``model`` with its transformer-block linears quantised (``mode`` "int8"), or
  ``model`` itself for "none". The original model is unchanged; unquantised arrays are shared."""
  if mode not in QUANTIZE_MODES:
    raise ValueError(f"unknown quantize mode {mode!r}; choose one of {list(QUANTIZE_MODES)}")
  if mode == "none":
    return model
  view = nnx.merge(*nnx.split(model))  # a new module graph over the same arrays
  for blk in view.layers:
    att = blk.self_attn
    att.to_qkv, att.to_out = Int8Linear(att.to_qkv), Int8Linear(att.to_out)
    if hasattr(blk, "cross_attn"):
      ca = blk.cross_attn
      ca.to_q, ca.to_out = Int8Linear(ca.to_q), Int8Linear(ca.to_out)
    blk.ff_in, blk.ff_out = Int8Linear(blk.ff_in), Int8Linear(blk.ff_out)
  return view


def stream_errors(model, cond, glob, *, blocks: int, steps: int, cfg_scale: float,
                  pingpong: bool = True, plus_plus: bool = False, seed: int = 0,
                  mode: str = "int8"):
  """[(velocity rel err, latents rel err)] per block of ``model`` vs its ``mode`` view, streamed
  block_causal from the same seed and prompt: the first step's velocity of both models on the
  float stream's state (one forward on identical inputs), and the blocks of the two free-running
  streams (errors compound through the context). cond: (1, S, cond_token_dim); glob: (1, G) or
  None."""
  from lmdm_jax import sampling as S
  qmodel = quantize_model(model, mode)
  cfg_on = cfg_scale != 1.0
  sp = S.SamplerParams.make(steps, cfg_scale, plus_plus, pingpong)
  sp1 = S.SamplerParams.make(1, cfg_scale, plus_plus, pingpong)
  tables = S.rope_window_tables(model)
  extra = jnp.zeros((1, model.cfg.chunk, model.cfg.extra_dim), jnp.float32)

  def fns(m):
    step = jax.jit(lambda st, sp: S.generate_block(m, tables, st, extra, sp, "block_causal"))
    prompt = jax.jit(lambda st: S.set_prompt(m, st, cond, glob))
    return step, prompt

  (step_f, prompt_f), (step_q, prompt_q) = fns(model), fns(qmodel)
  init = S.init_state(model.cfg, "block_causal", 1, cfg_on, cond.shape[1], seed)
  st_f, st_q = prompt_f(init), prompt_q(init)
  out = []
  for _ in range(blocks):
    # one step from the float stream's state (the prompt's K/V are not quantised: same inputs)
    v_f, v_q = step_f(st_f, sp1)[2].v, step_q(st_f, sp1)[2].v
    blk_f, st_f, _ = step_f(st_f, sp)
    blk_q, st_q, _ = step_q(st_q, sp)
    out.append((_rel_err(v_q, v_f), _rel_err(blk_q, blk_f)))
  return out


def _rel_err(a, b) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))
