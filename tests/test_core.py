"""Shapes, parameter counts, masks, cache ring arithmetic, schedule, recompilation, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmdm_jax import layouts
from lmdm_jax import sampling as S
from lmdm_jax.cache import KVCache
from lmdm_jax.config import DiTConfig, load_config
from lmdm_jax.nn import attention as A
from lmdm_jax.nn.dit import PastKV, abstract_model, count_params
from lmdm_jax.testing import random_model


@pytest.fixture(scope="module")
def model():
  return random_model("tiny", seed=0)


def test_saos_parameter_count_from_eval_shape():
  lmdm = count_params(abstract_model(DiTConfig.from_config(load_config("saos").model)))
  base = count_params(abstract_model(DiTConfig.from_config(load_config("saos:base").model)))
  assert base == 340_879_488  # SAO-small DiT (LMDM_REFERENCE §1.7: 340.88M)
  assert lmdm == base + 65 * 1024 == 340_946_048  # + the LMDM input_add projection (340.95M)


def test_window_masks_match_reference_formulas():
  cs, nw = 4, 4
  win = layouts.window_layout(nw, cs)
  n = len(win.all)  # T + 1 tokens, postpend token last
  q = np.arange(n)[:, None]
  k = np.arange(n)[None, :]
  blk = lambda i: np.minimum(i // cs, nw)
  ref_bc = (blk(k) >= blk(q) - (nw - 1)) & (blk(k) <= blk(q))
  ours_bc = A.streaming_mask(win.all, win.all, context_chunks=3)
  np.testing.assert_array_equal(ours_bc, ref_bc)
  c = nw * cs
  ref_ed = (k < c) | (q >= c)
  ours_ed = A.streaming_mask(win.all, win.all, context_chunks=nw, bidirectional_context=True)
  np.testing.assert_array_equal(ours_ed, ref_ed)


@pytest.mark.parametrize("span", [4, 3])  # the authors' layout (W = 4), the legacy one (K = 3)
def test_sequence_mask_semantics(span):
  cs, K = 2, 3
  lay = layouts.sequence_layout(6, [6], span, cs)
  m = A.streaming_mask(lay.meta, lay.meta, K)
  meta = lay.meta
  for qi in range(len(meta)):
    for ki in range(len(meta)):
      qc, kc = int(meta.chunk[qi]), int(meta.chunk[ki])
      q_clean, k_clean = meta.kind[qi] == A.CLEAN, meta.kind[ki] == A.CLEAN
      if q_clean:
        want = k_clean and qc - K <= kc <= qc
      else:
        want = (k_clean and qc - K <= kc < qc) or (not k_clean and kc == qc)
      assert m[qi, ki] == want
  assert m.any(axis=1).all()  # no empty softmax row
  # the global token of noisy chunk 6 sits where its window starts, ``span`` chunks back; the
  # noisy chunk's frames start at span * chunk + 1
  g = int(np.nonzero(meta.kind == A.GLOBAL)[0][0])
  first_ctx = int(np.nonzero((meta.chunk == 6 - span) & (meta.kind == A.CLEAN))[0][0])
  assert meta.pos[first_ctx] - meta.pos[g] == 1
  first_noisy = int(np.nonzero(meta.kind == A.NOISY)[0][0])
  assert meta.pos[first_noisy] - meta.pos[g] == span * cs + 1


def test_cache_ring_writes_whole_chunks_and_wraps():
  cfg = DiTConfig.from_config(load_config("tiny").model)
  cache = KVCache.create(cfg, batch=1, n_slots=3, cross_len=2)
  shape = (cfg.depth, 1, cfg.chunk, cfg.num_heads, cfg.head_dim)
  for c in range(7):
    kv = PastKV(jnp.full(shape, float(c)), jnp.full(shape, -float(c)))
    cache = cache.commit(kv, jnp.int32(c), jnp.bool_(True))
  assert int(cache.next_chunk) == 7
  np.testing.assert_array_equal(cache.slot_chunk, [6, 4, 5])  # chunk c lives in slot c mod 3
  for slot, c in enumerate([6, 4, 5]):
    blk = cache.k[:, :, slot * cfg.chunk:(slot + 1) * cfg.chunk]
    assert float(blk.min()) == float(blk.max()) == c
  before = cache
  cache = cache.commit(PastKV(jnp.full(shape, 99.0), jnp.full(shape, 99.0)), jnp.int32(7),
                       jnp.bool_(False))
  np.testing.assert_array_equal(cache.k, before.k)
  np.testing.assert_array_equal(cache.slot_chunk, before.slot_chunk)
  assert int(cache.next_chunk) == 7


def test_schedule_matches_reference_values():
  np.testing.assert_allclose(
      S.schedule(8)[:9], [1, .99331, .98201, .95257, .88080, .73106, .5, .26894, 0], atol=1e-5)
  np.testing.assert_allclose(
      S.schedule(6)[:7], [1, .99068, .96555, .88080, .66076, .33924, 0], atol=1e-5)


def test_cfg_updates_match_reference_rules():
  x, vc, vu, eps = (jnp.asarray(v) for v in (1.0, 0.3, -0.2, 0.7))
  t, tn, w = 0.8, 0.5, 3.0
  v = vu + w * (vc - vu)
  for pp, ping, want in [(False, False, x + (tn - t) * v),
                         (False, True, (1 - tn) * (x - t * v) + tn * eps),
                         (True, False, (x - t * v) + tn * vu),
                         (True, True, (x - t * v) + tn * (eps - (x - t * vu)))]:
    sp = S.SamplerParams.make(steps=4, cfg_scale=w, plus_plus=pp, pingpong=ping)
    np.testing.assert_allclose(S.update(x, vc, vu, t, tn, eps, sp, True), want, rtol=1e-6)


def test_stream_shapes_and_no_recompilation_after_first_block(model):
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *_a, **_k: compiles.append(name)
      if name == "/jax/core/compile/backend_compile_duration" else None)
  cfg = model.cfg
  s = S.Stream(model, batch=2, regime="block_causal", cross_len=5, seed=0,
               sampler=S.SamplerParams.make(steps=4, cfg_scale=2.0))
  cond = jnp.ones((2, 5, cfg.cond_token_dim))
  s.set_prompt(cond, jnp.ones((2, cfg.global_cond_dim)))
  cond2, glob2 = -cond, jnp.zeros((2, cfg.global_cond_dim))  # made before counting
  first = s.next_block()
  assert first.shape == (2, cfg.chunk, cfg.io_channels)
  n0 = len(compiles)
  outs = []
  for i in range(20):
    if i == 10:  # a prompt change and new sampler settings mid-stream: still no compilation
      s.set_prompt(cond2, glob2)
      s.set_sampler(steps=6, cfg_scale=4.0, plus_plus=True)
    outs.append(s.next_block())
  jax.block_until_ready(outs)
  assert len(compiles) - n0 == 0, f"{len(compiles) - n0} compilations after the first block"
  assert int(s.state.block_index) == 21
  assert all(bool(jnp.isfinite(o).all()) for o in outs)


def test_bad_input_is_rejected_with_clear_errors(model):
  cfg = model.cfg
  s = S.Stream(model, batch=2, cross_len=5)
  with pytest.raises(ValueError, match="prompt batch"):
    s.set_prompt(jnp.ones((3, 5, cfg.cond_token_dim)))
  with pytest.raises(ValueError, match="latent channels"):
    s.prime(jnp.zeros((2, cfg.chunk, cfg.io_channels + 1)))
  with pytest.raises(ValueError, match="multiple of the chunk"):
    s.generate(cfg.chunk * 3 + 1)
  with pytest.raises(ValueError, match="multiple of the chunk"):
    s.prime(jnp.zeros((2, cfg.chunk + 1, cfg.io_channels)))
  with pytest.raises(ValueError, match="latent channels"):
    model(jnp.zeros((1, 8, cfg.io_channels + 2)), jnp.ones((1,)))
  with pytest.raises(ValueError, match="regime"):
    S.Stream(model, regime="causal")
  with pytest.raises(ValueError, match="steps"):
    S.SamplerParams.make(steps=0)
  with pytest.raises(ValueError, match="input_add_dim"):
    DiTConfig(io_channels=8, embed_dim=64, num_heads=1, input_add_dim=5)


def test_model_without_global_conditioning():
  """global_cond_dim 0: None or an empty array means none (as the benchmarks pass); a real
  global vector is refused by name, not by a pytree mismatch from inside jit."""
  import dataclasses
  cfg = dataclasses.replace(DiTConfig.from_config(load_config("tiny").model), global_cond_dim=0)
  s = S.Stream(random_model(cfg), batch=1, cross_len=5, sampler=S.SamplerParams.make(steps=2))
  cond = jnp.ones((1, 5, cfg.cond_token_dim)) * 0.1
  s.set_prompt(cond)
  a = s.next_block()
  s.set_prompt(cond, jnp.ones((1, 0)))
  b = s.next_block()
  assert a.shape == b.shape == (1, cfg.chunk, cfg.io_channels)
  with pytest.raises(ValueError, match="global_cond_dim 0"):
    s.set_prompt(cond, jnp.ones((1, 4)))


@pytest.mark.parametrize("positions", ["authors", pytest.param("legacy", marks=pytest.mark.slow)])
def test_prime_then_stream_equals_reference_history(model, positions):
  """Priming with real context equals generating after that context in the no-cache reference."""
  import dataclasses
  model = random_model(dataclasses.replace(model.cfg, positions=positions), seed=0)
  cfg = model.cfg
  ctx = jax.random.normal(jax.random.key(5), (1, 3 * cfg.chunk, cfg.io_channels))
  sp = S.SamplerParams.make(steps=3, cfg_scale=1.5)
  s = S.Stream(model, batch=1, cross_len=5, seed=4, sampler=sp)
  cond = jax.random.normal(jax.random.key(6), (1, 5, cfg.cond_token_dim))
  s.set_prompt(cond)
  s.prime(ctx)
  got = s.generate(2 * cfg.chunk)
  st = S.set_prompt(model, S.init_state(cfg, "block_causal", 1, True, 5, seed=4), cond,
                    jnp.zeros((1, cfg.global_cond_dim)))
  # the context replaces the zero start chunks it covers (the authors' W = 4 > 3: one remains)
  pad = S.start_context(cfg, 1)[:, ctx.shape[1]:]
  assert pad.shape[1] == (cfg.chunk if positions == "authors" else 0)
  hist, key = jnp.concatenate([pad, ctx], axis=1), st.key
  for _ in range(2):
    blk, key = S.reference_block(model, hist, st.replace(key=key), jnp.zeros((1, cfg.chunk, 0)), sp)
    hist = jnp.concatenate([hist, blk], axis=1)
  np.testing.assert_allclose(got, hist[:, pad.shape[1] + ctx.shape[1]:], rtol=1e-4, atol=1e-5)


def test_attention_implementations_agree(monkeypatch):
  """``$LMDM_ATTENTION=jax`` (jax.nn.dot_product_attention) computes what the default einsums do:
  grouped KV heads, a shared (Q, S) mask and a per-batch (B, Q, S) mask; a bad value is one
  clear error."""
  rng = np.random.default_rng(0)
  b, nq, ns, h, hkv, d = 2, 5, 9, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(b, nq, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, ns, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, ns, hkv, d)), jnp.float32)
  mask2 = jnp.asarray(rng.random((nq, ns)) < 0.7).at[:, 0].set(True)
  mask3 = jnp.asarray(rng.random((b, nq, ns)) < 0.5).at[..., 0].set(True)
  for mask in (None, mask2, mask3):
    monkeypatch.delenv(A.ATTENTION_ENV, raising=False)
    ref = A.attend(q, k, v, mask)
    monkeypatch.setenv(A.ATTENTION_ENV, "jax")
    out = A.attend(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=2e-6)
  monkeypatch.setenv(A.ATTENTION_ENV, "flash")
  with pytest.raises(ValueError, match="LMDM_ATTENTION='flash'"):
    A.attend(q, k, v, mask2)
