"""Pre-encoded latent datasets: a folder of captioned audio -> latent shards, and a reader that
yields seeded random crops for training.

Input: audio files (wav/flac/ogg/mp3/...) with captions, given either
  * per file, a sidecar with the same name: ``song.txt`` (the caption) or ``song.json`` (a
    ``caption`` field, or ``text``/``prompt``/``description``; other fields are kept as ``info``;
    a ``stems`` list, of paths or ``{"file": ..., "name": ...}``, relative to the sidecar, names the
    aligned stems of the piece, as ``lmdm_jax.data.corpus`` writes them), or
  * one listing, ``--captions FILE`` (or ``captions.csv``/``captions.jsonl`` in the audio folder):
    CSV with ``path,caption`` columns or JSONL with ``path``/``caption`` (and optional ``stems``),
    paths relative to the listing.
  Every named file (item or stem) must lie inside the audio folder (or the listing's folder): an
  absolute path or one that climbs out (``../..``) is refused with an error naming the entry.

Output folder:
  ``dataset.json``      codec name and geometry, latent dtype, format version
  ``shard_NNNNN.npz``   latents ``(frames, latent_dim)`` keyed ``"<item>"``; stems ``"<item>_s<k>"``
  ``metadata.jsonl``    one line per finished item: caption, source, shard, key, frames, duration,
                        stems, info. This is also the manifest a resumed build skips by.
  ``bad_files.jsonl``   files that could not be used, with the reason; ``report.json`` the counts.

A shard is written (temp file + rename) before its items' metadata lines are appended, so an
interrupted build loses at most the items of the shard in progress and a rerun continues.

  python3 -m lmdm_jax.data.dataset --audio data_cache/corpus --out data_cache/latents \
      --codec lmdm_jax.codecs.mel:MelCodec
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lmdm_jax.codecs.base import Codec
from lmdm_jax.data.audio import AudioFileError, load_audio

log = logging.getLogger("lmdm_jax.data.dataset")

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".m4a", ".opus", ".wv")
CAPTION_KEYS = ("caption", "text", "prompt", "description")
FORMAT_VERSION = 1
# Fraction of sources (pieces) held out for evaluation, by hash. Recorded in dataset.json; folders
# built before it was recorded held out 0.05 (3 of the demo corpus's 79 pieces: too few for
# drift and music statistics), new ones 0.15 (11 of 79).
DEFAULT_HOLDOUT = 0.15
LEGACY_HOLDOUT = 0.05


def _check_holdout(h: float) -> float:
  h = float(h)
  if not 0.0 <= h < 1.0:
    raise ValueError(f"holdout must be a fraction in [0, 1), not {h}")
  return h


def _umask_mode():
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


_FILE_MODE = _umask_mode()  # what open() would give (mkstemp makes 0600 files)


# ---------------------------------------------------------------------------------------------
# Codecs by name


def get_codec(name: str, **kwargs) -> Codec:
  """A codec from a name:

  * ``"package.module:Name"``: ``Name`` (a Codec subclass or a factory) called with ``kwargs``;
  * a name ``lmdm_jax.codecs`` knows (its ``get_codec(name, **kw)`` or ``CODECS[name]``);
  * ``"module"`` (``lmdm_jax.codecs.module`` or an importable module) holding exactly one concrete
    Codec subclass.
  """
  if ":" in name:
    mod, attr = name.split(":", 1)
    obj = getattr(importlib.import_module(mod), attr)
    codec = obj(**kwargs)
  else:
    codec = None
    pkg = importlib.import_module("lmdm_jax.codecs")
    if hasattr(pkg, "get_codec"):
      try:
        codec = pkg.get_codec(name, **kwargs)
      except (KeyError, ValueError):
        codec = None
    if codec is None and name in getattr(pkg, "CODECS", {}):
      codec = pkg.CODECS[name](**kwargs)
    if codec is None:
      mod = None
      for cand in (f"lmdm_jax.codecs.{name}", name):
        try:
          mod = importlib.import_module(cand)
          break
        except ImportError:
          continue
      if mod is None:
        raise ValueError(f"unknown codec {name!r}: use 'module:Class', a name registered in "
                         "lmdm_jax.codecs, or a module with one Codec subclass")
      classes = [c for _, c in inspect.getmembers(mod, inspect.isclass)
                 if issubclass(c, Codec) and not inspect.isabstract(c) and c.__module__ == mod.__name__]
      if len(classes) != 1:
        raise ValueError(f"codec module {mod.__name__} has {len(classes)} Codec classes "
                         f"({[c.__name__ for c in classes]}): name one as 'module:Class'")
      codec = classes[0](**kwargs)
  if not isinstance(codec, Codec):
    raise TypeError(f"{name!r} gave {type(codec).__name__}, not a lmdm_jax.codecs.base.Codec")
  return codec


def codec_geometry(codec: Codec) -> dict:
  return dict(sample_rate=int(codec.sample_rate), channels=int(codec.channels), hop=int(codec.hop),
              latent_dim=int(codec.latent_dim), frame_rate=float(codec.frame_rate))


# ---------------------------------------------------------------------------------------------
# Finding captioned audio


@dataclass
class Item:
  source: str  # path relative to the audio folder (posix), the item's identity
  path: str
  caption: Optional[str]
  info: dict = field(default_factory=dict)
  stems: list = field(default_factory=list)  # [{"name", "path", "source", ...}]


def _read_sidecar(audio_path: str, audio_dir: str):
  """(caption, info, stems) from ``x.json`` or ``x.txt`` beside ``x.<ext>``; None if absent.
  ValueError when a stem lies outside ``audio_dir``."""
  base = os.path.splitext(audio_path)[0]
  if os.path.isfile(base + ".json"):
    with open(base + ".json", encoding="utf-8") as f:
      data = json.load(f)
    if isinstance(data, str):
      return data.strip(), {}, []
    caption = next((data[k] for k in CAPTION_KEYS if isinstance(data.get(k), str)), None)
    stems = _parse_stems(data.get("stems"), os.path.dirname(audio_path), [audio_dir],
                         base + ".json")
    info = {k: v for k, v in data.items() if k not in ("stems",) + CAPTION_KEYS}
    return caption, info, stems
  if os.path.isfile(base + ".txt"):
    with open(base + ".txt", encoding="utf-8") as f:
      return f.read().strip(), {}, []
  return None


def _inside(path: str, folder: str) -> bool:
  folder = os.path.abspath(folder)
  return os.path.commonpath([os.path.abspath(path), folder]) == folder


def _confined(entry: str, rel_to: str, roots, what: str) -> str:
  """``rel_to/entry``, normalised; ValueError naming ``entry`` when it is absolute or leaves every
  folder in ``roots`` (a dataset's files stay inside its own folders)."""
  if os.path.isabs(entry) or os.path.splitdrive(entry)[0]:
    raise ValueError(f"{what} {entry!r}: an absolute path; name files relative to the audio folder")
  p = os.path.normpath(os.path.join(rel_to, entry))
  if not any(_inside(p, r) for r in roots):
    raise ValueError(f"{what} {entry!r} points outside the audio folder "
                     f"({', '.join(os.path.abspath(r) for r in roots)})")
  return p


def _parse_stems(stems, rel_to, roots, where: str) -> list:
  """A ``stems`` list -> [{"name", "path", ...}]; each file must lie inside one of ``roots``."""
  out = []
  for i, s in enumerate(stems or []):
    if isinstance(s, str):
      s = {"file": s}
    if not isinstance(s, dict):
      raise ValueError(f"{where}: stem entry {i} is neither a path nor an object: {s!r}")
    f = s.get("file") or s.get("path")
    if not f:
      continue
    if not isinstance(f, str):
      raise ValueError(f"{where}: stem entry {i} has a non-text file name: {f!r}")
    p = _confined(f.strip(), rel_to, roots, f"{where}: stem entry {i}")
    d = {k: v for k, v in s.items() if k not in ("file", "path")}
    d.setdefault("name", os.path.splitext(os.path.basename(f))[0])
    d["path"] = p
    out.append(d)
  return out


def _read_listing(listing: str, audio_dir: str) -> list:
  root = os.path.dirname(os.path.abspath(listing))
  rows = []
  if listing.endswith((".jsonl", ".ndjson")):
    with open(listing, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        line = line.strip()
        if not line:
          continue
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{listing}:{n}: not JSON ({e})") from e
  else:
    with open(listing, encoding="utf-8", newline="") as f:
      rows = list(csv.DictReader(f))
  items = []
  for r in rows:
    p = r.get("path") or r.get("file") or r.get("audio")
    if not p or not isinstance(p, str):
      raise ValueError(f"{listing}: a row without a path column: {r}")
    for base in (root, audio_dir):
      full = _confined(p, base, (audio_dir, root), f"{listing}: path")
      if os.path.exists(full):
        break
    caption = next((r[k] for k in CAPTION_KEYS if isinstance(r.get(k), str)), None)
    stems = r.get("stems")
    if isinstance(stems, str):  # CSV: paths separated by ';' or '|'
      stems = [s for s in re.split(r"[;|]", stems) if s.strip()]
    info = {k: v for k, v in r.items() if k not in ("path", "file", "audio", "stems") + CAPTION_KEYS}
    try:
      source = os.path.relpath(full, audio_dir)
    except ValueError:
      source = full
    if source.startswith(".."):
      source = os.path.relpath(full, root)
    items.append(Item(source=source.replace(os.sep, "/"), path=full,
                      caption=caption.strip() if caption else caption, info=info,
                      stems=_parse_stems(stems, os.path.dirname(full), (audio_dir, root),
                                         f"{listing} (row for {p!r})")))
  return items


def find_items(audio_dir: str, captions: Optional[str] = None) -> list:
  """Every captioned audio file under ``audio_dir`` in a deterministic (sorted) order.

  Files named as another file's stems are not items themselves. Files with no caption are
  returned with ``caption=None`` (the builder reports them).
  """
  audio_dir = os.path.abspath(audio_dir)
  if captions is None:
    for name in ("captions.jsonl", "captions.csv"):
      if os.path.isfile(os.path.join(audio_dir, name)):
        captions = os.path.join(audio_dir, name)
        break
  if captions is not None:
    items = _read_listing(captions, audio_dir)
  else:
    items = []
    for dirpath, dirnames, filenames in os.walk(audio_dir):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for fn in sorted(filenames):
        if fn.startswith(".") or not fn.lower().endswith(AUDIO_EXTS):
          continue
        p = os.path.join(dirpath, fn)
        try:
          side = _read_sidecar(p, audio_dir)
        except (OSError, ValueError) as e:
          side = (None, {"sidecar_error": f"{type(e).__name__}: {e}"}, [])
        caption, info, stems = side if side is not None else (None, {}, [])
        items.append(Item(source=os.path.relpath(p, audio_dir).replace(os.sep, "/"), path=p,
                          caption=caption, info=info, stems=stems))
  stem_paths = {os.path.abspath(s["path"]) for it in items for s in it.stems}
  items = [it for it in items if os.path.abspath(it.path) not in stem_paths]
  items.sort(key=lambda it: it.source)
  for it in items:
    for s in it.stems:
      s["source"] = os.path.relpath(s["path"], audio_dir).replace(os.sep, "/")
  return items


# ---------------------------------------------------------------------------------------------
# Building


def _load_metadata(path: str) -> list:
  """Finished items; a torn last line (a crash while appending) is dropped."""
  out = []
  if not os.path.isfile(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        log.warning("%s: dropping an unreadable line (interrupted write)", path)
  return out


def _write_json(path: str, obj) -> None:
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=os.path.dirname(path))
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False)
  os.chmod(tmp, _FILE_MODE)
  os.replace(tmp, path)


class _ShardWriter:
  def __init__(self, out_dir: str, next_shard: int, next_item: int, shard_items: int,
               shard_bytes: int):
    self.out_dir = out_dir
    self.shard = next_shard
    self.next_item = next_item
    self.shard_items = shard_items
    self.shard_bytes = shard_bytes
    self.arrays = {}
    self.records = []
    self.nbytes = 0

  def add(self, latents: np.ndarray, stems: list, record: dict) -> None:
    key = f"{self.next_item:07d}"
    self.next_item += 1
    self.arrays[key] = latents
    record.update(key=key, shard=f"shard_{self.shard:05d}.npz")
    for k, (arr, srec) in enumerate(stems):
      self.arrays[f"{key}_s{k}"] = arr
      srec["key"] = f"{key}_s{k}"
    self.nbytes += latents.nbytes + sum(a.nbytes for a, _ in stems)
    self.records.append(record)
    if len(self.records) >= self.shard_items or self.nbytes >= self.shard_bytes:
      self.flush()

  def flush(self) -> None:
    if not self.records:
      return
    name = f"shard_{self.shard:05d}.npz"
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".npz", dir=self.out_dir)
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **self.arrays)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, os.path.join(self.out_dir, name))
    with open(os.path.join(self.out_dir, "metadata.jsonl"), "a", encoding="utf-8") as f:
      for r in self.records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
    self.shard += 1
    self.arrays, self.records, self.nbytes = {}, [], 0


