"""ARC-Forcing: adapters, real-sampler rollouts with last-step gradients, frozen base, resume.

Compiles with XLA's backend optimization level 0 (numerically the same program, several times
faster to compile on CPU); every jitted function is compiled once per module.
"""
import copy
import dataclasses
import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmdm_jax import layouts
from lmdm_jax import sampling as S
from lmdm_jax.config import DiTConfig, load_config
from lmdm_jax.nn import adapters as AD
from lmdm_jax.nn import attention as A
from lmdm_jax.nn.dit import abstract_model, count_params
from lmdm_jax.nn.discriminator import ConvNeXtHead, HeadConfig
from lmdm_jax.testing import random_model, rel_err
from lmdm_jax.training.arc_forcing import ARCConfig, ARCForcing, make_head, roll_prompts
from lmdm_jax.training.checkpoints import Checkpointer, abstract_like
from lmdm_jax.training.data import Batcher, SyntheticLatents

from lmdm_jax.training import arc_run as arc

pytestmark = pytest.mark.slow  # ARC-Forcing training steps (the full suite runs them)

OPTS = {"xla_backend_optimization_level": 0}


def compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=OPTS)


def perturbed(adapter, seed=1, scale=0.05):
  leaves, tdef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tdef, [x + scale * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def built(fn):
  """fn() -> an nnx module, with its initializers run as one jitted program (eager
  initialization compiles every op separately: 10+ s for the tiny DiT)."""
  gd = nnx.graphdef(nnx.eval_shape(fn))
  return nnx.merge(gd, compiled(lambda: nnx.state(fn()))())


@functools.lru_cache(maxsize=None)
def _base_state(cfg):
  return nnx.split(built(lambda: random_model(cfg, seed=0)))


def base_model(cfg):
  """The base of the fixture's adapted model (the same weights), built once per layout."""
  return nnx.merge(*_base_state(cfg))


def _setup(positions):
  conf = load_config("arc_tiny")
  cfg = dataclasses.replace(DiTConfig.from_config(conf.model), positions=positions)
  model = built(lambda: AD.add_adapters(random_model(cfg, seed=0),
                                        AD.AdapterConfig(rank=4, alpha=8.0)))
  ac = ARCConfig.from_config(dict(conf.arc, rollout_blocks=2, steps=4, max_k=3))
  head = built(lambda: make_head(cfg, HeadConfig.from_config(conf.head)))
  trainer = ARCForcing(model, ac, head)
  state, frozen = trainer.init(model, head)
  batches = Batcher(SyntheticLatents(trainer.frames, cfg.io_channels, seed=0), cfg)
  return dict(conf=conf, cfg=cfg, model=model, trainer=trainer, state=state, frozen=frozen,
              batches=batches, fns=arc.make_step_fns(trainer, OPTS))


@pytest.fixture(scope="module")
def setup():
  return _setup("authors")


@pytest.fixture(scope="module")
def legacy_setup():
  """The same in the legacy rotary layout (models trained before the authors' layout)."""
  return _setup("legacy")


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _batch(setup, step=0, b=2):
  return {k: jnp.asarray(v) for k, v in setup["batches"](step, b).items()}


# ----------------------------------------------------------------------------- adapters


def test_adapter_parameter_count_at_saos_scale_from_eval_shape():
  cfg = DiTConfig.from_config(load_config("saos").model)
  m = AD.abstract_adapted_model(cfg, AD.AdapterConfig())  # default: rank 144, all 6, 16 blocks
  n = AD.count_adapter_params(m)
  assert n == 16 * 144 * (4096 + 2048 + 2048 + 3072 + 9216 + 5120) == 58_982_400
  assert count_params(m) == count_params(abstract_model(cfg)) == 340_946_048  # base unchanged
  print(f"saos adapter (rank 144, all projections, 16 blocks): {n:,} params = {n / 1e9:.4f}B")


def test_head_matches_reference_size_and_downsampling():
  h = nnx.eval_shape(lambda: ConvNeXtHead(1024, HeadConfig(), rngs=nnx.Rngs(0)))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(h, nnx.Param))) == 3_201_538
  assert h.out_len(577) == 144 and h.out_len(193) == 48


