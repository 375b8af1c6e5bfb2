"""Training batches: latent crops + captions -> model inputs, deterministic in (seed, step).

Sources (``make_source``, from train.py's and arc.py's ``--data``): a pre-encoded
``LatentDataset`` folder (``lmdm_jax.data.dataset``), several folders mixed with weights
(``A:0.7,B:0.3``; ``MixedSource``), or ``synthetic`` (seeded smooth multi-channel signals with
template captions, for tests and smoke runs).

Row i of step s's batch depends only on (seed, s, i): ``batch(step, batch_size, rows)`` builds
just the given rows of the global batch, so each process of a several-process run builds only
its own rows (``sharding.local_rows``) and the global batch does not depend on how many
processes there are.
"""
from __future__ import annotations

import os

import numpy as np

from lmdm_jax.config import DiTConfig


class SyntheticLatents:
  """Seeded smooth latents: per channel a sum of slow sinusoids; captions name the pattern."""

  def __init__(self, frames: int, channels: int, seed: int = 0):
    self.frames, self.channels, self.seed = frames, channels, seed

  def batch(self, step: int, batch_size: int, rows=None) -> dict:
    """Rows ``rows`` (default: all) of step ``step``'s batch; row i from (seed, step, i) alone."""
    rows = range(batch_size) if rows is None else rows
    draws = []
    for i in rows:
      rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(step), int(i)]))
      draws.append([rng.uniform(lo, hi, self.channels)
                    for lo, hi in ((0.01, 0.2), (0, 2 * np.pi), (0.5, 1.5))])
    freq, phase, amp = (np.asarray([d[k] for d in draws]).reshape(len(draws), 1, self.channels)
                        for k in range(3))
    t = np.arange(self.frames)[None, :, None]
    lat = (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)
    caps = [f"pattern {int(f * 100)}" for f in freq[:, 0, 0]]
    return dict(latents=lat, mask=np.ones(lat.shape[:2], bool), captions=caps)


SYNTHETIC = "synthetic"
# Entropy tag of the per-row folder draw of a mix: independent of the crop (``LatentDataset``:
# [seed, step, row]) and of the Batcher's extras ([seed, step, 0xE7, row]).
_MIX_TAG = 0x4D1


def _entry(raw: str) -> tuple:
  """One entry of a ``--data`` value -> (folder, weight text or None): the text after the last
  colon is the weight."""
  folder, colon, weight = raw.strip().rpartition(":")
  return (folder.strip(), weight.strip()) if colon else (raw.strip(), None)


def spec_entries(spec: str) -> list:
  """``--data``'s value split into its entries, unchecked (``parse_data_spec`` checks them):
  ``A:0.7,B:0.3`` -> [("A", "0.7"), ("B", "0.3")]; ``A`` -> [("A", None)]."""
  return [_entry(raw) for raw in str(spec).split(",")]


