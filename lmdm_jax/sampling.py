"""Rectified-flow sampling, block by block, in every regime.

- ``schedule``: the reference's logSNR-linspace schedule (LMDM_REFERENCE §3.1), with the step count
  a runtime value (changing it does not recompile).
- ``generate_block(model, tables, state, extra, sp, regime)``: one block (all denoising steps)
  over a ``StreamState``: ``cached_step`` (the block_causal regimes; also ARC-Forcing's rollouts,
  with per-item hiding, a random step count and a last step with gradient as arguments) or
  ``window_step`` (the window regimes). Regimes:
    * ``block_causal``: cached streaming; the first step of block i+1 also commits block i's clean
      K/V into the ring (fused commit), the other steps see [cache | noisy chunk | global token].
      Rotary positions follow the model's layout (``layouts``; the authors' window of W context
      chunks for new models); in the authors' layout a fresh stream starts from W zero-latent
      chunks marked present (``start_stream``), unless primed with real context.
      ``block_causal_unfused`` does the commit as a separate pass first (same numbers).
    * ``enc_dec``: the window's context (bidirectional) is encoded once per block, then
      target-only steps against its K/V.
    * ``enc_dec_recompute``: the enc-dec window recomputed every step (exactness reference).
    * ``naive``: the reference's block-wise outpainting cost baseline: the fixed window
      [window_chunks context | target] recomputed every step with the block-causal mask.
  Exactness reference for ``block_causal`` (no cache, the whole history recomputed every step):
  ``reference_block``; the teacher-forcing forward over a whole stream: ``layouts.sequence_forward``.
- ``Stream``: the Python API, jitted and compiled ahead of time, state donated.
"""
from __future__ import annotations

import logging
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lmdm_jax import layouts
from lmdm_jax.cache import KVCache
from lmdm_jax.config import DiTConfig
from lmdm_jax.nn import attention as A
from lmdm_jax.nn.dit import DiT

REGIMES = ("block_causal", "block_causal_unfused", "enc_dec", "enc_dec_recompute", "naive")
MAX_STEPS = 64

log = logging.getLogger(__name__)


@struct.dataclass
class SamplerParams:
  """Runtime sampler settings (arrays: changing them does not recompile)."""

  steps: jax.Array  # () int32, 1..MAX_STEPS
  cfg_scale: jax.Array  # () float32; only used when the stream was built with CFG
  plus_plus: jax.Array  # () bool: CFG++ update
  pingpong: jax.Array  # () bool: pingpong (re-noise) update instead of Euler

  @classmethod
  def make(cls, steps=8, cfg_scale=1.0, plus_plus=False, pingpong=True) -> "SamplerParams":
    if not 1 <= int(steps) <= MAX_STEPS:
      raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    put = jax.device_put  # not jnp.asarray: no small conversion programs at start-up
    return cls(put(np.asarray(steps, np.int32)), put(np.asarray(cfg_scale, np.float32)),
               put(np.asarray(bool(plus_plus))), put(np.asarray(bool(pingpong))))


def schedule(steps, max_steps: int = MAX_STEPS) -> jax.Array:
  """t_i = sigmoid(-l_i), l = linspace(-6, 2, steps + 1), then t_0 = 1 and t_steps = 0.

  Returns (max_steps + 1,) float32; entries past ``steps`` are 0.
  """
  i = jnp.arange(max_steps + 1, dtype=jnp.float32)
  steps_f = jnp.asarray(steps, jnp.float32)
  t = jax.nn.sigmoid(-(-6.0 + 8.0 * i / steps_f))
  t = jnp.where(i == 0, 1.0, t)
  return jnp.where(i >= steps_f, 0.0, t)


def update(x, v_c, v_u, t, t_next, eps, sp: SamplerParams, cfg: bool):
  """One rectified-flow update (Euler or pingpong, with optional CFG / CFG++)."""
  if cfg:
    v = v_u + sp.cfg_scale * (v_c - v_u)
    d = x - t * v
    d_u = x - t * v_u
    plain = jnp.where(sp.pingpong, (1 - t_next) * d + t_next * eps, x + (t_next - t) * v)
    plus = jnp.where(sp.pingpong, d + t_next * (eps - d_u), d + t_next * v_u)
    return jnp.where(sp.plus_plus, plus, plain)
  d = x - t * v_c
  return jnp.where(sp.pingpong, (1 - t_next) * d + t_next * eps, x + (t_next - t) * v_c)


