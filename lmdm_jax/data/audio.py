"""Audio file I/O: robust loading (any common format, resampled and channel-converted) and an
incremental WAV writer whose file stays playable after every block (a Ctrl-C mid-stream leaves a
valid file).

Outputs never replace an existing file until they are complete: ``WavWriter`` writes to
``partial_path(path)`` (``out.wav`` -> ``out.wav.partial.wav``, same folder) and renames it over
``path`` on ``commit()``; ``save_audio`` writes a temporary file and renames it.

Audio arrays are ``(channels, samples)`` float32 in [-1, 1], as in ``lmdm_jax.codecs.base``.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np

__all__ = [
    "AudioFileError", "load_audio", "audio_info", "convert_channels", "resample", "save_audio",
    "WavWriter", "peak_db", "partial_path", "save_npy", "check_output_path",
]

# libsndfile commands (sndfile.h) that python-soundfile does not name.
_SFC_UPDATE_HEADER_NOW = 0x1060


class AudioFileError(ValueError):
  """An audio file that cannot be used: unreadable, empty, silent or too short.

  The message names the file and the problem; ``path`` and ``reason`` are also attributes.
  """

  def __init__(self, path, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")


def peak_db(audio: np.ndarray) -> float:
  """Peak level in dBFS (-inf for digital silence)."""
  peak = float(np.max(np.abs(audio))) if audio.size else 0.0
  return 20.0 * np.log10(peak) if peak > 0 else float("-inf")


def convert_channels(audio: np.ndarray, channels: int) -> np.ndarray:
  """(c, n) -> (channels, n): mono is duplicated, stereo/multichannel averaged to mono; more than
  two channels to stereo keeps the first two (front left/right in WAV/FLAC channel order)."""
  c = audio.shape[0]
  if channels is None or c == channels:
    return audio
  if channels == 1:
    return audio.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
  if c == 1:
    return np.repeat(audio, channels, axis=0)
  if c > channels:
    return np.ascontiguousarray(audio[:channels])
  raise ValueError(f"cannot convert {c} channels to {channels}")


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
  """Band-limited resampling of (channels, samples) with soxr (librosa as a fallback)."""
  if sr_in == sr_out or audio.shape[-1] == 0:
    return audio
  try:
    import soxr
    out = soxr.resample(np.ascontiguousarray(audio.T), sr_in, sr_out, quality="HQ").T
  except ImportError:  # pragma: no cover - soxr ships with librosa
    import librosa
    out = librosa.resample(audio, orig_sr=sr_in, target_sr=sr_out, res_type="soxr_hq")
  return np.ascontiguousarray(out, dtype=np.float32)


def _read_soundfile(path: str):
  import soundfile as sf
  data, sr = sf.read(path, dtype="float32", always_2d=True)
  return data.T, int(sr)


def _read_librosa(path: str):
  import warnings

  import librosa
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # librosa warns when it falls back to audioread
    data, sr = librosa.load(path, sr=None, mono=False)
  data = np.asarray(data, dtype=np.float32)
  if data.ndim == 1:
    data = data[None]
  return data, int(sr)


def audio_info(path) -> dict:
  """Header facts without decoding: sample_rate, channels, frames, duration (seconds), format.

  Raises AudioFileError when the header is unreadable or a WAV is truncated; MP3s that libsndfile
  cannot read are decoded (slow) to measure them.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise AudioFileError(path, "file does not exist")
  _check_wav_size(path)
  try:
    import soundfile as sf
    info = sf.info(path)
    return dict(sample_rate=int(info.samplerate), channels=int(info.channels),
                frames=int(info.frames), duration=float(info.frames) / info.samplerate,
                format=info.format)
  except Exception:
    data, sr = _load_raw(path)
    return dict(sample_rate=sr, channels=data.shape[0], frames=data.shape[1],
                duration=data.shape[1] / sr, format=os.path.splitext(path)[1].lstrip(".").upper())