def parse_data_spec(spec: str) -> list:
  """``--data``'s value -> [(folder, weight)], the weights normalised to sum to 1.

  ``synthetic`` (alone); ``FOLDER``; ``A,B`` (equal weights); ``A:0.7,B:0.3`` (weights,
  normalised: ``A:7,B:3`` is the same mix). Each entry names another folder, and a weight is a
  positive finite number, given for every folder or for none. ValueError, one line naming the
  entry, otherwise. The folders themselves are checked by ``make_source``."""
  spec = str(spec).strip()
  if spec == SYNTHETIC:
    return [(SYNTHETIC, 1.0)]
  if not spec:
    raise ValueError("--data is empty: name a latent dataset folder (or several: A:0.7,B:0.3), "
                     "or pass 'synthetic'")
  entries, seen = [], {}
  for raw in spec.split(","):
    folder, wtext = _entry(raw)
    if not folder:
      raise ValueError(f"--data {spec!r}: an empty entry ({raw.strip()!r}); write FOLDER or "
                       "FOLDER:WEIGHT between the commas")
    if folder == SYNTHETIC:
      raise ValueError(f"--data {spec!r}: 'synthetic' is a --data value of its own, not a folder "
                       "to mix")
    weight = None
    if wtext is not None:
      try:
        weight = float(wtext)
      except ValueError:
        pass
      if weight is None or not np.isfinite(weight):
        raise ValueError(f"--data entry {raw.strip()!r}: the weight {wtext!r} is not a finite "
                         "number")
      if weight <= 0:
        raise ValueError(f"--data entry {raw.strip()!r}: the weight must be > 0, got {wtext}")
    key = os.path.realpath(folder)
    if key in seen:
      raise ValueError(f"--data {spec!r}: the folder {folder!r} is named twice (as "
                       f"{seen[key]!r} too)")
    seen[key] = folder
    entries.append((folder, weight))
  given = [w is not None for _, w in entries]
  if any(given) and not all(given):
    raise ValueError(f"--data {spec!r}: give every folder a weight (A:0.7,B:0.3) or none (A,B: "
                     "equal weights)")
  w = np.array([1.0 if x is None else x for _, x in entries])
  return [(f, float(x)) for (f, _), x in zip(entries, w / w.sum())]


def same_data(a, b) -> bool:
  """Whether two ``--data`` values name the same data: the same folders (after normalising their
  paths) with the same normalised weights (``A,B`` == ``A:1,B:1`` == ``./A:0.5,B:0.5``)."""
  if a == b:
    return True
  try:
    pa, pb = parse_data_spec(a), parse_data_spec(b)
  except ValueError:
    return False
  return (len(pa) == len(pb) and all(os.path.normpath(fa) == os.path.normpath(fb)
                                     and abs(wa - wb) < 1e-9 for (fa, wa), (fb, wb) in zip(pa, pb)))


def _open_folder(folder: str, cfg: DiTConfig):
  """A folder's LatentDataset header (shards not read), its latent_dim checked against the
  model's."""
  from lmdm_jax.data.dataset import LatentDataset
  if not os.path.exists(os.path.join(folder, "dataset.json")):
    raise ValueError(f"--data {folder!r}: not a latent dataset folder (no dataset.json); build one "
                     "with `python3 -m lmdm_jax.data.dataset` or pass `synthetic`")
  ds = LatentDataset(folder, 1, preload=False)
  if ds.latent_dim != cfg.io_channels:
    raise ValueError(f"{folder}/dataset.json: latent_dim {ds.latent_dim} does not match the "
                     f"model's io_channels {cfg.io_channels}")
  return ds


def _check_alike(first, ds) -> None:
  """Every folder of a mix holds latents of one codec (its class where both folders record it,
  else its name) at one frame rate."""
  key = "codec_class" if "codec_class" in first.info and "codec_class" in ds.info else "codec"
  for what, a, b in (("frame_rate", first.frame_rate, ds.frame_rate),
                     (key, first.info.get(key), ds.info.get(key))):
    if a != b:
      raise ValueError(f"--data: {ds.root}/dataset.json: {what} {b!r} differs from {first.root}'s "
                       f"{a!r}; the folders of a mix must hold latents of one codec")


def check_data(spec: str, cfg: DiTConfig):
  """-> (``parse_data_spec(spec)``, the folders' LatentDataset headers, shards not read): the
  checks of ``make_source`` without reading the latents. ValueError (one line) for a bad value."""
  entries = parse_data_spec(spec)
  if entries[0][0] == SYNTHETIC:
    return entries, []
  heads = [_open_folder(f, cfg) for f, _ in entries]
  for ds in heads[1:]:
    _check_alike(heads[0], ds)
  return entries, heads