@struct.dataclass
class StreamState:
  """What a stream carries from block to block. The block step (``generate_block``) takes it
  donated and returns the next one; its shapes never change, so nothing recompiles.

  Attributes:
    cache: the KV cache: the prompt (cross-attention K/V, projected global embedding) and the
      self-attention ring: block_causal, the K/V of the last K committed clean chunks (slot
      ages in ``cache.slot_chunk``, the next chunk's index in ``cache.next_chunk``); enc_dec,
      the window context's, refilled every block.
    context: the clean latents the next block conditions on that the ring does not hold yet:
      block_causal, the last generated block (B, chunk, C), committed by the next block's first
      step; window regimes, the window's W context chunks (B, W * chunk, C), oldest first.
    context_extra: the extra input_add channels of ``context`` (B, *, E).
    has_pending: () int32, block_causal: 1 when ``context`` holds a block awaiting its commit.
    block_index: () int32, blocks generated so far.
    key: the PRNG key the next block's noise comes from (``block_noise``).
  """

  cache: KVCache
  context: jax.Array
  context_extra: jax.Array
  has_pending: jax.Array
  block_index: jax.Array
  key: jax.Array


def init_state(cfg: DiTConfig, regime: str, batch: int, cfg_guidance: bool, cross_len: int,
               seed: int | jax.Array = 0, context: jax.Array | None = None) -> StreamState:
  """A fresh stream. ``context`` (B, window_chunks * chunk, C) seeds the window regimes' context
  (default zeros, i.e. the reference's "no init audio": context mask 1, latents 0)."""
  if regime not in REGIMES:
    raise ValueError(f"unknown regime {regime!r}; choose one of {REGIMES}")
  b2 = 2 * batch if cfg_guidance else batch
  cs, c, e = cfg.chunk, cfg.io_channels, cfg.extra_dim
  if regime.startswith("block_causal"):
    n_slots, ctx_len = cfg.context_chunks, cs
  else:
    n_slots, ctx_len = (cfg.window_chunks if regime == "enc_dec" else 0), cfg.window_chunks * cs
  ctx = jax.device_put(np.zeros((batch, ctx_len, c), np.float32))
  if context is not None:
    if regime.startswith("block_causal"):
      raise ValueError("block_causal streams start from an empty cache; prime them by generating "
                       "or use Stream.prime(latents)")
    if context.shape != ctx.shape:
      raise ValueError(f"context must have shape {ctx.shape} (batch, window frames, latent "
                       f"channels), got {tuple(context.shape)}")
    ctx = jnp.asarray(context, jnp.float32)
  key = seed if isinstance(seed, jax.Array) else stream_key(seed)
  zero = lambda: jax.device_put(np.zeros((), np.int32))  # noqa: E731
  return StreamState(cache=KVCache.create(cfg, b2, n_slots, cross_len), context=ctx,
                     context_extra=jax.device_put(np.zeros((batch, ctx_len, e), np.float32)),
                     has_pending=zero(), block_index=zero(), key=key)


def stream_key(seed: int) -> jax.Array:
  """``jax.random.key(seed)``; for the default threefry keys and 0 <= seed < 2**32 built from
  its key data [0, seed] directly (the same key, without compiling the seeding program)."""
  if 0 <= int(seed) < 2 ** 32 and jax.config.jax_default_prng_impl == "threefry2x32":
    return jax.random.wrap_key_data(np.array([0, int(seed)], np.uint32))
  return jax.random.key(seed)


def start_context(cfg: DiTConfig, batch: int) -> jax.Array:
  """The clean history a fresh block_causal stream starts from, (batch, frames, C): the
  ``layouts.start_chunks`` zero-latent chunks (none in the legacy layout). The no-cache
  references (``reference_block``, ``layouts.sequence_forward``) take it as the history's start."""
  return jnp.zeros((batch, layouts.start_chunks(cfg) * cfg.chunk, cfg.io_channels), jnp.float32)


def set_prompt(model: DiT, state: StreamState, cond_tokens, global_cond) -> StreamState:
  """Swap the prompt: cross-attention K/V and global embedding for [cond | null] under CFG."""
  b = state.context.shape[0]
  b2 = state.cache.cross_k.shape[1]
  if b2 == 2 * b:  # CFG: the unconditional half has zeroed conditioning tokens
    cond_tokens = jnp.concatenate([cond_tokens, jnp.zeros_like(cond_tokens)])
    if global_cond is not None:
      global_cond = jnp.concatenate([global_cond, global_cond])
  cross = model.cross_kv(cond_tokens)
  g = model.project_global(global_cond)
  if g is None:
    g = jnp.zeros_like(state.cache.global_embed)
  return state.replace(cache=state.cache.with_prompt(cross, g))


def block_noise(key, shape):
  """The noise of one block from the stream's key: (the next key, the initial noise x (shape),
  ``eps(i)``: the noise of denoising step i (pingpong's re-noising))."""
  key, k_init, k_steps = jax.random.split(key, 3)
  eps = lambda i: jax.random.normal(jax.random.fold_in(k_steps, i), shape, jnp.float32)
  return key, jax.random.normal(k_init, shape, jnp.float32), eps


