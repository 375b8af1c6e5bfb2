"""sample.py end to end in a subprocess: a tiny-width model with the shipped spectral codec's
latent width, random weights; WAV validity, duration, time-varying prompts, Ctrl-C mid-stream."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from lmdm_jax.apps.common import TimedPrompt, UsageError, parse_prompts, prompt_schedule
from lmdm_jax.codecs.spectral import DEFAULT_ASSET
from lmdm_jax.data.audio import partial_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "sample.py")

CONFIG = '''
import ml_collections

def get_config(regime="block_causal"):
  c = ml_collections.ConfigDict()
  c.name = "tinyspectral"
  c.model = ml_collections.ConfigDict(dict(
      io_channels=LAT, embed_dim=64, depth=1, num_heads=1, cond_token_dim=32,
      project_cond_tokens=True, global_cond_dim=0, input_add_dim=1 + LAT + EXTRA,
      global_token="postpend", qk_norm="ln", rope_base=10000.0, ff_mult=2,
      timestep_features_dim=32, chunk=16, context_chunks=2, window_chunks=2,
      dtype="float32", param_dtype="float32"))
  c.sampler = ml_collections.ConfigDict(dict(regime=regime, steps=2, cfg_scale=2.0,
                                             plus_plus=False, pingpong=True))
  c.conditioner = ml_collections.ConfigDict(dict(type="bytes", max_tokens=8))
  c.codec = "spectral"
  c.seed = 0
  return c
'''

HOP, SR, CHUNK = 512, 22050, 16
# The shipped spectral codec's latent width (read from its asset, no codec built): the tiny
# model's io channels, and 1 + LAT accompaniment channels (mask + partner latents) for jamming.
with np.load(DEFAULT_ASSET) as _a:
  LAT = int(_a["latent_dim"])
ACC = 1 + LAT


def write_config(path, extra=0):
  path.write_text(CONFIG.replace("EXTRA", str(extra)).replace("LAT", str(LAT)))
  return str(path)


def child_env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def _restore_sigint():
  signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python then installs default_int_handler


def run_sample(*args, timeout=300):
  return subprocess.run([sys.executable, SAMPLE, "--no-progress", *args], capture_output=True,
                        text=True, timeout=timeout, env=child_env(), cwd=ROOT)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  return write_config(tmp_path_factory.mktemp("cfg") / "tinyspectral.py")


def test_parse_prompts():
  assert parse_prompts(None, default="d") == [TimedPrompt(0.0, "d")]
  assert parse_prompts(["solo piano, calm"]) == [TimedPrompt(0.0, "solo piano, calm")]
  ps = parse_prompts(["20:string quartet, lively", "0:solo piano, calm", "0.5:genre: jazz"])
  assert [p.start for p in ps] == [0.0, 0.5, 20.0]
  assert ps[1].text == "genre: jazz"
  for bad in ["x:foo", "-3:foo", "5:", "1e:foo"]:
    with pytest.raises(UsageError):
      parse_prompts([bad])
  with pytest.raises(UsageError, match="two prompts"):
    parse_prompts(["1:a", "1.0:b"])
  # the prompt starting at second t takes over at the block containing t
  ps = parse_prompts(["0:a", "1:b", "2.5:c"])
  assert prompt_schedule(ps, 0.5, 7) == [0, 0, 1, 1, 1, 2, 2]
  assert prompt_schedule(parse_prompts(["3:late"]), 1.0, 3) == [0, 0, 0]


@pytest.mark.slow  # two sample.py processes; the parser is tested in-process above
def test_bad_prompt_cli_errors():
  for bad in ["x:foo", "-3:foo"]:
    r = run_sample(f"--prompt={bad}", timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--prompt" in r.stderr and ("not a time" in r.stderr or ">= 0" in r.stderr), r.stderr


@pytest.mark.slow
def test_wav_duration_and_time_varying_prompts(config, tmp_path):
  """... and a complete run replaces an existing output, leaving no partial file."""
  out = tmp_path / "song.wav"
  out.write_bytes(b"the previous result")
  r = run_sample("--config", config, "--seconds", "2", "--prompt", "0:solo piano, calm",
                 "--prompt", "1:string quartet, lively", "--out", str(out))
  assert r.returncode == 0, r.stdout + r.stderr
  assert "RANDOM WEIGHTS" in r.stdout.splitlines()[0]
  assert "prompt -> 'string quartet, lively'" in r.stdout
  info = sf.info(str(out))
  assert info.samplerate == SR and info.channels == 1
  blocks = int(np.ceil(2 / (CHUNK * HOP / SR)))
  assert info.frames == blocks * CHUNK * HOP
  audio, _ = sf.read(str(out))
  assert np.all(np.isfinite(audio)) and np.abs(audio).max() > 0
  assert "real-time factor" in r.stdout
  assert not os.path.exists(partial_path(out))


@pytest.mark.slow
def test_codec_mismatch_writes_latents(tmp_path):
  out = tmp_path / "x.wav"
  r = run_sample("--config", "tiny", "--codec", "spectral", "--seconds", "1", "--steps", "1",
                 "--out", str(out))
  assert r.returncode == 0, r.stdout + r.stderr
  assert "cannot decode" in r.stdout
  lat = np.load(tmp_path / "x.npy")
  assert lat.shape[1] == 8 and lat.shape[0] % 4 == 0
  assert not out.exists() and not os.path.exists(partial_path(tmp_path / "x.npy"))


@pytest.mark.slow
def test_sigint_mid_stream_leaves_valid_wav(config, tmp_path):
  """Ctrl-C keeps what was made in the partial file (a valid WAV) and leaves --out untouched."""
  out = tmp_path / "long.wav"
  out.write_bytes(b"the previous result")
  part = partial_path(out)
  p = subprocess.Popen([sys.executable, SAMPLE, "--no-progress", "--config", config, "--seconds",
                        "600", "--out", str(out)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=ROOT,
                       preexec_fn=_restore_sigint)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
      if os.path.exists(part) and os.path.getsize(part) > 44 + 2 * 3 * SR:  # > 3 s of 16-bit audio
        break
      time.sleep(0.2)
    assert p.poll() is None, p.stdout.read()
    p.send_signal(signal.SIGINT)
    stdout, _ = p.communicate(timeout=120)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 130, stdout
  assert "interrupted" in stdout
  assert f"is in {part}; {out} was not changed" in stdout, stdout
  assert out.read_bytes() == b"the previous result"
  info = sf.info(part)
  assert info.samplerate == SR and info.frames >= 3 * SR
  assert info.frames % HOP == 0  # the decoder was flushed: whole latent frames
  audio, _ = sf.read(part)
  assert len(audio) == info.frames and np.all(np.isfinite(audio))


@pytest.mark.slow
def test_main_command_streams_the_bundled_model(tmp_path):
  """The README's first command (no flags): the bundled trained model, MiniLM prompt, WAV out."""
  from lmdm_jax.bundle import DEFAULT_BUNDLE, read_meta
  assert os.path.isfile(DEFAULT_BUNDLE), "the bundled default model is part of the repository"
  out = tmp_path / "default.wav"
  r = run_sample("--seconds", "1.5", "--out", str(out), timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "RANDOM WEIGHTS" not in r.stdout
  assert f"loaded {DEFAULT_BUNDLE}" in r.stdout, r.stdout
  meta = read_meta(DEFAULT_BUNDLE)  # the stage-1 model with its ARC-Forcing adapter merged
  assert meta["config"] == "arc_demo" and "merged ARC-Forcing adapter" in meta["weights"]
  assert meta["arc_step"] > 0 and meta["base_step"] > 0
  assert "config arc_demo" in r.stdout, r.stdout  # so its sampler: the 4-step ARC schedule
  assert f"base step {meta['base_step']} + ARC-Forcing step {meta['arc_step']}" in r.stdout
  assert "4 steps, CFG 3.0" in r.stdout, r.stdout
  audio, sr = sf.read(str(out))
  assert sr == SR and len(audio) == int(np.ceil(1.5 / (CHUNK * HOP / SR))) * CHUNK * HOP
  assert np.all(np.isfinite(audio)) and np.abs(audio).max() > 0
