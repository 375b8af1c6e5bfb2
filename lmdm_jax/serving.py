"""Batched serving: many live streams (text streams and jam sessions) in fixed slots, advanced
together by one compiled block step.

``SlotStreams`` (the model level) holds the state of ``slots`` batch-1 streams stacked on a
leading slot axis (``StreamState`` leaves of shape (slots, ...)) and runs the existing batch-1
block step (``sampling.cached_step`` / ``window_step``) over every slot at once with ``jax.vmap``:
the weights are read once per forward for all slots, and each slot keeps everything a lone
``sampling.Stream`` keeps: its own prompt (cross-attention K/V), ring, counters and noise key,
and its own sampler settings (``SamplerParams`` leaves of shape (slots,)). Per slot:
- validity: ``step(..., active)`` advances the slots marked active; the others' states come back
  unchanged (a select on every state leaf), so a slot that waits (a jam's delay) never
  changes. A step runs the narrowest of the compiled widths 1, 2, 4, ..., slots that holds every
  active slot (the first ``width`` slots; ``SlotServer`` hands out the lowest free slot), so
  free slots above the highest active one cost nothing;
- step count: each slot's schedule comes from its own ``steps``; the denoising loop (a
  ``fori_loop`` whose trip count is per slot) runs, under ``vmap``, the largest step count of
  the batch, and a slot whose steps are done keeps its value (JAX's batched while-loop selects
  the old value for finished slots): the result is the slot's own step count's, exactly;
- CFG: the guidance layout ([cond | uncond] per slot) is a shape, so one ``SlotStreams`` is
  either guided or not; the scale is per slot. ``SlotServer`` keeps one pool of each kind (the
  second compiled when first needed) and puts a stream in the guided pool when its CFG scale is
  not 1, as ``System.stream`` builds a guided stream then;
- joins and leaves change array values only (``join`` writes a fresh state into the slot, the
  block_causal start context is primed before the slot's first block, as ``generate_block``
  does): nothing recompiles. Every program is compiled ahead of time in the constructor.
Each slot's blocks equal a lone stream's of the same prompt, seed and settings (to float32
rounding: the batched matmuls may sum in another order); ``tests/test_serving.py`` checks 1e-5.

``SlotServer`` (the System level) hands out slots: ``open_stream`` (a text stream, as
``System.stream``) and ``JamSession(..., server=slots)`` (a jam session whose blocks come from
a slot), ``step`` (one batched step for a set of handles), ``render`` (offline, streams and jams
in lockstep) and a live sampler thread on the block clock for jam sessions (the jam server).
"""
from __future__ import annotations

import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdm_jax import layouts
from lmdm_jax import sampling as S


class SlotsFull(RuntimeError):
  """Every slot is taken."""


def _select(active, new, old):
  """Per slot: ``new`` where ``active`` (slots,), else ``old`` (leaves with a leading slot axis)."""
  return jnp.where(jnp.reshape(active, (-1,) + (1,) * (new.ndim - 1)), new, old)


def _at(states, slot):
  return jax.tree.map(lambda a: a[slot], states)


def _put(states, slot, one):
  return jax.tree.map(lambda a, b: a.at[slot].set(b), states, one)


