"""Rectified-flow sampling, block by block, in every regime.

- ``schedule``: the reference's logSNR-linspace schedule (LMDM_REFERENCE §3.1), with the step count
  a runtime value (changing it does not recompile).
- ``generate_block(model, tables, state, extra, sp)``: one block (all denoising steps) in the
  regime of the state. Regimes:
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

import functools
import logging
from typing import Iterator

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
    return cls(jnp.asarray(steps, jnp.int32), jnp.asarray(cfg_scale, jnp.float32),
               jnp.asarray(bool(plus_plus)), jnp.asarray(bool(pingpong)))


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
  """Everything a stream carries from block to block (donated to ``generate_block``)."""

  cache: KVCache
  context: jax.Array  # block_causal: the pending (generated, not yet committed) block (B, chunk, C);
  #                     window regimes: the window context (B, window_chunks * chunk, C)
  context_extra: jax.Array  # extra input_add channels of ``context`` (B, *, E)
  has_pending: jax.Array  # () int32: block_causal only, whether ``context`` awaits its commit
  block_index: jax.Array  # () int32: blocks generated so far
  key: jax.Array  # PRNG key


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
  ctx = jnp.zeros((batch, ctx_len, c), jnp.float32)
  if context is not None:
    if regime.startswith("block_causal"):
      raise ValueError("block_causal streams start from an empty cache; prime them by generating "
                       "or use Stream.prime(latents)")
    if context.shape != ctx.shape:
      raise ValueError(f"context must have shape {ctx.shape} (batch, window frames, latent "
                       f"channels), got {tuple(context.shape)}")
    ctx = jnp.asarray(context, jnp.float32)
  key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
  return StreamState(cache=KVCache.create(cfg, b2, n_slots, cross_len), context=ctx,
                     context_extra=jnp.zeros((batch, ctx_len, e), jnp.float32),
                     has_pending=jnp.zeros((), jnp.int32), block_index=jnp.zeros((), jnp.int32),
                     key=key)


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


def _dup(x, n):
  return x if n == 1 else jnp.concatenate([x] * n)


def _split_v(v, b, cfg_on):
  return (v[:b], v[b:]) if cfg_on else (v, v)


def _tables_lookup(tables, pos, offset):
  cos, sin = tables
  return jnp.take(cos, pos + offset, axis=0), jnp.take(sin, pos + offset, axis=0)


def prime_ring(model: DiT, tables, cache: KVCache, context, context_extra, visible=None):
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
  _, kv = model.forward_tokens(h, _tables_lookup(tables, jnp.asarray(meta.pos), cs), mask,
                               cache.cross())
  return cache.fill(kv)


def start_stream(model: DiT, tables, state: StreamState) -> StreamState:
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


def rope_window_tables(model: DiT):
  """Rotary tables for window positions [-chunk, (window_chunks + 1) * chunk], in float64 then
  cast (computed once, outside jit, from the loaded inverse frequencies)."""
  cfg = model.cfg
  span = max(cfg.context_chunks, cfg.window_chunks) + 1
  pos = np.arange(-cfg.chunk, span * cfg.chunk + 1)
  return A.rope_tables(np.asarray(model.inv_freq[...]), pos)


def commit_pending(model: DiT, tables, state: StreamState) -> StreamState:
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
  _, kv = model.forward_tokens(h, _tables_lookup(tables, pend.pos, cs), mask, cache.cross(),
                               cache.past(), _tables_lookup(tables, past_meta.pos, cs))
  cache = cache.commit(kv, i - 1, state.has_pending > 0)
  return state.replace(cache=cache, has_pending=jnp.zeros((), jnp.int32))


def generate_block(model: DiT, tables, state: StreamState, extra, sp: SamplerParams, regime: str):
  """One block of ``chunk`` frames. extra: (B, chunk, E) extra input_add channels of the block.

  Returns (block (B, chunk, C) float32, new state, aux) with aux = (x_in, v_cond) of the last step.
  """
  cfg = model.cfg
  b = state.context.shape[0]
  b2 = state.cache.cross_k.shape[1]
  cfg_on = b2 != b
  n = b2 // b
  cs, K = cfg.chunk, cfg.context_chunks
  key, x_init, eps = block_noise(state.key, (b, cs, cfg.io_channels))
  cache = state.cache
  cross = cache.cross()
  off = cs  # table index of position 0
  extra2 = _dup(extra, n)

  def glob_tok(t):
    return model.embed_global(cache.global_embed, jnp.full((b2,), t))[:, None]

  if regime.startswith("block_causal"):
    fused = regime == "block_causal"
    state = start_stream(model, tables, state)
    cache = state.cache
    i = cache.next_chunk + state.has_pending  # index of the noisy chunk being generated
    pos = layouts.cached_positions(i, layouts.span(cfg), cs)
    noisy = A.TokenMeta.concat(A.chunk_meta(i[None], A.NOISY, cs, pos, xp=jnp),
                               A.global_meta(i, 0, xp=jnp))
    pend = A.chunk_meta((i - 1)[None], A.CLEAN, cs, pos, valid=state.has_pending > 0, xp=jnp)
    h_pend = model.embed_clean(_dup(state.context, n), _dup(state.context_extra, n))

    def run(c: KVCache, x, t, with_pending):
      past_meta = c.slot_meta(pos)
      fresh = A.TokenMeta.concat(pend, noisy) if with_pending else noisy
      mask = A.streaming_mask(fresh, A.TokenMeta.concat(past_meta, fresh), K)
      h = jnp.concatenate([model.embed_noisy(_dup(x, n), extra2), glob_tok(t)], axis=1)
      if with_pending:
        h = jnp.concatenate([h_pend, h], axis=1)
      out, kv = model.forward_tokens(h, _tables_lookup(tables, fresh.pos, off), mask, cross,
                                     c.past(), _tables_lookup(tables, past_meta.pos, off))
      p = cs if with_pending else 0
      v_c, v_u = _split_v(model.velocity(out[:, p:p + cs]), b, cfg_on)
      return v_c, v_u, kv

    def commit(c, kv):
      kv_p = jax.tree.map(lambda a: a[:, :, :cs], kv)
      return c.commit(kv_p, i - 1, state.has_pending > 0)

    t0 = schedule(sp.steps)[0]
    if fused:  # step 0 also carries the pending clean chunk and commits its K/V
      v_c0, v_u0, kv = run(cache, x_init, t0, True)
      new_cache = commit(cache, kv)
    else:  # a separate commit pass: the pending clean chunk alone, against the cache
      new_cache = commit_pending(model, tables, state).cache
      v_c0, v_u0, _ = run(new_cache, x_init, t0, False)

    def velocity_at(x, t, _):
      v_c, v_u, _ = run(new_cache, x, t, False)
      return v_c, v_u

    block, aux = _denoise(x_init, v_c0, v_u0, eps, sp, cfg_on, velocity_at)
    new_state = state.replace(cache=new_cache, context=block, context_extra=extra,
                              has_pending=jnp.ones((), jnp.int32))
  else:
    kw = cfg.window_chunks
    win = layouts.window_layout(kw, cs)
    bidir = regime != "naive"
    k_mask = kw if bidir else K
    h_ctx = model.embed_clean(_dup(state.context, n), _dup(state.context_extra, n))
    rope_all = _tables_lookup(tables, jnp.asarray(win.all.pos), off)
    if regime == "enc_dec":
      ctx_rope = _tables_lookup(tables, jnp.asarray(win.context.pos), off)
      mask_ctx = A.streaming_mask(win.context, win.context, k_mask, bidir)
      _, kv_ctx = model.forward_tokens(h_ctx, ctx_rope, mask_ctx, cross)
      cache = cache.fill(kv_ctx)
      mask_t = A.streaming_mask(win.target, win.all, k_mask, bidir)
      rope_t = _tables_lookup(tables, jnp.asarray(win.target.pos), off)

      def velocity_at(x, t, _):
        h = jnp.concatenate([model.embed_noisy(_dup(x, n), extra2), glob_tok(t)], axis=1)
        out, _ = model.forward_tokens(h, rope_t, mask_t, cross, cache.past(), ctx_rope)
        return _split_v(model.velocity(out[:, :cs]), b, cfg_on)
    else:
      mask_all = A.streaming_mask(win.all, win.all, k_mask, bidir)
      w = kw * cs

      def velocity_at(x, t, _):
        h = jnp.concatenate([h_ctx, model.embed_noisy(_dup(x, n), extra2), glob_tok(t)], axis=1)
        out, _ = model.forward_tokens(h, rope_all, mask_all, cross)
        return _split_v(model.velocity(out[:, w:w + cs]), b, cfg_on)

    block, aux = _denoise(x_init, None, None, eps, sp, cfg_on, velocity_at)
    new_state = state.replace(
        cache=cache,
        context=jnp.concatenate([state.context[:, cs:], block], axis=1),
        context_extra=jnp.concatenate([state.context_extra[:, cs:], extra], axis=1))
  new_state = new_state.replace(block_index=state.block_index + 1, key=key)
  return block, new_state, aux


def _denoise(x, v_c0, v_u0, eps, sp, cfg_on, velocity_at):
  """Denoising loop from initial noise x. If v_c0 is given, step 0's velocity is already known
  (the fused first step); steps ``start..steps-1`` run in a ``fori_loop``.
  Returns (x_0, (x_in, v_cond) of the last step)."""
  t = schedule(sp.steps)
  start = 0
  aux = (x, jnp.zeros_like(x))
  if v_c0 is not None:
    aux = (x, v_c0)
    x = update(x, v_c0, v_u0, t[0], t[1], eps(0), sp, cfg_on)
    start = 1

  def body(i, val):
    x, _ = val
    v_c, v_u = velocity_at(x, t[i], i)
    return update(x, v_c, v_u, t[i], t[i + 1], eps(i), sp, cfg_on), (x, v_c)

  x, aux = jax.lax.fori_loop(start, sp.steps, body, (x, aux))
  return x, aux


def reference_block(model: DiT, history, state: StreamState, extra, sp: SamplerParams,
                    history_extra=None):
  """The no-cache exactness reference for ``block_causal``: block i is denoised by recomputing the
  whole history [clean chunks 0..i-1 | noisy chunk i | global] at every step with the streaming
  mask and absolute positions. history: (B, i * chunk, C). Uses ``state`` only for its prompt,
  batch layout and PRNG key, exactly as ``generate_block`` does. Returns (block, key')."""
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

  def velocity_at(x, t, _):
    v = layouts.sequence_forward(model, hist2, _dup(x, n), jnp.full((b2, 1), t), cross,
                                 state.cache.global_embed, layout, hist_extra2, extra2, rope)
    return _split_v(v, b, cfg_on)

  block, _ = _denoise(x_init, None, None, eps, sp, cfg_on, velocity_at)
  return block, key


# ------------------------------------------------------------------------------- Python API


class Stream:
  """A jitted stream of blocks: ``set_prompt`` then iterate ``blocks(n)`` or call ``next_block``.

  The block step is compiled ahead of time (``jit(...).lower(...).compile()``) with the state
  donated, so the first block has no compile stall and later blocks never recompile; the sampler
  settings (steps, CFG scale, CFG++, pingpong) are runtime arrays. A prompt change swaps the
  cross-attention K/V in the cache (same shapes, no recompilation).
  """

  def __init__(self, model: DiT, *, batch: int = 1, regime: str = "block_causal",
               cfg_guidance: bool = True, cross_len: int | None = None, seed: int = 0,
               sampler: SamplerParams | None = None):
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
    self._zero_extra = jnp.zeros((batch, cfg.chunk, cfg.extra_dim), jnp.float32)
    gd = self.graphdef

    def step(params, tables, state, extra, sp):
      return generate_block(nnx.merge(gd, params), tables, state, extra, sp, regime)

    def prompt(params, state, cond, glob):
      return set_prompt(nnx.merge(gd, params), state, cond, glob)

    def commit(params, tables, state):
      return commit_pending(nnx.merge(gd, params), tables, state)

    self._glob_spec = (jnp.zeros((batch, cfg.global_cond_dim), jnp.float32)
                       if cfg.global_cond_dim else None)
    cond_spec = jnp.zeros((batch, self.cross_len, cfg.cond_token_dim), jnp.float32)
    self._step = jax.jit(step, donate_argnums=(2,)).lower(
        self.params, self.tables, self.state, self._zero_extra, self.sampler).compile()
    self._prompt = jax.jit(prompt, donate_argnums=(1,)).lower(
        self.params, self.state, cond_spec, self._glob_spec).compile()
    self._commit = jax.jit(commit, donate_argnums=(2,))
    self._generate = {}

  # --------------------------------------------------------------------------- conditioning

  def set_prompt(self, cond_tokens, global_cond=None) -> None:
    """cond_tokens: (batch, cross_len, cond_token_dim); global_cond: (batch, global_cond_dim)."""
    cfg = self.cfg
    cond_tokens = jnp.asarray(cond_tokens, jnp.float32)
    want = (self.batch, self.cross_len, cfg.cond_token_dim)
    if cond_tokens.shape != want:
      what = "prompt batch" if cond_tokens.ndim == 3 and cond_tokens.shape[0] != self.batch else "shape"
      raise ValueError(f"conditioning tokens: {what} mismatch: expected (batch, tokens, dim) = "
                       f"{want}, got {tuple(cond_tokens.shape)}")
    if cfg.global_cond_dim:
      if global_cond is None:
        global_cond = jnp.zeros((self.batch, cfg.global_cond_dim), jnp.float32)
      global_cond = jnp.asarray(global_cond, jnp.float32)
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
    """Seed the stream with real context latents (B, frames, C), frames a multiple of chunk."""
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

  def next_block(self, extra=None) -> jax.Array:
    """Generate one block (batch, chunk, C)."""
    block, self.state, _ = self._step(self.params, self.tables, self.state,
                                      self._check_extra(extra, self.cfg.chunk), self.sampler)
    return block

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


def check_frames(frames: int, chunk: int, what: str) -> None:
  if frames <= 0 or frames % chunk:
    raise ValueError(f"{what}: {frames} frames is not a positive multiple of the chunk "
                     f"({chunk} frames)")
