"""Sketch-to-music: a melody (hummed/played audio, or MIDI) -> frame-aligned pitch features that
drive a model's sketch channels (extra ``input_add`` channels, LMDM_REFERENCE §5: a roadmap item
there, no reference code; this module defines the convention).

Features per latent frame (``SKETCH_DIM`` = 14 channels):
  [voiced (0/1) | pitch ((midi - 60) / 24, 0 when unvoiced) | chroma one-hot (12, C = 0)]
They are the *last* ``SKETCH_DIM`` extra channels of the model (extra groups come in the order
accompaniment, then sketch; see ``DiTConfig``). Frame g covers the audio around g / frame_rate s.

- audio: ``librosa.pyin`` f0 (C2..C7) at the codec's hop;
- MIDI: ``pretty_midi``, the highest sounding non-drum note per frame ("skyline").

  python3 -m lmdm_jax.data.sketch melody.wav --out sketch.npy   # inspect the features
  python3 sample.py --config my_sketch_config --checkpoint ... --sketch melody.mid
"""
from __future__ import annotations

import argparse
import os

import numpy as np

SKETCH_DIM = 14
MIDI_EXT = (".mid", ".midi")


class SketchError(ValueError):
  pass


def pitch_features(midi: np.ndarray) -> np.ndarray:
  """(frames,) MIDI pitch (float, NaN when unvoiced) -> (frames, SKETCH_DIM) float32."""
  midi = np.asarray(midi, np.float64)
  voiced = np.isfinite(midi)
  out = np.zeros((midi.shape[0], SKETCH_DIM), np.float32)
  out[:, 0] = voiced
  m = np.where(voiced, midi, 60.0)
  out[:, 1] = np.where(voiced, (m - 60.0) / 24.0, 0.0)
  pc = np.mod(np.rint(m).astype(int), 12)
  rows = np.nonzero(voiced)[0]
  out[rows, 2 + pc[rows]] = 1.0
  return out


def melody_from_audio(path, frame_rate: float, frames: int | None = None,
                      sample_rate: int = 22050) -> np.ndarray:
  """pyin f0 of a monophonic recording -> (frames,) MIDI pitch (NaN unvoiced) at ``frame_rate``."""
  import librosa

  from lmdm_jax.data.audio import load_audio
  audio = load_audio(path, sample_rate=sample_rate, channels=1)[0]
  hop = max(1, int(round(sample_rate / frame_rate)))
  f0, voiced, _ = librosa.pyin(audio, fmin=librosa.note_to_hz("C2"),
                               fmax=librosa.note_to_hz("C7"), sr=sample_rate,
                               frame_length=2048, hop_length=hop, center=True)
  midi = np.where(voiced & np.isfinite(f0), librosa.hz_to_midi(np.nan_to_num(f0, nan=1.0)), np.nan)
  # pyin frame j is centred at j * hop / sr; latent frame g at g / frame_rate
  n = frames if frames is not None else int(np.floor(len(audio) / sample_rate * frame_rate))
  idx = np.rint(np.arange(n) / frame_rate * sample_rate / hop).astype(int)
  return np.where(idx < len(midi), midi[np.minimum(idx, len(midi) - 1)], np.nan)


def melody_from_midi(path, frame_rate: float, frames: int | None = None) -> np.ndarray:
  """Skyline melody of a MIDI file -> (frames,) MIDI pitch (NaN where nothing sounds)."""
  try:
    import pretty_midi
  except ImportError as e:  # pragma: no cover - in requirements.txt
    raise SketchError("MIDI sketches need pretty_midi (`pip install pretty_midi`)") from e
  try:
    pm = pretty_midi.PrettyMIDI(os.fspath(path))
  except Exception as e:  # noqa: BLE001
    raise SketchError(f"{path}: cannot read MIDI ({type(e).__name__}: {e})") from e
  notes = [n for inst in pm.instruments if not inst.is_drum for n in inst.notes]
  if not notes:
    raise SketchError(f"{path}: no (non-drum) notes")
  n = frames if frames is not None else int(np.ceil(pm.get_end_time() * frame_rate))
  t = np.arange(n) / frame_rate
  midi = np.full(n, -np.inf)
  for note in notes:
    on = (t >= note.start) & (t < note.end)
    midi[on] = np.maximum(midi[on], note.pitch)
  return np.where(np.isfinite(midi), midi, np.nan)


def check_sketch(path) -> None:
  """Raise SketchError naming the problem when ``path`` is not a usable melody file (missing, empty,
  truncated, undecodable, silent or non-finite audio; unreadable or note-less MIDI). A quick check
  run before a model is loaded; ``load_sketch`` then extracts the features."""
  from lmdm_jax.data.audio import AudioFileError, load_audio
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise SketchError(f"{path}: no such sketch file")
  if path.lower().endswith(MIDI_EXT):
    melody_from_midi(path, 1.0, 1)
    return
  try:
    load_audio(path, channels=1)
  except AudioFileError as e:
    raise SketchError(str(e)) from e


def load_sketch(path, frame_rate: float, frames: int | None = None) -> np.ndarray:
  """A melody file (audio or MIDI) -> (frames, SKETCH_DIM) features; zero-padded past its end."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise SketchError(f"{path}: no such sketch file")
  if path.lower().endswith(MIDI_EXT):
    midi = melody_from_midi(path, frame_rate, frames)
  else:
    from lmdm_jax.data.audio import AudioFileError
    try:
      midi = melody_from_audio(path, frame_rate, frames)
    except AudioFileError as e:
      raise SketchError(str(e)) from e
  if not np.any(np.isfinite(midi)):
    raise SketchError(f"{path}: no pitched (voiced) frames found in the melody")
  return pitch_features(midi)


def place(features: np.ndarray, extra_dim: int) -> np.ndarray:
  """(frames, SKETCH_DIM) -> (frames, extra_dim) with the sketch in the last channels."""
  if extra_dim < SKETCH_DIM:
    raise SketchError(f"the model has {extra_dim} extra input channels; a sketch needs "
                      f"{SKETCH_DIM} (a config with input_add_dim = 1 + io_channels + "
                      f"[accompaniment] + {SKETCH_DIM})")
  out = np.zeros((features.shape[0], extra_dim), np.float32)
  out[:, extra_dim - SKETCH_DIM:] = features
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("melody", help="audio file (monophonic) or .mid")
  ap.add_argument("--frame-rate", type=float, default=22050 / 512, help="latent frames/s (spectral codec)")
  ap.add_argument("--out", default=None, help="save the (frames, 14) features as .npy")
  args = ap.parse_args(argv)
  import math
  import sys
  if not (math.isfinite(args.frame_rate) and 0 < args.frame_rate <= 1000):
    print(f"sketch: error: --frame-rate must be in (0, 1000], got {args.frame_rate}", file=sys.stderr)
    return 2
  try:
    f = load_sketch(args.melody, args.frame_rate)
  except SketchError as e:
    print(f"sketch: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  names = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
  v = f[:, 0] > 0
  hist = f[v, 2:].sum(0)
  print(f"{f.shape[0]} frames ({f.shape[0] / args.frame_rate:.1f} s), {100 * v.mean():.0f}% voiced; "
        "pitch classes: " + " ".join(f"{names[i]}:{int(hist[i])}" for i in np.argsort(-hist)[:5]))
  if args.out:
    from lmdm_jax.data.audio import save_npy
    print(f"wrote {save_npy(args.out, f)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
