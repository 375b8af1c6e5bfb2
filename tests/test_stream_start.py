"""Stage 1's start sequences (``Stage1Config.p_start``) train exactly what a fresh stream shows the
model: the training forward's prediction for the noisy chunks after the W zero start chunks equals
the cached stream's (``sampling.start_stream``, then block commits) at the same noise and time;
p_start = 0 is the old loss, bit for bit. fp32, CPU, tiny widths."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmdm_jax import layouts
from lmdm_jax import sampling as S
from lmdm_jax.config import DiTConfig, load_config
from lmdm_jax.testing import random_model, rel_err
from lmdm_jax.training.stage1 import Stage1, Stage1Config, context_drop, dropout_mask, sample_times

B, S_LEN, E = 2, 5, 3


def tiny(**kw) -> DiTConfig:
  """`tiny` with an extra input_add group of E channels (as sketch / accompaniment)."""
  cfg = DiTConfig.from_config(load_config("tiny").model)
  return dataclasses.replace(cfg, input_add_dim=1 + cfg.io_channels + E, **kw)


def make_batch(cfg, frames, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  return dict(latents=f(B, frames, cfg.io_channels), cond=f(B, S_LEN, cfg.cond_token_dim),
              global_cond=f(B, cfg.global_cond_dim), extra=f(B, frames, E))


def stream_velocities(model, batch, pred):
  """The cached stream's velocity for every noisy chunk after the start, (B, n - W chunks, chunk,
  C): a fresh stream under the batch's prompt (``start_stream``: W zero chunks, mask 1), whose
  blocks 0, 1, ... are then the batch's chunks W, W+1, ... (committed as a stream commits its
  blocks), each noisy chunk denoised at the training forward's x_t and t."""
  cfg = model.cfg
  cs, W = cfg.chunk, layouts.start_chunks(cfg)
  n = pred.t.shape[1]
  tables = S.rope_window_tables(model)
  commit = jax.jit(lambda st: S.commit_pending(model, tables, st))
  forward = jax.jit(lambda ring, x, t, i, e: S.cached_forward(model, tables, ring, x, t, i, e)[0])
  st = S.init_state(cfg, "block_causal", B, False, S_LEN, seed=0)
  st = S.set_prompt(model, st, batch["cond"], batch["global_cond"])
  st = jax.jit(lambda st: S.start_stream(model, tables, st))(st)
  assert int(st.cache.next_chunk) == W
  sl = lambda a, i: a[:, i * cs:(i + 1) * cs]  # noqa: E731 - chunk i of (B, frames, ...)
  out = []
  for i in range(W, n):
    if i > W:  # block i - W - 1 was the data's chunk i - 1: commit it as the stream does
      st = st.replace(context=sl(batch["latents"], i - 1), context_extra=sl(batch["extra"], i - 1),
                      has_pending=jnp.ones((), jnp.int32))
      st = commit(st)
    assert int(st.cache.next_chunk + st.has_pending) == i
    rows = []
    for r in range(B):  # the stream's global token takes one time for the whole batch
      v = forward(st.cache, sl(pred.x_t, i), pred.t[r, i], jnp.asarray(i, jnp.int32),
                  sl(batch["extra"], i))
      rows.append(v[r])
    out.append(jnp.stack(rows))
  return jnp.stack(out, axis=1)


# (K, W, chunks): tiny's geometry, and live's chunk counts (K 17, W 18, 20-chunk sequences)
@pytest.mark.parametrize("K,W,chunks", [
    (3, 4, 7), pytest.param(17, 18, 20, marks=pytest.mark.slow)], ids=["tiny", "live_chunks"])
def test_start_sequence_is_the_fresh_streams_first_blocks(K, W, chunks):
  model = random_model(tiny(context_chunks=K, window_chunks=W), seed=0)
  cfg, cs = model.cfg, model.cfg.chunk
  # dropout on: a start sequence must not get any (p_cfg 0: the stream has the prompt)
  tc = Stage1Config(chunks=chunks, p_start=1.0, p_uncond=0.5, p_partial=0.5, p_cfg=0.0)
  tr = Stage1(model, tc)
  st = tr.init_state(model)
  batch = make_batch(cfg, tr.frames)
  pred = jax.jit(tr.predict)(st["params"], st["rest"], batch, jax.random.key(4))
  assert bool(pred.start.all())
  np.testing.assert_array_equal(np.asarray(pred.weight),
                                np.broadcast_to(np.arange(tr.frames) >= W * cs, (B, tr.frames)))
  v_train = pred.v[:, W * cs:].reshape(B, chunks - W, cs, -1)
  v_stream = stream_velocities(model, batch, pred)
  errs = [rel_err(v_stream[:, j], v_train[:, j]) for j in range(chunks - W)]
  print(f"K={K} W={W}: start sequence vs fresh stream, rel err per block {errs}")
  assert max(errs) < 1e-5
  # the same chunks of an ordinary sequence (real context, same noise and time) are not that
  plain = Stage1(model, dataclasses.replace(tc, p_start=0.0, p_uncond=0.0, p_partial=0.0))
  v_plain = jax.jit(plain.predict)(st["params"], st["rest"], batch, jax.random.key(4)).v
  assert rel_err(v_plain[:, W * cs:].reshape(v_train.shape), v_train) > 1e-3