# ----------------------------------------------------------------------------- pieces of a step


@struct.dataclass
class RopeTables:
  """Rotary (cos, sin) rows for the integer positions ``first``, ``first`` + 1, ... (computed
  once, outside jit, by ``rope_window_tables``); ``at(pos)`` looks positions up."""

  cos: jax.Array  # (N, rotary_dim // 2) float32
  sin: jax.Array
  first: int = struct.field(pytree_node=False)

  def at(self, pos):
    return (jnp.take(self.cos, pos - self.first, axis=0),
            jnp.take(self.sin, pos - self.first, axis=0))


def rope_window_tables(model: DiT) -> RopeTables:
  """Rotary tables for every window position a stream uses, [-chunk, (max(K, W) + 1) * chunk],
  from float64 angles cast to float32, with the loaded inverse frequencies."""
  cfg = model.cfg
  span = max(cfg.context_chunks, cfg.window_chunks) + 1
  pos = np.arange(-cfg.chunk, span * cfg.chunk + 1)
  ang = pos[:, None].astype(np.float64) * np.asarray(model.inv_freq[...], np.float64)[None, :]
  put = lambda a: jax.device_put(a.astype(np.float32))  # noqa: E731 - as A.rope_tables, no program
  return RopeTables(put(np.cos(ang)), put(np.sin(ang)), first=-cfg.chunk)


class LastStep(NamedTuple):
  """The last denoising step of a block: its input x, conditional velocity v and time t."""

  x: jax.Array
  v: jax.Array
  t: jax.Array


def _dup(x, n):
  return x if n == 1 else jnp.concatenate([x] * n)


def _split_v(v, b, cfg_on):
  return (v[:b], v[b:]) if cfg_on else (v, v)


def _global_token(model: DiT, cache: KVCache, t):
  """The global token (B2, 1, D) at diffusion time t, for the cached prompt."""
  g = cache.global_embed
  return model.embed_global(g, jnp.full((g.shape[0],), t))[:, None]


def _denoise(x, v0, t, eps, n_steps, sp: SamplerParams, cfg_on: bool, velocity_at):
  """Denoising steps 0..n_steps-1 of schedule t from the initial noise x. ``velocity_at(x, t_i)``
  -> (v_cond, v_uncond); v0: step 0's pair when already known (the fused first step), else None.
  Steps after step 0 run in a ``fori_loop`` when ``n_steps`` is an array (the step count a
  runtime value), unrolled when it is a Python int (a fixed count: one straight program).
  Returns (x, (x_in, v_cond) of the last step)."""
  start, last = 0, (x, jnp.zeros_like(x))
  if v0 is not None:
    last = (x, v0[0])
    x = update(x, *v0, t[0], t[1], eps(0), sp, cfg_on)
    start = 1

  def body(i, val):
    x, _ = val
    v_c, v_u = velocity_at(x, t[i])
    return update(x, v_c, v_u, t[i], t[i + 1], eps(i), sp, cfg_on), (x, v_c)

  if isinstance(n_steps, int):
    val = (x, last)
    for i in range(start, n_steps):
      val = body(i, val)
    return val
  return jax.lax.fori_loop(start, n_steps, body, (x, last))


# ------------------------------------------------------------------------- the cached stream


def prime_ring(model: DiT, tables: RopeTables, cache: KVCache, context, context_extra,
               visible=None) -> KVCache:
  """The ring as if the clean chunks of ``context`` (B2, n * chunk, C), n >= K, had been
  committed one by one into an empty ring as stream chunks 0..n-1: one pass in which chunk c
  sees chunks c-K..c, keeping the last K. ``visible`` (B2, n * chunk) bool optionally hides keys
  per item (a hidden chunk still sees itself). Positions as seen from noisy chunk n."""
  cfg = model.cfg
  cs, K = cfg.chunk, cfg.context_chunks
  n = context.shape[1] // cs
  meta = A.chunk_meta(np.arange(n), A.CLEAN, cs, layouts.cached_positions(n, layouts.span(cfg), cs))
  mask = jnp.asarray(A.streaming_mask(meta, meta, K))
  if visible is not None:
    own = jnp.asarray(meta.chunk[None, :] == meta.chunk[:, None])
    mask = mask[None] & (visible[:, None, :] | own[None])
  h = model.embed_clean(context, context_extra)
  _, kv = model.forward_tokens(h, tables.at(jnp.asarray(meta.pos)), mask, cache.cross())
  return cache.fill(kv)


