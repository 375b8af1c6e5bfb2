"""Attention primitives: token metadata, the streaming mask, rotary tables, the attention op.

Every forward pass of the DiT, whatever the regime, is described by *token metadata*: for each
token its chunk index, its kind (clean context frame, noisy frame, or the global token of a noisy
chunk), its rotary position and whether it exists. One rule turns query and key metadata into the
boolean attention mask (``streaming_mask``), so teacher forcing over a whole stream, window
recompute, and cached streaming all share one definition (DESIGN.md, "Exact streaming semantics").
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

CLEAN, NOISY, GLOBAL = 0, 1, 2


@struct.dataclass
class TokenMeta:
  """Per-token metadata of one pass, shared by the whole batch. All fields have shape (N,)."""

  chunk: jax.Array  # int32 chunk index in the stream (or in the window)
  kind: jax.Array  # int32: CLEAN, NOISY or GLOBAL
  pos: jax.Array  # int32 rotary position (only differences matter)
  valid: jax.Array  # bool: False for empty cache slots / absent tokens

  def __len__(self) -> int:
    return self.chunk.shape[0]

  @staticmethod
  def concat(*metas: "TokenMeta") -> "TokenMeta":
    xp = jnp if any(isinstance(m.chunk, jax.Array) for m in metas) else np
    return TokenMeta(*(xp.concatenate([getattr(m, f.name) for m in metas])
                       for f in dataclasses.fields(TokenMeta)))


def chunk_meta(chunks, kind: int, chunk_size: int, pos_of_frame, valid=True, xp=np) -> TokenMeta:
  """Metadata of whole chunks of frames: ``chunks`` (n,) chunk indices, all of one ``kind``.

  ``pos_of_frame(chunk, j)`` gives the rotary position of frame j of a chunk (broadcasting).
  """
  chunks = xp.asarray(chunks, dtype=np.int32)
  j = xp.arange(chunk_size, dtype=np.int32)
  c = xp.repeat(chunks, chunk_size)
  jj = xp.tile(j, chunks.shape[0])
  n = c.shape[0]
  valid = xp.broadcast_to(xp.repeat(xp.asarray(valid, dtype=bool) * xp.ones_like(chunks, dtype=bool),
                                    chunk_size), (n,))
  return TokenMeta(chunk=c, kind=xp.full((n,), kind, dtype=np.int32),
                   pos=xp.asarray(pos_of_frame(c, jj), dtype=np.int32), valid=valid)


def global_meta(chunk, pos, xp=np) -> TokenMeta:
  """Metadata of one global token belonging to noisy chunk ``chunk`` at rotary position ``pos``."""
  return TokenMeta(chunk=xp.asarray([chunk], dtype=np.int32).reshape(1),
                   kind=xp.full((1,), GLOBAL, dtype=np.int32),
                   pos=xp.asarray([pos], dtype=np.int32).reshape(1),
                   valid=xp.ones((1,), dtype=bool))


def streaming_mask(q: TokenMeta, k: TokenMeta, context_chunks: int,
                   bidirectional_context: bool = False) -> jax.Array:
  """Boolean (Nq, Nk) mask: may query token q attend to key token k?

  - a clean chunk a sees clean chunks a-K .. a (all clean chunks when ``bidirectional_context``,
    the enc-dec regime, where clean chunks are one window's context);
  - a noisy chunk a and its global token see clean chunks a-K .. a-1, and the noisy/global tokens
    of chunk a itself;
  - clean tokens never see noisy or global tokens, so their K/V are independent of diffusion time;
  - keys that are not ``valid`` are never seen.
  Every valid query sees at least itself, so no softmax row is empty.
  """
  xp = jnp if isinstance(q.chunk, jax.Array) or isinstance(k.chunk, jax.Array) else np
  qc, kc = q.chunk[:, None], k.chunk[None, :]
  q_clean = (q.kind == CLEAN)[:, None]
  k_clean = (k.kind == CLEAN)[None, :]
  lo = qc - context_chunks
  if bidirectional_context:
    clean_clean = xp.ones_like(qc - kc, dtype=bool)
  else:
    clean_clean = (kc <= qc) & (kc >= lo)
  noisy_clean = (kc < qc) & (kc >= lo)
  noisy_noisy = kc == qc
  allowed = xp.where(q_clean, k_clean & clean_clean,
                     xp.where(k_clean, noisy_clean, noisy_noisy))
  return allowed & k.valid[None, :]


# ----------------------------------------------------------------------------------- rotary


def rope_tables(inv_freq, positions):
  """(cos, sin) tables of shape (N, rot_dim // 2) for integer ``positions``.

  When both inputs are concrete the angles are computed in float64 (numpy) and cast to float32, so
  large absolute positions lose no precision; inside a trace they are computed in float32 as the
  PyTorch reference does.
  """
  if not isinstance(inv_freq, jax.core.Tracer) and not isinstance(positions, jax.core.Tracer):
    ang = np.asarray(positions, np.float64)[:, None] * np.asarray(inv_freq, np.float64)[None, :]
    return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)
  ang = jnp.asarray(positions, jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Partial rotary embedding, rotate-half convention, on the first 2*cos.shape[-1] dims.

  x: (B, N, H, head_dim); cos/sin: (N, r) or (B, N, r). Computed in float32.
  """
  r = cos.shape[-1]
  dt = x.dtype
  xf = x.astype(jnp.float32)
  x1, x2, rest = xf[..., :r], xf[..., r:2 * r], xf[..., 2 * r:]
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return out.astype(dt)


# ------------------------------------------------------------------------------- attention


def _logits(qg, k):
  """Attention logits (B, Hkv, g, Q, S) in float32 from grouped queries and keys."""
  return jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _logits_low_precision(qg, k):
  """``_logits`` for bfloat16/float16 q and k, whose backward pass keeps its two matmuls in the
  inputs' dtype (float32 accumulation): autodiff would multiply the float32 logit cotangent by
  the low-precision q or k, a float32 matmul. The forward values are ``_logits``'s."""
  return _logits(qg, k)


def _logits_fwd(qg, k):
  return _logits(qg, k), (qg, k)


def _logits_bwd(res, g):
  qg, k = res
  g = g.astype(qg.dtype)
  dq = jnp.einsum("bkgqs,bskd->bqkgd", g, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bkgqs,bqkgd->bskd", g, qg, preferred_element_type=jnp.float32)
  return dq.astype(qg.dtype), dk.astype(k.dtype)


_logits_low_precision.defvjp(_logits_fwd, _logits_bwd)


# The attention op's implementation, read when a program is traced: ``xla`` (default: the
# einsums below, with float32 logits and low-precision backward matmuls), ``jax`` (the same
# arithmetic through ``jax.nn.dot_product_attention``, XLA's implementation) or ``cudnn``
# (``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN's fused attention, GPU only,
# bfloat16/float16 inputs). ``$LMDM_ATTENTION`` sets it for a process (bench/streaming.py and
# scripts/gpu_bench.sh compare them); the compile cache keys programs by it.
ATTENTION_ENV = "LMDM_ATTENTION"
ATTENTION_IMPLS = ("xla", "jax", "cudnn")


def attention_impl() -> str:
  """The implementation ``attend`` uses: ``$LMDM_ATTENTION`` or ``xla``."""
  impl = os.environ.get(ATTENTION_ENV, "") or "xla"
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"${ATTENTION_ENV}={impl!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
  return impl


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Scaled dot-product attention with grouped KV heads.

  q: (B, Q, H, d); k, v: (B, S, Hkv, d) with H a multiple of Hkv (query head h uses KV head
  h // (H // Hkv), as PyTorch's repeat_interleave); mask: bool (Q, S) or (B, Q, S). Logits and
  softmax in float32 whatever the inputs' dtype; the probabilities are cast to v's dtype for the
  second matmul. With low-precision (bfloat16) inputs every matmul, forward and backward, runs in
  that dtype (``_logits_low_precision``).
  """
  impl = attention_impl()
  if impl != "xla":
    m = None if mask is None else (mask if mask.ndim == 3 else mask[None])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=m,
                                        implementation=None if impl == "jax" else impl)
  b, nq, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  qg = q.reshape(b, nq, hkv, g, d)
  low = q.dtype == k.dtype and jnp.dtype(q.dtype).itemsize < 4
  logits = _logits_low_precision(qg, k) if low else _logits(qg, k)
  logits = logits * (1.0 / np.sqrt(d))
  if mask is not None:
    m = mask if mask.ndim == 3 else mask[None]
    logits = jnp.where(m[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
  return out.reshape(b, nq, h, d)
