"""Jamming: cached streaming with accompaniment channels is exact; JamSession push/pull, delay and
counters (with a controllable clock); the duet CLI."""
import dataclasses
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from lmdm_jax import sampling as S
from lmdm_jax.config import DiTConfig, load_config, load_config_file
from lmdm_jax.testing import random_model, rel_err
from tests.test_sample_cli import ACC, LAT, write_config

pytestmark = pytest.mark.slow  # jam sessions end to end (the full suite runs them)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cached_stream_with_accompaniment_equals_no_cache_reference():
  base = DiTConfig.from_config(load_config("tiny").model)
  cfg = dataclasses.replace(base, input_add_dim=1 + base.io_channels + 1 + base.io_channels)
  assert cfg.extra_dim == 1 + cfg.io_channels
  model = random_model(cfg, seed=0)
  b, s_len, n = 2, 5, 4
  sp = S.SamplerParams.make(steps=4, cfg_scale=2.5, plus_plus=False, pingpong=True)
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  cond = jax.random.normal(k1, (b, s_len, cfg.cond_token_dim))
  glob = jax.random.normal(k2, (b, cfg.global_cond_dim))
  # per-block accompaniment: mask 1 on a known prefix of each block, partner latents there
  lat = jax.random.normal(k3, (n, b, cfg.chunk, cfg.io_channels))
  extras = []
  for i in range(n):
    known = (np.arange(cfg.chunk) < (i * 3) % (cfg.chunk + 1)).astype(np.float32)[None, :, None]
    extras.append(jnp.concatenate([jnp.broadcast_to(known, (b, cfg.chunk, 1)), lat[i] * known], -1))
  tables = S.rope_window_tables(model)
  st = S.set_prompt(model, S.init_state(cfg, "block_causal", b, True, s_len, seed=1), cond, glob)
  step = jax.jit(lambda st, e: S.generate_block(model, tables, st, e, sp, "block_causal"))
  cached = []
  for e in extras:
    blk, st, _ = step(st, e)
    cached.append(blk)
  cached = jnp.concatenate(cached, 1)
  st = S.set_prompt(model, S.init_state(cfg, "block_causal", b, True, s_len, seed=1), cond, glob)
  start = S.start_context(cfg, b)  # the zero start chunks, with zero accompaniment channels
  hist, key = start, st.key
  for i, e in enumerate(extras):
    hist_extra = jnp.concatenate([jnp.zeros(start.shape[:2] + (cfg.extra_dim,))] + extras[:i], 1)
    blk, key = S.reference_block(model, hist, st.replace(key=key), e, sp, history_extra=hist_extra)
    hist = jnp.concatenate([hist, blk], 1)
  hist = hist[:, start.shape[1]:]
  err = rel_err(cached, hist)
  print(f"cached vs no-cache reference with accompaniment channels: rel err {err:.2e}")
  assert err < 1e-5
  # the accompaniment matters (the test would not notice dropped channels otherwise)
  st = S.set_prompt(model, S.init_state(cfg, "block_causal", b, True, s_len, seed=1), cond, glob)
  zero = []
  for _ in extras:
    blk, st, _ = step(st, jnp.zeros_like(extras[0]))
    zero.append(blk)
  assert rel_err(jnp.concatenate(zero, 1), hist) > 1e-3


# ------------------------------------------------------------------------------ JamSession


def acc_config(tmp_path, extra=ACC):
  return write_config(tmp_path / f"acc{extra}.py", extra=extra)


class FakeClock:
  def __init__(self):
    self.t = 0.0
    self.lock = threading.Lock()

  def __call__(self):
    with self.lock:
      return self.t

  def set(self, t):
    with self.lock:
      self.t = t


def wait_for(cond, timeout=120):
  end = time.time() + timeout
  while time.time() < end:
    if cond():
      return True
    time.sleep(0.01)
  return False


@pytest.fixture(scope="module")
def system(tmp_path_factory):
  """A System: a random tiny model with accompaniment channels + the spectral codec."""
  from lmdm_jax import sources
  conf = load_config_file(str(acc_config(tmp_path_factory.mktemp("jam"))))
  cfg = DiTConfig.from_config(conf.model)
  return sources.assemble(random_model(cfg, seed=0), conf, codec="spectral",
                          log=lambda *_: None)