def start_stream(model: DiT, tables: RopeTables, state: StreamState) -> StreamState:
  """block_causal: a fresh stream (nothing committed or pending) gets its start context, the
  ``layouts.start_chunks`` zero-latent chunks (mask 1), under the current prompt; otherwise (or
  in the legacy layout, which starts empty) the state is returned unchanged."""
  n = layouts.start_chunks(model.cfg)
  if not n:
    return state
  b2 = state.cache.cross_k.shape[1]
  cs, e = model.cfg.chunk, model.cfg.extra_dim
  zeros = jnp.zeros((b2, n * cs, model.cfg.io_channels), jnp.float32)
  fresh = (state.cache.next_chunk == 0) & (state.has_pending == 0)
  cache = jax.lax.cond(
      fresh, lambda c: prime_ring(model, tables, c, zeros, jnp.zeros((b2, n * cs, e), jnp.float32)),
      lambda c: c, state.cache)
  return state.replace(cache=cache)


def commit_pending(model: DiT, tables: RopeTables, state: StreamState) -> StreamState:
  """block_causal: write the pending clean chunk's K/V into the ring (a no-op without one)."""
  cfg = model.cfg
  cs, K = cfg.chunk, cfg.context_chunks
  n = state.cache.cross_k.shape[1] // state.context.shape[0]
  cache = state.cache
  i = cache.next_chunk + state.has_pending
  pos = layouts.cached_positions(i, layouts.span(cfg), cs)
  pend = A.chunk_meta((i - 1)[None], A.CLEAN, cs, pos, valid=state.has_pending > 0, xp=jnp)
  past_meta = cache.slot_meta(pos)
  mask = A.streaming_mask(pend, A.TokenMeta.concat(past_meta, pend), K)
  h = model.embed_clean(_dup(state.context, n), _dup(state.context_extra, n))
  _, kv = model.forward_tokens(h, tables.at(pend.pos), mask, cache.cross(), cache.past(),
                               tables.at(past_meta.pos))
  cache = cache.commit(kv, i - 1, state.has_pending > 0)
  return state.replace(cache=cache, has_pending=jnp.zeros((), jnp.int32))


def cached_forward(model: DiT, tables: RopeTables, ring: KVCache, x, t, i, extra, pending=None,
                   hidden=None):
  """One denoising forward of noisy chunk ``i`` against the ring: queries [noisy chunk | global
  token], keys [ring | themselves], window-relative positions (``layouts.cached_positions``).

  x: (B2, chunk, C) at time t; extra: its extra input_add channels. pending: None, or (tokens
  (B2, chunk, D) of clean chunk i-1, () bool whether it exists), carried first as extra queries
  (the fused commit: their K/V come back first). hidden: None, or (B2,) int32: per item, ring
  chunks below this index are invisible to the noisy chunk. Returns (velocity (B2, chunk, C) of
  the noisy chunk, K/V (L, B2, N, H, hd) of the fresh tokens).
  """
  cfg = model.cfg
  cs = cfg.chunk
  pos = layouts.cached_positions(i, layouts.span(cfg), cs)
  fresh = A.TokenMeta.concat(A.chunk_meta(i[None], A.NOISY, cs, pos, xp=jnp),
                             A.global_meta(i, 0, xp=jnp))
  h = jnp.concatenate([model.embed_noisy(x, extra), _global_token(model, ring, t)], axis=1)
  if pending is not None:
    fresh = A.TokenMeta.concat(
        A.chunk_meta((i - 1)[None], A.CLEAN, cs, pos, valid=pending[1], xp=jnp), fresh)
    h = jnp.concatenate([pending[0], h], axis=1)
  past = ring.slot_meta(pos)
  mask = A.streaming_mask(fresh, A.TokenMeta.concat(past, fresh), cfg.context_chunks)
  if hidden is not None:
    seen = jnp.concatenate([past.chunk[None] >= hidden[:, None],
                            jnp.ones((x.shape[0], len(fresh)), bool)], axis=1)
    mask = mask[None] & seen[:, None, :]
  out, kv = model.forward_tokens(h, tables.at(fresh.pos), mask, ring.cross(), ring.past(),
                                 tables.at(past.pos))
  p = 0 if pending is None else cs
  return model.velocity(out[:, p:p + cs]), kv


