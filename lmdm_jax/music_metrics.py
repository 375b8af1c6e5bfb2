"""Measurable properties of generated music: key, tempo, loudness stability, and how closely a
part follows a melody sketch or a partner. Used by ``bench/music_eval.py``; numpy + librosa.

- key: mean STFT chroma correlated with the 24 rotated Krumhansl-Kessler profiles;
- tempo: ``librosa.beat.beat_track``; errors are folded over octaves (x2, x1/2 count as right);
- loudness: RMS level (dBFS) per window, its spread and slope over the stream; the shares of
  5-s windows above -6 dBFS (runaway) and below -50 dBFS (near-silent); clipped samples;
- sketch adherence: the share of chroma energy in the sketch's pitch class per voiced frame
  (chance: 1/12), and how often it is the strongest pitch class;
- partner agreement: correlation of windowed mean chroma vectors of two parts, against a
  time-shuffled partner; the same measure as a distance between two seeds' outputs;
- memory: correlation of the pitch-class profile of a continuation with its context;
- harmonic motion: how much the pitch-class content changes from one 1-s window to the next.
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


def loud_share(audio: np.ndarray, sr: int, threshold_db: float = -6.0,
               window_s: float = 5.0) -> float:
  """The share of ``window_s`` windows whose RMS level is above ``threshold_db`` dBFS (a runaway
  to full scale; real mastered music stays below -6 dBFS RMS)."""
  return float((loudness_windows(audio, sr, window_s) > threshold_db).mean())


def silent_share(audio: np.ndarray, sr: int, threshold_db: float = -50.0,
                 window_s: float = 5.0) -> float:
  """The share of ``window_s`` windows whose RMS level is below ``threshold_db`` dBFS."""
  return float((loudness_windows(audio, sr, window_s) < threshold_db).mean())


def clipped_samples(audio: np.ndarray, full_scale: float = 1.0) -> int:
  """The number of samples (values, all channels) with ``|x| >= full_scale``: what a WAV writer
  clips. Measure it on the decoder's raw float output, before any writer or limiter."""
  return int((np.abs(np.asarray(audio)) >= full_scale).sum())


def loudness_stability(audio: np.ndarray, sr: int, window_s: float = 5.0) -> dict:
  """RMS level per ``window_s`` window: mean, std (dB; the level-std target), range, slope over
  the stream (dB per minute) and the shares of near-silent (< -50 dBFS) and loud (> -6 dBFS)
  windows."""
  db = loudness_windows(audio, sr, window_s)
  minutes = (np.arange(len(db)) + 0.5) * window_s / 60
  slope = float(np.polyfit(minutes, db, 1)[0]) if len(db) > 1 else 0.0
  return dict(mean_db=float(db.mean()), std_db=float(db.std()), range_db=float(np.ptp(db)),
              slope_db_per_min=slope, silent_windows=silent_share(audio, sr, window_s=window_s),
              loud_windows=loud_share(audio, sr, window_s=window_s))


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


def shuffle_windows(audio: np.ndarray, sr: int, window_s: float = 2.0) -> np.ndarray:
  """A time-shuffled copy: the consecutive ``window_s`` windows rotated by half their count, so
  every window moves (deterministic) while the pitch content is kept; a trailing partial window
  stays in place. The control for ``chroma_agreement`` with a partner."""
  w = int(window_s * sr)
  n = len(audio) // w
  if n < 2:
    raise ValueError(f"shuffle_windows: {len(audio) / sr:.1f} s holds fewer than two "
                     f"{window_s:g}-s windows")
  x = np.asarray(audio)
  head = np.roll(x[:n * w].reshape(n, w), n // 2, axis=0).reshape(-1)
  return np.concatenate([head, x[n * w:]])


def chroma_distance(a: np.ndarray, b: np.ndarray, sr: int, window_s: float = 2.0) -> float:
  """1 - ``chroma_agreement``: 0 for the same pitch content in time, about 1 for unrelated
  content (up to 2 for opposite). Between two seeds of one prompt it says how much the seed
  changes the music."""
  return 1.0 - chroma_agreement(a, b, sr, window_s)


def pitch_profile(audio: np.ndarray, sr: int) -> np.ndarray:
  """The mean chroma (12,) of a stretch of audio: its pitch-class profile."""
  return chroma(audio, sr, hop=2048).mean(0)


def context_correlation(generated: np.ndarray, context: np.ndarray, sr: int,
                        seconds: float = 10.0) -> float:
  """Pearson correlation of the pitch-class profile of the first ``seconds`` of ``generated``
  with that of its ``context`` (the audio it continues): whether a continuation keeps the
  context's key and harmony. NaN when either profile is flat."""
  x = pitch_profile(generated[:int(seconds * sr)], sr)
  y = pitch_profile(context, sr)
  if x.std() < 1e-6 or y.std() < 1e-6:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


def harmonic_motion(audio: np.ndarray, sr: int, window_s: float = 1.0) -> float:
  """Mean over consecutive ``window_s`` windows of 1 - r(mean chroma of window t, of window t+1):
  0 for a held chord, large when the pitch content changes every window. Pairs where either
  window's chroma is flat (silence) are skipped; NaN when none is left."""
  hop = 512
  c = chroma(audio, sr, hop=hop)
  w = max(1, int(window_s * sr / hop))
  m = [c[s:s + w].mean(0) for s in range(0, len(c) - w + 1, w)]
  d = [1.0 - np.corrcoef(x, y)[0, 1] for x, y in zip(m[:-1], m[1:])
       if x.std() > 1e-6 and y.std() > 1e-6]
  return float(np.mean(d)) if d else float("nan")
