"""The KV cache: one pytree with static shapes for every streaming regime.

Self-attention keys are cached *before* rotation and rotated at use with window-relative
positions, so a stream can run for hours without positions growing. The ring holds
``n_slots`` whole chunks; a slot's position comes from the age of the chunk it holds
(``slot_chunk``), never from its index. Counters are int32 arrays, so nothing recompiles between
blocks. The cross-attention K/V of the prompt and its projected global embedding live here too:
changing the prompt swaps them without touching the self-attention ring.
Under classifier-free guidance the batch axis holds [conditional | unconditional].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lmdm_jax.config import DiTConfig
from lmdm_jax.nn import attention as A
from lmdm_jax.nn.dit import CrossKV, PastKV


@struct.dataclass
class KVCache:
  k: jax.Array  # (L, B, n_slots * chunk, H, hd) self-attention keys, before rotation
  v: jax.Array  # (L, B, n_slots * chunk, H, hd)
  slot_chunk: jax.Array  # (n_slots,) int32: stream chunk index held by each slot, -1 if empty
  next_chunk: jax.Array  # () int32: chunks committed so far = index of the next one
  cross_k: jax.Array  # (L, B, S, Hkv, hd) cross-attention keys of the prompt (k-normalized)
  cross_v: jax.Array  # (L, B, S, Hkv, hd)
  global_embed: jax.Array  # (B, D) projected global conditioning (zeros if the model has none)

  @classmethod
  def create(cls, cfg: DiTConfig, batch: int, n_slots: int, cross_len: int) -> "KVCache":
    dt = jnp.dtype(cfg.dtype)
    shape = (cfg.depth, batch, n_slots * cfg.chunk, cfg.num_heads, cfg.head_dim)
    cshape = (cfg.depth, batch, cross_len, cfg.cross_kv_heads, cfg.head_dim)
    # Separate buffers per field (fields sharing one buffer cannot all be donated).
    # numpy + device_put: jnp.zeros would compile (or load) one small program per shape
    put = lambda a: jax.device_put(a)  # noqa: E731
    return cls(k=put(np.zeros(shape, dt)), v=put(np.zeros(shape, dt)),
               slot_chunk=put(np.full((n_slots,), -1, np.int32)),
               next_chunk=put(np.zeros((), np.int32)),
               cross_k=put(np.zeros(cshape, dt)), cross_v=put(np.zeros(cshape, dt)),
               global_embed=put(np.zeros((batch, cfg.embed_dim), dt)))

  @property
  def n_slots(self) -> int:
    return self.slot_chunk.shape[0]

  @property
  def chunk(self) -> int:
    return self.k.shape[2] // max(self.n_slots, 1)

  def past(self) -> PastKV:
    return PastKV(self.k, self.v)

  def cross(self) -> CrossKV:
    return CrossKV(self.cross_k, self.cross_v)

  def with_prompt(self, cross: CrossKV, global_embed: jax.Array) -> "KVCache":
    return self.replace(cross_k=cross.k.astype(self.cross_k.dtype),
                        cross_v=cross.v.astype(self.cross_v.dtype),
                        global_embed=global_embed.astype(self.global_embed.dtype))

  def slot_meta(self, pos_of_frame) -> A.TokenMeta:
    """Metadata of the cached tokens: chunk ids from ``slot_chunk``; empty slots invalid."""
    return A.chunk_meta(self.slot_chunk, A.CLEAN, self.chunk, pos_of_frame,
                        valid=self.slot_chunk >= 0, xp=jnp)

  def commit(self, fresh: PastKV, chunk_id: jax.Array, enable: jax.Array) -> "KVCache":
    """Write one chunk's K/V (L, B, chunk, H, hd) into slot ``chunk_id mod n_slots``.

    ``enable`` (bool/int32 scalar) makes the write a no-op when False, without a branch. The
    slot overwritten is the oldest chunk's: callers must have read the ring already.
    """
    cs = self.chunk
    slot = jnp.mod(chunk_id, self.n_slots).astype(jnp.int32)
    start = (0, 0, slot * cs, 0, 0)
    enable = jnp.asarray(enable, bool)

    def write(buf, new):
      old = jax.lax.dynamic_slice(buf, start, new.shape)
      return jax.lax.dynamic_update_slice(buf, jnp.where(enable, new.astype(buf.dtype), old), start)

    return self.replace(
        k=write(self.k, fresh.k), v=write(self.v, fresh.v),
        slot_chunk=self.slot_chunk.at[slot].set(jnp.where(enable, chunk_id, self.slot_chunk[slot])),
        next_chunk=self.next_chunk + enable.astype(jnp.int32))

  def fill(self, fresh: PastKV) -> "KVCache":
    """Replace the whole ring with the K/V (L, B, n * chunk, H, hd) of stream chunks 0..n-1,
    n >= n_slots, computed in one pass (a window's context, or a stream's start): the last
    n_slots chunks are kept, chunk c in slot c mod n_slots, and n chunks count as committed."""
    s, cs = self.n_slots, self.chunk
    n = fresh.k.shape[2] // cs
    shift = (n - s) % s  # puts chunk n - s + p (array position p) into slot (n - s + p) mod s
    keep = lambda a, buf: jnp.roll(a[:, :, (n - s) * cs:], shift * cs, axis=2).astype(buf.dtype)
    return self.replace(k=keep(fresh.k, self.k), v=keep(fresh.v, self.v),
                        slot_chunk=jnp.asarray(np.roll(np.arange(n - s, n), shift), jnp.int32),
                        next_chunk=jnp.asarray(n, jnp.int32))

  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))
