"""One program per block (``sampling.block_program``): commit, denoising steps and the codec's
block decode compiled once; it equals the unfused path (the block step, then the codec's stream
decoder on the host), compiles nothing while streaming, and a warm start loads the exported
program instead of tracing it."""
import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

from lmdm_jax import compile_cache
from lmdm_jax import sampling as S
from lmdm_jax.codecs.spectral import SpectralCodec
from lmdm_jax.config import DiTConfig, load_config
from lmdm_jax.nn.dit import abstract_model, model_with_params
from lmdm_jax.system import System
from lmdm_jax.testing import random_model, rel_err

CROSS = 3


@pytest.fixture(scope="module")
def codec():
  return SpectralCodec(n_iter=2)  # fewer Griffin-Lim iterations: same code paths, faster


def small_model(chunk: int):
  cfg = DiTConfig.from_config(load_config("tiny").model)
  cfg = dataclasses.replace(cfg, io_channels=192, input_add_dim=193, embed_dim=64, depth=1,
                            chunk=chunk)
  return random_model(cfg, seed=1)


def prompt(cfg, batch):
  k1, k2 = jax.random.split(jax.random.key(5))
  return (jax.random.normal(k1, (batch, CROSS, cfg.cond_token_dim)),
          jax.random.normal(k2, (batch, cfg.global_cond_dim)))


def fused_stream(model, codec, batch, seed=2):
  st = S.Stream(model, batch=batch, cross_len=CROSS, seed=seed,
                sampler=S.SamplerParams.make(3, 2.0), decoder=codec.block_decoder(model.cfg.chunk))
  st.set_prompt(*prompt(model.cfg, batch))
  return st


# one and two codec chunks per block
@pytest.mark.parametrize("chunk", [16, pytest.param(32, marks=pytest.mark.slow)])
def test_fused_decode_equals_block_step_then_stream_decoder(codec, chunk):
  """Batch 2: each item's audio from the block program (valid ranges, then the tail's flush)
  equals that item's latents pushed through ``codec.stream_decoder()``; and the latents equal
  the unfused block step's (``generate_block`` jitted alone)."""
  model = small_model(chunk)
  n, batch = 5, 2
  st = fused_stream(model, codec, batch)
  dec = st.decoder
  tables = S.rope_window_tables(model)
  ref_state = S.init_state(model.cfg, "block_causal", batch, True, CROSS, seed=2)
  ref_state = S.set_prompt(model, ref_state, *prompt(model.cfg, batch))
  ref_step = jax.jit(lambda s, e: S.generate_block(model, tables, s, e, st.sampler,
                                                   "block_causal"))
  extra = np.zeros((batch, chunk, model.cfg.extra_dim), np.float32)
  lat, audio, ref_lat = [], [], []
  for k in range(n):
    blk, out = st.step()
    lo, hi = dec.valid(k)
    lat.append(np.asarray(blk))
    audio.append(np.asarray(out)[:, :, lo:hi])
    r, ref_state, _ = ref_step(ref_state, extra)
    ref_lat.append(np.asarray(r))
  lat, ref_lat = np.concatenate(lat, 1), np.concatenate(ref_lat, 1)
  assert rel_err(lat, ref_lat) < 1e-6  # fp32; two programs fuse differently (max abs ~2e-6)
  np.testing.assert_allclose(lat, ref_lat, rtol=0, atol=1e-5)
  for i in range(batch):
    fused = np.concatenate([a[i] for a in audio] + [dec.tail(st.dec_state, i).flush()], -1)
    sd = codec.stream_decoder()
    pieces = [sd.push(lat[i, k * chunk:(k + 1) * chunk]) for k in range(n)] + [sd.flush()]
    want = np.concatenate(pieces, -1)
    assert fused.shape == want.shape == (1, n * chunk * codec.hop)
    np.testing.assert_allclose(fused, want, rtol=0, atol=1e-6)
    assert np.abs(want).max() > 1e-3  # real audio, not silence on both sides
  # the items differ (batch preserved, not one item broadcast)
  assert np.abs(lat[0] - lat[1]).max() > 1e-3