def cached_step(model: DiT, tables: RopeTables, state: StreamState, extra, sp: SamplerParams, *,
                fused: bool = True, hidden=None, stop=None, last_velocity=None):
  """One block of the cached stream: the ``block_causal`` regimes and ARC-Forcing's rollouts.

  Step 0 also carries the pending block as clean queries and commits its K/V into the ring
  (``fused``; else ``commit_pending`` first: the same numbers); every step denoises the next
  chunk against the ring (``cached_forward``). extra: (B, chunk, E) the block's extra channels.
  ARC-Forcing's arguments: ``hidden`` (B,) per-item hidden ring chunks (``cached_forward``);
  ``stop`` () int32: run steps 0..stop-1 of the ``sp.steps`` schedule, the last to t = 0, so
  that its update is the denoised prediction x - t v; ``last_velocity(ring, x, t, i)``: the
  last step's velocity (the trained generator, with gradient), the earlier ones from ``model``.
  The new state's pending block is detached. Returns (block (B, chunk, C), state, LastStep).
  """
  cfg = model.cfg
  b, b2 = state.context.shape[0], state.cache.cross_k.shape[1]
  cfg_on, n = b2 != b, b2 // b
  if cfg_on and last_velocity is not None:
    raise ValueError("last_velocity (a gradient step) needs a stream without CFG")
  i = state.cache.next_chunk + state.has_pending  # the noisy chunk's stream index
  key, x0, eps = block_noise(state.key, (b, cfg.chunk, cfg.io_channels))
  t = schedule(sp.steps)
  n_steps = sp.steps if stop is None else stop
  if stop is not None:
    t = jnp.where(jnp.arange(t.shape[0]) >= stop, 0.0, t)
  extra2, hid2 = _dup(extra, n), None if hidden is None else _dup(hidden, n)

  def velocity(ring, x, t_i, pending=None):
    v, kv = cached_forward(model, tables, ring, _dup(x, n), t_i, i, extra2, pending, hid2)
    return _split_v(v, b, cfg_on), kv

  if fused:
    h_pend = model.embed_clean(_dup(state.context, n), _dup(state.context_extra, n))
    v0, kv = velocity(state.cache, x0, t[0], (h_pend, state.has_pending > 0))
    ring = state.cache.commit(jax.tree.map(lambda a: a[:, :, :cfg.chunk], kv), i - 1,
                              state.has_pending > 0)
  else:
    ring = commit_pending(model, tables, state).cache
    v0, _ = velocity(ring, x0, t[0])
  loop_velocity = lambda x, t_i: velocity(ring, x, t_i)[0]
  if last_velocity is None:
    block, (x_in, v_in) = _denoise(x0, v0, t, eps, n_steps, sp, cfg_on, loop_velocity)
  else:  # steps 0..stop-2 as usual, then the last one's velocity from last_velocity
    x_in = jnp.where(n_steps == 1, x0,
                     _denoise(x0, v0, t, eps, n_steps - 1, sp, cfg_on, loop_velocity)[0])
    v_in = last_velocity(ring, x_in, t[n_steps - 1], i)
    block = update(x_in, v_in, v_in, t[n_steps - 1], t[n_steps], eps(n_steps - 1), sp, False)
  state = state.replace(cache=ring, context=jax.lax.stop_gradient(block), context_extra=extra,
                        has_pending=jnp.ones((), jnp.int32), block_index=state.block_index + 1,
                        key=key)
  return block, state, LastStep(x_in, v_in, t[n_steps - 1])


# ------------------------------------------------------------------------- the window regimes


def window_step(model: DiT, tables: RopeTables, state: StreamState, extra, sp: SamplerParams,
                regime: str):
  """One block of a window regime over [W context chunks | noisy chunk | global token], frame k
  at position k + 1 and the global token at 0 (the authors' window, in either layout):
    enc_dec: the context (bidirectional) is encoded once, its K/V fill the cache, and every step
      runs the noisy chunk against them; enc_dec_recompute: the same, recomputing the window
      every step; naive: the window recomputed every step with the block-causal training mask.
  The window then slides by one chunk. Returns (block (B, chunk, C), state, LastStep).
  """
  cfg = model.cfg
  cs = cfg.chunk
  b, b2 = state.context.shape[0], state.cache.cross_k.shape[1]
  cfg_on, n = b2 != b, b2 // b
  key, x0, eps = block_noise(state.key, (b, cs, cfg.io_channels))
  t = schedule(sp.steps)
  win = layouts.window_layout(cfg.window_chunks, cs)
  bidir = regime != "naive"
  mask = lambda q, k: A.streaming_mask(q, k, cfg.window_chunks if bidir else cfg.context_chunks,
                                       bidir)
  cache, extra2 = state.cache, _dup(extra, n)
  h_ctx = model.embed_clean(_dup(state.context, n), _dup(state.context_extra, n))
  if regime == "enc_dec":
    ctx_rope = tables.at(jnp.asarray(win.context.pos))
    _, kv_ctx = model.forward_tokens(h_ctx, ctx_rope, mask(win.context, win.context), cache.cross())
    cache = cache.fill(kv_ctx)
    prefix, queries, past = h_ctx[:, :0], win.target, (cache.past(), ctx_rope)
  else:
    prefix, queries, past = h_ctx, win.all, (None, None)
  q_mask, q_rope, p = mask(queries, win.all), tables.at(jnp.asarray(queries.pos)), prefix.shape[1]

  def velocity(x, t_i):
    h = jnp.concatenate([prefix, model.embed_noisy(_dup(x, n), extra2),
                         _global_token(model, cache, t_i)], axis=1)
    out, _ = model.forward_tokens(h, q_rope, q_mask, cache.cross(), *past)
    return _split_v(model.velocity(out[:, p:p + cs]), b, cfg_on)

  block, (x_in, v_in) = _denoise(x0, None, t, eps, sp.steps, sp, cfg_on, velocity)
  state = state.replace(
      cache=cache, context=jnp.concatenate([state.context[:, cs:], block], axis=1),
      context_extra=jnp.concatenate([state.context_extra[:, cs:], extra], axis=1),
      block_index=state.block_index + 1, key=key)
  return block, state, LastStep(x_in, v_in, t[sp.steps - 1])