def _riff_data_sizes(path: str):
  """(declared, available) bytes of a RIFF/WAVE file's ``data`` chunk, or None when the file is
  not a plain RIFF WAV, has no ``data`` chunk header, or declares an unknown size (0 or
  0xFFFFFFFF, as streaming writers do). Reads only chunk headers."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
      return None
    pos = 12
    while pos + 8 <= size:
      f.seek(pos)
      ck = f.read(8)
      cid, n = ck[:4], int.from_bytes(ck[4:8], "little")
      if cid == b"data":
        if n in (0, 0xFFFFFFFF):
          return None
        return n, size - pos - 8
      pos += 8 + n + (n & 1)  # chunks are padded to even sizes
  return None


def _check_wav_size(path: str) -> None:
  """Raise AudioFileError when a WAV's header claims more sample data than the file holds
  (libsndfile would silently read the shorter part)."""
  sizes = _riff_data_sizes(path)
  if sizes is not None and sizes[0] > sizes[1]:
    raise AudioFileError(path, f"truncated WAV: the header declares {sizes[0]} bytes of audio "
                         f"data but the file holds {sizes[1]}")


def _load_raw(path: str):
  errors = []
  for reader in (_read_soundfile, _read_librosa):
    try:
      return reader(path)
    except Exception as e:  # noqa: BLE001 - every decoder failure is reported together
      errors.append(f"{reader.__name__[6:]}: {type(e).__name__}: {str(e).strip()[:200]}")
  raise AudioFileError(path, "cannot decode audio (" + "; ".join(errors) + ")")


def load_audio(path, sample_rate: Optional[int] = None, channels: Optional[int] = None, *,
               offset: float = 0.0, duration: Optional[float] = None, min_seconds: float = 0.0,
               silence_db: Optional[float] = -60.0) -> np.ndarray:
  """Load an audio file as float32 ``(channels, samples)``.

  Args:
    path: a WAV/FLAC/OGG/MP3/... file (soundfile first; librosa/audioread for what libsndfile lacks).
    sample_rate: resample to this rate (None keeps the file's).
    channels: 1 or 2 (None keeps the file's): mono is duplicated, stereo averaged.
    offset, duration: seconds to cut out (after decoding).
    min_seconds: raise AudioFileError if the (cut) audio is shorter.
    silence_db: raise AudioFileError if the peak is below this many dBFS (None disables).

  Raises:
    AudioFileError: missing, unreadable, empty, truncated (a WAV header claiming more data than
      the file holds), non-finite, silent or too-short audio.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise AudioFileError(path, "file does not exist")
  if os.path.getsize(path) == 0:
    raise AudioFileError(path, "file is empty (0 bytes)")
  _check_wav_size(path)
  data, sr = _load_raw(path)
  if data.shape[-1] == 0:
    raise AudioFileError(path, "contains no audio samples")
  if offset or duration is not None:
    total = data.shape[-1] / sr
    start = int(round(offset * sr))
    stop = None if duration is None else start + int(round(duration * sr))
    data = data[:, start:stop]
    if data.shape[-1] == 0:
      raise AudioFileError(path, f"no audio after offset {offset:.2f} s (file has {total:.2f} s)")
  if not np.all(np.isfinite(data)):
    raise AudioFileError(path, "contains NaN or infinite samples")
  seconds = data.shape[-1] / sr
  if seconds < min_seconds:
    raise AudioFileError(path, f"too short: {seconds:.2f} s < minimum {min_seconds:.2f} s")
  if silence_db is not None:
    level = peak_db(data)
    if level < silence_db:
      raise AudioFileError(path, f"silent: peak {level:.1f} dBFS is below the {silence_db:.1f} dBFS "
                           "threshold")
  data = convert_channels(data, channels)
  if sample_rate is not None:
    data = resample(data, sr, int(sample_rate))
  return np.ascontiguousarray(data, dtype=np.float32)


def _umask_mode():
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


_FILE_MODE = _umask_mode()  # what open() would give (mkstemp makes 0600 files)


def _atomic_target(path: str):
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  base, ext = os.path.splitext(os.path.basename(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=d)
  os.close(fd)
  return tmp


def save_audio(path, audio: np.ndarray, sample_rate: int, subtype: Optional[str] = None,
               atomic: bool = True) -> None:
  """Write (channels, samples) float audio to WAV/FLAC/OGG (by extension), via a temp file and
  rename when ``atomic`` (a crash never leaves a half-written file under ``path``)."""
  import soundfile as sf
  path = os.fspath(path)
  audio = np.asarray(audio, dtype=np.float32)
  if audio.ndim == 1:
    audio = audio[None]
  fmt = os.path.splitext(path)[1].lstrip(".").upper() or "WAV"
  if fmt == "OGG" and subtype is None:
    subtype = "VORBIS"
  target = _atomic_target(path) if atomic else path
  try:
    sf.write(target, audio.T, int(sample_rate), subtype=subtype, format=fmt)
    if atomic:
      os.chmod(target, _FILE_MODE)
      os.replace(target, path)
  finally:
    if atomic and os.path.exists(target):
      os.unlink(target)


def partial_path(path) -> str:
  """Where an output is written until it is complete: ``out.wav`` -> ``out.wav.partial.wav``.

  The same folder (so the final rename is atomic) and the same extension (so players open it).
  A later run to the same output starts this file afresh.
  """
  path = os.fspath(path)
  return path + ".partial" + os.path.splitext(path)[1]


def check_output_path(path) -> str:
  """Raise ValueError when ``path`` cannot be written as a file: it is a folder, or the nearest
  existing folder above it is not a folder or not writable. Returns ``path``."""
  path = os.fspath(path)
  if not path or os.path.isdir(path):
    raise ValueError(f"{path!r} is a folder, not a file name")
  d = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(d):
    d = os.path.dirname(d)
  if not os.path.isdir(d):
    raise ValueError(f"{path}: {d} is a file, not a folder")
  if not os.access(d, os.W_OK | os.X_OK):
    raise ValueError(f"{path}: cannot write in the folder {d}")
  return path


def save_npy(path, array: np.ndarray, partial: bool = False) -> str:
  """``np.save`` that never leaves a half-written file under ``path``: written to
  ``partial_path(path)`` and renamed over ``path`` (``partial=True`` keeps it at the partial name,
  for an interrupted run's output). Returns the path written."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = partial_path(path)
  with open(tmp, "wb") as f:  # a file object: np.save adds no second ".npy"
    np.save(f, array)
  if partial:
    return tmp
  os.replace(tmp, path)
  return path


class WavWriter:
  """Incremental WAV writer: ``append`` blocks as they are produced, ``commit()`` when complete.

  The audio goes to ``partial_path`` (``partial_path(path)``, or ``path`` itself with
  ``partial=False``); ``commit()`` closes the file and renames it over ``path``, so an existing
  file at ``path`` is replaced only by a complete one. ``close()`` without ``commit()`` (an
  interrupted or failed run) leaves the audio at ``partial_path`` and ``path`` untouched. As a
  context manager it commits on a normal exit and only closes when an exception leaves the block.

  After every ``append`` the RIFF/data chunk sizes in the header are rewritten and the file is
  flushed, so the file on disk is a complete, playable WAV at all times: an interrupted stream
  (Ctrl-C, crash) keeps everything written so far. (A plain ``SoundFile.flush`` is not enough:
  libsndfile leaves the sizes at 0 until close, which strict readers reject.)

  Blocks are ``(channels, n)`` float arrays in [-1, 1] (1-D is accepted for mono); values are
  clipped for integer subtypes. ``format='RF64'`` lifts WAV's 4 GiB limit (about 6.7 h of
  44.1 kHz stereo 16-bit).
  """

  def __init__(self, path, sample_rate: int, channels: int, subtype: str = "PCM_16",
               format: str = "WAV", fsync: bool = False, partial: bool = True):
    import soundfile as sf
    self.path = check_output_path(path)
    self.partial_path = partial_path(self.path) if partial else self.path
    self.sample_rate = int(sample_rate)
    self.channels = int(channels)
    self.subtype = subtype
    self.fsync = fsync
    self.committed = False
    self._clip = not subtype.upper().startswith(("FLOAT", "DOUBLE"))
    d = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(d, exist_ok=True)
    self._sf = sf
    self._file = sf.SoundFile(self.partial_path, "w", samplerate=self.sample_rate,
                              channels=self.channels, subtype=subtype, format=format)
    self.frames_written = 0
    self._sync()

  @property
  def seconds_written(self) -> float:
    return self.frames_written / self.sample_rate

  @property
  def closed(self) -> bool:
    return self._file.closed

  @property
  def written_path(self) -> str:
    """Where the audio is now: ``path`` once committed, else ``partial_path``."""
    return self.path if self.committed else self.partial_path

  def _sync(self):
    self._sf._snd.sf_command(self._file._file, _SFC_UPDATE_HEADER_NOW, self._sf._ffi.NULL, 0)
    self._file.flush()
    if self.fsync:
      fd = os.open(self.partial_path, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)

  def append(self, block: np.ndarray) -> None:
    if self._file.closed:
      raise ValueError(f"{self.path}: WavWriter is closed")
    block = np.asarray(block, dtype=np.float32)
    if block.ndim == 1:
      block = block[None]
    if block.ndim != 2 or block.shape[0] != self.channels:
      raise ValueError(f"{self.path}: expected a ({self.channels}, n) block, got {block.shape}")
    if not np.all(np.isfinite(block)):
      raise ValueError(f"{self.path}: block contains NaN or infinite samples")
    if self._clip:
      block = np.clip(block, -1.0, 1.0)
    self._file.write(np.ascontiguousarray(block.T))
    self.frames_written += block.shape[1]
    self._sync()

  def close(self) -> None:
    """Close the file where it is (``partial_path`` unless committed)."""
    if not self._file.closed:
      self._file.close()

  def commit(self) -> str:
    """Close and rename the complete file over ``path``; returns ``path``."""
    if self.committed:
      return self.path
    self.close()
    if self.partial_path != self.path:
      os.replace(self.partial_path, self.path)
    self.committed = True
    return self.path

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is None:
      self.commit()
    else:
      self.close()
    return False

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001
      pass