def _to_dtype(x: np.ndarray, dtype) -> np.ndarray:
  dt = np.dtype(dtype)
  if dt == np.float16 and np.max(np.abs(x), initial=0.0) > 6e4:
    return x.astype(np.float32)  # would overflow: keep this one in float32
  return x.astype(dt)


def _encode(codec: Codec, audio: np.ndarray, what: str) -> np.ndarray:
  z = np.asarray(codec.encode(audio))
  if z.ndim == 3 and z.shape[0] == 1:
    z = z[0]
  if z.ndim != 2 or z.shape[1] != codec.latent_dim:
    raise ValueError(f"{what}: codec returned shape {z.shape}, expected (frames, "
                     f"{codec.latent_dim})")
  if z.shape[0] == 0:
    raise ValueError(f"{what}: codec returned no frames")
  if not np.all(np.isfinite(z)):
    raise ValueError(f"{what}: codec returned NaN/inf latents")
  return z.astype(np.float32, copy=False)


def build_dataset(audio_dir: str, out_dir: str, codec: Codec, codec_name: str = "",
                  captions: Optional[str] = None, dtype: str = "float16", shard_items: int = 64,
                  shard_mb: float = 256.0, min_seconds: float = 1.0,
                  silence_db: Optional[float] = -60.0, stems: bool = True,
                  allow_missing_captions: bool = False, limit: Optional[int] = None,
                  progress: bool = True, holdout: float = DEFAULT_HOLDOUT) -> dict:
  """Encode every captioned file under ``audio_dir`` into latent shards in ``out_dir``.

  ``holdout``: the fraction of sources held out (by hash, ``LatentDataset.split``), recorded in
  ``dataset.json`` so training and every benchmark agree on the split.
  Resumable: items already in ``metadata.jsonl`` are skipped. A file that fails (unreadable,
  silent, too short, no caption, codec error) is recorded in ``bad_files.jsonl`` and counted; the
  build goes on. Returns the report (also written to ``report.json``).
  """
  os.makedirs(out_dir, exist_ok=True)
  geo = codec_geometry(codec)
  ds_json = os.path.join(out_dir, "dataset.json")
  header = dict(format_version=FORMAT_VERSION, codec=codec_name or type(codec).__name__,
                codec_class=f"{type(codec).__module__}:{type(codec).__qualname__}",
                dtype=str(np.dtype(dtype)), **geo, holdout=_check_holdout(holdout))
  if os.path.isfile(ds_json):
    with open(ds_json) as f:
      old = json.load(f)
    mismatch = {k: (old.get(k), v) for k, v in header.items()
                if k in ("sample_rate", "channels", "hop", "latent_dim", "codec") and old.get(k) != v}
    if mismatch:
      raise ValueError(f"{out_dir} was built with another codec: {mismatch}; use a new folder")
    old_h = float(old.get("holdout", LEGACY_HOLDOUT))
    if old_h != header["holdout"]:
      raise ValueError(f"{ds_json}: built with holdout {old_h}, not {header['holdout']}; pass "
                       f"--holdout {old_h} to resume it, or use a new folder")
  else:
    _write_json(ds_json, header)
  meta_path = os.path.join(out_dir, "metadata.jsonl")
  finished = _load_metadata(meta_path)
  # rewrite the metadata without torn lines; forget shards no finished item points to
  if finished:
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".jsonl", dir=out_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for r in finished:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, meta_path)
  used = {r["shard"] for r in finished}
  for fn in os.listdir(out_dir):
    if (fn.startswith("shard_") and fn.endswith(".npz") and fn not in used) or fn.startswith(".tmp_"):
      os.unlink(os.path.join(out_dir, fn))  # written by an interrupted run, never recorded
  done = {r["source"] for r in finished}
  next_shard = 1 + max((int(r["shard"][6:11]) for r in finished), default=-1)
  next_item = 1 + max((int(r["key"]) for r in finished), default=-1)
  writer = _ShardWriter(out_dir, next_shard, next_item, shard_items, int(shard_mb * 2 ** 20))

  items = find_items(audio_dir, captions)
  todo = [it for it in items if it.source not in done]
  if limit is not None:
    todo = todo[:limit]
  bad_path = os.path.join(out_dir, "bad_files.jsonl")
  bad_run = []
  stem_problems = 0
  frames_new = 0
  t0 = time.time()
  try:
    from tqdm import tqdm
    bar = tqdm(todo, desc="encode", unit="file", disable=not progress, dynamic_ncols=True)
  except ImportError:  # pragma: no cover
    bar = todo
  try:
    for it in bar:
      try:
        if "sidecar_error" in it.info:
          raise AudioFileError(it.path, f"unusable sidecar: {it.info['sidecar_error']}")
        if it.caption is None and not allow_missing_captions:
          raise AudioFileError(it.path, "no caption (no .txt/.json sidecar or listing entry)")
        audio = load_audio(it.path, codec.sample_rate, codec.channels, min_seconds=min_seconds,
                           silence_db=silence_db)
        z = _encode(codec, audio, it.source)
      except KeyboardInterrupt:
        raise
      except Exception as e:  # noqa: BLE001 - one bad file never stops the build
        reason = e.reason if isinstance(e, AudioFileError) else f"{type(e).__name__}: {e}"
        rec = dict(source=it.source, reason=str(reason)[:500])
        bad_run.append(rec)
        log.warning("skipping %s: %s", it.source, rec["reason"])
        continue
      stem_out = []
      if stems and it.stems:
        try:
          for s in it.stems:
            sa = load_audio(s["path"], codec.sample_rate, codec.channels, silence_db=None)
            n = audio.shape[1]
            sa = np.pad(sa, ((0, 0), (0, max(0, n - sa.shape[1]))))[:, :n]  # align to the mix
            sz = _encode(codec, sa, s["source"])
            if sz.shape[0] != z.shape[0]:
              raise ValueError(f"stem {s['source']}: {sz.shape[0]} frames, mix {z.shape[0]}")
            srec = {k: v for k, v in s.items() if k != "path"}
            stem_out.append((_to_dtype(sz, dtype), srec))
        except KeyboardInterrupt:
          raise
        except Exception as e:  # noqa: BLE001 - keep the mix without stems
          stem_problems += 1
          log.warning("%s: stems left out: %s", it.source, e)
          stem_out = []
      zd = _to_dtype(z, dtype)
      frames_new += z.shape[0]
      record = dict(source=it.source, caption=it.caption or "", frames=int(z.shape[0]),
                    duration=round(audio.shape[1] / codec.sample_rate, 4),
                    latent_dim=int(z.shape[1]), dtype=str(zd.dtype),
                    stems=[r for _, r in stem_out], info=it.info)
      writer.add(zd, stem_out, record)
    writer.flush()
  except KeyboardInterrupt:
    writer.flush()  # keep what was encoded
    raise
  finally:
    if bad_run:
      with open(bad_path, "a", encoding="utf-8") as f:
        for r in bad_run:
          f.write(json.dumps(r, ensure_ascii=False) + "\n")
  all_done = _load_metadata(meta_path)
  done_sources = {r["source"] for r in all_done}
  bad_all = {}
  for r in _load_metadata(bad_path):
    if r["source"] not in done_sources:  # a later run may have succeeded
      bad_all[r["source"]] = r["reason"]
  frames_total = sum(r["frames"] for r in all_done)
  report = dict(
      items=len(all_done), items_new=len(all_done) - len(done), bad_this_run=len(bad_run),
      bad_total=len(bad_all), bad=[dict(source=k, reason=v) for k, v in sorted(bad_all.items())],
      items_without_stems_after_error=stem_problems,
      items_with_stems=sum(1 for r in all_done if r["stems"]),
      frames=frames_total, hours=round(frames_total / geo["frame_rate"] / 3600, 4),
      shards=len({r["shard"] for r in all_done}), seconds=round(time.time() - t0, 2),
      frames_new=frames_new, codec=header["codec"], **geo)
  _write_json(os.path.join(out_dir, "report.json"), report)
  if bad_run:
    warnings.warn(f"{len(bad_run)} files skipped (see {bad_path}): "
                  + "; ".join(f"{r['source']}: {r['reason']}" for r in bad_run[:3])
                  + (" ..." if len(bad_run) > 3 else ""), RuntimeWarning)
  return report