def make_source(spec: str, frames: int, cfg: DiTConfig, seed: int, holdout: bool = False):
  """The training (or, with ``holdout``, the held-out) data of a ``--data`` value
  (``parse_data_spec``): ``synthetic``, one LatentDataset folder, or a ``MixedSource`` of several.

  Each folder is split by its own ``LatentDataset.split`` (sidecar splits honoured). A folder
  with no items on one side of its split gives the other side's instead (as a lone folder always
  did), except in a mix's held-out data, which leaves a folder without held-out items out (the
  other folders' weights renormalised): held-out rows of a mix are always held-out items.
  Every folder's latent_dim must match the model; the folders of a mix must share the codec and
  frame rate. ValueError (one line naming the folder) otherwise."""
  from lmdm_jax.data.dataset import LatentDataset
  entries, heads = check_data(spec, cfg)
  if entries[0][0] == SYNTHETIC:
    return SyntheticLatents(frames, cfg.io_channels, seed + (10_000 if holdout else 0))
  seed = seed + (10_000 if holdout else 0)
  picked = []
  for (folder, w), ds in zip(entries, heads):
    train, held = ds.split()
    idx = held if holdout else train
    if not idx and (len(entries) == 1 or not holdout):
      idx = train or held
    if idx:
      picked.append((folder, w, idx))
  if not picked:
    raise ValueError(f"--data {spec!r}: no folder of the mix has held-out items")
  parts = [LatentDataset(f, frames, seed=seed, indices=idx) for f, _, idx in picked]
  if len(entries) == 1:
    return parts[0]
  return MixedSource(parts, [w for _, w, _ in picked], seed)


class MixedSource:
  """Rows from several LatentDatasets (``sources``, each with its own crops) in proportions
  ``weights`` (normalised), with LatentDataset's ``batch(step, batch_size, rows)`` contract.

  Row i of step s comes from source k with probability weights[k], drawn from (seed, s, i) alone,
  and is that source's row i of step s: so it depends only on (seed, s, i), whatever other rows
  are built with it (``sharding.local_rows``) and wherever a run resumes. The batch has the
  keys of the richest source, the same for every call: ``stems`` (B, S, n, D) with S the most
  stems of any source (``stem_mask`` False where a row has fewer, ``stem_names`` [] for a row
  without), ``melody``/``stem_melody`` NaN (unvoiced: no sketch) for rows from a source without a
  ``melody.npz``; ``index`` is the item index within the row's source, ``source`` the source's
  index in ``sources``."""

  def __init__(self, sources, weights, seed: int = 0):
    if not sources or len(sources) != len(weights):
      raise ValueError("MixedSource needs one weight per source")
    w = np.asarray(weights, np.float64)
    if not (np.all(np.isfinite(w)) and np.all(w > 0)):
      raise ValueError(f"MixedSource weights must be positive, got {list(weights)}")
    self.sources, self.seed = list(sources), int(seed)
    self.weights = w / w.sum()
    self._cdf = np.cumsum(self.weights)
    self._cdf[-1] = 1.0
    first = self.sources[0]
    self.latent_dim, self.crop_frames = first.latent_dim, first.crop_frames
    self.frame_rate = first.frame_rate
    for s in self.sources[1:]:
      if (s.latent_dim, s.crop_frames) != (self.latent_dim, self.crop_frames):
        raise ValueError(f"MixedSource: {s.root} gives ({s.crop_frames}, {s.latent_dim}) crops, "
                         f"{first.root} ({self.crop_frames}, {self.latent_dim})")
    self.max_stems = max(s.max_stems if s.use_stems else 0 for s in self.sources)
    self.has_melody = any(s.melody is not None for s in self.sources)

  def which(self, step: int, rows) -> np.ndarray:
    """The source of each of ``rows`` at ``step`` (an int array, one per row)."""
    u = [np.random.default_rng(np.random.SeedSequence([self.seed, int(step), _MIX_TAG, int(i)]))
         .random() for i in rows]
    return np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self.sources) - 1)

  def batch(self, step: int, batch_size: int, rows=None) -> dict:
    """Rows ``rows`` (default: all ``batch_size``) of step ``step``'s batch, in that order."""
    rows = list(range(batch_size) if rows is None else rows)
    B, n, D, S = len(rows), self.crop_frames, self.latent_dim, self.max_stems
    which = self.which(step, rows)
    out = dict(latents=np.zeros((B, n, D), np.float32), mask=np.zeros((B, n), bool),
               captions=[""] * B, index=np.zeros(B, np.int64), start=np.zeros(B, np.int64),
               source=which.astype(np.int64))
    if S:
      out.update(stems=np.zeros((B, S, n, D), np.float32), stem_mask=np.zeros((B, S), bool),
                 stem_names=[[] for _ in range(B)])
    if self.has_melody:
      out["melody"] = np.full((B, n), np.nan, np.float32)
      if S:
        out["stem_melody"] = np.full((B, S, n), np.nan, np.float32)
    for k, src in enumerate(self.sources):
      pos = np.nonzero(which == k)[0]
      if not len(pos):
        continue
      sub = src.batch(step, batch_size, [rows[p] for p in pos])
      for key in ("latents", "mask", "index", "start", "melody"):
        if key in sub:
          out[key][pos] = sub[key]
      for j, p in enumerate(pos):
        out["captions"][p] = sub["captions"][j]
      if "stems" in sub:
        s = sub["stems"].shape[1]
        out["stems"][pos, :s] = sub["stems"]
        out["stem_mask"][pos, :s] = sub["stem_mask"]
        for j, p in enumerate(pos):
          out["stem_names"][p] = list(sub["stem_names"][j])
        if "stem_melody" in sub:
          out["stem_melody"][pos, :s] = sub["stem_melody"]
    return out