def test_split_separates_adapter_from_base(setup):
  gd, ad, params, rest = AD.split(setup["model"])
  assert all(isinstance(v, AD.AdapterParam) for v in jax.tree.leaves(
      nnx.state(setup["model"], AD.AdapterParam), is_leaf=lambda x: isinstance(x, nnx.Variable)))
  n_proj = setup["cfg"].depth * 6
  assert len(jax.tree.leaves(ad)) == 2 * n_proj
  # base param paths are exactly those of an unadapted DiT (base checkpoints load unchanged)
  _, p0, _ = nnx.split(base_model(setup["cfg"]), nnx.Param, ...)
  assert jax.tree.structure(p0) == jax.tree.structure(params)


def test_zero_initialized_adapter_equals_base(setup):
  cfg, model = setup["cfg"], setup["model"]
  base = base_model(cfg)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, cfg.io_channels)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(2, 5, cfg.cond_token_dim)), jnp.float32)
  g = jnp.zeros((2, cfg.global_cond_dim))
  ia = jnp.zeros((2, 16, cfg.input_add_dim))
  t = jnp.array([0.3, 0.8])
  ya, yb = compiled(lambda: (model(x, t, c, g, ia), base(x, t, c, g, ia)))()
  np.testing.assert_array_equal(ya, yb)


def test_merged_equals_unmerged_adapter(setup):
  cfg = setup["cfg"]
  gd, ad, params, rest = AD.split(setup["model"])
  adapted = nnx.merge(gd, perturbed(ad), params, rest)
  merged = AD.merge_adapters(adapted)
  assert not any(isinstance(m, AD.AdaptedLinear) for _, m in nnx.iter_graph(merged))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 16, cfg.io_channels)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(2, 5, cfg.cond_token_dim)), jnp.float32)
  g = jnp.zeros((2, cfg.global_cond_dim))
  ia = jnp.asarray(rng.normal(size=(2, 16, cfg.input_add_dim)), jnp.float32)
  t = jnp.array([0.3, 0.8])
  stripped = AD.strip_adapters(adapted)
  y_ad, y_m, y_base = compiled(lambda: (adapted(x, t, c, g, ia), merged(x, t, c, g, ia),
                                        stripped(x, t, c, g, ia)))()
  assert rel_err(y_m, y_ad) < 1e-5
  assert rel_err(y_base, y_ad) > 1e-2  # the adapter does change the function


# ------------------------------------------------------------------------------ rollouts


def _sampler_blocks(model, cfg, ctx, cond, gc, key, n, steps, prime):
  """n blocks of the real streaming sampler (generate_block, fused regime), optionally primed
  with the context chunks as Stream.prime does."""
  b, cs = ctx.shape[0], cfg.chunk
  tables = S.rope_window_tables(model)
  sp = S.SamplerParams.make(steps=steps, cfg_scale=1.0, plus_plus=False, pingpong=True)
  st = S.init_state(cfg, "block_causal", b, False, cond.shape[1], seed=key)
  st = S.set_prompt(model, st, cond, gc)
  zero = jnp.zeros((b, cs, cfg.extra_dim))
  if prime:  # a fresh stream: the context replaces the zero start chunks it covers
    ctx = jnp.concatenate([S.start_context(cfg, b)[:, ctx.shape[1]:], ctx], axis=1)
    for c in range(ctx.shape[1] // cs):
      st = S.commit_pending(model, tables, st)
      st = st.replace(context=ctx[:, c * cs:(c + 1) * cs], context_extra=zero,
                      has_pending=jnp.ones((), jnp.int32))
  out = []
  for _ in range(n):
    blk, st, _ = S.generate_block(model, tables, st, zero, sp, "block_causal")
    out.append(blk)
  return jnp.concatenate(out, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["setup", "legacy_setup"])
def test_rollout_with_k_equal_steps_is_the_real_sampler(request, layout):
  setup = request.getfixturevalue(layout)
  tr, cfg, frozen = setup["trainer"], setup["cfg"], setup["frozen"]
  K, n, steps = cfg.context_chunks, tr.ac.rollout_blocks, tr.ac.steps
  ad = perturbed(setup["state"]["adapter"])
  batch = _batch(setup)
  ctx, cond, gc = batch["latents"][:, :tr.context_frames], batch["cond"], batch["global_cond"]
  key = jax.random.key(7)
  ks = jnp.full((n,), steps, jnp.int32)

  def both(a):
    model = nnx.merge(tr.gd, a, frozen["params"], frozen["rest"])
    out = []
    # all context hidden == a fresh stream; all context visible == a stream primed with it
    for hidden, prime in ((K, False), (0, True)):
      ours = tr.rollout(a, frozen, ctx, cond, gc, key, ks, jnp.full((2,), hidden, jnp.int32))[0]
      out.append((ours, _sampler_blocks(model, cfg, ctx, cond, gc, key, n, steps, prime)))
    return out

  for (ours, ref), hidden in zip(compiled(both, ad)(ad), (K, 0)):
    assert ours.shape == (2, n * cfg.chunk, cfg.io_channels)
    err = rel_err(ours, ref)
    print(f"rollout (k = steps = {steps}, hidden {hidden}) vs generate_block: rel err {err:.1e}")
    assert err < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["setup", "legacy_setup"])