class SlotStreams:
  """``slots`` batch-1 streams of ``model`` stepped together (see the module docstring).

  ``join(slot, cond, glob, seed, sampler)`` starts a fresh stream in ``slot``; ``set_prompt`` and
  ``set_sampler`` change one slot; ``step(extras, active)`` -> (slots, chunk, C) latents (rows of
  inactive slots are meaningless; the step runs the narrowest compiled width, 1, 2, 4, ...,
  slots, that holds every active slot); ``leave(slot)`` frees it (its state stays until the next
  join overwrites it). Nothing here recompiles after the constructor.
  """

  def __init__(self, model, slots: int, *, regime: str = "block_causal", cfg_guidance: bool = True,
               cross_len: int = 1):
    cfg = model.cfg
    if not cfg.streaming:
      raise ValueError("serving streams needs a model with input_add channels (an LMDM config)")
    if regime not in S.REGIMES:
      raise ValueError(f"unknown regime {regime!r}; choose one of {S.REGIMES}")
    if int(slots) < 1:
      raise ValueError(f"slots must be >= 1, got {slots}")
    self.cfg, self.slots, self.regime = cfg, int(slots), regime
    self.cfg_guidance, self.cross_len = bool(cfg_guidance), int(cross_len)
    self.graphdef, self.params = nnx.split(model)
    self.tables = S.rope_window_tables(model)
    gd, n = self.graphdef, self.slots
    fresh = lambda key: S.init_state(cfg, regime, 1, cfg_guidance, cross_len, seed=key)
    self.state = jax.jit(jax.vmap(fresh))(jax.vmap(jax.random.key)(jnp.arange(n)))
    self.sampler = jax.tree.map(lambda a: jnp.stack([a] * n), S.SamplerParams.make())
    self._started = np.zeros(n, bool)  # block_causal: start context primed (host side)
    self.compiles = 0  # programs compiled by this object (all in the constructor)
    cached = regime.startswith("block_causal")

    def step_one(params, tables, state, extra, sp):
      model = nnx.merge(gd, params)
      if cached:  # the slot was started by _start (no lax.cond under vmap: it would run both)
        blk, state, _ = S.cached_step(model, tables, state, extra, sp,
                                      fused=regime == "block_causal")
      else:
        blk, state, _ = S.window_step(model, tables, state, extra, sp, regime)
      return blk[0], state

    def step(width, params, tables, states, extras, sp, active):
      """Slots 0..width-1 (the first ``width`` of the slot axis) advance, the rest untouched."""
      head = lambda tree: jax.tree.map(lambda a: a[:width], tree)
      blocks, new = jax.vmap(step_one, in_axes=(None, None, 0, 0, 0))(
          params, tables, head(states), head(extras), head(sp))
      new = jax.tree.map(lambda a, b: _select(active[:width], a, b), new, head(states))
      return blocks, jax.tree.map(lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, 0, 0),
                                  states, new)

    def join(params, states, slot, key, cond, glob):
      one = S.set_prompt(nnx.merge(gd, params), fresh(key), cond, glob)
      return _put(states, slot, one)

    def prompt(params, states, slot, cond, glob):
      one = S.set_prompt(nnx.merge(gd, params), _at(states, slot), cond, glob)
      return _put(states, slot, one)

    def start(params, tables, states, slot):
      one = S.start_stream(nnx.merge(gd, params), tables, _at(states, slot))
      return _put(states, slot, one)

    e = cfg.extra_dim
    self._zero_extras = jnp.zeros((n, 1, cfg.chunk, e), jnp.float32)
    slot0 = jnp.zeros((), jnp.int32)
    cond = jnp.zeros((1, cross_len, cfg.cond_token_dim), jnp.float32)
    self._glob_spec = (jnp.zeros((1, cfg.global_cond_dim), jnp.float32)
                       if cfg.global_cond_dim else None)
    key = jax.random.key(0)

    def compile_(f, donate, *args):
      self.compiles += 1
      return jax.jit(f, donate_argnums=donate).lower(*args).compile()

    # one program per width 1, 2, 4, ..., slots: a step runs the narrowest that holds every
    # active slot (slots are handed out lowest first), so free slots above cost nothing
    self.widths = sorted({min(2 ** i, n) for i in range(n.bit_length() + 1)})
    self._steps = {w: compile_(functools.partial(step, w), (2,), self.params, self.tables,
                               self.state, self._zero_extras, self.sampler,
                               jnp.zeros((n,), bool)) for w in self.widths}
    self._join = compile_(join, (1,), self.params, self.state, slot0, key, cond, self._glob_spec)
    self._prompt = compile_(prompt, (1,), self.params, self.state, slot0, cond, self._glob_spec)
    self._start = (compile_(start, (2,), self.params, self.tables, self.state, slot0)
                   if cached and layouts.start_chunks(cfg) else None)
    self._setsp = compile_(lambda sp, slot, one: _put(sp, slot, one), (0,), self.sampler, slot0,
                           S.SamplerParams.make())
    self._key = jax.jit(jax.random.key)

  # ------------------------------------------------------------------------------- slots

  def _slot(self, slot) -> jax.Array:
    if not 0 <= int(slot) < self.slots:
      raise ValueError(f"slot must be in 0..{self.slots - 1}, got {slot}")
    return jnp.asarray(int(slot), jnp.int32)

  def _cond(self, cond, glob):
    cfg = self.cfg
    cond = jnp.asarray(cond, jnp.float32)
    want = (1, self.cross_len, cfg.cond_token_dim)
    if cond.shape != want:
      raise ValueError(f"conditioning tokens: expected {want}, got {tuple(cond.shape)}")
    if cfg.global_cond_dim:
      glob = (jnp.zeros((1, cfg.global_cond_dim), jnp.float32) if glob is None
              else jnp.asarray(glob, jnp.float32))
      if glob.shape != (1, cfg.global_cond_dim):
        raise ValueError(f"global conditioning: expected {(1, cfg.global_cond_dim)}, got "
                         f"{tuple(glob.shape)}")
    else:
      glob = None
    return cond, glob

  def join(self, slot: int, cond, glob=None, *, seed: int = 0,
           sampler: S.SamplerParams | None = None) -> None:
    """A fresh stream in ``slot``: prompt ``cond`` (1, cross_len, D) / ``glob`` (1, G), noise
    ``jax.random.key(seed)`` (as ``sampling.Stream``), ``sampler`` (default
    ``SamplerParams.make()``)."""
    s = self._slot(slot)
    cond, glob = self._cond(cond, glob)
    self.state = self._join(self.params, self.state, s, self._key(seed), cond, glob)
    self._started[int(slot)] = False
    self.set_sampler(slot, sampler or S.SamplerParams.make())

  def leave(self, slot: int) -> None:
    """Free ``slot`` (its state is overwritten by the next ``join``)."""
    self._slot(slot)
    self._started[int(slot)] = False

  def set_prompt(self, slot: int, cond, glob=None) -> None:
    cond, glob = self._cond(cond, glob)
    self.state = self._prompt(self.params, self.state, self._slot(slot), cond, glob)

  def set_sampler(self, slot: int, sampler: S.SamplerParams) -> None:
    self.sampler = self._setsp(self.sampler, self._slot(slot), sampler)

  def sampler_of(self, slot: int) -> S.SamplerParams:
    return jax.tree.map(lambda a: a[int(slot)], self.sampler)

  def step(self, extras=None, active=None) -> np.ndarray:
    """One block for every active slot: extras (slots, chunk, E) (default zeros), active
    (slots,) bool (default all). Returns (slots, chunk, C) float32 latents."""
    n, cfg = self.slots, self.cfg
    active = np.ones(n, bool) if active is None else np.asarray(active, bool)
    if active.shape != (n,):
      raise ValueError(f"active: expected ({n},) bools, got shape {active.shape}")
    if extras is None:
      extras = self._zero_extras
    else:
      extras = np.asarray(extras, np.float32)
      if extras.shape != (n, cfg.chunk, cfg.extra_dim):
        raise ValueError(f"extras: expected {(n, cfg.chunk, cfg.extra_dim)}, got {extras.shape}")
      extras = jnp.asarray(extras[:, None])
    if self._start is not None:
      for slot in np.flatnonzero(active & ~self._started):
        self.state = self._start(self.params, self.tables, self.state, self._slot(slot))
    self._started |= active
    top = int(np.flatnonzero(active)[-1]) + 1 if active.any() else 1
    width = next(w for w in self.widths if w >= top)
    blocks, self.state = self._steps[width](self.params, self.tables, self.state, extras,
                                            self.sampler, jnp.asarray(active))
    out = np.zeros((n, cfg.chunk, cfg.io_channels), np.float32)
    out[:width] = np.asarray(blocks)
    return out


