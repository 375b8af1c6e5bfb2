"""Melody tracks of a latent dataset, for training the sketch channels.

For every pitched stem of every item (a stem marked ``"pitched": false``, a drum kit, gets an
all-unvoiced track): the stem's pitch per latent frame (``librosa.yin`` f0 of the stem's
audio at the codec's hop, frame g centred on latent frame g; unvoiced where the stem's frame RMS
is more than ``gate_db`` below its loud frames). Rendered stems are single parts, so silence
between notes is a clean voicing cue and yin's f0 is reliable there. The melody of the *mix* is
the skyline of its stems (the highest voiced stem pitch per frame), the same rule that
``lmdm_jax.data.sketch`` applies to MIDI sketches.

Writes ``melody.npz`` in the dataset folder (atomically): ``"<stem key>"`` -> (frames,) float16
MIDI pitch, NaN where unvoiced; ``"<item key>"`` -> the skyline.

  python3 -m lmdm_jax.data.melody data_cache/latents_spectral --audio data_cache/corpus
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

FILE = "melody.npz"


def track(audio: np.ndarray, sample_rate: int, hop: int, frames: int, gate_db: float = 35.0,
          fmin: float = 55.0, fmax: float = 2100.0) -> np.ndarray:
  """Mono audio -> (frames,) MIDI pitch per hop (NaN unvoiced); frame g centred on g * hop."""
  import librosa
  audio = np.asarray(audio, np.float32)
  if audio.size < 4 * hop:
    return np.full(frames, np.nan, np.float32)
  fl = 4 * hop
  f0 = librosa.yin(audio, fmin=fmin, fmax=fmax, sr=sample_rate, frame_length=fl, hop_length=hop,
                   center=True)
  rms = librosa.feature.rms(y=audio, frame_length=fl, hop_length=hop, center=True)[0]
  db = 20 * np.log10(rms + 1e-9)
  loud = np.percentile(db, 95) if db.size else -200.0
  voiced = (db > loud - gate_db) & (db > -70.0)
  midi = np.where(voiced, librosa.hz_to_midi(np.maximum(f0, 1.0)), np.nan).astype(np.float32)
  out = np.full(frames, np.nan, np.float32)
  m = min(frames, midi.shape[0])
  out[:m] = midi[:m]
  return out


def skyline(tracks: list, frames: int) -> np.ndarray:
  """Highest voiced pitch over tracks per frame (NaN where none is voiced)."""
  if not tracks:
    return np.full(frames, np.nan, np.float32)
  st = np.stack([t[:frames] for t in tracks])
  with np.errstate(all="ignore"):
    top = np.nanmax(np.where(np.isfinite(st), st, -np.inf), axis=0)
  return np.where(np.isfinite(top), top, np.nan).astype(np.float32)


def _stem_audio(path: str):
  import soundfile as sf
  audio, sr = sf.read(path, dtype="float32", always_2d=True)
  return audio.mean(axis=1), sr


def build(dataset_dir: str, audio_root: str, log=print) -> str:
  """Tracks every stem of the dataset at ``dataset_dir``; stems are found relative to the item's
  source file under ``audio_root``. Returns the path of the written ``melody.npz``."""
  from tqdm import tqdm
  meta = json.load(open(os.path.join(dataset_dir, "dataset.json")))
  recs = [json.loads(line) for line in open(os.path.join(dataset_dir, "metadata.jsonl"))]
  frame_rate = meta["frame_rate"]
  out, missing = {}, 0
  for r in tqdm(recs, desc="melody", unit="item"):
    tracks = []
    for s in r.get("stems", []):
      if s.get("pitched") is False:  # a drum kit: no melody, and none in the skyline
        out[s["key"]] = np.full(r["frames"], np.nan, np.float16)
        continue
      p = os.path.normpath(os.path.join(audio_root, s["source"]))
      if not os.path.isfile(p):
        missing += 1
        continue
      audio, sr = _stem_audio(p)
      hop = sr / frame_rate
      if abs(hop - round(hop)) > 1e-6:
        raise ValueError(f"{p}: sample rate {sr} is not an integer multiple of the latent frame "
                         f"rate {frame_rate} (hop {hop})")
      t = track(audio, sr, int(round(hop)), r["frames"])
      out[s["key"]] = t.astype(np.float16)
      tracks.append(t)
    out[r["key"]] = skyline(tracks, r["frames"]).astype(np.float16)
  if missing:
    log(f"[melody] {missing} stem file(s) not found under {audio_root} (their items get no melody)")
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".npz", dir=dataset_dir)
  with os.fdopen(fd, "wb") as f:
    np.savez(f, **out)
  dst = os.path.join(dataset_dir, FILE)
  os.replace(tmp, dst)
  log(f"[melody] wrote {dst}: {len(out)} tracks")
  return dst


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("dataset", help="a latent dataset folder (lmdm_jax.data.dataset)")
  ap.add_argument("--audio", required=True, help="the folder the dataset was built from")
  args = ap.parse_args(argv)
  build(args.dataset, args.audio)


if __name__ == "__main__":
  main()
