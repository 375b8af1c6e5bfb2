"""Sketch features from audio (pyin) and MIDI, their placement, and sample.py --sketch."""
import numpy as np
import pytest
import soundfile as sf

from lmdm_jax.data import sketch as K

FR = 22050 / 512


def tone_melody(path, notes, seconds_each=0.5, sr=22050):
  t = np.arange(int(seconds_each * sr)) / sr
  audio = np.concatenate([0.4 * np.sin(2 * np.pi * 440.0 * 2 ** ((m - 69) / 12) * t) for m in notes])
  sf.write(str(path), audio, sr)


def test_pitch_features():
  f = K.pitch_features(np.array([60.0, np.nan, 69.2, 47.0]))
  assert f.shape == (4, K.SKETCH_DIM)
  assert f[:, 0].tolist() == [1, 0, 1, 1]
  assert f[1].sum() == 0
  assert np.argmax(f[0, 2:]) == 0 and np.argmax(f[2, 2:]) == 9 and np.argmax(f[3, 2:]) == 11
  assert f[0, 1] == 0 and abs(f[2, 1] - 9.2 / 24) < 1e-6


def test_audio_sketch_follows_the_melody(tmp_path):
  p = tmp_path / "hum.wav"
  tone_melody(p, [69, 72, 76])  # A4 C5 E5, 0.5 s each
  f = K.load_sketch(p, FR)
  assert f.shape[1] == K.SKETCH_DIM and abs(f.shape[0] - 1.5 * FR) <= 1
  for i, pc in enumerate([9, 0, 4]):  # middle of each note
    g = int((i * 0.5 + 0.25) * FR)
    assert f[g, 0] == 1 and np.argmax(f[g, 2:]) == pc, (i, f[g])


def test_midi_sketch(tmp_path):
  pretty_midi = pytest.importorskip("pretty_midi")
  pm = pretty_midi.PrettyMIDI()
  inst = pretty_midi.Instrument(0)
  inst.notes += [pretty_midi.Note(100, 62, 0.0, 1.0), pretty_midi.Note(100, 50, 0.0, 2.0),
                 pretty_midi.Note(100, 67, 1.5, 2.0)]
  pm.instruments.append(inst)
  p = tmp_path / "m.mid"
  pm.write(str(p))
  f = K.load_sketch(p, FR, frames=100)
  assert f.shape == (100, K.SKETCH_DIM)
  assert np.argmax(f[int(0.5 * FR), 2:]) == 2  # D (skyline: 62 over 50)
  assert np.argmax(f[int(1.2 * FR), 2:]) == 2  # 50 = D as well
  assert np.argmax(f[int(1.7 * FR), 2:]) == 7  # G
  assert f[int(2.2 * FR), 0] == 0  # after the end


def test_place_and_errors(tmp_path):
  f = K.pitch_features(np.full(8, 60.0))
  ex = K.place(f, 1 + 128 + K.SKETCH_DIM)
  assert ex.shape == (8, 143) and np.all(ex[:, :129] == 0) and np.all(ex[:, 129:] == f)
  with pytest.raises(K.SketchError, match="extra input channels"):
    K.place(f, 0)
  with pytest.raises(K.SketchError, match="no such"):
    K.load_sketch(tmp_path / "missing.wav", FR)


@pytest.mark.slow
def test_sample_cli_with_sketch(tmp_path):
  from tests.test_sample_cli import run_sample, write_config
  cfg = write_config(tmp_path / "sk.py", extra=K.SKETCH_DIM)
  mel = tmp_path / "hum.wav"
  tone_melody(mel, [60, 64, 67, 72])
  out = tmp_path / "o.wav"
  r = run_sample("--config", cfg, "--seconds", "1.5", "--sketch", str(mel), "--out", str(out))
  assert r.returncode == 0, r.stdout + r.stderr
  assert "[sketch]" in r.stdout
  assert sf.info(str(out)).frames > 0
  # a model without sketch channels refuses clearly
  cfg0 = write_config(tmp_path / "nosk.py", extra=0)
  r = run_sample("--config", cfg0, "--seconds", "1", "--sketch", str(mel), "--out", str(out))
  assert r.returncode == 2 and "sketch needs" in r.stderr, r.stdout + r.stderr