# --------------------------------------------------------------------------- the System level


class SlotHandle:
  """One slot of a ``SlotServer``: the ``sampling.Stream`` surface that ``AudioStream`` and
  ``JamSession`` use (``set_prompt(tokens, glob)``, ``set_sampler(**kw)``, ``next_block(extra)``
  -> (1, chunk, C), ``cfg_guidance``), with its blocks computed by the server's batched step
  (``next_block`` alone runs a step in which only this slot is active)."""

  def __init__(self, server: "SlotServer", pool: SlotStreams, slot: int, sampler):
    self.server, self.pool, self.slot = server, pool, slot
    self.cfg_guidance = pool.cfg_guidance
    self.sampler = sampler
    self.open = True

  def set_prompt(self, cond_tokens, global_cond=None) -> None:
    with self.server.lock:
      self._check()
      self.pool.set_prompt(self.slot, cond_tokens, global_cond)

  def set_sampler(self, **kw) -> None:
    cur = dict(steps=int(self.sampler.steps), cfg_scale=float(self.sampler.cfg_scale),
               plus_plus=bool(self.sampler.plus_plus), pingpong=bool(self.sampler.pingpong))
    cur.update(kw)
    sp = S.SamplerParams.make(**cur)
    with self.server.lock:
      self._check()
      self.pool.set_sampler(self.slot, sp)
      self.sampler = sp

  def next_block(self, extra=None) -> np.ndarray:
    return self.server.step([(self, extra)])[0][None]

  def close(self) -> None:
    self.server.leave(self)

  def _check(self):
    if not self.open:
      raise RuntimeError("this slot was closed")