# ---------------------------------------------------------------------------------------------
# Reading


class LatentDataset:
  """Random crops of ``crop_frames`` latent frames with their captions (and aligned stems).

  Deterministic: row i of ``batch(step, batch_size)`` depends only on (seed, step, i) and the
  dataset, so training resumed at step k sees the same data as an uninterrupted run, and
  ``batch(step, batch_size, rows)`` reads only some rows (one process's share of a global batch).
  Items are drawn in proportion to their number of crop positions (``weighting="frames"``:
  every frame equally likely) or uniformly (``"items"``). Items shorter than ``crop_frames`` are
  zero-padded (``mask`` marks the real frames) unless ``min_frames`` excludes them.

  A batch is a dict: ``latents`` (B, n, D) float32, ``mask`` (B, n) bool, ``captions`` [B],
  ``index`` (B,) item indices, ``start`` (B,) crop starts, and when stems are present
  ``stems`` (B, S, n, D), ``stem_mask`` (B, S) bool, ``stem_names`` [B][S]; with a ``melody.npz``
  (``lmdm_jax.data.melody``) also ``melody`` (B, n) and ``stem_melody`` (B, S, n) MIDI pitch (NaN
  unvoiced).
  """

  def __init__(self, root: str, crop_frames: int, seed: int = 0, stems: bool = True,
               weighting: str = "frames", min_frames: int = 1, indices=None,
               preload: bool = True, max_stems: Optional[int] = None, cache_shards: int = 8):
    self.root = root
    self.crop_frames = int(crop_frames)
    self.seed = int(seed)
    with open(os.path.join(root, "dataset.json")) as f:
      self.info = json.load(f)
    records = _load_metadata(os.path.join(root, "metadata.jsonl"))
    if indices is not None:
      records = [records[i] for i in indices]
    self.records = [r for r in records if r["frames"] >= min_frames]
    if not self.records:
      raise ValueError(f"{root}: no items with at least {min_frames} frames")
    self.latent_dim = int(self.info["latent_dim"])
    self.frame_rate = float(self.info["frame_rate"])
    self.use_stems = stems and any(r["stems"] for r in self.records)
    self.max_stems = max_stems if max_stems is not None else max(
        (len(r["stems"]) for r in self.records), default=0)
    frames = np.array([r["frames"] for r in self.records])
    if weighting == "frames":
      w = np.maximum(frames - self.crop_frames + 1, 1).astype(np.float64)
    elif weighting == "items":
      w = np.ones(len(frames))
    else:
      raise ValueError(f"weighting must be 'frames' or 'items', not {weighting!r}")
    self.probs = w / w.sum()
    self._cdf = np.cumsum(self.probs)
    self._cdf[-1] = 1.0
    self._shards = {}
    mel = os.path.join(root, "melody.npz")  # optional: ``python3 -m lmdm_jax.data.melody``
    self.melody = None
    if os.path.exists(mel):
      with np.load(mel) as z:
        self.melody = {k: z[k].astype(np.float32) for k in z.files}
    if preload:
      for name in sorted({r["shard"] for r in self.records}):
        self._shards[name] = self._read_shard(name)
    else:
      self._load = functools.lru_cache(maxsize=cache_shards)(self._read_shard)

  def _read_shard(self, name):
    with np.load(os.path.join(self.root, name)) as z:
      return {k: z[k] for k in z.files}

  def _shard(self, name):
    if name in self._shards:
      return self._shards[name]
    return self._load(name)

  def __len__(self):
    return len(self.records)

  @property
  def hours(self) -> float:
    return sum(r["frames"] for r in self.records) / self.frame_rate / 3600

  def latents(self, i: int) -> np.ndarray:
    r = self.records[i]
    return self._shard(r["shard"])[r["key"]]

  def stem_latents(self, i: int) -> list:
    r = self.records[i]
    sh = self._shard(r["shard"])
    return [sh[s["key"]] for s in r["stems"]]

  def item(self, i: int) -> dict:
    r = self.records[i]
    return dict(latents=self.latents(i).astype(np.float32), caption=r["caption"],
                stems=[s.astype(np.float32) for s in self.stem_latents(i)],
                stem_names=[s.get("name", "") for s in r["stems"]], record=r)

  def _rng(self, step: int, row: int):
    return np.random.default_rng(np.random.SeedSequence([self.seed, int(step), int(row)]))

  def batch(self, step: int, batch_size: int, rows=None) -> dict:
    """Rows ``rows`` (default: all ``batch_size``) of step ``step``'s batch, in that order."""
    rows = range(batch_size) if rows is None else rows
    rngs = [self._rng(step, i) for i in rows]
    batch_size = len(rngs)
    idx = np.searchsorted(self._cdf, [rng.random() for rng in rngs], side="right")
    idx = np.minimum(idx, len(self.records) - 1).astype(np.int64)
    n, d = self.crop_frames, self.latent_dim
    lat = np.zeros((batch_size, n, d), np.float32)
    mask = np.zeros((batch_size, n), bool)
    starts = np.zeros(batch_size, np.int64)
    S = self.max_stems if self.use_stems else 0
    stems = np.zeros((batch_size, S, n, d), np.float32) if S else None
    stem_mask = np.zeros((batch_size, S), bool) if S else None
    stem_names = []
    captions = []
    mel = self.melody
    melody = np.full((batch_size, n), np.nan, np.float32) if mel is not None else None
    stem_melody = np.full((batch_size, S, n), np.nan, np.float32) if mel is not None and S else None
    for b, (i, rng) in enumerate(zip(idx, rngs)):
      r = self.records[i]
      T = r["frames"]
      start = int(rng.integers(0, T - n + 1)) if T >= n else 0
      starts[b] = start
      m = min(n, T - start)
      lat[b, :m] = self.latents(i)[start:start + m]
      mask[b, :m] = True
      captions.append(r["caption"])
      if mel is not None and r["key"] in mel:
        melody[b, :m] = mel[r["key"]][start:start + m]
      if S:
        names = []
        for k, s in enumerate(self.stem_latents(i)[:S]):
          stems[b, k, :m] = s[start:start + m]
          stem_mask[b, k] = True
          names.append(r["stems"][k].get("name", ""))
          if stem_melody is not None and r["stems"][k]["key"] in mel:
            stem_melody[b, k, :m] = mel[r["stems"][k]["key"]][start:start + m]
        stem_names.append(names)
    out = dict(latents=lat, mask=mask, captions=captions, index=idx.astype(np.int64), start=starts)
    if S:
      out.update(stems=stems, stem_mask=stem_mask, stem_names=stem_names)
    if melody is not None:  # MIDI pitch per frame, NaN unvoiced (lmdm_jax.data.melody)
      out["melody"] = melody
      if stem_melody is not None:
        out["stem_melody"] = stem_melody
    return out

  def iterate(self, batch_size: int, start_step: int = 0, steps: Optional[int] = None):
    """Batches for steps start_step, start_step + 1, ... (forever unless ``steps`` is given)."""
    step = start_step
    while steps is None or step < start_step + steps:
      yield self.batch(step, batch_size)
      step += 1

  def split(self, holdout: Optional[float] = None, salt: str = "holdout") -> tuple:
    """(train, held-out) item indices, by a hash of each item's source (stable as data grows).

    ``holdout`` defaults to the fraction recorded in ``dataset.json`` (datasets built before it
    was recorded: 0.05). A larger fraction holds out a superset of a smaller one's sources.
    An item whose sidecar says ``"split": "train"`` or ``"holdout"`` (``info["split"]``; e.g.
    ``lmdm_jax.data.recorded``, which holds out whole works) goes where it says, whatever the
    fraction.
    """
    if holdout is None:
      holdout = float(self.info.get("holdout", LEGACY_HOLDOUT))
    train, held = [], []
    for i, r in enumerate(self.records):
      fixed = (r.get("info") or {}).get("split")
      if fixed in ("train", "holdout"):
        (held if fixed == "holdout" else train).append(i)
        continue
      h = int.from_bytes(hashlib.sha256(f"{salt}:{r['source']}".encode()).digest()[:8], "little")
      (held if h / 2 ** 64 < holdout else train).append(i)
    return train, held


