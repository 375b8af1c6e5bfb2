"""Tests for lmdm_jax.data.audio: loading, conversion, errors, and the incremental WAV writer."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import wave

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")

from lmdm_jax.data import audio as A  # noqa: E402


def _sine(freq, sr, seconds, channels=1, amp=0.5):
  t = np.arange(int(sr * seconds)) / sr
  x = amp * np.sin(2 * np.pi * freq * t).astype(np.float32)
  if channels == 2:
    return np.stack([x, 0.5 * x])
  return x[None]


def _peak_freq(x, sr):
  spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
  return np.argmax(spec) * sr / len(x)


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg"])
def test_roundtrip_formats(tmp_path, ext):
  x = _sine(440, 44100, 1.0, channels=2)
  p = tmp_path / f"a.{ext}"
  A.save_audio(p, x, 44100)
  y = A.load_audio(p)
  assert y.dtype == np.float32 and y.shape[0] == 2
  assert abs(y.shape[1] - x.shape[1]) < 2048  # ogg may pad
  if ext != "ogg":
    np.testing.assert_allclose(y, x, atol=2e-4)
  assert abs(_peak_freq(y[0], 44100) - 440) < 3


def test_mp3_load(tmp_path):
  if "MP3" not in sf.available_formats():
    pytest.skip("libsndfile without MP3 support: cannot create a test MP3")
  x = _sine(440, 44100, 1.0, channels=2)
  p = tmp_path / "a.mp3"
  sf.write(p, x.T, 44100, format="MP3")
  y = A.load_audio(p, sample_rate=22050, channels=1)
  assert y.shape[0] == 1 and abs(y.shape[1] - 22050) < 2000
  assert abs(_peak_freq(y[0], 22050) - 440) < 5


def test_librosa_fallback(tmp_path, monkeypatch):
  pytest.importorskip("librosa")
  x = _sine(300, 16000, 0.5)
  p = tmp_path / "a.wav"
  A.save_audio(p, x, 16000)

  def broken(path):
    raise RuntimeError("pretend libsndfile cannot read this")
  monkeypatch.setattr(A, "_read_soundfile", broken)
  y = A.load_audio(p)
  np.testing.assert_allclose(y, x, atol=1e-4)


def test_resample_and_channels(tmp_path):
  x = _sine(1000, 48000, 1.0, channels=1)
  p = tmp_path / "m.wav"
  A.save_audio(p, x, 48000, subtype="FLOAT")
  y = A.load_audio(p, sample_rate=22050, channels=2)
  assert y.shape == (2, 22050)
  np.testing.assert_array_equal(y[0], y[1])
  assert abs(_peak_freq(y[0], 22050) - 1000) < 2
  # no energy lost in band, no aliasing blow-up
  assert abs(np.sqrt(np.mean(y[0, 1000:-1000] ** 2)) - 0.5 / np.sqrt(2)) < 0.01
  s = _sine(440, 44100, 0.5, channels=2)
  p2 = tmp_path / "s.wav"
  A.save_audio(p2, s, 44100, subtype="FLOAT")
  mono = A.load_audio(p2, channels=1)
  np.testing.assert_allclose(mono[0], s.mean(0), atol=1e-6)


def test_offset_duration(tmp_path):
  x = np.linspace(-0.5, 0.5, 8000, dtype=np.float32)[None]
  p = tmp_path / "r.wav"
  A.save_audio(p, x, 8000, subtype="FLOAT")
  y = A.load_audio(p, offset=0.25, duration=0.5)
  np.testing.assert_allclose(y, x[:, 2000:6000])


def _check_error(path, match, **kw):
  with pytest.raises(A.AudioFileError) as ei:
    A.load_audio(path, **kw)
  msg = str(ei.value)
  assert os.fspath(path) in msg and match in msg, msg
  assert isinstance(ei.value, ValueError)
  return msg


def test_errors_name_file_and_problem(tmp_path):
  _check_error(tmp_path / "missing.wav", "does not exist")
  empty = tmp_path / "empty.wav"
  empty.write_bytes(b"")
  _check_error(empty, "empty")
  garbage = tmp_path / "garbage.flac"
  garbage.write_bytes(b"this is not audio at all" * 100)
  _check_error(garbage, "cannot decode")
  nosamples = tmp_path / "nosamples.wav"
  sf.write(nosamples, np.zeros((0, 1), np.float32), 8000)
  _check_error(nosamples, "no audio samples")
  silent = tmp_path / "silent.wav"
  A.save_audio(silent, np.zeros((1, 8000), np.float32), 8000)
  _check_error(silent, "silent")
  quiet = tmp_path / "quiet.wav"
  A.save_audio(quiet, _sine(440, 8000, 1.0, amp=1e-4), 8000, subtype="FLOAT")  # -80 dBFS
  _check_error(quiet, "silent")
  assert A.load_audio(quiet, silence_db=-90).shape == (1, 8000)  # configurable threshold
  assert A.load_audio(quiet, silence_db=None).shape == (1, 8000)
  short = tmp_path / "short.wav"
  A.save_audio(short, _sine(440, 8000, 0.5), 8000)
  _check_error(short, "too short", min_seconds=1.0)


def test_truncated_wav_is_refused_with_sizes(tmp_path):
  """A WAV whose header claims more data than the file holds (a cut-off download or copy) is an
  error naming the file and both sizes, not a silently shorter load; intact files, files with
  extra chunks and streamed headers of unknown size still load."""
  whole = tmp_path / "whole.wav"
  A.save_audio(whole, _sine(440, 8000, 1.0, channels=2), 8000)  # 16-bit: 32000 data bytes
  raw = whole.read_bytes()
  cut = tmp_path / "cut.wav"
  cut.write_bytes(raw[:-1000])
  for fn in (A.load_audio, A.audio_info):
    with pytest.raises(A.AudioFileError) as ei:
      fn(cut)
    assert ei.value.path == str(cut)
    assert "truncated WAV" in str(ei.value) and "32000" in str(ei.value) and "31000" in str(ei.value)
  assert A.load_audio(whole).shape == (2, 8000)
  # a LIST chunk (odd size, padded) before the data chunk; then a cut: still found
  i = raw.index(b"data")
  extra = b"LIST" + (5).to_bytes(4, "little") + b"INFOx\0"
  listed = tmp_path / "listed.wav"
  listed.write_bytes(raw[:4] + (len(raw) - 8 + len(extra)).to_bytes(4, "little") + raw[8:i] +
                     extra + raw[i:])
  assert A.load_audio(listed).shape == (2, 8000)
  listed.write_bytes(listed.read_bytes()[:-2])
  with pytest.raises(A.AudioFileError, match="truncated WAV.*32000.*31998"):
    A.load_audio(listed)
  # a streaming writer's header (data size 0xFFFFFFFF: unknown) is not called truncated
  streamed = tmp_path / "streamed.wav"
  streamed.write_bytes(raw[:i + 4] + b"\xff\xff\xff\xff" + raw[i + 8:])
  assert A._riff_data_sizes(str(streamed)) is None
  # a WavWriter's partial file mid-stream is always consistent
  with A.WavWriter(tmp_path / "live.wav", 8000, 1) as w:
    w.append(_sine(440, 8000, 0.5))
    assert A.load_audio(w.partial_path).shape == (1, 4000)


def test_audio_info(tmp_path):
  p = tmp_path / "i.flac"
  A.save_audio(p, _sine(440, 22050, 2.0, channels=2), 22050)
  info = A.audio_info(p)
  assert info["sample_rate"] == 22050 and info["channels"] == 2 and info["frames"] == 44100
  assert abs(info["duration"] - 2.0) < 1e-9


def _strict_read(path):
  """Python's wave module trusts the header's chunk sizes (unlike libsndfile)."""
  with wave.open(os.fspath(path)) as w:
    n = w.getnframes()
    raw = w.readframes(n)
    return n, w.getnchannels(), np.frombuffer(raw, "<i2").reshape(n, w.getnchannels())


def test_wav_writer_valid_after_every_append(tmp_path):
  p = tmp_path / "stream.wav"
  rng = np.random.default_rng(0)
  blocks = [rng.uniform(-0.9, 0.9, (2, n)).astype(np.float32) for n in (1000, 1, 4410, 2048)]
  p.write_bytes(b"the previous result")
  with A.WavWriter(p, 44100, 2) as w:
    part = w.partial_path
    assert part == str(p) + ".partial.wav"
    n, c, _ = _strict_read(part)  # valid (empty) before any block
    assert (n, c) == (0, 2)
    total = 0
    for i, b in enumerate(blocks):
      w.append(b)
      total += b.shape[1]
      assert w.frames_written == total
      # read back while the writer is still open: both a strict and a libsndfile reader
      n, c, pcm = _strict_read(part)
      assert (n, c) == (total, 2)
      back, sr = sf.read(part, dtype="float32")
      assert sr == 44100 and back.shape == (total, 2)
      expect = np.concatenate([x for x in blocks[:i + 1]], axis=1).T
      np.testing.assert_allclose(back, expect, atol=1.0 / 32767)
      assert abs(w.seconds_written - total / 44100) < 1e-12
      assert p.read_bytes() == b"the previous result"  # untouched until the writer commits
  assert w.closed and w.committed and w.written_path == str(p)
  assert sf.info(p).frames == total and not os.path.exists(part)


def test_wav_writer_mono_clip_float(tmp_path):
  p = tmp_path / "m.wav"
  with A.WavWriter(p, 8000, 1) as w:
    w.append(np.array([0.0, 2.0, -3.0], np.float32))  # 1-D mono, clipped
    with pytest.raises(ValueError):
      w.append(np.zeros((2, 10), np.float32))
  y, _ = sf.read(p, dtype="float32")
  np.testing.assert_allclose(y, [0, 1, -1], atol=1e-4)
  pf = tmp_path / "f.wav"
  with A.WavWriter(pf, 8000, 1, subtype="FLOAT", partial=False) as w:  # written in place
    w.append(np.array([0.5, 1.5], np.float32))
    y, _ = sf.read(pf, dtype="float32")
    np.testing.assert_allclose(y, [0.5, 1.5])


def test_wav_writer_survives_exception(tmp_path):
  """An exception inside the block keeps the partial file and never touches the target."""
  p = tmp_path / "interrupted.wav"
  p.write_bytes(b"the previous result")
  with pytest.raises(KeyboardInterrupt):
    with A.WavWriter(p, 8000, 1) as w:
      w.append(np.full((1, 800), 0.25, np.float32))
      raise KeyboardInterrupt
  assert w.closed and not w.committed and w.written_path == A.partial_path(p)
  assert _strict_read(A.partial_path(p))[0] == 800
  assert p.read_bytes() == b"the previous result"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_wav_writer_killed_process_leaves_playable_file(tmp_path, sig):
  """A stream killed mid-way (Ctrl-C, or even SIGKILL with no cleanup) leaves a valid WAV."""
  p = tmp_path / "killed.wav"
  ready = tmp_path / "ready"
  code = textwrap.dedent(f"""
      import numpy as np, os, signal, time
      from lmdm_jax.data.audio import WavWriter
      # a shell that starts jobs in the background passes SIGINT down as ignored: restore Ctrl-C
      signal.signal(signal.SIGINT, signal.default_int_handler)
      w = WavWriter({os.fspath(p)!r}, 16000, 2)
      i = 0
      while True:
        w.append(np.full((2, 1600), 0.1, np.float32))
        i += 1
        if i == 5:
          open({os.fspath(ready)!r}, 'w').close()
        time.sleep(0.01)
      """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=root,
                          env=dict(os.environ, PYTHONPATH=root))
  try:
    t0 = time.time()
    while not ready.exists():
      assert proc.poll() is None, "writer process died"
      assert time.time() - t0 < 60
      time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not p.exists()  # never committed
  n, c, pcm = _strict_read(A.partial_path(p))
  assert c == 2 and n >= 5 * 1600 and n % 1600 == 0
  assert np.all(pcm == pcm[0, 0]) and abs(int(pcm[0, 0]) - 0.1 * 32768) <= 1
