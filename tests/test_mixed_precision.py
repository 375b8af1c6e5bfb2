"""Mixed precision: bfloat16 compute (``DiTConfig.dtype``) with float32 parameters and optimizer
state, for stage 1, ARC-Forcing and sampling; and bench/train_throughput.py's FLOP count and run."""
import dataclasses
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmdm_jax import sampling as S
from lmdm_jax.config import DiTConfig, load_config
from lmdm_jax.nn import adapters
from lmdm_jax.nn.dit import DiT
from lmdm_jax.nn.discriminator import HeadConfig
from lmdm_jax.testing import random_model, rel_err
from lmdm_jax.training.arc_forcing import ARCConfig, ARCForcing, make_head
from lmdm_jax.training.data import SyntheticLatents
from lmdm_jax.training.stage1 import Stage1, Stage1Config

pytestmark = pytest.mark.slow  # bf16 training traces (the full suite runs them)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(dtype, name="tiny"):
  return dataclasses.replace(DiTConfig.from_config(load_config(name).model), dtype=dtype,
                             param_dtype="float32")


def _batch(cfg, latents, seed=0):
  rng = np.random.default_rng(seed)
  b = latents.shape[0]
  return dict(latents=jnp.asarray(latents, jnp.float32),
              cond=jnp.asarray(rng.normal(size=(b, 5, cfg.cond_token_dim)), jnp.float32),
              global_cond=jnp.asarray(rng.normal(size=(b, cfg.global_cond_dim)), jnp.float32))


