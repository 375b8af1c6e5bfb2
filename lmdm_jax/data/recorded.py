"""Recorded music from freely licensed Debian packages, as a captioned audio folder for
``lmdm_jax.data.dataset``.

The packages (``PACKAGES``; no others): nexuiz-music, warzone2100-music, hyperrogue-music,
drascula-music, asc-music, colobot-common-sounds, freedroidrpg-data (its music), supertuxkart-data
(its ``data/music`` folder) and fb-music-high. For each: ``apt-get download`` (no install), the
music members and the copyright file taken out of the .deb (``dpkg-deb --fsys-tarfile``, read
with ``tarfile``: regular files only, nothing outside the cache), the copyright file parsed (the
Debian machine-readable format, ``Files`` stanzas matched per track, the last match winning; the
older free-text files by their GPL wording), and every track whose licence is free decoded
(``lmdm_jax.data.audio.load_audio``; the tracker module of fb-music-high is rendered with
``openmpt123`` when that program is installed, and skipped with the reason otherwise), trimmed of
leading/trailing digital silence and written as 16-bit FLAC at its native rate and channels (the
dataset builder resamples to the codec's rate).

Output (``OUT``):
  ``debs/``, ``extract/<package>/``  the downloaded .debs and what was taken out of them
  ``audio/<package>/<track>.flac``   one file per track, whole (training crops at random)
  ``audio/<package>/<track>.json``   sidecar: ``caption``, ``split`` ("train" | "holdout") and the
                                     track's package, version, licence, copyright line,
                                     attribution, title, composer and measured descriptors
  ``licences.json``                  per package and per track: licence (SPDX-style short name and
                                     the Debian copyright file's name), copyright line, attribution;
                                     the tracks rejected for their licence
  ``copyright/<package>``            the package's copyright file, verbatim
  ``holdout.json``                   the held-out tracks (dataset sources, relative to ``audio/``)
  ``report.json``                    counts, hours, skipped tracks and why

Captions come from the package (game), the track's title and composer where the package names
them, and descriptors measured on the audio (22.05 kHz mono): tempo (``librosa`` beat tracking,
given only where the beat is clear), key and mode (``lmdm_jax.music_metrics.estimate_key``:
chroma against the Krumhansl-Kessler profiles, given only where the match is clear), loudness
(RMS dBFS), brightness (spectral centroid) and the percussive share of the energy (harmonic /
percussive separation). Instrumentation is not named: the packages do not document it.

Hold-out: whole works (a track and its variants: SuperTuxKart's fast versions, Warzone 2100's
enhanced remakes) are held out together, chosen per package by a hash of the work's name
(``HOLDOUT_FRACTION`` of each package's works, at least one where a package has three or more), so
every package (every style) has held-out tracks. The choice is written into each sidecar's
``split``, which ``LatentDataset.split`` honours, and listed in ``holdout.json``.

Deterministic (same packages -> same audio, captions and split; only the sidecar's
``seconds_to_make`` varies) and resumable: a track is done when its sidecar exists (written last,
atomically); a rerun does not decode it again, and only rewrites its sidecar when the metadata,
hold-out or caption rules changed (captions are re-derived from the stored descriptors).

  apt-get update                          # once, so that apt-get download finds the packages
  apt-get install openmpt123              # optional: renders fb-music-high's tracker module
  python3 -m lmdm_jax.data.recorded --out data_cache/recorded
  python3 -m lmdm_jax.data.dataset --audio data_cache/recorded/audio \\
      --out data_cache/latents_recorded --codec default
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lmdm_jax.data.audio import AudioFileError, audio_info, load_audio, resample, save_audio
from lmdm_jax.data.licences import copyright_for, is_free, person_name, spdx_name

log = logging.getLogger("lmdm_jax.data.recorded")

GENERATOR = "lmdm_jax.data.recorded/1"
AUDIO_EXTS = (".ogg", ".opus", ".mp3", ".flac", ".wav", ".xm", ".mod", ".it", ".s3m")
MODULE_EXTS = (".xm", ".mod", ".it", ".s3m")  # tracker modules: rendered with openmpt123
HOLDOUT_FRACTION = 0.15
HOLDOUT_SALT = "recorded-holdout"
ANALYSIS_SR = 22050


@dataclass(frozen=True)
class Package:
  """A Debian package of game music.

  ``members``: fnmatch patterns (``*`` crosses ``/``) of the .deb members to take out;
  ``tracks``: patterns, relative to the extracted root, of the track files;
  ``composer``: where a track's composer is named: ``"holder"`` (the copyright line of the
  track's ``Files`` stanza), ``"music_xml"`` (SuperTuxKart's ``.music`` files), ``"album_json"``
  (Warzone 2100's ``album.json``), ``"upstream_author"`` (the copyright file's "Upstream Author"),
  or ``""`` (not named: the copyright holder is a team or a company).
  ``title_strip``: a regex removed from file names to make titles.
  """
  name: str
  game: str
  members: tuple
  tracks: tuple
  composer: str = ""
  title_strip: str = ""


_STK = "usr/share/games/supertuxkart/data/music/"
_WZ = "usr/share/games/warzone2100/music/"
PACKAGES = {p.name: p for p in [
    Package("nexuiz-music", "Nexuiz", ("usr/share/games/nexuiz/data/music.pk3",),
            ("pk3/sound/cdtracks/*.ogg",)),
    Package("warzone2100-music", "Warzone 2100", (_WZ + "*",), (_WZ + "*.opus",), "album_json"),
    Package("hyperrogue-music", "HyperRogue", ("usr/share/hyperrogue/music/*",),
            ("usr/share/hyperrogue/music/*.ogg",), "holder", r"^hr3?-(domina-|savino-)?"),
    Package("drascula-music", "Drascula: The Vampire Strikes Back",
            ("usr/share/scummvm/drascula/audio/*",), ("usr/share/scummvm/drascula/audio/*.ogg",)),
    Package("asc-music", "Advanced Strategic Command", ("usr/share/games/asc/music/*",),
            ("usr/share/games/asc/music/*.mp3",), "holder"),
    Package("colobot-common-sounds", "Colobot", ("usr/share/games/colobot/music/*",),
            ("usr/share/games/colobot/music/*.ogg",)),
    Package("freedroidrpg-data", "FreedroidRPG",
            ("usr/share/freedroidrpg/data/sound/music/*",
             "usr/share/freedroidrpg/data/base/titles/Credits.lua"),
            ("usr/share/freedroidrpg/data/sound/music/*.ogg",)),
    Package("supertuxkart-data", "SuperTuxKart", (_STK + "*",), (_STK + "*.ogg",), "music_xml"),
    Package("fb-music-high", "Frozen Bubble", ("usr/share/games/frozen-bubble/snd/*.xm",),
            ("usr/share/games/frozen-bubble/snd/*.xm",), "upstream_author", r"^frozen-"),
]}


class RecordedError(RuntimeError):
  """A package that cannot be fetched or read (the message says which and why)."""


# ---------------------------------------------------------------------------------------------
# Files


def _umask_mode():
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


_FILE_MODE = _umask_mode()


def _write_json(path: str, obj, only_if_changed: bool = True) -> bool:
  """Atomically write ``obj`` as JSON; returns whether the file changed."""
  text = json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n"
  if only_if_changed and os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return False
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(text)
  os.chmod(tmp, _FILE_MODE)
  os.replace(tmp, path)
  return True


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Fetch and extract


def find_deb(pkg: str, debs_dir: str) -> Optional[str]:
  found = sorted(glob.glob(os.path.join(debs_dir, f"{pkg}_*.deb")))
  return found[-1] if found else None


def fetch_deb(pkg: str, debs_dir: str) -> str:
  """The package's .deb in ``debs_dir``, downloaded with ``apt-get download`` if absent."""
  deb = find_deb(pkg, debs_dir)
  if deb:
    return deb
  if shutil.which("apt-get") is None:
    raise RecordedError(f"{pkg}: no .deb in {debs_dir} and no apt-get to download it")
  os.makedirs(debs_dir, exist_ok=True)
  res = subprocess.run(["apt-get", "download", pkg], cwd=debs_dir, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  deb = find_deb(pkg, debs_dir)
  if res.returncode != 0 or deb is None:
    err = (res.stderr or res.stdout).strip().splitlines()
    raise RecordedError(f"{pkg}: apt-get download failed ({res.returncode}): "
                        f"{err[-1] if err else 'no output'} (run 'apt-get update' first?)")
  return deb


def deb_field(deb: str, name: str) -> str:
  res = subprocess.run(["dpkg-deb", "-f", deb, name], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  if res.returncode != 0:
    raise RecordedError(f"{deb}: dpkg-deb -f failed: {res.stderr.strip()[:200]}")
  return res.stdout.strip()


def _safe_rel(name: str) -> Optional[str]:
  """A member name as a relative path inside the target, or None if it would leave it."""
  parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
  if not parts or any(p == ".." for p in parts):
    return None
  return "/".join(parts)


def extract_deb(deb: str, dest: str, members: tuple, pkg: str) -> list:
  """Take the regular files matching ``members`` (and ``usr/share/doc/<pkg>/copyright``) out of a
  .deb into ``dest``. Links, devices and paths leaving ``dest`` are ignored. Returns the files."""
  pats = tuple(members) + (f"usr/share/doc/{pkg}/copyright",)
  proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  out = []
  try:
    with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
      for m in tar:
        rel = _safe_rel(m.name)
        if rel is None or not m.isfile() or not any(fnmatch.fnmatchcase(rel, p) for p in pats):
          continue
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        src = tar.extractfile(m)
        with open(target + ".part", "wb") as f:
          shutil.copyfileobj(src, f)
        os.replace(target + ".part", target)
        out.append(rel)
  finally:
    proc.stdout.close()
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    rc = proc.wait()
  if rc != 0:
    raise RecordedError(f"{deb}: dpkg-deb --fsys-tarfile failed ({rc}): {err.strip()[:200]}")
  for rel in list(out):  # game archives (Quake-style .pk3 = zip): their audio members
    if rel.endswith(".pk3"):
      out += _extract_zip_audio(os.path.join(dest, rel), os.path.join(dest, "pk3"))
  return sorted(out)


def _extract_zip_audio(path: str, dest: str) -> list:
  out = []
  with zipfile.ZipFile(path) as z:
    for info in z.infolist():
      rel = _safe_rel(info.filename)
      if rel is None or info.is_dir() or not rel.lower().endswith(AUDIO_EXTS):
        continue
      target = os.path.join(dest, rel)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with z.open(info) as src, open(target + ".part", "wb") as f:
        shutil.copyfileobj(src, f)
      os.replace(target + ".part", target)
      out.append("pk3/" + rel)
  return out


def prepare_package(pkg: str, root: str, fetch: bool = True) -> dict:
  """Fetch (unless already extracted) and extract one package under ``root``; returns its
  ``extract/<pkg>/.extracted.json`` record (package, version, deb file name and sha256)."""
  spec = PACKAGES[pkg]
  dest = os.path.join(root, "extract", pkg)
  marker = os.path.join(dest, ".extracted.json")
  if os.path.isfile(marker):
    with open(marker, encoding="utf-8") as f:
      return json.load(f)
  if not fetch:
    raise RecordedError(f"{pkg}: not extracted under {dest} and fetching is off")
  deb = fetch_deb(pkg, os.path.join(root, "debs"))
  if os.path.isdir(dest):
    shutil.rmtree(dest)  # an interrupted extraction
  os.makedirs(dest)
  files = extract_deb(deb, dest, spec.members, pkg)
  rec = dict(package=pkg, version=deb_field(deb, "Version"), deb=os.path.basename(deb),
             sha256=_sha256(deb), homepage=deb_field(deb, "Homepage"), files=len(files))
  _write_json(marker, rec)
  return rec


# ---------------------------------------------------------------------------------------------
# Tracks


@dataclass
class Track:
  package: str
  name: str  # file-system-safe id inside the package
  path: str  # the extracted file
  rel: str  # its path inside the package (for the copyright file)
  title: str
  group: str  # the work: variants of one piece share it (held out together)
  composer: str = ""
  extra: dict = field(default_factory=dict)

  @property
  def source(self) -> str:  # the dataset builder's identity for this track
    return f"{self.package}/{self.name}.flac"


def nice_title(stem: str, strip: str = "") -> str:
  """``'beast-of-insanity'`` -> ``'Beast of Insanity'``, ``'music002'`` -> ``'Music 002'``."""
  s = re.sub(strip, "", stem) if strip else stem
  s = re.sub(r"([a-z])([A-Z])", r"\1 \2", s)
  s = re.sub(r"([A-Za-z])(\d)", r"\1 \2", s)
  words = [w for w in re.split(r"[\s_\-]+", s) if w]
  small = {"of", "the", "to", "in", "a", "and", "on", "at"}
  return " ".join(w if (w.isupper() and len(w) > 1) else
                  (w.lower() if i and w.lower() in small else w[:1].upper() + w[1:])
                  for i, w in enumerate(words))


def _safe_name(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_")


def _music_xml(path: str) -> dict:
  """SuperTuxKart ``.music`` file -> its attributes (title, composer, file, fast-filename)."""
  try:
    return dict(ET.parse(path).getroot().attrib)
  except (ET.ParseError, OSError):
    return {}


def _album_tracks(folder: str) -> dict:
  """Warzone 2100 ``album.json`` files under ``folder`` -> {file name: track info + album}."""
  out = {}
  for p in sorted(glob.glob(os.path.join(folder, "**", "album.json"), recursive=True)):
    try:
      with open(p, encoding="utf-8") as f:
        album = json.load(f)
    except (OSError, json.JSONDecodeError):
      continue
    for t in album.get("tracks", []) if isinstance(album, dict) else []:
      if isinstance(t, dict) and isinstance(t.get("filename"), str):
        out[t["filename"]] = dict(title=str(t.get("title", "")), author=str(t.get("author", "")),
                                  album=str(album.get("title", "")),
                                  album_dir=os.path.relpath(os.path.dirname(p), folder))
  return out


def _credits_music(path: str) -> list:
  """The names under ``MUSIC:`` in FreedroidRPG's credits."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError:
    return []
  m = re.search(r"\nMUSIC:\s*\n(.*?)\n\s*\n", text, re.S)
  return [s.strip() for s in m.group(1).splitlines() if s.strip()] if m else []


def list_tracks(pkg: str, root: str) -> list:
  """The tracks of an extracted package (``root`` = ``extract/<pkg>``), sorted by name."""
  spec = PACKAGES[pkg]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for fn in sorted(filenames):
      rel = os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/")
      if any(fnmatch.fnmatchcase(rel, p) for p in spec.tracks) and fn.lower().endswith(AUDIO_EXTS):
        files.append(rel)
  xml, albums, fast_of = {}, {}, {}
  if spec.composer == "music_xml":
    for rel in files:
      d = _music_xml(os.path.join(root, os.path.splitext(rel)[0] + ".music"))
      if d:
        xml[rel] = d
        if d.get("fast-filename"):
          fast_of[d["fast-filename"]] = os.path.splitext(d.get("file", ""))[0]
    for rel in files:  # a fast version's own .music file rarely exists: take the base's
      base = fast_of.get(os.path.basename(rel))
      if base and rel not in xml:
        base_rel = os.path.join(os.path.dirname(rel), base + os.path.splitext(rel)[1])
        xml[rel] = dict(xml.get(base_rel, {}), fast="true")
  if spec.composer == "album_json":
    albums = _album_tracks(os.path.join(root, _WZ))
  credits = ", ".join(_credits_music(os.path.join(
      root, "usr/share/freedroidrpg/data/base/titles/Credits.lua"))) if pkg == "freedroidrpg-data" else ""
  tracks = []
  for rel in files:
    stem = os.path.splitext(os.path.basename(rel))[0]
    title, composer, extra = nice_title(stem, spec.title_strip), "", {}
    group = stem
    if rel in xml:
      d = xml[rel]
      title = d.get("title") or title
      composer = d.get("composer", "")
      if os.path.basename(rel) in fast_of:
        group = fast_of[os.path.basename(rel)]
        title += " (fast version)"
        extra["variant_of"] = group
    elif re.search(r"_(fast|f)$", stem) and spec.composer == "music_xml":
      group = re.sub(r"_(fast|f)$", "", stem)
    if os.path.basename(rel) in albums:
      a = albums[os.path.basename(rel)]
      title = a["title"] or title
      composer = a["author"]
      extra.update(album=a["album"])
    if pkg == "warzone2100-music":
      group = re.sub(r"_enhanced$", "", stem)
      if group != stem:
        extra["variant_of"] = group
    if credits:
      extra["game_credits_music"] = credits
    tracks.append(Track(pkg, _safe_name(stem), os.path.join(root, rel), rel, title, f"{pkg}/{group}",
                        composer, extra))
  names = [t.name for t in tracks]
  if len(set(names)) != len(names):
    raise RecordedError(f"{pkg}: two tracks share a name: {sorted(n for n in names if names.count(n) > 1)}")
  return sorted(tracks, key=lambda t: t.name)


# ---------------------------------------------------------------------------------------------
# Hold-out


def _hash01(key: str) -> float:
  h = hashlib.sha256(f"{HOLDOUT_SALT}:{key}".encode()).digest()
  return int.from_bytes(h[:8], "little") / 2 ** 64


def holdout_groups(tracks: list, fraction: float = HOLDOUT_FRACTION) -> set:
  """The held-out works: per package, the ``round(fraction * works)`` works (at least one where
  the package has three or more) with the smallest hash of their name. Depends only on the
  works' names, so it is stable as long as the packages are."""
  by_pkg = {}
  for t in tracks:
    by_pkg.setdefault(t.package, set()).add(t.group)
  held = set()
  for pkg, groups in sorted(by_pkg.items()):
    n = int(round(fraction * len(groups)))
    if len(groups) >= 3:
      n = max(n, 1)
    held.update(sorted(groups, key=_hash01)[:n])
  return held


# ---------------------------------------------------------------------------------------------
# Audio


def _render_module(path: str, tmpdir: str, sample_rate: int = 44100,
                   max_seconds: float = 900.0) -> str:
  exe = shutil.which("openmpt123")
  if exe is None:
    raise AudioFileError(path, "a tracker module: rendering it needs openmpt123 "
                         "(Debian: apt-get install openmpt123)")
  wav = os.path.join(tmpdir, "module.wav")
  cmd = [exe, "--batch", "-q", "--samplerate", str(sample_rate), "--channels", "2", "--float",
         "--dither", "0", "--repeat", "0", "--end-time", str(int(max_seconds)), "--force",
         "-o", wav, "--", path]
  res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=max_seconds * 2 + 60)
  if res.returncode != 0 or not os.path.isfile(wav):
    raise AudioFileError(path, f"openmpt123 failed ({res.returncode}): {res.stderr.strip()[:200]}")
  return wav


def trim_silence(audio: np.ndarray, sr: int, threshold_db: float = -60.0,
                 margin_s: float = 0.1) -> tuple:
  """Cut leading/trailing audio whose peak (per 10 ms) stays below ``threshold_db``; keeps
  ``margin_s`` around the sound. Returns (audio, seconds cut at the start, at the end)."""
  hop = max(1, sr // 100)
  n = audio.shape[1] // hop
  if n == 0:
    return audio, 0.0, 0.0
  env = np.abs(audio[:, :n * hop]).max(axis=0).reshape(n, hop).max(axis=1)
  loud = np.nonzero(env > 10 ** (threshold_db / 20))[0]
  if loud.size == 0:
    return audio[:, :0], 0.0, 0.0
  m = int(margin_s * sr)
  a = max(0, loud[0] * hop - m)
  b = min(audio.shape[1], (loud[-1] + 1) * hop + m)
  return audio[:, a:b], a / sr, (audio.shape[1] - b) / sr


def decode(track: Track, tmpdir: str) -> tuple:
  """-> ((channels, samples) float32, sample rate, source format)."""
  path = track.path
  if path.lower().endswith(MODULE_EXTS):
    path = _render_module(path, tmpdir)
    fmt = "tracker module rendered by openmpt123"
  else:
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
  sr = int(audio_info(path)["sample_rate"])
  audio = load_audio(path, None, None, min_seconds=0.0, silence_db=-60.0)
  return audio, sr, fmt


# ---------------------------------------------------------------------------------------------
# Descriptors and captions


def pulse_clarity(onset: np.ndarray, sr: int, hop: int, window: int = 384,
                  floor: float = 0.25) -> float:
  """How periodic an onset envelope is: its mean-removed autocorrelation (normalized by the
  energy at lag 0 plus ``floor``**2 per frame, so that the tiny ripples of a held chord do not
  count; averaged over windows of ``window`` frames, half overlapping) at its highest point
  between the lags of 240 and 40 BPM. About 0.9 for a click track, near 0 for noise or a held
  chord; music with a clear beat 0.5-0.8."""
  onset = np.asarray(onset, np.float64)
  lo = int(np.floor(60.0 * sr / (hop * 240)))
  hi = int(np.ceil(60.0 * sr / (hop * 40)))
  window = max(window, 2 * hi)
  starts = range(0, max(1, len(onset) - window + 1), window // 2)
  acs = []
  for a in starts:
    x = onset[a:a + window]
    x = x - x.mean()
    if len(x) <= hi:
      continue
    ac = np.correlate(x, x, mode="full")[len(x) - 1:len(x) + hi]
    acs.append(ac / (ac[0] + len(x) * floor ** 2))
  if not acs:
    return 0.0
  ac = np.mean(acs, axis=0)
  return float(max(0.0, ac[lo:hi + 1].max()))


def describe(y: np.ndarray, sr: int = ANALYSIS_SR) -> dict:
  """Measured descriptors of mono audio.

  ``tempo_bpm``: ``librosa.beat.beat_track``; ``pulse_clarity``: see ``pulse_clarity``; ``tonic``/``mode``/
  ``key_correlation``: ``music_metrics.estimate_key``; ``rms_db`` (whole track) and
  ``rms_db_std_5s`` (spread of 5-s windows), ``peak_db``; ``centroid_hz``: median spectral
  centroid over the frames within 30 dB of the loudest; ``percussive_share``: the percussive part
  of the energy after harmonic/percussive median-filter separation of a 128-band mel spectrogram.
  """
  import librosa

  from lmdm_jax import music_metrics as mm
  y = np.asarray(y, np.float32)
  hop = 512
  S = np.abs(librosa.stft(y, n_fft=2048, hop_length=hop))
  mel = librosa.feature.melspectrogram(S=S ** 2, sr=sr, n_mels=128)
  frame_db = 10 * np.log10(mel.sum(axis=0) + 1e-12)
  loud = frame_db > np.percentile(frame_db, 95) - 30
  cent = librosa.feature.spectral_centroid(S=S, sr=sr)[0]
  H, P = librosa.decompose.hpss(mel, kernel_size=17)
  onset = librosa.onset.onset_strength(S=librosa.power_to_db(mel), sr=sr, hop_length=hop)
  tempo, _ = librosa.beat.beat_track(onset_envelope=onset, sr=sr, hop_length=hop)
  tempo = float(np.atleast_1d(tempo)[0])
  clarity = pulse_clarity(onset, sr, hop)
  tonic, mode, corr = mm.estimate_key(y, sr)
  win = mm.loudness_windows(y, sr, 5.0) if len(y) >= 5 * sr else np.array(
      [20 * np.log10(np.sqrt(np.mean(y.astype(np.float64) ** 2)) + 1e-9)])
  rms = float(np.sqrt(np.mean(y.astype(np.float64) ** 2)))
  return dict(
      tempo_bpm=round(tempo, 1), pulse_clarity=round(clarity, 3),
      tonic=mm.NAMES[tonic], mode=mode, key_correlation=round(float(corr), 3),
      rms_db=round(float(20 * np.log10(rms + 1e-9)), 2),
      rms_db_std_5s=round(float(win.std()), 2),
      peak_db=round(float(20 * np.log10(np.max(np.abs(y)) + 1e-9)), 2),
      centroid_hz=round(float(np.median(cent[loud])) if loud.any() else 0.0, 1),
      percussive_share=round(float(P.sum() / max(float(H.sum() + P.sum()), 1e-12)), 3))


# Thresholds that turn descriptors into words (fixed: captions are deterministic).
PULSE_CLARITY_MIN = 0.3  # see ``describe``: below, no tempo is stated
KEY_CORRELATION_MIN = 0.6  # Krumhansl-Kessler profile correlation: below, no key is stated
LOUDNESS_WORDS = ((-32.0, "very quiet"), (-25.0, "quiet"), (-13.0, ""), (999.0, "loud"))
BRIGHTNESS_WORDS = ((900.0, "dark"), (1500.0, "warm"), (2400.0, ""), (1e9, "bright"))
PERCUSSION_WORDS = ((0.1, "sustained"), (0.35, ""), (2.0, "percussive"))


def _word(value: float, table) -> str:
  for lim, w in table:
    if value < lim:
      return w
  return ""


def tempo_word(bpm: float) -> str:
  for lim, word in ((60, "very slow"), (80, "slow"), (100, "moderate"), (130, "lively"),
                    (170, "fast")):
    if bpm < lim:
      return word
  return "very fast"


def descriptor_words(d: dict) -> dict:
  """The words a caption uses: tempo (or "" without a clear beat), loudness, brightness,
  percussion, the key ("A minor", or "" when unclear) and the BPM (or None)."""
  beat = d["pulse_clarity"] >= PULSE_CLARITY_MIN
  return dict(
      tempo=tempo_word(d["tempo_bpm"]) if beat else "",
      loudness=_word(d["rms_db"], LOUDNESS_WORDS),
      brightness=_word(d["centroid_hz"], BRIGHTNESS_WORDS),
      percussion=_word(d["percussive_share"], PERCUSSION_WORDS),
      key=f"{d['tonic']} {d['mode']}" if d["key_correlation"] >= KEY_CORRELATION_MIN else "",
      bpm=int(round(d["tempo_bpm"])) if beat else None)


def _join(words: list) -> str:
  words = [w for w in words if w]
  if len(words) <= 1:
    return "".join(words)
  return ", ".join(words[:-1]) + " and " + words[-1]


_TEMPLATES = [
    "{Mood} game music from {game}: '{title}'{by}.{tail}",
    "'{title}'{by}, {mood} music from the game {game}.{tail}",
    "{Mood} piece '{title}' from the {game} soundtrack{by}.{tail}",
]


def make_caption(track_meta: dict, descriptors: dict, seed_key: str) -> str:
  """One caption in the corpus captions' style, e.g. "Lively, bright and percussive game music
  from SuperTuxKart: 'Bay' by 0zone0ne. E minor, 128 BPM." The template is chosen by a hash of
  ``seed_key`` (deterministic)."""
  w = descriptor_words(descriptors)
  mood_words = [w["tempo"], w["loudness"], w["brightness"], w["percussion"]]
  mood = _join(mood_words) or "instrumental"
  tail_parts = []
  if w["key"]:
    tail_parts.append(w["key"])
  if w["bpm"] is not None:
    tail_parts.append(f"{w['bpm']} BPM")
  else:
    tail_parts.append("no steady beat")
  tail = " " + ", ".join(tail_parts) + "."
  tail = tail[:2].upper() + tail[2:]
  comp = track_meta.get("composer") or ""
  by = f" by {comp}" if comp else ""
  rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed_key.encode()).digest()[:8],
                                             "little"))
  t = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
  return t.format(Mood=mood[:1].upper() + mood[1:], mood=mood, game=track_meta["game"],
                  title=track_meta["title"], by=by, tail=tail)


# ---------------------------------------------------------------------------------------------
# Building


def _package_licences(pkg: str, root: str) -> tuple:
  path = os.path.join(root, "usr", "share", "doc", pkg, "copyright")
  if not os.path.isfile(path):
    raise RecordedError(f"{pkg}: no copyright file at {path}")
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read(), path


def track_licence(track: Track, copyright_text: str, version: str) -> dict:
  """The licence record of one track (also its sidecar's licence fields): package, version,
  licence (SPDX style), licence_debian (as the copyright file names it), copyright (the holder
  line), stanza (the matching ``Files`` patterns), composer (where the package names one),
  attribution (one line) and free (bool)."""
  spec = PACKAGES[track.package]
  game = spec.game
  c = copyright_for(copyright_text, track.rel)
  spdx = spdx_name(c["licence_debian"]) if c["licence_debian"] else ""
  holder = c["copyright"]
  composer = track.composer
  if not composer and spec.composer in ("holder", "upstream_author"):
    composer = person_name(holder)
  attribution = (f"'{track.title}'" + (f" by {composer}" if composer else "") + f", from {game}"
                 + (f"; (c) {holder}" if holder else "") + f"; {spdx or 'no licence named'}; "
                 + f"Debian package {track.package} {version}")
  return dict(package=track.package, version=version, licence=spdx,
              licence_debian=c["licence_debian"], copyright=holder, stanza=c["stanza"],
              composer=composer, attribution=attribution, free=is_free(spdx))


def _upstream_notes(track: Track, pkg_root: str) -> dict:
  """Licence statements shipped beside the music (Warzone 2100's per-album license.txt), quoted
  (their first lines), not interpreted."""
  out = {}
  lic = os.path.join(os.path.dirname(track.path), "license.txt")
  if os.path.isfile(lic):
    with open(lic, encoding="utf-8", errors="replace") as f:
      head = [s.strip() for s in f.read().split("[EN]")[0].splitlines() if s.strip()]
    out["upstream_licence_file"] = os.path.relpath(lic, pkg_root).replace(os.sep, "/")
    out["upstream_licence_note"] = " ".join(head)[:600]
  return out


def _caption_fields(meta: dict, desc: dict, source: str) -> dict:
  return dict(caption=make_caption(meta, desc, source), descriptors=desc,
              words={k: v for k, v in descriptor_words(desc).items() if v not in ("", None)})


def _refresh(side: dict, meta: dict, track: Track) -> bool:
  """Bring a finished track's sidecar up to the current metadata, hold-out and caption rules
  (captions from its stored descriptors: nothing is measured again). Returns whether it
  changed."""
  new = dict(side, **meta)
  new.update(_caption_fields(new, side["descriptors"], track.source))
  if new == side:
    return False
  side.update(new)
  return True


def convert_track(track: Track, meta: dict, out_audio: str, min_seconds: float,
                  sample_rate: Optional[int]) -> dict:
  """Decode, trim, write ``<pkg>/<name>.flac``, measure, caption; write the sidecar last.
  Returns the sidecar."""
  t0 = time.time()
  with tempfile.TemporaryDirectory(prefix="lmdm_recorded_") as tmp:
    audio, sr, fmt = decode(track, tmp)
  audio, cut_a, cut_b = trim_silence(audio, sr)
  seconds = audio.shape[1] / sr
  if seconds < min_seconds:
    raise AudioFileError(track.path, f"too short: {seconds:.1f} s < {min_seconds:.0f} s")
  if sample_rate and sample_rate != sr:
    audio, sr = resample(audio, sr, sample_rate), int(sample_rate)
  peak = float(np.max(np.abs(audio)))
  gain = 1.0
  if peak > 1.0:  # lossy decoders overshoot a little: scale instead of clipping
    gain = 0.999 / peak
    audio = audio * np.float32(gain)
  mono = resample(audio.mean(axis=0, keepdims=True), sr, ANALYSIS_SR)[0]
  desc = describe(mono, ANALYSIS_SR)
  d = os.path.join(out_audio, track.package)
  os.makedirs(d, exist_ok=True)
  save_audio(os.path.join(d, track.name + ".flac"), audio, sr, subtype="PCM_16")
  side = dict(meta)
  side.update(
      **_caption_fields(meta, desc, track.source), duration=round(seconds, 3), sample_rate=sr, channels=int(audio.shape[0]),
      source_format=fmt, trimmed_seconds=[round(cut_a, 3), round(cut_b, 3)],
      gain=round(gain, 6), generator=GENERATOR, seconds_to_make=round(time.time() - t0, 2))
  _write_json(os.path.join(d, track.name + ".json"), side, only_if_changed=False)
  return side


def build(out: str, packages=None, fetch: bool = True, min_seconds: float = 10.0,
          sample_rate: Optional[int] = None, limit: Optional[int] = None,
          progress: bool = True) -> dict:
  """Fetch, extract, license-check, convert and caption every track of ``packages`` (default:
  all of ``PACKAGES``) under ``out``. Resumable; returns the report (also ``report.json``)."""
  packages = list(packages or PACKAGES)
  unknown = [p for p in packages if p not in PACKAGES]
  if unknown:
    raise RecordedError(f"unknown package(s) {unknown}: this module takes only {sorted(PACKAGES)}")
  out_audio = os.path.join(out, "audio")
  os.makedirs(out_audio, exist_ok=True)
  pkg_recs, tracks, texts = {}, [], {}
  for pkg in packages:
    rec = prepare_package(pkg, out, fetch=fetch)
    root = os.path.join(out, "extract", pkg)
    text, cpath = _package_licences(pkg, root)
    texts[pkg] = text
    dst = os.path.join(out, "copyright", pkg)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if not os.path.isfile(dst) or open(dst, encoding="utf-8", errors="replace").read() != text:
      shutil.copyfile(cpath, dst)
    pkg_recs[pkg] = rec
    tracks += list_tracks(pkg, root)[:limit] if limit else list_tracks(pkg, root)
  lic_tracks, rejected, skipped, usable, made = {}, [], [], [], 0
  for t in tracks:  # licences and lengths first: the hold-out is drawn among usable tracks
    lic = track_licence(t, texts[t.package], pkg_recs[t.package]["version"])
    if not lic["free"]:
      rejected.append(dict(source=t.source, licence=lic["licence"] or "(none named)",
                           licence_debian=lic["licence_debian"], copyright=lic["copyright"]))
      for ext in (".json", ".flac"):  # made by a run under other rules: the sidecar goes first
        p = os.path.join(out_audio, t.package, t.name + ext)
        if os.path.exists(p):
          os.unlink(p)
      continue
    if not t.path.lower().endswith(MODULE_EXTS):
      try:
        seconds = audio_info(t.path)["duration"]
      except AudioFileError:
        seconds = None  # decoding will say why
      if seconds is not None and seconds < min_seconds:
        skipped.append(dict(source=t.source, reason=f"too short: {seconds:.1f} s < "
                            f"{min_seconds:.0f} s"))
        continue
    lic_tracks[t.source] = dict(lic, title=t.title, game=PACKAGES[t.package].game)
    usable.append(t)
  held = holdout_groups(usable)
  try:
    from tqdm import tqdm
    bar = tqdm(usable, desc="recorded", unit="track", disable=not progress, dynamic_ncols=True)
  except ImportError:  # pragma: no cover
    bar = usable
  for t in bar:
    spec = PACKAGES[t.package]
    lic = lic_tracks[t.source]
    split = "holdout" if t.group in held else "train"
    meta = dict(
        split=split, group=t.group, package=t.package, version=lic["version"], game=spec.game,
        title=t.title, composer=lic["composer"], licence=lic["licence"],
        licence_debian=lic["licence_debian"], copyright=lic["copyright"],
        attribution=lic["attribution"], copyright_stanza=lic["stanza"],
        package_path=t.rel, **t.extra, **_upstream_notes(t, os.path.join(out, "extract", t.package)))
    side_path = os.path.join(out_audio, t.package, t.name + ".json")
    if os.path.isfile(side_path):
      with open(side_path, encoding="utf-8") as f:
        side = json.load(f)
      if _refresh(side, meta, t):  # the rules changed: relabel and recaption, keep the audio
        _write_json(side_path, side, only_if_changed=False)
      continue
    try:
      convert_track(t, meta, out_audio, min_seconds, sample_rate)
      made += 1
    except (AudioFileError, OSError, subprocess.SubprocessError, ValueError) as e:
      reason = e.reason if isinstance(e, AudioFileError) else f"{type(e).__name__}: {e}"
      skipped.append(dict(source=t.source, reason=str(reason)[:300]))
      log.warning("skipping %s: %s", t.source, reason)
  return _finish(out, packages, pkg_recs, tracks, held, lic_tracks, rejected, skipped, made)


def _finish(out, packages, pkg_recs, tracks, held, lic_tracks, rejected, skipped, made) -> dict:
  out_audio = os.path.join(out, "audio")
  sides = {}
  for t in tracks:
    p = os.path.join(out_audio, t.package, t.name + ".json")
    if os.path.isfile(p):
      with open(p, encoding="utf-8") as f:
        sides[t.source] = json.load(f)
  per_pkg = {}
  for pkg in packages:
    s = [v for v in sides.values() if v["package"] == pkg]
    per_pkg[pkg] = dict(
        version=pkg_recs[pkg]["version"], tracks=len(s),
        hours=round(sum(v["duration"] for v in s) / 3600, 3),
        held_out=sum(v["split"] == "holdout" for v in s),
        licences=sorted({v["licence"] for v in s}))
  licences = dict(
      generator=GENERATOR,
      note=("Licences as stated in each Debian package's copyright file (copyright/<package>), "
            "matched per track; 'licence' is an SPDX-style name, 'licence_debian' the file's."),
      packages={pkg: dict(version=r["version"], deb=r["deb"], sha256=r["sha256"],
                          homepage=r.get("homepage", ""), game=PACKAGES[pkg].game,
                          copyright_file=f"copyright/{pkg}",
                          licences=sorted({v["licence"] for k, v in lic_tracks.items()
                                           if v["package"] == pkg}))
                for pkg, r in pkg_recs.items()},
      tracks={k: lic_tracks[k] for k in sorted(lic_tracks)},
      rejected=rejected)
  _write_json(os.path.join(out, "licences.json"), licences)
  held_sources = sorted(k for k, v in sides.items() if v["split"] == "holdout")
  _write_json(os.path.join(out, "holdout.json"), dict(
      rule=(f"per package, round({HOLDOUT_FRACTION} x works) works (>= 1 where a package has >= 3)"
            f" with the smallest sha256('{HOLDOUT_SALT}:<package>/<work>'), among the tracks with "
            "a free licence and long enough; a work's variants go with it. Sources are relative to audio/ (the dataset builder's 'source'); each "
            "sidecar's 'split' says the same and LatentDataset.split honours it."),
      groups=sorted(held), sources=held_sources,
      hours=round(sum(sides[k]["duration"] for k in held_sources) / 3600, 3)))
  total = sum(v["duration"] for v in sides.values())
  report = dict(tracks=len(sides), made_this_run=made, hours=round(total / 3600, 3),
                held_out_tracks=len(held_sources), packages=per_pkg,
                rejected_for_licence=rejected, skipped=skipped)
  _write_json(os.path.join(out, "report.json"), report)
  return report


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True, help="output folder (debs/, extract/, audio/, ...)")
  ap.add_argument("--packages", default="", help=f"comma-separated subset of: {', '.join(PACKAGES)}")
  ap.add_argument("--no-fetch", action="store_true",
                  help="use only packages already extracted under OUT/extract (no apt-get)")
  ap.add_argument("--min-seconds", type=float, default=10.0,
                  help="tracks shorter than this (after trimming silence) are skipped")
  ap.add_argument("--sample-rate", type=int, default=None,
                  help="resample to this rate (default: keep each track's native rate)")
  ap.add_argument("--limit", type=int, default=None, help="at most this many tracks per package")
  ap.add_argument("--quiet", action="store_true")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  pkgs = [p.strip() for p in args.packages.split(",") if p.strip()] or None
  try:
    report = build(args.out, pkgs, fetch=not args.no_fetch, min_seconds=args.min_seconds,
                   sample_rate=args.sample_rate, limit=args.limit, progress=not args.quiet)
  except RecordedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: v for k, v in report.items() if k not in ("skipped",)}, indent=1,
                   ensure_ascii=False))
  for s in report["skipped"]:
    print(f"skipped {s['source']}: {s['reason']}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
