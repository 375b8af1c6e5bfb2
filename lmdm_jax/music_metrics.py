"""Measurable properties of generated music: key, tempo, loudness stability, and how closely a
part follows a melody sketch or a partner. Used by ``bench/music_eval.py``; numpy + librosa.

- key: mean STFT chroma correlated with the 24 rotated Krumhansl-Kessler profiles;
- tempo: ``librosa.beat.beat_track``; errors are folded over octaves (x2, x1/2 count as right);
- loudness: RMS level (dBFS) per window, its spread and slope over the stream;
- sketch adherence: the share of chroma energy in the sketch's pitch class per voiced frame
  (chance: 1/12), and how often it is the strongest pitch class;
- partner agreement: correlation of windowed mean chroma vectors of two parts.
"""
from __future__ import annotations

import re

import numpy as np

MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
NAMES = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
_LETTER = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


def pitch_class(name: str) -> int:
  """'D', 'B-', 'Bb', 'F#', 'c#' -> 0..11 (music21 writes flats as '-')."""
  m = re.fullmatch(r"\s*([A-Ga-g])([#b\-]*)\s*", name)
  if not m:
    raise ValueError(f"not a pitch name: {name!r}")
  pc = _LETTER[m.group(1).upper()]
  pc += m.group(2).count("#") - m.group(2).count("b") - m.group(2).count("-")
  return pc % 12


def chroma(audio: np.ndarray, sr: int, hop: int = 512, n_fft: int = 4096) -> np.ndarray:
  """(frames, 12) STFT chroma, frame g centred on sample g * hop."""
  import librosa
  return librosa.feature.chroma_stft(y=np.asarray(audio, np.float32), sr=sr, n_fft=n_fft,
                                     hop_length=hop, center=True).T


def estimate_key(audio: np.ndarray, sr: int) -> tuple:
  """-> (tonic pitch class, 'major'|'minor', correlation)."""
  prof = chroma(audio, sr, hop=2048).mean(0)
  best = (0, "major", -2.0)
  for mode, p in (("major", MAJOR), ("minor", MINOR)):
    for k in range(12):
      r = np.corrcoef(prof, np.roll(p, k))[0, 1]
      if np.isfinite(r) and r > best[2]:
        best = (k, mode, float(r))
  return best


def key_relation(est: tuple, true: tuple) -> str:
  """'exact', 'related' (relative, parallel, or a fifth away in the same mode) or 'other'."""
  (ek, em), (tk, tm) = est[:2], true[:2]
  if (ek, em) == (tk, tm):
    return "exact"
  rel = (tk + 9) % 12 if tm == "major" else (tk + 3) % 12
  if (em != tm and ek == rel) or (em != tm and ek == tk) or (em == tm and (ek - tk) % 12 in (5, 7)):
    return "related"
  return "other"


def estimate_tempo(audio: np.ndarray, sr: int) -> float:
  import librosa
  t, _ = librosa.beat.beat_track(y=np.asarray(audio, np.float32), sr=sr)
  return float(np.atleast_1d(t)[0])


def tempo_error(est: float, true: float) -> float:
  """|log2(est / true)| folded over octaves: 0 is right, 0.11 is 8 % off, 0.58 is 3:2."""
  if est <= 0 or true <= 0:
    return float("inf")
  e = np.log2(est / true)
  return float(abs(e - np.round(e)))


def loudness_windows(audio: np.ndarray, sr: int, window_s: float = 5.0) -> np.ndarray:
  """RMS level in dBFS of consecutive windows (a trailing partial window is dropped)."""
  w = int(window_s * sr)
  n = len(audio) // w
  x = np.asarray(audio[: n * w], np.float64).reshape(n, w)
  return 20 * np.log10(np.sqrt((x ** 2).mean(1)) + 1e-9)


def loudness_stability(audio: np.ndarray, sr: int, window_s: float = 5.0) -> dict:
  db = loudness_windows(audio, sr, window_s)
  minutes = (np.arange(len(db)) + 0.5) * window_s / 60
  slope = float(np.polyfit(minutes, db, 1)[0]) if len(db) > 1 else 0.0
  return dict(mean_db=float(db.mean()), std_db=float(db.std()), range_db=float(np.ptp(db)),
              slope_db_per_min=slope, silent_windows=float((db < -50).mean()))


def sketch_adherence(audio: np.ndarray, sr: int, hop: int, midi: np.ndarray) -> dict:
  """Per voiced sketch frame g (MIDI pitch, NaN unvoiced; frame g centred on g * hop): the share
  of the output's chroma energy in the sketch's pitch class, and whether it is the top class."""
  c = chroma(audio, sr, hop=hop, n_fft=2048)
  n = min(len(c), len(midi))
  v = np.isfinite(midi[:n])
  if not v.any():
    return dict(share=float("nan"), top1=float("nan"), frames=0)
  pc = np.mod(np.rint(midi[:n][v]).astype(int), 12)
  cv = c[:n][v]
  share = cv[np.arange(len(pc)), pc] / np.maximum(cv.sum(1), 1e-9)
  top1 = cv.argmax(1) == pc
  return dict(share=float(share.mean()), top1=float(top1.mean()), frames=int(v.sum()))


def chroma_agreement(a: np.ndarray, b: np.ndarray, sr: int, window_s: float = 2.0) -> float:
  """Mean correlation of the windowed mean chroma of two parts (same rate, aligned)."""
  hop = 512
  ca, cb = chroma(a, sr, hop=hop), chroma(b, sr, hop=hop)
  n = min(len(ca), len(cb))
  w = max(1, int(window_s * sr / hop))
  rs = []
  for s in range(0, n - w + 1, w):
    x, y = ca[s:s + w].mean(0), cb[s:s + w].mean(0)
    if x.std() > 1e-6 and y.std() > 1e-6:
      rs.append(np.corrcoef(x, y)[0, 1])
  return float(np.mean(rs)) if rs else float("nan")