def generate_block(model: DiT, tables: RopeTables, state: StreamState, extra, sp: SamplerParams,
                   regime: str):
  """One block of ``chunk`` frames in ``regime`` (extra: (B, chunk, E) its extra input_add
  channels): ``cached_step`` for a started stream (``start_stream``) in the block_causal regimes,
  ``window_step`` otherwise. Returns (block (B, chunk, C) float32, new state, LastStep)."""
  if regime.startswith("block_causal"):
    return cached_step(model, tables, start_stream(model, tables, state), extra, sp,
                       fused=regime == "block_causal")
  return window_step(model, tables, state, extra, sp, regime)


def block_program(model: DiT, tables: RopeTables, state: StreamState, extra, sp: SamplerParams,
                  regime: str, decoder=None, dec_params=None, dec_state=None):
  """One block of a stream as ONE program, the stream's common path: in the block_causal
  regimes the commit of the previous block into the ring (fused into step 0), every denoising
  step, and, with a ``decoder`` (a codec's ``BlockDecoder``), the decode of the new block.
  ``Stream`` compiles it once, ahead of time, with ``state`` and ``dec_state`` donated; the
  batch axis is kept throughout (serving calls it with one slot per item).

  Returns (block (B, chunk, C) float32, audio (B, channels, n) or None, state, dec_state)."""
  block, state, _ = generate_block(model, tables, state, extra, sp, regime)
  if decoder is None:
    return block, None, state, dec_state
  audio, dec_state = decoder.step(dec_params, dec_state, block)
  return block, audio, state, dec_state


def reference_block(model: DiT, history, state: StreamState, extra, sp: SamplerParams,
                    history_extra=None):
  """The no-cache exactness reference for ``block_causal``: block i is denoised by recomputing the
  whole history [clean chunks 0..i-1 | noisy chunk i | global] at every step with the streaming
  mask and absolute positions. history: (B, i * chunk, C), starting with ``start_context``. Uses
  ``state`` only for its prompt, batch layout and PRNG key, exactly as ``generate_block`` does.
  Returns (block, key')."""
  cfg = model.cfg
  cs = cfg.chunk
  b = history.shape[0]
  b2 = state.cache.cross_k.shape[1]
  cfg_on = b2 != b
  n = b2 // b
  i = history.shape[1] // cs
  key, x_init, eps = block_noise(state.key, (b, cs, cfg.io_channels))
  layout = layouts.sequence_layout(i, [i], layouts.span(cfg), cs)
  rope = A.rope_tables(np.asarray(model.inv_freq[...]), layout.meta.pos)
  hist2 = _dup(history, n)
  hist_extra2 = None if history_extra is None else _dup(history_extra, n)
  extra2 = _dup(extra, n)
  cross = state.cache.cross()

  def velocity_at(x, t):
    v = layouts.sequence_forward(model, hist2, _dup(x, n), jnp.full((b2, 1), t), cross,
                                 state.cache.global_embed, layout, hist_extra2, extra2, rope)
    return _split_v(v, b, cfg_on)

  block, _ = _denoise(x_init, None, schedule(sp.steps), eps, sp.steps, sp, cfg_on, velocity_at)
  return block, key


# ------------------------------------------------------------------------------- Python API