# ---------------------------------------------------------------------------------------------


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--audio", required=True, help="folder of audio files (searched recursively)")
  ap.add_argument("--out", required=True, help="output folder for shards and metadata")
  ap.add_argument("--codec", required=True,
                  help="'module:Class', a name registered in lmdm_jax.codecs, or a codec module")
  ap.add_argument("--codec-args", default="{}", help="JSON keyword arguments for the codec")
  ap.add_argument("--captions", default=None, help="CSV (path,caption) or JSONL listing")
  ap.add_argument("--dtype", default="float16", choices=("float16", "float32"))
  ap.add_argument("--shard-items", type=int, default=64)
  ap.add_argument("--shard-mb", type=float, default=256.0)
  ap.add_argument("--min-seconds", type=float, default=1.0)
  ap.add_argument("--holdout", type=float, default=DEFAULT_HOLDOUT,
                  help="fraction of sources held out for evaluation (by hash; default %(default)s)")
  ap.add_argument("--silence-db", type=float, default=-60.0,
                  help="files whose peak is below this (dBFS) are skipped as silent")
  ap.add_argument("--no-stems", action="store_true")
  ap.add_argument("--allow-missing-captions", action="store_true",
                  help="encode files without a caption (empty caption) instead of skipping them")
  ap.add_argument("--limit", type=int, default=None)
  ap.add_argument("--quiet", action="store_true")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  codec = get_codec(args.codec, **json.loads(args.codec_args))
  report = build_dataset(args.audio, args.out, codec, codec_name=args.codec,
                         captions=args.captions, dtype=args.dtype, shard_items=args.shard_items,
                         shard_mb=args.shard_mb, min_seconds=args.min_seconds,
                         silence_db=args.silence_db, stems=not args.no_stems,
                         allow_missing_captions=args.allow_missing_captions, limit=args.limit,
                         progress=not args.quiet, holdout=args.holdout)
  short = {k: v for k, v in report.items() if k != "bad"}
  print(json.dumps(short, indent=1))
  if report["bad"]:
    print(f"{report['bad_total']} bad files, e.g.:", file=sys.stderr)
    for r in report["bad"][:10]:
      print(f"  {r['source']}: {r['reason']}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