def test_jam_session_delay_counters_and_accompaniment(system):
  model, codec = system.model, system.codec
  clock = FakeClock()
  sess = system.jam(delay_blocks=2, steps=2, cfg_scale=1.0, clock=clock)
  sr, B = codec.sample_rate, sess.block_seconds
  assert abs(B - 16 * 512 / sr) < 1e-9
  # the jam's decoder holds back 1 look-ahead frame + the net's radius + 2 frames of overlap-add
  assert sess.decoder_latency == sess.dec_codec.hold_back(16) * 512 == (3 + codec.radius) * 512
  assert sess.delay_samples == round(2 * B * sr) + sess.decoder_latency
  assert sess.lead_samples == 16 * 512  # by default a block starts one block before it is due
  assert abs(sess.delay_seconds - sess.delay_samples / sr) < 1e-12
  sess.start()
  try:
    # the delay prefix is silence and no under-run
    y = sess.pull(sess.delay_samples)
    assert y.shape == (1, sess.delay_samples) and not y.any() and sess.underruns == 0
    # nothing generated yet (the clock stands at 0): an under-run, silence, fixed delay kept
    y = sess.pull(100)
    assert y.shape == (1, 100) and sess.underruns == 1 and sess.underrun_samples == 100
    # the partner plays 3 s; the clock reaches block 0's start: generated on time
    t = np.arange(3 * sr) / sr
    partner = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    sess.push(partner[None])
    assert sess.stats()["blocks"] == 0
    clock.set(1.0 * B)
    assert wait_for(lambda: sess.blocks >= 1 or sess._error is not None)
    sess._raise()
    assert sess.deadline_misses == 0
    # accompaniment of block 0: all 16 frames known, = the codec's latents of the partner
    ex = sess._accomp_extra(0)
    assert ex.shape == (1, 16, model.cfg.extra_dim)
    assert np.all(ex[0, :, 0] == 1)
    ref = codec.encode(partner[None])[:16]
    np.testing.assert_allclose(ex[0, :, 1:1 + codec.latent_dim], ref, atol=1e-4)
    # a block past the partner's end: nothing known, mask 0
    far = int(3 * codec.frame_rate) // 16 + 2
    ex = sess._accomp_extra(far)
    assert not ex.any()
    # the clock jumps: the worker is late for the blocks it catches up on
    clock.set(12 * B)
    assert wait_for(lambda: sess.blocks >= 12 or sess._error is not None)
    sess._raise()
    assert sess.deadline_misses >= 5
    st = sess.stats()
    assert st["max_lateness_s"] > 0 and st["blocks"] >= 12
    # the generated part is there now: no new under-run, and it is not silence
    y = sess.pull(sr // 2)
    assert y.shape == (1, sr // 2) and sess.underruns == 1 and np.abs(y).max() > 0
    # bad pushes are refused
    with pytest.raises(ValueError, match="push expects"):
      sess.push(np.zeros((2, 10), np.float32))
  finally:
    sess.close()
  assert not sess._thread.is_alive()


@pytest.mark.parametrize("delay, lead", [(2, None), (1, 0.1)])
def test_jam_offline_render_equals_a_live_session_that_keeps_up(system, delay, lead):
  """The jam command's offline default is what a live session makes when its input arrives on
  time and its compute keeps up: the live session here runs on a clock that waits for it. With
  a one-block delay and a short lead the model hears the start of its own block."""
  sr = system.codec.sample_rate
  t = np.arange(int(1.5 * sr)) / sr
  partner = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 1.5 * t))
             ).astype(np.float32)[None]
  kw = dict(delay_blocks=delay, lead_seconds=lead, steps=2, cfg_scale=1.0, seed=3)
  offline_sess = system.jam("a duet", **kw)
  offline = offline_sess.render(partner)
  n_blocks = offline_sess.blocks
  assert offline.shape == (1, partner.shape[1] + offline_sess.delay_samples)
  assert not offline[:, :offline_sess.delay_samples].any() and np.abs(offline).max() > 0
  clock = FakeClock()
  live = system.jam("a duet", clock=clock, **kw)
  block = live.cs * live.hop
  fed_total = partner.shape[1] + live.delay_samples
  padded = np.pad(partner, ((0, 0), (0, fed_total - partner.shape[1])))
  live.start()
  fed = 0
  try:
    for k in range(n_blocks):  # the partner's audio up to block k's start, then the clock
      start = (k + delay) * block - live.lead_samples
      upto = min(start, fed_total)
      if upto > fed:
        live.push(padded[:, fed:upto])
        fed = upto
      if k == 1 and delay == 1:  # block 1 hears its first 16 - lead - guard frames
        known = 16 - live.lead_samples // live.hop - live.guard
        assert known > 0 and live._accomp_extra(1)[0, :, 0].sum() == known
      clock.set(live.block_start(k))
      assert wait_for(lambda: live.blocks >= k + 1 or live._error is not None)
      live._raise()
    heard = live.pull(fed_total)
  finally:
    live.close()
  np.testing.assert_allclose(heard, offline, atol=1e-6)