def old_loss(tr, params, rest, batch, key):
  """Stage-1's loss as it was before start sequences (the reference's formula, step by step)."""
  from flax import nnx
  cfg, tc = tr.cfg, tr.tc
  model = nnx.merge(tr.graphdef, params, rest)
  x0 = batch["latents"]
  b, n, cs = x0.shape[0], tc.chunks, cfg.chunk
  k_t, k_eps, k_ctx, k_cfg, k_extra = jax.random.split(key, 5)
  t = sample_times(k_t, (b, n), tc.time_shift)
  eps = jax.random.normal(k_eps, x0.shape)
  t_f = jnp.repeat(t, cs, axis=1)[..., None]
  x_t = (1 - t_f) * x0 + t_f * eps
  cond = jnp.where((jax.random.uniform(k_cfg, (b,)) < tc.p_cfg)[:, None, None], 0.0, batch["cond"])
  extra = batch["extra"] * (jax.random.uniform(k_extra, (b,)) >= tc.p_cfg)[:, None, None]
  hidden = context_drop(k_ctx, b, n, cfg.context_chunks, tc.p_uncond, tc.p_partial)
  mask = dropout_mask(tr.base_mask, tr.layout.meta, hidden, cfg.context_chunks)
  v = layouts.sequence_forward(model, x0, x_t, t, model.cross_kv(cond),
                               model.project_global(batch["global_cond"]), tr.layout, extra, extra,
                               rope=tr.rope, mask=mask)
  err = jnp.square(v - (eps - x0)).mean(-1)
  return err.sum() / err.size


def test_p_start_zero_is_the_old_loss_bit_for_bit():
  model = random_model(tiny(), seed=1)
  tr = Stage1(model, Stage1Config(chunks=6))
  assert tr.tc.p_start == 0.0 and tr.n_start == 0
  st = tr.init_state(model)
  batch = make_batch(model.cfg, tr.frames, seed=1)
  for s in range(2):
    key = jax.random.key(s)
    new = tr.loss(st["params"], st["rest"], batch, key)[0]
    assert np.asarray(new) == np.asarray(old_loss(tr, st["params"], st["rest"], batch, key)), s
    # the start draw has its own key: with (almost) no start rows every other draw is unchanged
    rare = Stage1(model, Stage1Config(chunks=6, p_start=1e-9))
    assert rare.n_start == layouts.start_chunks(model.cfg) > 0
    p = rare.predict(st["params"], st["rest"], batch, key)
    assert not bool(p.start.any())
    assert np.asarray(rare.loss(st["params"], st["rest"], batch, key)[0]) == np.asarray(new)


@pytest.mark.slow
def test_start_rows_are_drawn_per_sequence_and_other_rows_unchanged():
  model = random_model(tiny(), seed=2)
  st = Stage1(model, Stage1Config(chunks=6)).init_state(model)
  batch = {k: jnp.concatenate([v] * 4) for k, v in make_batch(model.cfg, 24, seed=2).items()}
  tc = Stage1Config(chunks=6, p_start=0.5)
  with_start = Stage1(model, tc).predict(st["params"], st["rest"], batch, jax.random.key(0))
  without = Stage1(model, dataclasses.replace(tc, p_start=0.0)).predict(
      st["params"], st["rest"], batch, jax.random.key(0))
  start = np.asarray(with_start.start)
  assert 0 < start.sum() < len(start)  # 8 rows at p 0.5
  np.testing.assert_allclose(with_start.v[~start], without.v[~start], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(with_start.t, without.t)  # the same noise and times
  np.testing.assert_array_equal(with_start.x_t, without.x_t)
  assert float(with_start.weight[start][:, :16].max()) == 0.0  # W = 4 chunks of 4 frames
  assert float(without.weight.min()) == 1.0


def test_p_start_checks():
  model = random_model(tiny(), seed=0)  # W = 4
  with pytest.raises(ValueError, match="chunks"):
    Stage1(model, Stage1Config(chunks=4, p_start=0.1))
  Stage1(model, Stage1Config(chunks=4))  # without start sequences 4 chunks are fine
  with pytest.raises(ValueError, match="p_start must be a probability"):
    Stage1Config(p_start=1.5)
  # the legacy layout starts from an empty cache: nothing to prepend
  legacy = random_model(tiny(positions="legacy"), seed=0)
  assert Stage1(legacy, Stage1Config(chunks=4, p_start=0.5)).n_start == 0