def _dots(jaxpr, out):
  """(operand dtypes, output dtype) of every dot_general in a jaxpr and its sub-jaxprs (scan,
  while, cond, remat, custom_vjp, pjit)."""
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general":
      out.append((tuple(str(v.aval.dtype) for v in e.invars), str(e.outvars[0].aval.dtype)))
    for p in e.params.values():
      for sub in p if isinstance(p, (list, tuple)) else (p,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _dots(inner, out)
  return out


def _arc(cfg, rollout_blocks=2):
  model = adapters.add_adapters(random_model(cfg), adapters.AdapterConfig(rank=4, alpha=4.0))
  head = make_head(cfg, HeadConfig(16, (1, 2), (1, 2), (1, 1)))
  tr = ARCForcing(model, ARCConfig(rollout_blocks=rollout_blocks, steps=4, max_k=4,
                                   disc_exit_layer=1, lr_g=1e-3, lr_d=1e-3), head)
  state, frozen = tr.init(model, head)
  return tr, state, frozen


@pytest.mark.parametrize("kind", ["stage1", pytest.param("arc_g", marks=pytest.mark.slow),
                                  pytest.param("arc_d", marks=pytest.mark.slow)])
def test_bf16_compute_runs_every_matmul_in_bf16(kind):
  """With dtype bfloat16 every matmul of an update step, forward and backward (attention's
  included, through its custom backward), takes bfloat16 operands; the loss and the gradients
  are float32. The float32 model's matmuls are all float32 (the check reads real dtypes)."""
  for dtype in ("float32", "bfloat16"):
    cfg = _cfg(dtype)
    key = jax.random.key(0)
    if kind == "stage1":
      model = random_model(cfg)
      tr = Stage1(model, Stage1Config(chunks=4))
      st = tr.init_state(model)
      batch = _batch(cfg, np.ones((2, tr.frames, cfg.io_channels)))
      f = jax.value_and_grad(lambda p: tr.loss(p, st["rest"], batch, key)[0])
      jp = jax.make_jaxpr(f)(st["params"])
    else:
      tr, st, frozen = _arc(cfg)
      batch = _batch(cfg, np.ones((2, tr.frames, cfg.io_channels)))
      step = tr.g_step if kind == "arc_g" else tr.d_step
      jp = jax.make_jaxpr(step)(st, frozen, batch, key)
    dots = _dots(jp.jaxpr, [])
    assert len(dots) > 20
    operands = {t for ins, _ in dots for t in ins}
    assert operands == {dtype}, (dtype, sorted(set(dots)))
    # loss / gradients / new state: float32 whatever the compute dtype
    floats = {str(a.dtype) for a in jp.out_avals if jnp.issubdtype(a.dtype, jnp.floating)}
    assert floats == {"float32"}, floats


def _train_curve(cfg, steps, chunks=4, batch=4):
  model = DiT(cfg, rngs=nnx.Rngs(0))
  tr = Stage1(model, Stage1Config(chunks=chunks, lr=2e-3, warmup_steps=5, clip_norm=1.0))
  state = tr.init_state(model)
  src = SyntheticLatents(tr.frames, cfg.io_channels, seed=0)
  step = jax.jit(tr.train_step)
  losses, norms = [], []
  for i in range(steps):
    state, m = step(state, _batch(cfg, src.batch(i, batch)["latents"], seed=i), jax.random.key(i))
    losses.append(float(m["loss"]))
    norms.append(float(m["grad_norm"]))
  return np.array(losses), np.array(norms), state


@pytest.mark.slow
def test_fp32_and_bf16_loss_curves_agree():
  """Tiny stage-1 runs from the same init, data and noise in float32 and in bfloat16 compute:
  the loss curves agree within noise (every step within 1% relative, the mean of the last 10
  steps within 0.5%; measured: 0.11% and 0.002%), the bfloat16 curve is not the float32 one (its compute dtype is in effect),
  the loss falls, gradients are finite, and parameters and optimizer state stay float32."""
  steps = 40
  l32, g32, _ = _train_curve(_cfg("float32"), steps)
  l16, g16, st16 = _train_curve(_cfg("bfloat16"), steps)
  rel = np.abs(l16 - l32) / l32
  last32, last16 = l32[-10:].mean(), l16[-10:].mean()
  print(f"fp32 loss {l32[0]:.4f} -> {last32:.4f} (mean of the last 10 of {steps}); bf16 "
        f"{l16[0]:.4f} -> {last16:.4f}; max per-step relative difference {rel.max():.2%}, "
        f"last-10 means differ by {abs(last16 - last32) / last32:.3%}")
  assert np.isfinite(g16).all() and np.isfinite(l16).all()
  assert last32 < 0.8 * l32[0]  # a real training curve
  assert not np.array_equal(l16, l32)
  assert rel.max() < 0.01
  assert abs(last16 - last32) / last32 < 0.005
  for part in ("params", "opt"):
    dts = {str(x.dtype) for x in jax.tree.leaves(st16[part])
           if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dts == {"float32"}, (part, dts)


@pytest.mark.slow
def test_bf16_stream_and_arc_steps():
  """A bfloat16-compute model streams (finite float32 blocks, close to the float32 model's with
  the same weights), and ARC-Forcing's G and D steps run in bfloat16 with finite losses and
  gradients, keeping the adapter, the head and both optimizer states float32."""
  blocks = {}
  for dtype in ("float32", "bfloat16"):
    model = random_model(_cfg(dtype))
    s = S.Stream(model, batch=1, cross_len=5,
                 sampler=S.SamplerParams.make(steps=4, cfg_scale=3.0), cfg_guidance=True)
    s.set_prompt(jnp.ones((1, 5, model.cfg.cond_token_dim)) * 0.1,
                 jnp.ones((1, model.cfg.global_cond_dim)) * 0.1)
    blocks[dtype] = np.concatenate([np.asarray(s.next_block()) for _ in range(4)], axis=1)
  assert blocks["bfloat16"].dtype == np.float32 and np.isfinite(blocks["bfloat16"]).all()
  err = rel_err(blocks["bfloat16"], blocks["float32"])
  print(f"bf16 vs fp32 stream, 4 blocks: relative error {err:.3%}")
  assert 0 < err < 0.05

  cfg = _cfg("bfloat16")
  tr, state, frozen = _arc(cfg)
  batch = _batch(cfg, np.random.default_rng(0).normal(size=(2, tr.frames, cfg.io_channels)))
  for phase, fn in (("g", tr.g_step), ("d", tr.d_step)):
    state, m = jax.jit(fn)(state, frozen, batch, jax.random.key(1))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert float(m["grad_norm"]) > 0, phase
  for part in ("adapter", "head", "opt_g", "opt_d"):
    dts = {str(x.dtype) for x in jax.tree.leaves(state[part])
           if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dts == {"float32"}, (part, dts)


# ------------------------------------------------------------------- bench/train_throughput.py


def _bench():
  spec = importlib.util.spec_from_file_location("train_throughput",
                                                os.path.join(ROOT, "bench", "train_throughput.py"))
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # its dataclasses look their module up
  spec.loader.exec_module(mod)
  return mod


def test_pass_flop_count_matches_xla():
  """The benchmark's analytic FLOPs of a transformer pass agree with XLA's cost analysis of
  ``DiT.forward_tokens`` (which adds the elementwise work: LayerNorm, softmax, rotary, SiLU)."""
  bench = _bench()
  cfg = dataclasses.replace(_cfg("float32"), embed_dim=256, num_heads=4)
  model = DiT(cfg, rngs=nnx.Rngs(0))
  gd, st = nnx.split(model)
  b, s = 2, 7
  cross = model.cross_kv(jnp.ones((b, s, cfg.cond_token_dim)))
  for nq in (40,):
    h = jnp.ones((b, nq, cfg.embed_dim))
    r = cfg.rotary_dim // 2
    rope = (jnp.ones((nq, r)), jnp.zeros((nq, r)))
    mask = jnp.ones((nq, nq), bool)
    f = jax.jit(lambda st, h: nnx.merge(gd, st).forward_tokens(h, rope, mask, cross)[0])
    ca = f.lower(st, h).compile().cost_analysis()
    xla = float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])
    ours = b * bench.pass_flops(cfg, nq, nq, s).total
    print(f"{nq} tokens: analytic {ours / 1e6:.2f} MFLOP, XLA {xla / 1e6:.2f} MFLOP")
    assert ours <= xla <= 1.05 * ours


@pytest.mark.slow
def test_train_throughput_bench_runs():
  r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_throughput.py"),
                      "--configs", "tiny", "--steps", "2", "--batch", "2", "--dtypes",
                      "bfloat16", "--rollout-blocks", "2"], capture_output=True, text=True,
                     timeout=900, cwd=ROOT)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  rows = [l.split("|")[1:-1] for l in r.stdout.splitlines() if l.startswith("| ")]
  rows = [[c.strip() for c in row] for row in rows if row[0].strip() != "kind"]
  assert sorted((row[0], row[3]) for row in rows) == sorted(
      (k, "bfloat16") for k in ("stage1", "arc G", "arc D"))
  for row in rows:
    tokens_s, gflop, peak, mfu = (float(row[i].rstrip("%")) for i in (6, 7, 10, 11))
    assert tokens_s > 0 and gflop > 0 and peak > 0 and mfu > 0, row


@pytest.mark.slow
def test_train_throughput_bench_rejects_bad_flags():
  for args in (["--kinds", "stage2"], ["--configs", "no_such_config"], ["--configs", "saos@x"],
               ["--batch", "0"], ["--peak-tflops", "bfloat16"]):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_throughput.py")]
                       + args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    assert r.stderr.strip().splitlines()[-1].startswith("usage:") or "error" in r.stderr