class SlotServer:
  """``slots`` streams of a ``System`` served by batched steps (see the module docstring).

  ``open_stream(prompt, seed=, **sampler)`` -> an ``AudioStream`` whose blocks come from a slot;
  ``system.jam(..., server=this)`` -> a ``JamSession`` in a slot. Both leave their slot with
  ``close()``. ``step([(handle, extra), ...])`` advances the given slots one block in one batched
  step per pool; ``render`` runs streams and jams offline in lockstep; ``attach(jam)`` puts a
  started jam session on the live sampler thread (``start()`` does it).
  """

  def __init__(self, system, slots: int, *, regime: str | None = None,
               clock=time.perf_counter, log=None):
    if not system.streams:
      raise ValueError("a base model generates whole clips; serving needs a streaming model")
    if int(slots) < 1:
      raise ValueError(f"slots must be >= 1, got {slots}")
    self.system, self.slots = system, int(slots)
    self.regime = system.defaults.regime if regime is None else regime
    self.clock = clock
    self.log = log or (lambda *a: None)
    self.lock = threading.RLock()  # the pools' state and the slot table
    self._build_lock = threading.Lock()
    self.pools: dict[bool, SlotStreams] = {}
    self._used: dict[bool, set] = {}
    self.handles: list[SlotHandle] = []
    self.block_seconds = system.block_seconds
    self._epoch = None  # the block clock's origin (set by the first live jam)
    self._live: list = []  # started jam sessions on the sampler thread
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread = None
    self.ticks = 0

  # ------------------------------------------------------------------------------- slots

  @property
  def in_use(self) -> int:
    with self.lock:
      return len(self.handles)

  def pool(self, cfg_guidance: bool) -> SlotStreams:
    """The pool of guided (CFG) or unguided slots, compiled on first use."""
    with self._build_lock:
      if cfg_guidance not in self.pools:
        p = SlotStreams(self.system.model, self.slots, regime=self.regime,
                        cfg_guidance=cfg_guidance, cross_len=self.system.cross_len)
        with self.lock:
          self.pools[cfg_guidance], self._used[cfg_guidance] = p, set()
      return self.pools[cfg_guidance]

  def join(self, tokens, glob, *, seed: int = 0, steps=None, cfg_scale=None, plus_plus=None,
           pingpong=None) -> SlotHandle:
    """A slot holding a fresh stream with this prompt, seed and sampler settings (the System's
    defaults where None). Raises ``SlotsFull`` when all slots are taken."""
    s = self.system.sampler_settings(steps, cfg_scale, plus_plus, pingpong, self.regime)
    guided = s.cfg_scale != 1.0
    with self.lock:
      self._check_free()
    pool = self.pool(guided)  # (compiles outside the lock when new)
    sp = S.SamplerParams.make(s.steps, s.cfg_scale, s.plus_plus, s.pingpong)
    with self.lock:
      self._check_free()
      slot = min(set(range(self.slots)) - self._used[guided])
      pool.join(slot, tokens, glob, seed=seed, sampler=sp)
      self._used[guided].add(slot)
      h = SlotHandle(self, pool, slot, sp)
      self.handles.append(h)
      return h

  def _check_free(self):
    if len(self.handles) >= self.slots:
      raise SlotsFull(f"all {self.slots} slots are taken: try again when a session ends")

  def leave(self, handle: SlotHandle) -> None:
    with self.lock:
      if handle.open:
        handle.open = False
        handle.pool.leave(handle.slot)
        self._used[handle.pool.cfg_guidance].discard(handle.slot)
        self.handles.remove(handle)

  def open_stream(self, prompt: str | None = None, *, seed: int = 0, decode: bool = True,
                  **sampler):
    """A text stream in a slot: an ``AudioStream`` as ``System.stream`` makes (no sketch)."""
    from lmdm_jax.system import DEFAULT_PROMPT, AudioStream
    return AudioStream(self.system, DEFAULT_PROMPT if prompt is None else prompt, seed=seed,
                       sketch=None, decode=decode,
                       settings=self.system.sampler_settings(regime=self.regime, **sampler),
                       server=self)

  # ------------------------------------------------------------------------------ stepping

  def step(self, items) -> list[np.ndarray]:
    """One block for each ``(handle, extra)`` (extra: (1, chunk, E) or (chunk, E), or None for
    zeros): one batched step per pool that has any. Returns each handle's (chunk, C) latents."""
    cfg = self.system.cfg
    out = [None] * len(items)
    with self.lock:
      by_pool: dict[bool, list] = {}
      for i, (h, extra) in enumerate(items):
        h._check()
        by_pool.setdefault(h.pool.cfg_guidance, []).append((i, h, extra))
      for guided, group in by_pool.items():
        pool = self.pools[guided]
        extras = np.zeros((pool.slots, cfg.chunk, cfg.extra_dim), np.float32)
        active = np.zeros(pool.slots, bool)
        for _, h, extra in group:
          if active[h.slot]:
            raise ValueError("a slot appears twice in one step")
          active[h.slot] = True
          if extra is not None:
            extras[h.slot] = np.asarray(extra, np.float32).reshape(cfg.chunk, cfg.extra_dim)
        blocks = pool.step(extras, active)
        for i, h, _ in group:
          out[i] = blocks[h.slot]
      self.ticks += 1
    return out

  def render(self, streams=(), jams=()) -> tuple[list, list]:
    """Offline, in lockstep: ``streams`` [(AudioStream from ``open_stream``, n_blocks)] and
    ``jams`` [(JamSession in this server, partner audio)]; each round advances every unfinished
    one by one block in one batched step. Returns (the streams' blocks as ``next_block`` returns
    them, concatenated, each; the jams' ``render`` outputs)."""
    streams, jams = list(streams), list(jams)
    parts = [[] for _ in streams]
    for sess, partner in jams:
      sess.render_begin(partner)
    while True:
      items, who = [], []
      for i, (st, n) in enumerate(streams):
        if len(parts[i]) < n:
          items.append((st.stream, st.next_extra()))
          who.append(("stream", i))
      for j, (sess, _) in enumerate(jams):
        if sess.render_pending():
          items.append((sess.stream, sess.render_input()))
          who.append(("jam", j))
      if not items:
        break
      t1 = time.perf_counter()
      blocks = self.step(items)
      dt = time.perf_counter() - t1
      for (kind, i), blk in zip(who, blocks):
        if kind == "stream":
          parts[i].append(streams[i][0].take_block(blk))
        else:
          jams[i][0].render_output(blk, dt)
    axis = 0 if self.system.codec is None else -1
    texts = [np.concatenate(p, axis=axis) if p else None for p in parts]
    return texts, [sess.render_result() for sess, _ in jams]

  # ------------------------------------------------------------------------- the live clock

  def attach(self, sess) -> float:
    """Put a started jam session on the sampler thread. Returns its clock origin: the block
    clock's tick at or before now, so that every live session's blocks fall on the same ticks
    and run in one batched step (a session's block k is generated at tick origin +
    (k + delay_blocks - 1) B, up to one block before a lone session would, with up to one block
    less of the partner heard; the delay and the deadlines are those of a lone session)."""
    now = self.clock()
    with self.lock:
      if self._epoch is None:
        self._epoch = now
      t0 = self._epoch + np.floor((now - self._epoch) / self.block_seconds) * self.block_seconds
      self._live.append(sess)
      if self._thread is None:
        self._thread = threading.Thread(target=self._run, name="slot-sampler", daemon=True)
        self._thread.start()
    self._wake.set()
    return float(t0)

  def detach(self, sess) -> None:
    with self.lock:
      if sess in self._live:
        self._live.remove(sess)

  def close(self) -> None:
    """Stop the sampler thread (the sessions' slots stay until they close)."""
    self._stop.set()
    self._wake.set()
    if self._thread is not None:
      self._thread.join(timeout=60)

  def _due_at(self, sess) -> float:
    return sess._t0 + sess.block_start(sess.blocks)

  def _run(self):
    while not self._stop.is_set():
      with self.lock:
        live = list(self._live)
      if not live:
        self._wake.wait(0.1)
        self._wake.clear()
        continue
      now = self.clock()
      first = min(self._due_at(s) for s in live)
      if now < first:
        self._stop.wait(min(0.005, max(first - now, 0.0005)))
        continue
      due = [s for s in live if self._due_at(s) <= now]
      t1 = time.perf_counter()
      items, ok = [], []
      for s in due:
        try:
          items.append((s.stream, s._accomp_extra(s.blocks, trim=True)))
          ok.append(s)
        except BaseException as e:  # noqa: BLE001 - this session's failure, surfaced by its pull
          self._fail(s, e)
      try:
        blocks = self.step(items) if items else []
      except BaseException as e:  # noqa: BLE001 - the batched step failed: every session in it
        for s in ok:
          self._fail(s, e)
        continue
      for s, blk in zip(ok, blocks):
        k = s.blocks
        try:
          s._emit(k, blk)
        except BaseException as e:  # noqa: BLE001
          self._fail(s, e)
          continue
        s.block_times.append(time.perf_counter() - t1)
        late = s.now() - (k + s.delay_blocks) * s.block_seconds
        s.max_lateness = max(s.max_lateness, late)
        if late > 0:
          s.deadline_misses += 1

  def _fail(self, sess, e):
    sess._error = e
    self.detach(sess)