def test_gradients_flow_only_through_the_last_step_of_each_block(request, layout):
  """d rollout / d adapter equals the gradient of sum_j (X_j - T_j v_theta(X_j; ring_j)) with
  X_j (the last step's input), T_j and the K/V ring held constant: no gradient through the
  earlier steps, the cache writes or the window slide. k = 1 and k > 1 blocks, mixed hiding."""
  setup = request.getfixturevalue(layout)
  tr, cfg, frozen = setup["trainer"], setup["cfg"], setup["frozen"]
  K, cs, n = cfg.context_chunks, cfg.chunk, tr.ac.rollout_blocks
  ad = perturbed(setup["state"]["adapter"])
  batch = _batch(setup, 1)
  ctx, cond, gc = batch["latents"][:, :tr.context_frames], batch["cond"], batch["global_cond"]
  key = jax.random.key(3)
  ks = jnp.array([3, 1], jnp.int32)[:n]
  hidden = jnp.array([0, 2], jnp.int32)
  w = jax.random.normal(jax.random.key(9), (2, n * cs, cfg.io_channels))

  def loss(a):
    blocks, aux = tr.rollout(a, frozen, ctx, cond, gc, key, ks, hidden, keep_intermediates=True)
    return jnp.sum(w * blocks), aux

  (l_roll, aux), g_roll = compiled(jax.value_and_grad(loss, has_aux=True), ad)(ad)
  tables = tr.tables

  # the authors' layout zeroes hidden context chunks (present) when priming, after its zero start
  # chunks; the legacy one hides them (absent) from every step
  authors = layouts.start_chunks(cfg) > 0
  first = max(layouts.start_chunks(cfg), K)

  def last_steps_only(a):
    m = nnx.merge(tr.gd, a, frozen["params"], frozen["rest"])
    cross, g = m.cross_kv(cond), m.project_global(gc)
    total = 0.0
    for j in range(n):
      ring = jax.tree.map(lambda x: x[j], aux["cache"])
      i = first + j
      pos = layouts.cached_positions(i, layouts.span(cfg), cs)
      noisy = A.TokenMeta.concat(A.chunk_meta([i], A.NOISY, cs, pos), A.global_meta(i, 0))
      past = ring.slot_meta(pos)
      mask = A.streaming_mask(noisy, A.TokenMeta.concat(past, noisy), K)
      seen = jnp.concatenate([past.chunk[None] >= (0 * hidden if authors else hidden)[:, None],
                              jnp.ones((2, len(noisy)), bool)], 1)
      x, t = aux["x_last"][j], aux["t_last"][j]
      h = jnp.concatenate([m.embed_noisy(x), m.embed_global(g, jnp.full((2,), t))[:, None]], 1)
      out, _ = m.forward_tokens(h, tables.at(jnp.asarray(noisy.pos)), mask[None] & seen[:, None],
                                cross, ring.past(), tables.at(past.pos))
      total = total + jnp.sum(w[:, j * cs:(j + 1) * cs] * (x - t * m.velocity(out[:, :cs])))
    return total

  aux = jax.tree.map(jax.lax.stop_gradient, aux)
  l_ref, g_ref = compiled(jax.value_and_grad(last_steps_only), ad)(ad)
  assert abs(float(l_roll) - float(l_ref)) < 1e-4 * abs(float(l_ref)) + 1e-5
  assert jax.tree.structure(g_roll) == jax.tree.structure(ad)  # adapter leaves only
  G1, G2 = jax.tree.leaves(g_roll), jax.tree.leaves(g_ref)
  gmax = max(float(jnp.abs(x).max()) for x in G2)
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(G1, G2)) / gmax
  print(f"rollout grad vs last-steps-only grad: max diff / max |grad| = {diff:.1e}")
  assert diff < 1e-4
  assert all(float(jnp.abs(x).max()) > 0 for x in G1)  # every adapter leaf gets gradient