@pytest.mark.slow
def test_jam_delay_auto_follows_the_measured_compute(system, monkeypatch):
  """delay_blocks='auto': one block when, starting a block twice the measured block compute (the
  lead) before its deadline, the model still hears half of its own block; else two. The
  measurement leaves the stream as it was (same output)."""
  from lmdm_jax.jamming import JamSession
  sr = system.codec.sample_rate
  partner = (0.3 * np.sin(2 * np.pi * 330 * np.arange(sr) / sr)).astype(np.float32)[None]
  auto = system.jam("a duet", delay_blocks="auto", steps=2, cfg_scale=1.0, seed=5)
  assert auto.measured_block_compute_s > 0 and auto.delay_blocks in (1, 2)
  st = auto.stats()
  assert st["delay_blocks"] == auto.delay_blocks and st["lead_seconds"] == auto.lead_seconds
  assert auto.delay_samples == auto.delay_blocks * 16 * 512 + auto.decoder_latency
  lead = None if auto.delay_blocks == 2 else auto.lead_seconds
  same = system.jam("a duet", delay_blocks=auto.delay_blocks, seed=5, steps=2, cfg_scale=1.0,
                    lead_seconds=lead)
  assert same.lead_samples == auto.lead_samples
  np.testing.assert_array_equal(auto.render(partner), same.render(partner))
  # the rule, with the guard of 4 frames: lead = 2 c rounded up to whole frames (23.2 ms)
  for c, delay, lead_frames in ((0.046, 1, 4), (0.047, 2, 16)):
    monkeypatch.setattr(JamSession, "measure_block_compute", lambda self, c=c: c)
    s = system.jam(delay_blocks="auto", steps=2, cfg_scale=1.0)
    assert (s.delay_blocks, s.lead_samples) == (delay, lead_frames * 512), c
  for bad in (dict(delay_blocks=0), dict(delay_blocks="soon"), dict(lead_seconds=0.0),
              dict(lead_seconds=1.0), dict(delay_blocks="auto", lead_seconds=0.1)):
    with pytest.raises(ValueError, match="delay_blocks|lead_seconds"):
      system.jam(**bad)


def test_jam_session_needs_accompaniment_channels():
  from lmdm_jax import sources
  base = DiTConfig.from_config(load_config("tiny").model)
  cfg = dataclasses.replace(base, io_channels=LAT, input_add_dim=1 + LAT)
  conf = load_config("tiny")
  system = sources.assemble(random_model(cfg), conf, codec="spectral", log=lambda *_: None)
  with pytest.raises(ValueError, match="accompaniment channels"):
    system.jam()


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


@pytest.mark.slow
def test_jam_cli_writes_duet_and_part(tmp_path):
  cfg = acc_config(tmp_path)
  sr = 22050
  t = np.arange(int(2.0 * sr)) / sr
  sf.write(str(tmp_path / "partner.wav"), 0.3 * np.sin(2 * np.pi * 220 * t), sr)
  out = tmp_path / "duet.wav"
  out.write_bytes(b"a previous duet")  # replaced by the complete run, via a partial file
  r = subprocess.run([sys.executable, "-m", "lmdm_jax.apps.jam", "--config", cfg, "--input",
                      str(tmp_path / "partner.wav"), "--out", str(out)], capture_output=True,
                     text=True, timeout=300, env=_env(), cwd=ROOT)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "offline" in r.stdout and "compute at" in r.stdout
  delay = float(r.stdout.split("delay ")[1].split(" s")[0])
  for p in (out, tmp_path / "duet_part.wav"):
    info = sf.info(str(p))
    assert info.samplerate == sr and info.channels == 1
    assert abs(info.frames / sr - (2.0 + delay)) < 0.02, (p, info.frames / sr, delay)
    a, _ = sf.read(str(p))
    assert np.all(np.isfinite(a))
  assert not list(tmp_path.glob("*.partial.wav"))
  part, _ = sf.read(str(tmp_path / "duet_part.wav"))
  assert not part[: int((delay - 0.005) * sr)].any()  # the delay prefix (printed in 10 ms)
  # a model without accompaniment channels is refused clearly
  r = subprocess.run([sys.executable, "-m", "lmdm_jax.apps.jam", "--config",
                      acc_config(tmp_path, extra=0), "--input", str(tmp_path / "partner.wav"),
                      "--out", str(out)], capture_output=True, text=True, timeout=300,
                     env=_env(), cwd=ROOT)
  assert r.returncode == 2 and "accompaniment channels" in r.stderr, r.stdout + r.stderr
