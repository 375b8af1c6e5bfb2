"""Bad command-line input and failed runs (issue 16): every bad value of sample.py and the jam CLI
is refused with one stderr line naming it (exit 2) before a model is loaded, and no run destroys an
existing output: a run that fails mid-way (NaN latents) keeps the previous file and says where its
partial output (a valid WAV) is.

Most cases call the CLIs' ``main`` in this process with the model loader replaced by a tripwire
(so they also prove that nothing was loaded); a few run sample.py as a subprocess to check the real
exit code and that no traceback is printed; one in-process pair of runs streams a tiny model.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from lmdm_jax.apps import jam
from lmdm_jax.data.audio import partial_path
from lmdm_jax.apps import sample_cli as sample
from tests.test_sample_cli import CHUNK, HOP, ROOT, SAMPLE, SR, child_env, write_config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Broken and good audio files, and a folder."""
  d = tmp_path_factory.mktemp("inputs")
  sr = 8000
  t = np.arange(sr) / sr
  sf.write(d / "ok.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr)
  sf.write(d / "silent.wav", np.zeros(sr, np.float32), sr)
  sf.write(d / "nan.wav", np.full(sr, np.nan, np.float32), sr, subtype="FLOAT")
  raw = (d / "ok.wav").read_bytes()
  (d / "truncated.wav").write_bytes(raw[:len(raw) // 2])  # the header still claims all of it
  (d / "empty.wav").write_bytes(b"")
  (d / "text.wav").write_text("not audio at all\n")
  (d / "afile").write_text("x")
  (d / "folder").mkdir()
  return d


@pytest.fixture
def no_model(monkeypatch):
  """Loading a model fails the test: the checks must come first."""
  def tripwire(*a, **k):
    raise AssertionError("a model was loaded before the input was checked")
  from lmdm_jax import sources
  monkeypatch.setattr(sources, "load", tripwire)  # every command loads through the System


def one_error_line(capsys, rc, *needles):
  out, err = capsys.readouterr()
  assert rc == 2, (rc, out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  for n in needles:
    assert n in lines[0], (n, lines[0])
  return lines[0]


SAMPLE_CASES = [
    (["--seconds", "nan"], ["--seconds", "finite"]),
    (["--seconds", "inf"], ["--seconds", "finite"]),
    (["--seconds", "0"], ["--seconds", "positive"]),
    (["--seconds", "-3"], ["--seconds", "positive"]),
    (["--seconds", "1e9"], ["--seconds", "<= 86400"]),  # no per-block schedule of 1e9 s is built
    (["--steps", "0"], ["--steps", "1..64", "got 0"]),  # not silently replaced by the default
    (["--steps", "-1"], ["--steps", "got -1"]),
    (["--steps", "100000"], ["--steps", "got 100000"]),
    (["--cfg-scale", "nan"], ["--cfg-scale", "finite"]),
    (["--cfg-scale", "inf"], ["--cfg-scale", "finite"]),
    (["--seed", "-1"], ["--seed"]),
    (["--seed", str(2 ** 70)], ["--seed"]),
    (["--prompt", "0:caf\udce9"], ["--prompt", "UTF-8"]),
    (["--codec", "nosuchcodec"], ["--codec", "nosuchcodec", "spectral"]),
    (["--config", "nosuchconfig"], ["nosuchconfig", "not a registered config"]),
    (["--config", "tiny:bogus_regime"], ["bogus_regime", "block_causal"]),
    (["--checkpoint", "{d}/missing_run"], ["--checkpoint", "missing_run", "no such"]),
    (["--sketch", "{d}/missing.wav"], ["--sketch", "missing.wav", "no such"]),
    (["--sketch", "{d}/empty.wav"], ["--sketch", "empty.wav", "empty"]),
    (["--sketch", "{d}/text.wav"], ["--sketch", "text.wav", "cannot decode"]),
    (["--sketch", "{d}/truncated.wav"], ["--sketch", "truncated.wav", "truncated WAV",
                                         "16000", "7978"]),
    (["--sketch", "{d}/silent.wav"], ["--sketch", "silent.wav", "silent"]),
    (["--sketch", "{d}/nan.wav"], ["--sketch", "nan.wav", "NaN"]),
    (["--sketch", "{d}/ok.wav", "--out", "{d}/ok.wav"], ["--out", "same file as --sketch"]),
    (["--out", "{d}/folder"], ["--out", "folder", "is a folder"]),
    (["--out", "{d}/afile/x.wav"], ["--out", "afile", "not a folder"]),
]


@pytest.mark.parametrize("argv,needles", SAMPLE_CASES, ids=[" ".join(a) for a, _ in SAMPLE_CASES])
def test_sample_bad_input_one_line_exit_2_before_model_load(files, no_model, capsys, argv, needles):
  argv = [a.replace("{d}", str(files)) for a in argv]
  if "--out" not in argv:
    argv += ["--out", str(files / "never.wav")]
  rc = sample.main(["--no-progress", *argv])
  one_error_line(capsys, rc, "sample.py: error:", *needles)
  assert not os.path.exists(files / "never.wav")


@pytest.mark.slow  # three sample.py processes
@pytest.mark.parametrize("argv,needle", [
    (["--seconds", "nan"], "--seconds"),
    (["--sketch", "{d}/text.wav"], "text.wav"),
    (["--config", "nosuchconfig"], "nosuchconfig"),
])
def test_sample_bad_input_subprocess(files, argv, needle):
  """The real process: exit code 2, one stderr line, no traceback."""
  argv = [a.replace("{d}", str(files)) for a in argv]
  r = subprocess.run([sys.executable, SAMPLE, "--no-progress", "--out", str(files / "never.wav"),
                      *argv], capture_output=True, text=True, timeout=120, env=child_env(),
                     cwd=ROOT)
  assert r.returncode == 2, r.stdout + r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_sample_unusable_checkpoint_folder(files, capsys):
  """A folder that is no checkpoint: the loader's message, on one line, exit 2."""
  rc = sample.main(["--no-progress", "--checkpoint", str(files / "folder"), "--out",
                    str(files / "never.wav")])
  one_error_line(capsys, rc, "sample.py: error:", "folder", "neither a train.py work directory")


JAM_CASES = [
    (["--input", "{d}/missing.wav"], ["--input", "missing.wav"]),
    (["--input", "{d}/empty.wav"], ["--input", "empty.wav", "empty"]),
    (["--input", "{d}/text.wav"], ["--input", "text.wav", "cannot decode"]),
    (["--input", "{d}/truncated.wav"], ["--input", "truncated.wav", "truncated WAV"]),
    (["--input", "{d}/silent.wav"], ["--input", "silent.wav", "silent"]),
    (["--input", "{d}/nan.wav"], ["--input", "nan.wav", "NaN"]),
    (["--seconds", "nan"], ["--seconds", "finite"]),
    (["--seconds", "-1"], ["--seconds", "positive"]),
    (["--steps", "0"], ["--steps", "got 0"]),
    (["--cfg-scale", "inf"], ["--cfg-scale", "finite"]),
    (["--delay-blocks", "0"], ["--delay-blocks", ">= 1"]),
    (["--delay-blocks", "100000"], ["--delay-blocks", "<= 64"]),
    (["--buffer", "0"], ["--buffer", ">= 16"]),
    (["--buffer", "100000000"], ["--buffer", "<= 65536"]),
    (["--prompt", "\udcff"], ["--prompt", "UTF-8"]),
    (["--codec", "nosuchcodec"], ["--codec", "nosuchcodec"]),
    (["--config", "nosuchconfig"], ["nosuchconfig"]),
    (["--checkpoint", "{d}/missing_run"], ["--checkpoint", "missing_run"]),
    (["--out", "{d}/ok.wav"], ["--out", "same file as --input"]),
    (["--out", "{d}/duet.wav", "--part", "{d}/duet.wav"], ["--part", "same file as --out"]),
    (["--out", "{d}/folder"], ["--out", "is a folder"]),
]


@pytest.mark.parametrize("argv,needles", JAM_CASES, ids=[" ".join(a) for a, _ in JAM_CASES])
def test_jam_bad_input_one_line_exit_2_before_model_load(files, no_model, capsys, argv, needles):
  argv = [a.replace("{d}", str(files)) for a in argv]
  if "--input" not in argv:
    argv += ["--input", str(files / "ok.wav")]
  if "--out" not in argv:
    argv += ["--out", str(files / "never.wav")]
  rc = jam.main(argv)
  one_error_line(capsys, rc, "[jam] error:", *needles)
  assert not os.path.exists(files / "never.wav")


def test_nan_latents_keep_the_previous_output(tmp_path, capsys, monkeypatch):
  """The issue's case: a run that meets NaN latents stops with one error line naming the block and
  the partial file (a valid WAV of the blocks before), and the previous output is untouched.
  (A complete run replacing an existing output: test_sample_cli's duration test.)"""
  from lmdm_jax import sampling as S
  cfg = write_config(tmp_path / "tinyspectral.py")
  out = tmp_path / "song.wav"
  out.write_bytes(b"the previous result")
  orig = S.Stream.step  # every block goes through it (with or without the decode inside)
  calls = []

  def nan_at_block_2(self, *a, **k):
    x, audio = orig(self, *a, **k)
    calls.append(1)
    return (x * np.nan if len(calls) == 3 else x), audio

  monkeypatch.setattr(S.Stream, "step", nan_at_block_2)
  rc = sample.main(["--no-progress", "--config", cfg, "--seconds", "1.5", "--out", str(out)])
  _, err = capsys.readouterr()
  assert rc == 1, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  part = partial_path(out)
  assert "block 2" in lines[0] and "NaN" in lines[0] and part in lines[0], lines[0]
  assert f"{out} was not changed" in lines[0]
  assert out.read_bytes() == b"the previous result"
  info = sf.info(part)  # the two good blocks, decoded, in a valid WAV
  assert info.samplerate == SR and 0 < info.frames <= 2 * CHUNK * HOP
  audio, _ = sf.read(part)
  assert np.all(np.isfinite(audio))


class _FakeSession:
  """Stands in for JamSession (no model): silence, then NaN from the 4th pull on."""
  delay_seconds, block_seconds, decoder_latency, delay_samples = 0.1, 0.1, 0, 800

  def __init__(self, *a, **k):
    self.pulls = 0

  def start(self):
    return self

  def push(self, x):
    pass

  def pull(self, n):
    self.pulls += 1
    return np.full((1, n), np.nan if self.pulls >= 4 else 0.0, np.float32)

  def close(self):
    pass

  def stats(self):
    return {}


def test_jam_failure_mid_run_keeps_previous_outputs(files, tmp_path, capsys, monkeypatch):
  """The jam CLI's two outputs follow the same rule: a run that fails mid-way (NaN from the model)
  says where both partial files are (valid WAVs) and leaves the existing outputs untouched."""
  from types import SimpleNamespace
  codec = SimpleNamespace(sample_rate=8000, channels=1)
  from lmdm_jax import system as system_lib
  fake = SimpleNamespace(codec=codec, jam=lambda *a, **k: _FakeSession())
  monkeypatch.setattr(system_lib, "load_system", lambda *a, **k: fake)
  out, part = tmp_path / "duet.wav", tmp_path / "duet_part.wav"
  out.write_bytes(b"previous duet")
  part.write_bytes(b"previous part")
  rc = jam.main(["--input", str(files / "ok.wav"), "--out", str(out), "--buffer", "400",
                 "--realtime"])
  _, err = capsys.readouterr()
  assert rc == 1, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err and "NaN" in lines[0], err
  for p in (out, part):
    assert partial_path(p) in lines[0] and f"{p} was not changed" in lines[0]
    assert sf.info(partial_path(p)).frames == 3 * 400  # the three good buffers
  assert out.read_bytes() == b"previous duet" and part.read_bytes() == b"previous part"