def test_audio_stream_uses_the_block_program(codec):
  """The System's stream decodes inside the block program; its audio (blocks + flush) equals
  the stream decoder over its latents, and a stream of N blocks compiles nothing after it is
  built (the block program was compiled once, at construction)."""
  model = small_model(16)
  cfg = model.cfg

  def cond(prompts, start, total):
    return np.ones((len(prompts), CROSS, cfg.cond_token_dim), np.float32), np.zeros(
        (len(prompts), cfg.global_cond_dim), np.float32)

  system = System(model, conditioner=cond, cross_len=CROSS, codec=codec)
  before = dict(compile_cache.COMPILES)
  stream = system.stream("x", steps=2, cfg_scale=1.5)
  assert stream.fused is not None and stream.decoder is None
  built = sum(compile_cache.COMPILES.values()) - sum(before.values())
  assert built == 2  # the block program and the prompt program, once each
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None)
  pieces, lats = [], []
  for _ in range(6):
    pieces.append(stream.next_block())
    lats.append(stream.last_latents)
  stream.set_prompt("y")  # no recompilation either
  pieces.append(stream.next_block())
  lats.append(stream.last_latents)
  assert compiles == [], compiles
  pieces.append(stream.flush())
  assert stream.flush().shape[-1] == 0  # flushed once
  sd = codec.stream_decoder()
  want = np.concatenate([sd.push(x) for x in lats] + [sd.flush()], -1)
  got = np.concatenate(pieces, -1)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  with pytest.raises(RuntimeError, match="flushed"):
    stream.next_block()


@pytest.mark.slow
def test_warm_start_loads_the_exported_program(codec, tmp_path, monkeypatch):
  """With the cache on, the first stream exports its programs; a second one loads them (no
  tracing) and streams the same numbers; a damaged file is traced again."""
  monkeypatch.setattr(compile_cache, "_folder", str(tmp_path))
  model = small_model(16)
  c0 = dict(compile_cache.COMPILES)
  a = fused_stream(model, codec, 1)
  assert compile_cache.COMPILES["traced"] - c0["traced"] == 2
  files = sorted(os.listdir(tmp_path / "exported"))
  assert len(files) == 2
  c1 = dict(compile_cache.COMPILES)
  b = fused_stream(model, codec, 1)
  assert compile_cache.COMPILES["exported"] - c1["exported"] == 2
  assert compile_cache.COMPILES["traced"] == c1["traced"]
  for _ in range(3):
    (la, aa), (lb, ab) = a.step(), b.step()
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    np.testing.assert_array_equal(np.asarray(aa), np.asarray(ab))
  for f in files:
    (tmp_path / "exported" / f).write_bytes(b"not a program")
  said = []
  c2 = dict(compile_cache.COMPILES)
  compile_cache.compile_program("block", lambda x: x + 1, (np.zeros(3, np.float32),),
                                out_like=0, key="t", log=said.append)
  c = fused_stream(model, codec, 1)
  assert compile_cache.COMPILES["traced"] - c2["traced"] == 3
  np.testing.assert_array_equal(np.asarray(c.step()[0]), np.asarray(fused_stream(
      model, codec, 1).step()[0]))


def test_program_key_changes_with_the_source(monkeypatch, tmp_path):
  """An edit of the package's code (its source hash) never reuses an exported program."""
  monkeypatch.setattr(compile_cache, "_folder", str(tmp_path))
  leaves = [np.zeros(3, np.float32)]
  treedef = jax.tree.structure(leaves)
  p1 = compile_cache._exported_path("p", "k", leaves, treedef, ())
  monkeypatch.setattr(compile_cache, "_source_hash", "edited")
  assert compile_cache._exported_path("p", "k", leaves, treedef, ()) != p1
  assert compile_cache._exported_path("p", "k2", leaves, treedef, ()) != p1


def test_model_with_params_equals_the_model():
  """Building from the abstract model and its parameters (no random init) gives the same
  model: every parameter and buffer, of the same kind and dtype."""
  model = random_model("tiny", seed=4)
  cfg = model.cfg
  built = model_with_params(abstract_model(cfg), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  a, b = dict(nnx.to_flat_state(nnx.state(model))), dict(nnx.to_flat_state(nnx.state(built)))
  assert a.keys() == b.keys()
  for k in a:
    assert type(a[k]) is type(b[k]), k
    x, y = np.asarray(a[k].get_value()), np.asarray(b[k].get_value())
    assert x.dtype == y.dtype and np.array_equal(x, y), k


def test_stream_key_is_jax_random_key():
  """Stream keys built from key data are the keys ``jax.random.key`` makes (no seeding program
  at start-up), for every seed, including those outside the fast path."""
  for seed in (0, 1, 12345, 2 ** 31 + 5, 2 ** 32 - 1, -1, 2 ** 40):
    np.testing.assert_array_equal(jax.random.key_data(S.stream_key(seed)),
                                  jax.random.key_data(jax.random.key(seed)))


@pytest.mark.slow
def test_flax_import_skips_ipython():
  """``import lmdm_jax`` then flax: IPython is not imported (flax only asks whether it runs
  inside IPython); without lmdm_jax's hook flax would import it when it is installed."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import sys, lmdm_jax; from flax import nnx; import treescope; "
          "print('IPython' in sys.modules)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     env=dict(os.environ, PYTHONPATH=root), timeout=300)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split()[-1] == "False"