# ------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_steps_keep_base_bit_identical_and_optimizer_state_only_for_trainable(setup):
  tr, frozen = setup["trainer"], setup["frozen"]
  state = _copy(setup["state"])
  before = jax.tree.map(np.asarray, frozen)
  ad0 = jax.tree.map(np.asarray, state["adapter"])
  losses = {}
  state = arc.train_loop(tr, setup["fns"], state, frozen, setup["batches"], 2, 0, 1, seed=0,
                         on_metrics=lambda s, ph, m: losses.setdefault(s, (ph, float(m["loss"]))))
  # First G step from B = 0: dL/dA = 0 exactly, so A moves by AdamW's decay alone
  # (A <- A - lr wd A), while every B leaf gets a gradient and moves by about lr.
  lr, wd = tr.ac.lr_g, tr.ac.weight_decay
  for (path, v), (_, v0) in zip(nnx.to_flat_state(state["adapter"]), nnx.to_flat_state(ad0)):
    new, old = np.asarray(v[...]), np.asarray(v0[...])
    if path[-1] == "lora_a":
      np.testing.assert_allclose(new, old - lr * wd * old, rtol=1e-6, atol=1e-12)
    else:
      assert np.all(old == 0) and np.abs(new).max() > 0.5 * lr, path
  state = arc.train_loop(tr, setup["fns"], state, frozen, setup["batches"], 2, 1, 4, seed=0,
                         on_metrics=lambda s, ph, m: losses.setdefault(s, (ph, float(m["loss"]))))
  print("G/D losses:", losses)
  assert [losses[s][0] for s in (1, 2, 3, 4)] == ["g", "d", "g", "d"]
  # base parameters: bit-identical to the freshly built base model's
  base = nnx.split(base_model(setup["cfg"]), nnx.Param, ...)[1]
  for a, b, c in zip(jax.tree.leaves(frozen["params"]), jax.tree.leaves(before["params"]),
                     jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(a), b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  # the trainable parts did move
  d_ad = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(state["adapter"]), jax.tree.leaves(setup["state"]["adapter"])))
  d_hd = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(state["head"]), jax.tree.leaves(setup["state"]["head"])))
  assert d_ad > 0 and d_hd > 0
  # optimizer state: Adam's mu and nu for each trainable leaf (+ scalar counts), nothing else
  assert set(state) == {"adapter", "head", "opt_g", "opt_d", "step"}
  for opt, train in ((state["opt_g"], state["adapter"]), (state["opt_d"], state["head"])):
    shapes = sorted(x.shape for x in jax.tree.leaves(opt) if x.ndim)
    want = sorted([x.shape for x in jax.tree.leaves(train)] * 2)
    assert shapes == want
    n_opt = sum(x.size for x in jax.tree.leaves(opt) if x.ndim)
    assert n_opt == 2 * sum(x.size for x in jax.tree.leaves(train))
  n_base = sum(x.size for x in jax.tree.leaves(frozen["params"]))
  n_ad = sum(x.size for x in jax.tree.leaves(state["adapter"]))
  print(f"optimizer leaves: G {len(jax.tree.leaves(state['opt_g']))} for {len(jax.tree.leaves(state['adapter']))}"
        f" adapter leaves ({n_ad:,} params; base {n_base:,} frozen), D "
        f"{len(jax.tree.leaves(state['opt_d']))} for {len(jax.tree.leaves(state['head']))} head leaves")