def extra_groups(cfg: DiTConfig) -> tuple:
  """(accompaniment, sketch): which extra ``input_add`` groups the model has, from its width.
  Groups come in the order [accomp_mask | accomp latents (io_channels)] then sketch (SKETCH_DIM)."""
  from lmdm_jax.data.sketch import SKETCH_DIM
  e, acc = cfg.extra_dim, 1 + cfg.io_channels
  table = {0: (False, False), acc: (True, False), SKETCH_DIM: (False, True),
           acc + SKETCH_DIM: (True, True)}
  if e not in table:
    raise ValueError(f"model extra input_add channels = {e}: expected 0, {acc} (accompaniment), "
                     f"{SKETCH_DIM} (sketch) or {acc + SKETCH_DIM} (both)")
  return table[e]


class Batcher:
  """source batch -> the model inputs of ``Stage1.loss``; prompts through ``text`` (a callable
  list of str -> (B, T, cond_token_dim), e.g. ``lmdm_jax.text.from_config(config)``), cached per
  caption.

  Extra channels (when the model has them, see ``extra_groups``), deterministic in (seed, step,
  row):
  - jamming (accompaniment): for an item with >= 2 stems, with probability ``p_jam`` the target
    is one stem and the accompaniment another stem of the same crop (a duet partner), the caption
    is prefixed with the target's part name; the accompaniment is dropped whole with
    ``p_acc_uncond``, and with ``p_acc_partial`` each chunk only knows the partner up to a random
    frame (as a jam with a one-block delay does); mask 1 where known.
  - sketch: with probability ``p_sketch`` the pitch features (``data.sketch.pitch_features``) of
    the target's melody (the stem's pitch, or the skyline of the mix's stems).
  """

  def __init__(self, source, cfg: DiTConfig, text=None, *, p_jam: float = 0.4,
               p_acc_uncond: float = 0.1, p_acc_partial: float = 0.25, p_sketch: float = 0.5):
    self.source, self.cfg = source, cfg
    if text is None and cfg.cond_token_dim:
      from lmdm_jax.nn.byte_text import ByteTextEncoder
      text = ByteTextEncoder(cfg.cond_token_dim)
    self.text = text
    self._text_cache = {}
    self.accomp, self.sketch = extra_groups(cfg)
    self.p_jam, self.p_acc_uncond, self.p_acc_partial, self.p_sketch = (
        p_jam, p_acc_uncond, p_acc_partial, p_sketch)

  @classmethod
  def for_config(cls, source, conf, cfg: DiTConfig, **kw) -> "Batcher":
    """A Batcher with the config's own text encoder (``conf.conditioner``), as train.py uses."""
    from lmdm_jax import text as text_lib
    return cls(source, cfg, text_lib.from_config(conf) if cfg.cond_token_dim else None, **kw)

  def encode_text(self, captions) -> np.ndarray:
    new = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
    if new:
      emb = np.asarray(self.text(new), np.float32)
      for c, e in zip(new, emb):
        self._text_cache[c] = e
    return np.stack([self._text_cache[c] for c in captions])

  def _extra(self, raw, step: int, rows):
    cfg = self.cfg
    lat, mask = raw["latents"].astype(np.float32), raw["mask"]
    B, n, C = lat.shape
    caps = list(raw["captions"])
    seed = getattr(self.source, "seed", 0)
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, int(step), 0xE7, int(i)]))
            for i in rows]
    parts = []
    acc = np.zeros((B, n, 1 + C), np.float32) if self.accomp else None
    melody = raw.get("melody")
    melody = np.array(melody) if melody is not None else None
    stems = raw.get("stems")
    for b in range(B):
      if acc is None or stems is None:
        break
      rng = rngs[b]
      have = np.nonzero(raw["stem_mask"][b])[0]
      if len(have) < 2 or rng.random() >= self.p_jam:
        continue
      i, j = rng.choice(have, 2, replace=False)
      lat[b] = stems[b, i]
      name = raw["stem_names"][b][i] or "solo"
      caps[b] = f"{name[:1].upper()}{name[1:]} part. {caps[b]}"
      if melody is not None and "stem_melody" in raw:
        melody[b] = raw["stem_melody"][b, i]
      if rng.random() < self.p_acc_uncond:
        continue
      known = mask[b].astype(np.float32)
      if rng.random() < self.p_acc_partial:
        cs = cfg.chunk
        cut = rng.integers(0, cs + 1, size=-(-n // cs))  # per chunk: frames known
        known = known * (np.arange(n) % cs < np.repeat(cut, cs)[:n])
      acc[b, :, 0] = known
      acc[b, :, 1:] = stems[b, j] * known[:, None]
    if acc is not None:
      parts.append(acc)
    if self.sketch:
      from lmdm_jax.data.sketch import SKETCH_DIM, pitch_features
      sk = np.zeros((B, n, SKETCH_DIM), np.float32)
      if melody is not None:
        for b in range(B):
          if rngs[b].random() < self.p_sketch and np.isfinite(melody[b]).any():
            sk[b] = pitch_features(melody[b]) * mask[b][:, None]
      parts.append(sk)
    extra = np.concatenate(parts, axis=-1) if parts else None
    return lat, caps, extra

  def __call__(self, step: int, batch_size: int, rows=None) -> dict:
    """Rows ``rows`` (default: all) of step ``step``'s batch of ``batch_size``: the arrays have
    len(rows) rows, row i depending only on (seed, step, i)."""
    rows = range(batch_size) if rows is None else rows
    raw = self.source.batch(step, batch_size, rows)
    lat, caps, extra = self._extra(raw, step, rows)
    out = dict(latents=lat, frame_mask=raw["mask"].astype(np.float32))
    if extra is not None:
      out["extra"] = extra
    if self.text is not None:
      out["cond"] = self.encode_text(caps)
    if self.cfg.global_cond_dim:
      out["global_cond"] = np.zeros((len(lat), self.cfg.global_cond_dim), np.float32)
    return out
