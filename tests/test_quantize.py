"""Dynamic int8 quantisation (``lmdm_jax.quantize``): the kernels, the model view, streams on it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmdm_jax import quantize as Q
from lmdm_jax import sampling as S
from lmdm_jax.testing import random_model, rel_err

pytestmark = pytest.mark.slow  # int8 views of models (the full suite runs them)

# The stated tolerances (docs/STREAMING.md, "int8 weights"): relative L2 error vs the float model.
VELOCITY_TOL = 0.05  # one forward pass on identical inputs
LATENT_TOL = 0.10  # free-running streams, over the first blocks


@pytest.fixture(scope="module")
def model():
  return random_model("tiny", seed=0)


def test_weight_quantisation_is_per_output_channel_and_within_half_a_step():
  w = jax.random.normal(jax.random.key(0), (32, 8)) * jnp.arange(1, 9)  # channels of varied range
  w = w.at[:, 3].set(0.0)  # an all-zero channel: scale 1, no division by zero
  q, s = Q.quantize_weight(w)
  assert q.dtype == jnp.int8 and q.shape == (32, 8) and s.shape == (8,)
  assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127
  np.testing.assert_array_equal(np.asarray(q[:, 3]), 0)
  err = jnp.abs(q.astype(jnp.float32) * s - w)
  assert bool(jnp.all(err <= s / 2 + 1e-6))
  # per channel: the small channel keeps its resolution (a per-tensor scale would not)
  assert float(s[0]) < float(s[7]) / 4


def test_int8_matmul_matches_float_and_handles_zero_rows():
  k1, k2 = jax.random.split(jax.random.key(1))
  x = jax.random.normal(k1, (2, 5, 64))
  x = x.at[0, 2].set(0.0)
  w = jax.random.normal(k2, (64, 48)) / 8
  y = Q.int8_matmul(x, *Q.quantize_weight(w))
  assert y.shape == (2, 5, 48) and y.dtype == jnp.float32
  assert bool(jnp.isfinite(y).all())
  np.testing.assert_array_equal(np.asarray(y[0, 2]), 0.0)
  assert rel_err(y, x @ w) < 0.02
  # the product is an int8 x int8 -> int32 dot_general
  hlo = jax.jit(Q.int8_matmul).lower(x, *Q.quantize_weight(w)).as_text()
  assert "i8" in hlo and "i32" in hlo


def test_view_quantises_block_linears_and_leaves_the_model_alone(model):
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  view = Q.quantize_model(model, "int8")
  assert Q.quantize_model(model, "none") is model
  for blk, vblk in zip(model.layers, view.layers):
    for name in ("ff_in", "ff_out"):
      assert isinstance(getattr(blk, name), nnx.Linear)
      assert isinstance(getattr(vblk, name), Q.Int8Linear)
      assert getattr(vblk, name).kernel_q[...].dtype == jnp.int8
    assert isinstance(vblk.self_attn.to_qkv, Q.Int8Linear)
    assert isinstance(vblk.cross_attn.to_q, Q.Int8Linear)
    assert isinstance(vblk.cross_attn.to_kv, nnx.Linear)  # the prompt's K/V: once per prompt
  assert isinstance(view.project_out, nnx.Linear)
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  with pytest.raises(ValueError, match="unknown quantize mode 'int4'"):
    Q.quantize_model(model, "int4")


def test_quantised_velocity_is_within_tolerance_of_the_float_model(model):
  cfg = model.cfg
  ks = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(ks[0], (2, 9, cfg.io_channels))
  ia = jax.random.normal(ks[1], (2, 9, cfg.input_add_dim))
  c = jax.random.normal(ks[2], (2, 5, cfg.cond_token_dim))
  g = jax.random.normal(ks[3], (2, cfg.global_cond_dim))
  t = jnp.array([0.3, 0.9])
  qmodel = Q.quantize_model(model)
  v_f = jax.jit(lambda *a: model(*a))(x, t, c, g, ia)
  v_q = jax.jit(lambda *a: qmodel(*a))(x, t, c, g, ia)
  assert v_q.shape == v_f.shape and v_q.dtype == jnp.float32
  err = rel_err(v_q, v_f)
  print(f"tiny: int8 velocity rel err {err:.4f}")
  assert 0 < err < VELOCITY_TOL


def _prompt(cfg):
  k1, k2 = jax.random.split(jax.random.key(3))
  return (jax.random.normal(k1, (1, 5, cfg.cond_token_dim)),
          jax.random.normal(k2, (1, cfg.global_cond_dim)))


@pytest.mark.slow
def test_quantised_stream_stays_within_tolerance(model):
  errs = Q.stream_errors(model, *_prompt(model.cfg), blocks=4, steps=4, cfg_scale=1.0)
  print("tiny, 4 steps, no CFG: (velocity, latents) rel err per block", errs)
  assert max(e for e, _ in errs) < VELOCITY_TOL
  assert max(e for _, e in errs) < LATENT_TOL
  assert min(e for _, e in errs) > 0  # the int8 stream really is a different computation


def test_quantised_stream_runs_without_recompiling(model):
  cfg = model.cfg
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *_a, **_k: compiles.append(name)
      if name == "/jax/core/compile/backend_compile_duration" else None)
  s = S.Stream(Q.quantize_model(model), batch=1, cross_len=5, cfg_guidance=False,
               sampler=S.SamplerParams.make(steps=4))
  s.set_prompt(*_prompt(cfg))
  first = s.next_block()
  assert first.shape == (1, cfg.chunk, cfg.io_channels) and first.dtype == jnp.float32
  n0 = len(compiles)
  outs = [s.next_block() for _ in range(4)]
  jax.block_until_ready(outs)
  assert len(compiles) == n0, f"{len(compiles) - n0} compilations after the first block"
  assert all(bool(jnp.isfinite(o).all()) for o in outs)


def test_load_system_quantize_option():
  from lmdm_jax.sources import SourceError
  from lmdm_jax.system import load_system
  with pytest.raises(SourceError, match="--quantize 'int4': choose one of"):
    load_system(config="tiny", quantize="int4", log=lambda *_: None)
  logs = []
  system = load_system(config="tiny", codec="none", quantize="int8", log=logs.append)
  assert system.quantize == "int8"
  assert isinstance(system.model.layers[0].ff_in, Q.Int8Linear)
  assert any("int8" in m for m in logs)
  blk = system.stream("a prompt", seed=0, steps=2, cfg_scale=1.0).next_block()
  assert blk.shape == (system.cfg.chunk, system.cfg.io_channels) and np.isfinite(blk).all()


def test_cli_quantize_flag(capsys):
  from lmdm_jax.apps import jam, sample_cli, server
  assert sample_cli.build_parser().parse_args([]).quantize == "none"
  assert sample_cli.build_parser().parse_args(["--quantize", "int8"]).quantize == "int8"
  jam_args = jam.build_parser().parse_args(["--input", "x.wav", "--quantize", "int8"])
  assert jam_args.quantize == "int8"
  for main in (sample_cli.main, server.main):
    with pytest.raises(SystemExit) as e:
      main(["--quantize", "int4"])
    assert e.value.code == 2
    assert "--quantize: invalid choice: 'int4'" in capsys.readouterr().err