@pytest.mark.slow
def test_contrastive_roll_gives_every_item_another_items_prompt(setup):
  cond = jnp.arange(4)[:, None, None] * jnp.ones((4, 3, 5))
  rolled = roll_prompts(cond)
  src = [int(rolled[i, 0, 0]) for i in range(4)]
  assert src == [3, 0, 1, 2] and all(s != i for i, s in enumerate(src))
  # d_loss with the discriminator scores stubbed (records what it is asked to score)
  tr = copy.copy(setup["trainer"])
  seen = []

  def fake_scores(head_p, frozen, x, t, c, g):
    seen.append((x, c))
    return jnp.tanh(x.mean(-1)[:, tr.context_frames:] + c.mean((1, 2))[:, None])

  tr.scores = fake_scores
  for b in (1, 3):
    batch = _batch(setup, 0, b)
    blocks = jax.random.normal(jax.random.key(0), (b, tr.frames - tr.context_frames,
                                                   setup["cfg"].io_channels))
    _, m = tr.d_loss(None, None, batch, blocks, jnp.zeros((b,), jnp.int32), batch["cond"],
                     jax.random.key(1))
    x, c = seen[-1]
    if b == 1:  # no other prompt exists: the contrastive term is skipped
      assert float(m["loss_c"]) == 0.0 and x.shape[0] == 2
    else:  # [real | fake | real with item i-1's prompt]
      assert x.shape[0] == 3 * b and float(m["loss_c"]) > 0.0
      np.testing.assert_array_equal(x[2 * b:], x[:b])
      np.testing.assert_array_equal(c[2 * b:], jnp.roll(batch["cond"], 1, axis=0))
      np.testing.assert_array_equal(c[:2 * b], jnp.concatenate([batch["cond"]] * 2))


@pytest.mark.slow
def test_resume_gives_identical_losses(setup):
  tr, frozen = setup["trainer"], setup["frozen"]
  with tempfile.TemporaryDirectory() as d:
    ref, run = {}, {}
    ck = Checkpointer(os.path.join(d, "a"), keep=5)
    arc.train_loop(tr, setup["fns"], _copy(setup["state"]), frozen, setup["batches"], 2, 0, 4,
                   seed=0, ckpt=ck, ckpt_every=2,
                   on_metrics=lambda s, ph, m: ref.setdefault(s, float(m["loss"])))
    ck.close()
    ck = Checkpointer(os.path.join(d, "a"))
    state, _ = ck.restore(abstract_like(setup["state"]), step=2)
    ck.close()
    assert int(state["step"]) == 2
    arc.train_loop(tr, setup["fns"], state, frozen, setup["batches"], 2, 2, 4, seed=0,
                   on_metrics=lambda s, ph, m: run.setdefault(s, float(m["loss"])))
  print("uninterrupted:", ref, "resumed at 2:", run)
  assert run == {3: ref[3], 4: ref[4]}


@pytest.mark.slow
def test_generator_step_reports_rollout_and_real_rms(setup):
  """The collapse monitors of the G step: RMS of the rollout blocks and of the real
  continuation (a run drifting to loud output shows up in arc_metrics.jsonl, not only in a
  drift benchmark afterwards)."""
  tr, frozen = setup["trainer"], setup["frozen"]
  batch = _batch(setup, 0, 2)
  key = jax.random.key(3)
  _, m = tr.g_loss(setup["state"]["adapter"], setup["state"]["head"], frozen, batch, key)
  blocks, *_ = tr._rollout_from_batch(setup["state"]["adapter"], frozen, batch,
                                      jax.random.split(key)[0])
  real = np.asarray(batch["latents"])[:, tr.context_frames:]
  np.testing.assert_allclose(float(m["rms_fake"]), np.sqrt(np.mean(np.asarray(blocks) ** 2)),
                             rtol=1e-5)
  np.testing.assert_allclose(float(m["rms_real"]), np.sqrt(np.mean(real ** 2)), rtol=1e-5)