class Stream:
  """A jitted stream of blocks: ``set_prompt`` then iterate ``blocks(n)`` or call ``next_block``.

  The block program (``block_program``: commit, every denoising step and, given a codec's
  ``decoder`` (``BlockDecoder``), the block's decode) is compiled once, ahead of time
  (``compile_cache.compile_program``: jit, lower, compile; exported to the user cache for the
  next start) with the state donated, so the first block has no compile stall and later blocks
  never recompile; the sampler settings (steps, CFG scale, CFG++, pingpong) are runtime arrays.
  A prompt change swaps the cross-attention K/V in the cache (same shapes, no recompilation).
  ``step()`` returns the block and its audio; ``next_block()`` the block.
  """

  def __init__(self, model: DiT, *, batch: int = 1, regime: str = "block_causal",
               cfg_guidance: bool = True, cross_len: int | None = None, seed: int = 0,
               sampler: SamplerParams | None = None, decoder=None):
    cfg = model.cfg
    if not cfg.streaming:
      raise ValueError("streaming needs a model with input_add channels (an LMDM config); "
                       f"this one has input_add_dim={cfg.input_add_dim}")
    if regime not in REGIMES:
      raise ValueError(f"unknown regime {regime!r}; choose one of {REGIMES}")
    if batch < 1:
      raise ValueError(f"batch must be >= 1, got {batch}")
    self.cfg, self.regime, self.batch, self.cfg_guidance = cfg, regime, batch, cfg_guidance
    self.cross_len = cross_len if cross_len is not None else 1
    self.graphdef, self.params = nnx.split(model)
    self.tables = rope_window_tables(model)
    self.sampler = sampler or SamplerParams.make()
    self.state = init_state(cfg, regime, batch, cfg_guidance, self.cross_len, seed)
    self._zero_extra = jax.device_put(np.zeros((batch, cfg.chunk, cfg.extra_dim), np.float32))
    gd = self.graphdef

    def prompt(params, state, cond, glob):
      return set_prompt(nnx.merge(gd, params), state, cond, glob)

    def commit(params, tables, state):
      return commit_pending(nnx.merge(gd, params), tables, state)

    self.decoder = decoder
    self.dec_state = None if decoder is None else decoder.init(batch)
    self.dec_params = None if decoder is None else decoder.params

    def program(params, tables, state, extra, sp, dec_params, dec_state):
      return block_program(nnx.merge(gd, params), tables, state, extra, sp, regime, decoder,
                           dec_params, dec_state)

    self._glob_spec = (np.zeros((batch, cfg.global_cond_dim), np.float32)
                       if cfg.global_cond_dim else None)
    cond_spec = np.zeros((batch, self.cross_len, cfg.cond_token_dim), np.float32)
    from lmdm_jax import compile_cache
    key = f"{cfg!r} {regime} decoder={decoder!r}"
    audio_like = None if decoder is None else 0
    self._program = compile_cache.compile_program(
        "block", program, (self.params, self.tables, self.state, self._zero_extra, self.sampler,
                           self.dec_params, self.dec_state), donate_argnums=(2, 6),
        out_like=(0, audio_like, self.state, self.dec_state), key=key)
    self._prompt = compile_cache.compile_program(
        "prompt", prompt, (self.params, self.state, cond_spec, self._glob_spec),
        donate_argnums=(1,), out_like=self.state, key=f"{cfg!r}")
    self._commit = jax.jit(commit, donate_argnums=(2,))
    self._generate = {}

  # --------------------------------------------------------------------------- conditioning

  def set_prompt(self, cond_tokens, global_cond=None) -> None:
    """cond_tokens: (batch, cross_len, cond_token_dim); global_cond: (batch, global_cond_dim)."""
    cfg = self.cfg
    cond_tokens = _f32(cond_tokens)
    want = (self.batch, self.cross_len, cfg.cond_token_dim)
    if cond_tokens.shape != want:
      what = "prompt batch" if cond_tokens.ndim == 3 and cond_tokens.shape[0] != self.batch else "shape"
      raise ValueError(f"conditioning tokens: {what} mismatch: expected (batch, tokens, dim) = "
                       f"{want}, got {tuple(cond_tokens.shape)}")
    if cfg.global_cond_dim:
      if global_cond is None:
        global_cond = jnp.zeros((self.batch, cfg.global_cond_dim), jnp.float32)
      global_cond = _f32(global_cond)
      if global_cond.shape != (self.batch, cfg.global_cond_dim):
        raise ValueError(f"global conditioning: expected shape {(self.batch, cfg.global_cond_dim)}"
                         f", got {tuple(global_cond.shape)} (prompt batch mismatch?)")
    elif global_cond is not None:  # no global conditioning: only an empty array means "none"
      if np.size(global_cond):
        raise ValueError(f"global conditioning given (shape {tuple(np.shape(global_cond))}) but "
                         "the model has none (global_cond_dim 0)")
      global_cond = None
    self.state = self._prompt(self.params, self.state, cond_tokens, global_cond)

  def set_sampler(self, **kw) -> None:
    """Change steps / cfg_scale / plus_plus / pingpong for the next blocks (no recompilation)."""
    cur = dict(steps=int(self.sampler.steps), cfg_scale=float(self.sampler.cfg_scale),
               plus_plus=bool(self.sampler.plus_plus), pingpong=bool(self.sampler.pingpong))
    cur.update(kw)
    self.sampler = SamplerParams.make(**cur)

  def _check_extra(self, extra, frames):
    e = self.cfg.extra_dim
    if extra is None:
      return jnp.zeros((self.batch, frames, e), jnp.float32) if frames != self.cfg.chunk else self._zero_extra
    extra = jnp.asarray(extra, jnp.float32)
    if extra.shape != (self.batch, frames, e):
      raise ValueError(f"extra conditioning channels: expected (batch, frames, extra_dim) = "
                       f"{(self.batch, frames, e)}, got {tuple(extra.shape)}")
    return extra

  def prime(self, latents, extra=None) -> None:
    """Seed the stream with real context latents (B, frames, C), frames a multiple of chunk,
    after what it holds. On a fresh block_causal stream in the authors' layout they replace the
    zero start chunks they cover (as the window regimes' window): a W-chunk context starts the
    stream exactly as the authors' ``init_audio`` does."""
    cfg = self.cfg
    latents = jnp.asarray(latents, jnp.float32)
    if latents.ndim != 3 or latents.shape[0] != self.batch or latents.shape[2] != cfg.io_channels:
      raise ValueError(f"context latents: expected (batch={self.batch}, frames, latent channels="
                       f"{cfg.io_channels}), got {tuple(latents.shape)}")
    frames = latents.shape[1]
    check_frames(frames, cfg.chunk, "context latents")
    extra = self._check_extra(extra, frames)
    if self.regime.startswith("block_causal"):
      st = self.state
      n_start = layouts.start_chunks(cfg) - frames // cfg.chunk
      if n_start > 0 and int(st.cache.next_chunk) == 0 and int(st.has_pending) == 0:
        # a fresh stream: the real context replaces the zero start chunks it covers
        pad = jnp.zeros((self.batch, n_start * cfg.chunk, latents.shape[2]), jnp.float32)
        latents = jnp.concatenate([pad, latents], axis=1)
        extra = jnp.concatenate([jnp.zeros(pad.shape[:2] + extra.shape[2:]), extra], axis=1)
        frames = latents.shape[1]
      for c in range(frames // cfg.chunk):
        sl = slice(c * cfg.chunk, (c + 1) * cfg.chunk)
        self.state = self._commit(self.params, self.tables, self.state)
        self.state = self.state.replace(context=latents[:, sl], context_extra=extra[:, sl],
                                        has_pending=jnp.ones((), jnp.int32))
    else:
      w = cfg.window_chunks * cfg.chunk
      ctx = jnp.concatenate([self.state.context, latents], axis=1)[:, -w:]
      ctx_e = jnp.concatenate([self.state.context_extra, extra], axis=1)[:, -w:]
      self.state = self.state.replace(context=ctx, context_extra=ctx_e)

  # ------------------------------------------------------------------------------ generation

  def step(self, extra=None):
    """One block through the block program: (block (batch, chunk, C), its audio (batch,
    channels, decoder.max_samples), of which ``decoder.valid(k)`` is new, or None without a
    decoder)."""
    block, audio, self.state, self.dec_state = self._program(
        self.params, self.tables, self.state, self._check_extra(extra, self.cfg.chunk),
        self.sampler, self.dec_params, self.dec_state)
    return block, audio

  def next_block(self, extra=None) -> jax.Array:
    """Generate one block (batch, chunk, C)."""
    return self.step(extra)[0]

  def blocks(self, n: int | None = None) -> Iterator[jax.Array]:
    """Iterate blocks (forever when n is None)."""
    k = 0
    while n is None or k < n:
      yield self.next_block()
      k += 1

  def generate(self, frames: int, extra=None) -> jax.Array:
    """Offline generation of ``frames`` (a multiple of chunk) as one ``lax.scan`` over blocks."""
    cfg = self.cfg
    check_frames(frames, cfg.chunk, "requested length")
    n = frames // cfg.chunk
    extra = self._check_extra(extra, frames).reshape(self.batch, n, cfg.chunk, cfg.extra_dim)
    if n not in self._generate:
      gd, regime = self.graphdef, self.regime

      def run(params, tables, state, extra, sp):
        model = nnx.merge(gd, params)

        def body(st, e):
          blk, st, _ = generate_block(model, tables, st, e, sp, regime)
          return st, blk

        state, blocks = jax.lax.scan(body, state, jnp.swapaxes(extra, 0, 1))
        return jnp.swapaxes(blocks, 0, 1).reshape(self.batch, n * cfg.chunk, -1), state

      self._generate[n] = jax.jit(run, donate_argnums=(2,))
    out, self.state = self._generate[n](self.params, self.tables, self.state, extra, self.sampler)
    return out


def _f32(x) -> jax.Array:
  """A float32 device array; host arrays go by device_put (jnp.asarray compiles a small
  conversion program per new shape, which costs start-up time)."""
  if isinstance(x, jax.Array):
    return x.astype(jnp.float32)
  return jax.device_put(np.asarray(x, np.float32))


def check_frames(frames: int, chunk: int, what: str) -> None:
  if frames <= 0 or frames % chunk:
    raise ValueError(f"{what}: {frames} frames is not a positive multiple of the chunk "
                     f"({chunk} frames)")
