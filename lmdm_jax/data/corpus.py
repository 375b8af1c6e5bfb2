"""Render a corpus of real (public-domain) music offline: music21's score corpus, orchestrated with
General MIDI instruments and rendered with FluidSynth.

Each piece gives
  ``OUT/audio/<id>.<ext>``         the mix (44.1 kHz stereo by default; ``--mono --sample-rate 22050``)
  ``OUT/stems/<id>/NN_<instr>.<ext>`` every part rendered alone, same length and alignment as the mix
  ``OUT/audio/<id>.json``          metadata sidecar (composer, title, ensemble, instruments, key,
                                   mode, tempo, time signature, stems, ...) with a ``caption``.
The mix is the sum of the stems (FluidSynth is linear: a joint render equals the sum of solo renders
to ~1e-7), with one loudness gain shared by all of them, so stems align with the mix sample for sample.

Deterministic from ``--seed``: candidates are shuffled per collection and interleaved round-robin (so
small collections are not drowned by the 1300 Palestrina movements), and every random choice for a
piece comes from a generator seeded by (seed, piece path). Resumable: a piece is finished when its
JSON sidecar exists (written last; every file goes through a temp file + rename); failures are
recorded in ``OUT/skipped.jsonl`` and not retried.

Timbres: ``--timbres classic`` (the default) draws exactly the instruments and random numbers of
the first corpora, so those are reproduced; ``--timbres wide`` adds General MIDI synth leads and
pads, electric pianos, electric guitars and basses (``WIDE_ENSEMBLES``: synth ensemble, synth
pads, electric band, rock band, electric jazz combo) and, under those, a drum kit on MIDI channel 10
(``drum_events``: a pattern in the piece's meter; its stem is marked ``"pitched": false``). The
sidecar records ``timbres`` and ``drums`` (the pattern's style, or null). Use a new folder for a
wide corpus (finished pieces are not re-rendered).

  python3 -m lmdm_jax.data.corpus --out data_cache/corpus --hours 3
  python3 -m lmdm_jax.data.corpus --out data_cache/corpus_wide --hours 3 --timbres wide
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

log = logging.getLogger("lmdm_jax.data.corpus")

DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
GENERATOR = "lmdm_jax.data.corpus/1"

# ---------------------------------------------------------------------------------------------
# General MIDI instruments used here: program -> (name, lowest, highest comfortable MIDI pitch)
GM = {
    0: ("piano", 21, 108), 1: ("bright piano", 21, 108), 4: ("electric piano", 28, 103),
    6: ("harpsichord", 29, 89), 11: ("vibraphone", 53, 89), 12: ("marimba", 45, 96),
    19: ("church organ", 24, 96), 20: ("reed organ", 36, 96), 21: ("accordion", 41, 93),
    22: ("harmonica", 60, 96), 24: ("nylon-string guitar", 40, 84),
    25: ("steel-string guitar", 40, 84), 32: ("acoustic bass", 28, 67),
    40: ("violin", 55, 100), 41: ("viola", 48, 88), 42: ("cello", 36, 76), 43: ("contrabass", 28, 67),
    45: ("pizzicato strings", 28, 96), 46: ("harp", 24, 103), 48: ("string ensemble", 28, 100),
    49: ("slow strings", 28, 100), 52: ("choir aahs", 40, 84), 53: ("voice oohs", 45, 81),
    56: ("trumpet", 55, 82), 57: ("trombone", 40, 72), 58: ("tuba", 28, 65),
    59: ("muted trumpet", 55, 82), 60: ("french horn", 41, 77), 61: ("brass section", 40, 84),
    64: ("soprano sax", 56, 88), 65: ("alto sax", 49, 81), 66: ("tenor sax", 44, 76),
    67: ("baritone sax", 36, 69), 68: ("oboe", 58, 91), 69: ("english horn", 52, 81),
    70: ("bassoon", 34, 75), 71: ("clarinet", 50, 91), 72: ("piccolo", 74, 108),
    73: ("flute", 60, 96), 74: ("recorder", 60, 96), 75: ("pan flute", 60, 96),
    78: ("whistle", 62, 96), 79: ("ocarina", 60, 89), 105: ("banjo", 48, 84),
    109: ("bagpipe", 55, 81), 110: ("fiddle", 55, 100),
    # used by the "wide" timbre set only (RenderConfig.timbres)
    5: ("FM electric piano", 28, 103), 26: ("jazz electric guitar", 40, 86),
    27: ("clean electric guitar", 40, 86), 29: ("overdriven guitar", 40, 86),
    30: ("distortion guitar", 40, 86), 33: ("electric bass", 28, 67),
    34: ("picked electric bass", 28, 67), 38: ("synth bass", 28, 72),
    80: ("square lead", 48, 96), 81: ("sawtooth lead", 48, 96), 88: ("new age pad", 36, 96),
    89: ("warm pad", 36, 96), 90: ("polysynth pad", 36, 96), 95: ("sweep pad", 36, 96),
    128: ("drum kit", 35, 81),  # not a GM program: the percussion channel (MIDI channel 10)
}
DRUMS = 128  # the program number standing for the drum kit on channel 10
TIMBRES = ("classic", "wide")
PLURAL = {"piano": "pianos", "bass": "basses"}

# Ensembles for polyphonic music, by register role top -> bottom (soprano, alto, tenor, bass).
# A part's role is its rank by mean pitch; parts beyond four share the nearest role.
POLY_ENSEMBLES = {
    "strings": ([40, 40, 41, 42], "string"),
    "string orchestra": ([48, 48, 48, 48], None),
    "woodwinds": ([73, 68, 71, 70], "woodwind"),
    "brass": ([56, 56, 60, 57], "brass"),
    "low brass": ([60, 60, 57, 58], "brass"),
    "saxophones": ([64, 65, 66, 67], "saxophone"),
    "recorders": ([74, 74, 74, 70], None),  # recorder consort with a bassoon bass
    "choir": ([52, 52, 52, 52], None),
    "voices": ([53, 53, 53, 53], None),
    "church organ": ([19, 19, 19, 19], None),
    "reed organ": ([20, 20, 20, 20], None),
    "piano": ([0, 0, 0, 0], None),
    "mixed winds and strings": ([73, 71, 41, 42], None),
    "clarinet and strings": ([71, 40, 41, 42], None),
}
# The "wide" timbre set adds these to the classic choices (same keys: register roles).
WIDE_ENSEMBLES = {
    "synth ensemble": ([81, 80, 89, 38], None),
    "synth pads": ([90, 89, 88, 38], None),
    "electric band": ([29, 4, 27, 33], None),
    "rock band": ([30, 29, 27, 34], None),
    "electric jazz combo": ([26, 4, 4, 33], None),
}
# probability that an ensemble of the wide set gets a drum kit
WIDE_DRUMS = {"synth ensemble": 0.8, "synth pads": 0.4, "electric band": 1.0, "rock band": 1.0,
              "electric jazz combo": 0.9}
SIZE_WORDS = {1: "solo", 2: "duo", 3: "trio", 4: "quartet", 5: "quintet", 6: "sextet",
              7: "septet", 8: "octet"}
KEYBOARD = {"piano": 0, "bright piano": 1, "electric piano": 4, "harpsichord": 6,
            "vibraphone": 11, "marimba": 12, "FM electric piano": 5, "warm pad": 89,
            "polysynth pad": 90}
SOLO_FOLK = [110, 40, 73, 78, 74, 21, 22, 105, 24, 75, 71, 109]
SOLO_ART = [73, 40, 68, 71, 42, 53, 56, 65, 11, 12, 24, 0]
ACCOMPANIMENT = [0, 0, 0, 4, 46, 24, 48]
SOLO_WIDE = [80, 81, 27, 29, 26, 5]  # added to the solo pools by the wide timbre set
ACCOMPANIMENT_WIDE = [4, 5, 27, 89, 90]

COMPOSERS = {
    "bach": "Johann Sebastian Bach", "beethoven": "Ludwig van Beethoven",
    "mozart": "Wolfgang Amadeus Mozart", "haydn": "Joseph Haydn",
    "palestrina": "Giovanni Pierluigi da Palestrina", "chopin": "Frédéric Chopin",
    "joplin": "Scott Joplin", "schumann_robert": "Robert Schumann",
    "schumann_clara": "Clara Schumann", "cpebach": "Carl Philipp Emanuel Bach",
    "verdi": "Giuseppe Verdi", "handel": "George Frideric Handel", "schubert": "Franz Schubert",
    "schoenberg": "Arnold Schoenberg", "weber": "Carl Maria von Weber", "webern": "Anton Webern",
    "corelli": "Arcangelo Corelli", "monteverdi": "Claudio Monteverdi",
    "josquin": "Josquin des Prez", "beach": "Amy Beach", "ciconia": "Johannes Ciconia",
    "lusitano": "Vicente Lusitano", "liliuokalani": "Liliʻuokalani",
    "johnson_j_r": "J. Rosamond Johnson",
}
TRADITIONAL = {
    "ryansMammoth": "traditional (Ryan's Mammoth Collection, 1883)",
    "oneills1850": "traditional Irish (O'Neill's Music of Ireland, 1903)",
    "airdsAirs": "traditional Scottish (Aird's Airs)", "essenFolksong": "traditional German",
    "miscFolk": "traditional", "nottingham-dataset": "traditional",
}
FOLK = set(TRADITIONAL)
# Collections left out by default: analyses and exercises (not music), tiny folk songs.
DEFAULT_EXCLUDE = ("theoryExercises", "demos", "essenFolksong", "leadSheet")
EXCLUDE_EXT = (".rntxt", ".txt", ".py", ".json")

VOCAL_WORDS = re.compile(
    r"\b(soprano|sopran|alto|altus|tenor|tenore|bass|basso|bassus|cantus|canto|contratenor|"
    r"superius|quintus|sextus|voice|gesang|choir|chorus|s|a|t|b|c|ct)\b", re.I)
KEY_WORDS = re.compile(r"(piano|organ|harpsichord|keyboard|cembalo|klavier|pianoforte|organo)",
                       re.I)
STRING_WORDS = [("violon", 42), ("violin", 40), ("violino", 40), ("viola", 41), ("cello", 42),
                ("violoncello", 42), ("contrabass", 43), ("double bass", 43), ("bass viol", 42)]
WIND_WORDS = [("clarinet", 71), ("klarinette", 71), ("flute", 73), ("flöte", 73), ("oboe", 68),
              ("bassoon", 70), ("horn", 60), ("trumpet", 56), ("trombone", 57)]


class SkipPiece(Exception):
  """A score that cannot or should not be rendered (the reason is recorded)."""


@dataclass
class Voice:
  """One part of the score, as notes in quarter lengths."""
  name: str
  notes: list  # (onset_ql, dur_ql, midi_pitch)
  role: str = "voice"  # vocal | keyboard | strings | wind | other
  program_hint: Optional[int] = None
  mean_pitch: float = 0.0


# ---------------------------------------------------------------------------------------------
# Candidates


def _corpus_paths():
  from music21 import corpus
  return sorted(str(p) for p in corpus.getCorePaths())


def _rel(path: str) -> str:
  """music21-corpus-relative path ('bach/bwv66.6.mxl'); other files keep their base name."""
  path = os.fspath(path).replace("\\", "/")
  i = path.rfind("/corpus/")
  if i >= 0:
    return path[i + 8:]
  return os.path.basename(path) if os.path.isabs(path) else path


def _piece_id(rel: str, opus_index=None) -> str:
  stem = os.path.splitext(rel)[0]
  pid = re.sub(r"[^A-Za-z0-9]+", "_", stem).strip("_")
  if opus_index is not None:
    pid += f"_n{opus_index}"
  return pid


def _seed_for(seed: int, key: str) -> np.random.Generator:
  h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
  return np.random.default_rng(int.from_bytes(h[:8], "little"))


def candidates(seed: int = 0, include=None, exclude=DEFAULT_EXCLUDE, paths=None) -> list:
  """Every renderable corpus path, in a deterministic order: shuffled within each collection
  (top-level corpus folder), then interleaved round-robin across collections."""
  paths = _corpus_paths() if paths is None else sorted(paths)
  # the corpus holds some scores twice (bwv281.krn and .mxl): keep one, MusicXML first
  pref = {".mxl": 0, ".musicxml": 1, ".xml": 2, ".krn": 3, ".abc": 4}
  best = {}
  for p in paths:
    rel = _rel(p)
    if rel.lower().endswith(EXCLUDE_EXT):
      continue
    pid = _piece_id(rel)
    rank = pref.get(os.path.splitext(rel)[1].lower(), 9)
    if pid not in best or rank < best[pid][0]:
      best[pid] = (rank, p)
  keep = {p for _, p in best.values()}
  groups = collections.defaultdict(list)
  for p in paths:
    if p not in keep:
      continue
    rel = _rel(p)
    coll = rel.split("/")[0]
    if include and coll not in include:
      continue
    if exclude and coll in exclude:
      continue
    groups[coll].append(p)
  order = []
  for coll in sorted(groups):
    ps = groups[coll]
    rng = _seed_for(seed, "order:" + coll)
    order.append([ps[i] for i in rng.permutation(len(ps))])
  # interleave; the collection order per round is itself shuffled (deterministically)
  out = []
  rng = _seed_for(seed, "rounds")
  for r in range(max((len(g) for g in order), default=0)):
    for gi in rng.permutation(len(order)):
      if r < len(order[gi]):
        out.append(order[gi][r])
  return out


# ---------------------------------------------------------------------------------------------
# Score analysis


def _part_name(part, i) -> str:
  name = (part.partName or "").strip()
  if not name or name.lower().startswith("musicxml part"):
    inst = part.getInstrument(returnDefault=False)
    name = (inst.instrumentName or "").strip() if inst is not None else ""
  return name or f"part {i + 1}"


def _classify(part, name) -> tuple:
  from music21 import stream
  low = name.lower()
  inst = part.getInstrument(returnDefault=False)
  iname = ((inst.instrumentName or "") if inst is not None else "").lower()
  for word, prog in STRING_WORDS:
    if word in low:
      return "strings", prog
  for word, prog in WIND_WORDS:
    if word in low:
      return "wind", prog
  if isinstance(part, stream.PartStaff) or KEY_WORDS.search(low) or (
      KEY_WORDS.search(iname) and not VOCAL_WORDS.search(low)):
    return "keyboard", None
  if VOCAL_WORDS.search(low):
    return "vocal", None
  return "other", None


def _extract_notes(part) -> list:
  flat = part.flatten().stripTies(inPlace=False)
  notes = []
  for n in flat.notes:
    ql = float(n.quarterLength)
    if ql <= 0:  # grace notes
      continue
    off = float(n.offset)
    pitches = getattr(n, "pitches", ())
    for p in pitches:
      m = int(round(p.ps))
      if 0 <= m <= 127:
        notes.append((off, ql, m))
  notes.sort()
  return notes


def _first(score, cls):
  return score.recurse().getElementsByClass(cls).first()


def _tempo_mark_bpm(score, beat_ql: float) -> Optional[float]:
  """The first metronome mark (or tempo word) as beats per minute of the time signature's beat."""
  from music21 import tempo
  for mm in score.recurse().getElementsByClass(tempo.TempoIndication):
    try:
      if isinstance(mm, tempo.MetronomeMark):
        if mm.number is None and mm.text:
          mm = tempo.TempoText(mm.text).getMetronomeMark()
      elif isinstance(mm, tempo.TempoText):
        mm = mm.getMetronomeMark()
      else:
        continue
      if mm is None or mm.number is None:
        continue
      q = mm.getQuarterBPM()
      if q:
        return float(q) * beat_ql
    except Exception:  # noqa: BLE001 - odd marks: fall back to a chosen tempo
      continue
  return None


# default beats-per-minute ranges when a score gives no tempo
def _default_bpm_range(collection: str, beat_ql: float, kind: str):
  compound = abs(beat_ql - 1.5) < 1e-6
  if collection == "bach":
    return (60, 92)
  if collection in ("palestrina", "josquin", "lusitano", "luca", "monteverdi"):
    return (54, 76) if beat_ql >= 2 else (72, 108)
  if collection == "trecento":
    return (50, 76) if compound else (60, 96)
  if collection in FOLK:
    return (92, 118) if compound else ((88, 112) if beat_ql >= 2 else (100, 140))
  if compound:
    return (52, 96)
  if beat_ql >= 2:
    return (50, 90)
  if beat_ql <= 0.5:
    return (80, 140)
  return (66, 132)


def _nice_title(rel: str, md) -> tuple:
  """(title, work) from metadata, falling back to the corpus path."""
  title = (getattr(md, "title", None) or "") if md else ""
  movement = (getattr(md, "movementName", None) or "") if md else ""
  if re.search(r"\.(mxl|xml|krn|abc|musicxml)$", movement or "", re.I):
    movement = ""
  parts = rel.split("/")
  coll = parts[0]
  stem = os.path.splitext(parts[-1])[0]
  work = ""
  if coll == "bach" and not title:
    m = re.match(r"bwv(\d+)\.?(\d*)", stem)
    if m:
      title = f"Chorale BWV {m.group(1)}" + (f".{m.group(2)}" if m.group(2) else "")
  if coll in ("beethoven", "mozart", "haydn", "schumann_robert", "schoenberg", "corelli") and len(
      parts) >= 3:
    opus = parts[-2]
    m = re.match(r"opus(\d+)no(\d+)", opus)
    if m:
      work = f"Op. {m.group(1)} No. {m.group(2)}"
    elif re.match(r"opus(\d+)$", opus):
      work = f"Op. {opus[4:]}"
    elif re.match(r"k\d+", opus):
      work = f"K. {opus[1:]}"
    mv = re.match(r"movement(\d+)", stem)
    if not title and movement:
      title = movement
    if not title:
      kind = {"beethoven": "String Quartet", "mozart": "String Quartet", "haydn": "String Quartet",
              "schumann_robert": "String Quartet", "schoenberg": "Six Little Piano Pieces",
              "corelli": "Trio Sonata"}[coll]
      title = f"{kind} {work}".strip()
      if mv:
        title += f", movement {mv.group(1)}"
  if not title:
    title = movement or stem.replace("_", " ")
  elif movement and movement not in title:
    title = f"{title} ({movement})"
  title = re.sub(r"\s+", " ", title).strip().strip(".")
  title = re.sub(r"^\d+[a-z]?\.\s+", "", title)  # "15a. Kyrie" -> "Kyrie"
  if title == stem.replace("_", " ") and title.islower():
    title = title.title()
  if title.isupper():
    title = title.title().replace("'S", "'s")
  title = re.sub(r"\s*--\s*(\w[\w ]*)$", lambda m: f" ({m.group(1).lower()})", title)
  return title, work


def _composer(collection: str, md) -> str:
  if collection in COMPOSERS:
    return COMPOSERS[collection]
  if collection in TRADITIONAL:
    return TRADITIONAL[collection]
  c = (getattr(md, "composer", None) or "") if md else ""
  c = re.sub(r"\s+", " ", c).strip()
  if c.lower().startswith(("anonymous", "anon.", "anon ")):
    c = ""
  if "," in c and c.count(",") == 1:  # "Chopin, Frederic" -> "Frederic Chopin"
    last, first = [x.strip() for x in c.split(",")]
    c = f"{first} {last}"
  if not c:
    return "anonymous (14th century)" if collection == "trecento" else "anonymous"
  return c


def _key_name(k) -> tuple:
  tonic = k.tonic.name.replace("-", "b")
  mode = k.mode if k.mode in ("major", "minor") else "major"
  return f"{tonic} {mode}", tonic, mode


@dataclass
class Analysis:
  voices: list
  kind: str  # polyphonic | strings | keyboard | song | solo
  title: str
  work: str
  composer: str
  key: str
  tonic: str
  mode: str
  time_signature: str
  beat_ql: float
  marked_bpm: Optional[float]
  total_ql: float
  measure_offsets: list
  expanded_repeats: bool


MAX_BPM = 220  # the fastest tempo ever chosen (beats per minute)


def analyze_score(score, rel: str, max_seconds: Optional[float] = None) -> Analysis:
  """Voices, ensemble kind and metadata of a parsed music21 score.

  Repeats are written out, unless the score as written already lasts ``max_seconds`` at the
  fastest tempo (it will be cut anyway; expanding a long score takes minutes).
  """
  from music21 import meter
  collection = rel.split("/")[0]
  md = score.metadata
  expanded = False
  ts = _first(score, meter.TimeSignature)
  beat_ql = float(ts.beatDuration.quarterLength) if ts is not None else 1.0
  if max_seconds is None or score.highestTime < max_seconds * MAX_BPM / 60 * beat_ql:
    try:
      ex = score.expandRepeats()
      if ex is not None and ex.highestTime >= score.highestTime:
        expanded = ex.highestTime > score.highestTime
        score = ex
    except Exception:  # noqa: BLE001 - badly formed repeats: render as written
      pass
  ts = _first(score, meter.TimeSignature)
  ts_str = ts.ratioString if ts is not None else "4/4"
  beat_ql = float(ts.beatDuration.quarterLength) if ts is not None else 1.0
  try:
    k = score.analyze("key")
    key, tonic, mode = _key_name(k)
  except Exception:  # noqa: BLE001
    key, tonic, mode = "C major", "C", "major"
  voices = []
  for i, part in enumerate(score.parts):
    name = _part_name(part, i)
    role, hint = _classify(part, name)
    notes = _extract_notes(part)
    if not notes:
      continue
    mean = float(np.mean([n[2] for n in notes]))
    voices.append(Voice(name=name, notes=notes, role=role, program_hint=hint, mean_pitch=mean))
  if not voices:
    raise SkipPiece("no pitched notes")
  roles = [v.role for v in voices]
  if all(r == "keyboard" for r in roles):
    kind = "keyboard"
  elif "keyboard" in roles:
    kind = "song"
  elif len(voices) == 1:
    kind = "solo"
  elif all(r == "strings" for r in roles):
    kind = "strings"
  else:
    kind = "polyphonic"
  title, work = _nice_title(rel, md)
  first = score.parts[0]
  offsets = sorted({float(m.offset) for m in first.getElementsByClass("Measure")})
  return Analysis(voices=voices, kind=kind, title=title, work=work,
                  composer=_composer(collection, md), key=key, tonic=tonic, mode=mode,
                  time_signature=ts_str, beat_ql=beat_ql,
                  marked_bpm=_tempo_mark_bpm(score, beat_ql),
                  total_ql=max(n[0] + n[1] for v in voices for n in v.notes),
                  measure_offsets=offsets, expanded_repeats=expanded)


# ---------------------------------------------------------------------------------------------
# Orchestration


def _fit_octave(notes, program) -> int:
  """Octave shift (-2..2) that puts most notes inside the instrument's range."""
  _, lo, hi = GM[program]
  pitches = np.array([n[2] for n in notes])
  best = (None, None)
  for k in (0, 1, -1, 2, -2):
    p = pitches + 12 * k
    out = int(np.sum((p < lo) | (p > hi)))
    if best[0] is None or out < best[0]:
      best = (out, k)
  # shift only when it helps clearly (fewer than 80% of the out-of-range notes remain)
  out0 = int(np.sum((pitches < GM[program][1]) | (pitches > GM[program][2])))
  if best[1] != 0 and best[0] <= 0.8 * out0 and out0 > 0.05 * len(pitches):
    return best[1]
  return 0


def _weighted(rng, options: dict):
  keys = list(options)
  w = np.array([options[k] for k in keys], float)
  return keys[int(rng.choice(len(keys), p=w / w.sum()))]


def orchestrate(an: Analysis, collection: str, rng: np.random.Generator,
                timbres: str = "classic") -> tuple:
  """Choose GM programs for every voice. Returns (ensemble name, [program per voice]).

  ``timbres="classic"`` draws exactly as before the wide set existed (same random numbers, same
  choices: corpora rendered then are reproduced); ``"wide"`` adds synth leads and pads, electric
  pianos, guitars and basses (``WIDE_ENSEMBLES``, ``SOLO_WIDE``, ``ACCOMPANIMENT_WIDE``).
  """
  if timbres not in TIMBRES:
    raise ValueError(f"timbres must be one of {TIMBRES}, not {timbres!r}")
  wide = timbres == "wide"
  n = len(an.voices)
  order = np.argsort([-v.mean_pitch for v in an.voices], kind="stable")
  rank = np.empty(n, int)
  rank[order] = np.arange(n)

  def role_of(r):  # rank -> soprano/alto/tenor/bass index
    if n == 1:
      return 0
    return int(round(r * 3 / (n - 1)))

  def poly(name):
    progs, family = POLY_ENSEMBLES[name] if name in POLY_ENSEMBLES else WIDE_ENSEMBLES[name]
    programs = [progs[role_of(rank[i])] for i in range(n)]
    if name == "brass" and n >= 4:  # a tuba under a brass quartet/quintet bass line
      low = [i for i in range(n) if rank[i] == n - 1][0]
      if an.voices[low].mean_pitch < 50:
        programs[low] = 58
    if family:
      ens = f"{family} {SIZE_WORDS.get(n, 'ensemble')}"
    elif name == "recorders":
      ens = "recorder consort"
    elif name in ("choir", "voices"):
      ens = f"{n}-part choir ({GM[programs[0]][0]})"
    elif name in ("church organ", "reed organ", "piano"):
      ens = f"{name} ({n} voices)"
    elif name == "string orchestra" or name in WIDE_ENSEMBLES:
      ens = name
    else:
      ens = f"chamber ensemble ({name})"
    return ens, programs

  if an.kind == "keyboard":
    baroque = collection in ("cpebach", "bach", "handel", "corelli")
    opts = {"piano": 6, "bright piano": 1, "electric piano": 1.5, "harpsichord": 3 if baroque else 0.6,
            "vibraphone": 0.3, "marimba": 0.3}
    if wide:
      opts.update({"electric piano": 3, "FM electric piano": 2, "warm pad": 1, "polysynth pad": 1})
    name = _weighted(rng, opts)
    return name, [KEYBOARD[name]] * n
  if an.kind == "song":
    acc = int(rng.choice(ACCOMPANIMENT + ACCOMPANIMENT_WIDE if wide else ACCOMPANIMENT))
    programs = [acc] * n
    melodic = [i for i, v in enumerate(an.voices) if v.role != "keyboard"]
    if len(melodic) == 1:
      v = an.voices[melodic[0]]
      if v.program_hint is not None and rng.random() < 0.8:
        programs[melodic[0]] = v.program_hint
      else:
        programs[melodic[0]] = int(rng.choice([53, 52, 40, 73, 71, 42, 68, 65]
                                              + ([80, 81, 27, 29] if wide else [])))
      lead = GM[programs[melodic[0]]][0]
    elif all(an.voices[i].program_hint is not None for i in melodic) and rng.random() < 0.7:
      for i in melodic:  # named instruments (a piano trio's violin and cello): keep them
        programs[i] = an.voices[i].program_hint
      lead = " and ".join(dict.fromkeys(GM[programs[i]][0] for i in melodic))
    else:  # a choir (or several solo voices): one coherent ensemble for all of them
      sub = Analysis(**{**an.__dict__, "voices": [an.voices[i] for i in melodic],
                        "kind": "polyphonic"})
      lead, progs = orchestrate(sub, collection, rng, timbres)
      for i, p in zip(melodic, progs):
        programs[i] = p
    return f"{lead} with {GM[acc][0]}", programs
  if an.kind == "solo":
    pool = SOLO_FOLK if collection in FOLK else SOLO_ART
    if wide:
      pool = pool + SOLO_WIDE
    v = an.voices[0]
    if v.program_hint is not None and rng.random() < 0.7:
      p = v.program_hint
    else:
      p = int(rng.choice(pool))
    return f"solo {GM[p][0]}", [p]
  if an.kind == "strings":
    r = rng.random()
    if r < 0.55 and all(v.program_hint is not None for v in an.voices):
      programs = [v.program_hint for v in an.voices]
      return f"string {SIZE_WORDS.get(n, 'ensemble')}", programs
    if r < 0.75:
      return poly("string orchestra")
    opts = {"woodwinds": 1, "brass": 1, "saxophones": 0.7, "clarinet and strings": 0.7, "piano": 0.5}
    if wide:
      opts.update({"synth pads": 1, "synth ensemble": 0.7, "electric band": 0.7})
    return poly(_weighted(rng, opts))
  # polyphonic (vocal or unlabeled parts)
  sacred = collection in ("palestrina", "bach", "josquin", "trecento", "luca", "ciconia")
  opts = {"strings": 3, "string orchestra": 1.5, "woodwinds": 1.5, "brass": 1.5, "low brass": 0.5,
          "saxophones": 1, "recorders": 1, "choir": 2.5 if sacred else 1.5, "voices": 1,
          "church organ": 2 if sacred else 0.7, "reed organ": 0.4, "piano": 1,
          "mixed winds and strings": 1, "clarinet and strings": 0.6}
  if wide:
    opts.update({"synth ensemble": 2, "synth pads": 1.5, "electric band": 2, "rock band": 1.5,
                 "electric jazz combo": 1})
  return poly(_weighted(rng, opts))


# ---------------------------------------------------------------------------------------------
# MIDI + FluidSynth


def _pans(n, rng):
  if n == 1:
    return [int(np.clip(64 + rng.integers(-8, 9), 0, 127))]
  spread = rng.uniform(28, 48)
  return [int(np.clip(round(64 + spread * (2 * i / (n - 1) - 1)), 0, 127)) for i in range(n)]


def _write_stem_midi(path, events, program, pan, reverb, chorus):
  """One stem as a MIDI file; ``program`` ``DRUMS`` writes a drum part (MIDI channel 10)."""
  import pretty_midi
  pm = pretty_midi.PrettyMIDI(initial_tempo=120.0)
  if program == DRUMS:
    inst = pretty_midi.Instrument(program=0, is_drum=True)
  else:
    inst = pretty_midi.Instrument(program=program)
  for num, val in ((7, 110), (10, pan), (11, 127), (91, reverb), (93, chorus)):
    inst.control_changes.append(pretty_midi.ControlChange(num, int(val), 0.0))
  for (start, end, pitch, vel) in events:
    inst.notes.append(pretty_midi.Note(velocity=int(vel), pitch=int(pitch), start=float(start),
                                       end=float(end)))
  pm.instruments.append(inst)
  pm.write(path)


def fluidsynth_available(soundfont: str = DEFAULT_SOUNDFONT) -> Optional[str]:
  """None if FluidSynth and the soundfont are usable, else the reason."""
  if shutil.which("fluidsynth") is None:
    return "the fluidsynth program is not installed (Debian: apt-get install fluidsynth)"
  if not os.path.isfile(soundfont):
    return f"soundfont {soundfont} not found (Debian: apt-get install fluid-soundfont-gm)"
  return None


def render_midi(midi_path, wav_path, sample_rate, soundfont=DEFAULT_SOUNDFONT, timeout=600):
  """FluidSynth offline render to a float WAV; returns (channels, samples) float32."""
  import soundfile as sf
  cmd = ["fluidsynth", "-ni", "-q", "-R", "1", "-C", "1", "-g", "0.5",
         "-r", str(int(sample_rate)), "-F", wav_path,
         "-o", "audio.file.format=float", "-o", "audio.file.type=wav",
         "-o", "synth.cpu-cores=1", "-o", "synth.polyphony=512",
         soundfont, midi_path]
  res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
  if res.returncode != 0 or not os.path.isfile(wav_path):
    raise RuntimeError(f"fluidsynth failed ({res.returncode}): "
                       f"{res.stderr.decode(errors='replace')[-500:]}")
  data, sr = sf.read(wav_path, dtype="float32", always_2d=True)
  assert sr == sample_rate, (sr, sample_rate)
  return data.T


def _performance(an: Analysis, programs, sec_per_ql, cut_ql, repeats, rng):
  """Per voice (start, end, pitch, velocity) events in seconds, with light humanization."""
  out = []
  total_ql = min(an.total_ql, cut_ql)
  melody = int(np.argmax([v.mean_pitch for v in an.voices]))
  for voice_i, (v, prog) in enumerate(zip(an.voices, programs)):
    shift = _fit_octave(v.notes, prog)
    base = rng.uniform(68, 92) + (6 if voice_i == melody and len(an.voices) > 1 else 0)
    legato = rng.uniform(0.88, 0.97)
    if prog in (45, 105, 24, 25, 46, 11, 12, 0, 1, 4, 6):  # plucked/struck: let it ring
      legato = 1.0
    events = []
    for rep in range(repeats):
      t0 = rep * total_ql
      for (on, dur, pitch) in v.notes:
        if on >= cut_ql:
          continue
        dur = min(dur, cut_ql - on)
        p = pitch + 12 * shift
        if not 0 <= p <= 127:
          continue
        beat_pos = (on / an.beat_ql) % 1.0
        accent = 6 if abs(beat_pos) < 1e-6 else 0
        vel = int(np.clip(base + accent + rng.normal(0, 4), 30, 120))
        jitter = rng.normal(0, 0.004)
        start = max(0.0, (t0 + on) * sec_per_ql + jitter)
        end = (t0 + on + dur * legato) * sec_per_ql
        end = max(end, start + 0.03)
        events.append((start, end, p, vel))
    out.append((events, shift))
  return out


# General MIDI percussion keys (channel 10)
KICK, SNARE, CLOSED_HAT, OPEN_HAT, RIDE, CRASH, SIDE_STICK = 36, 38, 42, 46, 51, 49, 37
DRUM_STYLES = ("backbeat", "four on the floor", "ride", "brushes")


def _bars(an: Analysis, total_ql: float) -> list:
  """(start, length) in quarter lengths of every bar up to ``total_ql``; bars come from the
  score's measures (a short first bar, a pickup, keeps its place) or, without them, from the
  time signature."""
  offs = [o for o in an.measure_offsets if o < total_ql]
  if len(offs) < 2:
    num = int(an.time_signature.split("/")[0]) if "/" in an.time_signature else 4
    beat_len = 4.0 / int(an.time_signature.split("/")[1]) if "/" in an.time_signature else 1.0
    bar = max(num * beat_len, an.beat_ql)
    offs = list(np.arange(0.0, total_ql, bar))
  ends = offs[1:] + [total_ql]
  return [(float(a), float(b - a)) for a, b in zip(offs, ends) if b > a]


def drum_events(an: Analysis, sec_per_ql: float, cut_ql: float, repeats: int,
                rng: np.random.Generator, style: str) -> list:
  """A drum-kit part in the piece's meter: (start s, end s, GM percussion key, velocity).

  Per bar of ``b`` beats (the score's beat unit): a kick on the downbeat (and on beat ``b/2``
  of even bars; on every beat for ``"four on the floor"``), a backbeat (snare, or side stick for
  ``"brushes"``) on the off beats of even bars and on beats 2 and 3 of triple bars, hi-hat (ride
  for ``"ride"``/``"brushes"``) on every subdivision (3 per dotted beat, else 2), a crash on the
  first downbeat and every 8 bars. Short (pickup) bars are aligned to their end. Timing and
  velocities are lightly humanized like the pitched parts.
  """
  if style not in DRUM_STYLES:
    raise ValueError(f"unknown drum style {style!r}")
  total_ql = min(an.total_ql, cut_ql)
  beat = an.beat_ql
  sub = 3 if abs(beat - 1.5) < 1e-6 or abs(beat - 3.0) < 1e-6 else 2
  bars = _bars(an, total_ql)
  full = max((length for _, length in bars), default=4 * beat)
  first_full = next((k for k, (_, length) in enumerate(bars) if length >= full - 1e-6), 0)
  cymbal = RIDE if style in ("ride", "brushes") else (OPEN_HAT if style == "four on the floor"
                                                       else CLOSED_HAT)
  back = SIDE_STICK if style == "brushes" else SNARE
  base = rng.uniform(70, 95)
  events = []
  for rep in range(repeats):
    t0 = rep * total_ql
    for k, (start, length) in enumerate(bars):
      nb = max(1, int(round(full / beat)))
      shift = length - full  # <= 0: a pickup bar keeps only its last beats
      hits = []
      for b in range(nb):
        pos = b * beat
        if b == 0 or (style == "four on the floor") or (nb % 2 == 0 and nb >= 4 and b == nb // 2):
          hits.append((pos, KICK, 12))
        if (nb % 2 == 0 and b % 2 == 1) or (nb == 3 and b > 0):
          hits.append((pos, back, 8 if nb != 3 else -6))
        for j in range(sub):
          p = pos + j * beat / sub
          if style == "four on the floor" and j == 0:
            continue  # open hat on the off-beats only
          hits.append((p, cymbal, -8 if j else 0))
      if k >= first_full and (k - first_full) % 8 == 0:
        hits.append((0.0, CRASH, 10))
      for pos, key, accent in hits:
        q = start + pos + shift
        if q < start - 1e-9 or q >= total_ql:
          continue
        vel = int(np.clip(base + accent + rng.normal(0, 5), 25, 125))
        t = max(0.0, (t0 + q) * sec_per_ql + rng.normal(0, 0.004))
        events.append((t, t + 0.1, key, vel))
  events.sort()
  return events


def _cut_point(an: Analysis, max_ql: float) -> float:
  """The last barline at or before max_ql (max_ql itself if no barline fits)."""
  if an.total_ql <= max_ql:
    return an.total_ql + 1e-6
  bars = [o for o in an.measure_offsets if 0 < o <= max_ql]
  return bars[-1] if bars and bars[-1] > 0.5 * max_ql else max_ql


# ---------------------------------------------------------------------------------------------
# Captions

_TEMPLATES = [
    "{Ens_full} playing '{title}' {by}. {Key}, {ts} time, {bpm} BPM.",
    "'{title}' {by}, arranged for {ens_full}. {Key}, {bpm} BPM, {ts}.",
    "{Ens_full} in {key}: '{title}' {by}; {ts}, {bpm} BPM.",
    "{Tempo_word} {ts} piece in {key} at {bpm} BPM: '{title}' {by}, performed by {ens_full}.",
]


def _tempo_word(bpm, beat_ql):
  q = bpm * beat_ql  # quarter notes per minute
  for lim, word in ((60, "very slow"), (80, "slow"), (100, "moderate"), (130, "lively"),
                    (170, "fast")):
    if q < lim:
      return word
  return "very fast"


def _instrument_list(names):
  counts = collections.Counter(names)
  out = []
  for nm in dict.fromkeys(names):
    c = counts[nm]
    if c == 1:
      out.append(nm)
    else:
      out.append(f"{c} {PLURAL.get(nm, nm + 's') if not nm.endswith('s') else nm}")
  return ", ".join(out)


def _cap(x: str) -> str:
  return x[:1].upper() + x[1:]


def make_caption(meta: dict, rng) -> str:
  """A one-sentence description from the sidecar's fields (template chosen by ``rng``)."""
  title = meta["title"]
  if meta.get("work") and meta["work"] not in title and "opus" not in title.lower():
    title = f"{title}, {meta['work']}"
  comp = meta["composer"]
  if comp.startswith("traditional"):
    m = re.match(r"traditional( \w+)? \((.*)\)$", comp)
    by = (f"(traditional{m.group(1) or ''}, from {m.group(2)})" if m else f"({comp})")
  elif comp.startswith("anonymous"):
    by = "by an anonymous composer" + (" of the 14th century" if "14th" in comp else "")
  else:
    by = f"by {comp}"
  ens = meta["ensemble"]
  players = meta.get("players") or meta["instruments"]
  if all(p in ens for p in set(players)) or (ens == "string orchestra" and set(players) == {
      "string ensemble"}):
    ens_full = ens
  else:
    ens_full = f"{ens} ({_instrument_list(players)})"
  f = dict(ens_full=ens_full, Ens_full=_cap(ens_full), title=title, by=by, key=meta["key"],
           Key=_cap(meta["key"]), ts=meta["time_signature"], bpm=meta["tempo_bpm"],
           Tempo_word=_cap(_tempo_word(meta["tempo_bpm"], meta["beat_quarters"])))
  cap = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].format(**f)
  if meta.get("excerpt"):
    cap += f" Excerpt (first {meta['duration']:.0f} s)."
  return cap


# ---------------------------------------------------------------------------------------------
# Rendering one piece


@dataclass
class RenderConfig:
  sample_rate: int = 44100
  channels: int = 2
  fmt: str = "flac"  # flac | wav
  subtype: str = "PCM_16"
  min_seconds: float = 30.0
  max_seconds: float = 240.0
  max_repeats: int = 3  # short solo tunes are played through up to this many times
  soundfont: str = DEFAULT_SOUNDFONT
  stems: bool = True
  target_rms_db: float = -20.0
  peak_db: float = -1.0
  parse_timeout: int = 600  # seconds for parsing + analysis (a whole quartet in one file is slow)
  timbres: str = "classic"  # "wide": + synth leads/pads, electric instruments, drum kits


def _parse(path: str, opus_index, rng):
  from music21 import converter, corpus, stream
  try:
    s = corpus.parse(path) if not os.path.isabs(path) else converter.parse(path)
  except Exception as e:  # noqa: BLE001
    raise SkipPiece(f"unparseable: {type(e).__name__}: {str(e)[:200]}") from e
  if isinstance(s, stream.Opus):
    scores = list(s.scores)
    if not scores:
      raise SkipPiece("empty opus")
    titles = {(sc.metadata.title if sc.metadata else None) for sc in scores}
    if 1 < len(scores) <= 8 and len(titles) == 1 and None not in titles:
      # the voices of one polyphonic piece written as separate tunes (e.g. Josquin in ABC)
      merged = stream.Score()
      merged.metadata = scores[0].metadata
      for sc in scores:
        for part in sc.parts:
          merged.insert(0, part)
      return merged, None
    idx = opus_index if opus_index is not None else int(rng.integers(len(scores)))
    s, opus_index = scores[idx % len(scores)], idx % len(scores)
  if not isinstance(s, stream.Score):
    sc = stream.Score()
    sc.insert(0, s)
    s = sc
  return s, opus_index


@contextlib.contextmanager
def _time_limit(seconds):
  if not seconds or not hasattr(signal, "SIGALRM") or (
      __import__("threading").current_thread() is not __import__("threading").main_thread()):
    yield
    return

  def handler(signum, frame):
    raise SkipPiece(f"timed out after {seconds} s")
  old = signal.signal(signal.SIGALRM, handler)
  signal.alarm(int(seconds))
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _umask_mode():
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


_FILE_MODE = _umask_mode()  # what open() would give (mkstemp makes 0600 files)


def _atomic_save(path, audio, sr, fmt, subtype):
  import soundfile as sf
  d = os.path.dirname(path)
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix="." + fmt, dir=d)
  os.close(fd)
  try:
    sf.write(tmp, np.ascontiguousarray(audio.T), sr, subtype=subtype, format=fmt.upper())
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _atomic_json(path, obj):
  d = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=d)
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False)
  os.chmod(tmp, _FILE_MODE)
  os.replace(tmp, path)


def render_piece(path: str, out_dir: str, seed: int = 0, cfg: RenderConfig = RenderConfig(),
                 opus_index=None, piece_id=None) -> dict:
  """Parse, orchestrate and render one score (a music21 corpus path, or an absolute file path).

  Returns the metadata dict that is also written to ``out_dir/audio/<id>.json``.
  Raises SkipPiece for scores that are unusable (unparseable, no notes, too short).
  """
  t_start = time.time()
  rel = _rel(path)
  collection = rel.split("/")[0] if "/" in rel else "local"
  rng = _seed_for(seed, rel)
  with _time_limit(cfg.parse_timeout):
    score, opus_index = _parse(path, opus_index, rng)
    an = analyze_score(score, rel, cfg.max_seconds)
  piece_id = piece_id or _piece_id(rel, opus_index)
  ensemble, programs = orchestrate(an, collection, rng, cfg.timbres)
  # tempo
  if an.marked_bpm and 30 <= an.marked_bpm <= 240:
    bpm = an.marked_bpm * rng.uniform(0.92, 1.08)
  else:
    lo, hi = _default_bpm_range(collection, an.beat_ql, an.kind)
    bpm = rng.uniform(lo, hi)
  bpm = float(np.clip(round(bpm), 36, MAX_BPM))
  sec_per_ql = 60.0 / (bpm * an.beat_ql)
  full_seconds = an.total_ql * sec_per_ql
  repeats = 1
  if full_seconds < cfg.min_seconds and an.kind == "solo":
    repeats = int(math.ceil(cfg.min_seconds / max(full_seconds, 1e-3)))
  if repeats > cfg.max_repeats or full_seconds * repeats < cfg.min_seconds:
    raise SkipPiece(f"too short: {full_seconds:.1f} s at {bpm:.0f} BPM "
                    f"(minimum {cfg.min_seconds:.0f} s)")
  cut_ql = _cut_point(an, cfg.max_seconds / sec_per_ql)
  excerpt = cut_ql < an.total_ql
  perf = _performance(an, programs, sec_per_ql, cut_ql, repeats, rng)
  drum_style = None
  if cfg.timbres == "wide" and rng.random() < WIDE_DRUMS.get(ensemble, 0.0):
    drum_style = str(rng.choice(["ride", "brushes"] if "jazz" in ensemble else
                                ["backbeat", "backbeat", "four on the floor"]))
    perf.append((drum_events(an, sec_per_ql, cut_ql, repeats, rng, drum_style), 0))
    programs = list(programs) + [DRUMS]
  reverb = int(rng.integers(70, 110) if ensemble.startswith(("church", "4-part choir", "choir"))
               or "choir" in ensemble else rng.integers(30, 85))
  chorus = int(rng.integers(0, 25))
  pans = _pans(len(an.voices), rng)
  pans_by_voice = [64] * len(programs)  # a drum kit sits in the middle
  order = np.argsort([-v.mean_pitch for v in an.voices], kind="stable")
  for slot, vi in enumerate(order):
    pans_by_voice[vi] = pans[slot]
  if an.kind in ("keyboard",):  # one instrument: staves share a position
    pans_by_voice = [pans[0] if len(pans) == 1 else 64] * len(programs)

  names = [GM[p][0] for p in programs]
  players = []  # staves of one keyboard instrument count as one player
  roles = [v.role for v in an.voices] + ["drums"] * (len(programs) - len(an.voices))
  for i, nm in enumerate(names):
    if (i > 0 and roles[i] == "keyboard" and roles[i - 1] == "keyboard"
        and programs[i] == programs[i - 1]):
      continue
    players.append(nm)
  stem_names = []
  for i, nm in enumerate(names):
    same = [j for j, x in enumerate(names) if x == nm]
    label = nm if len(same) == 1 else f"{nm} {same.index(i) + 1}"
    if roles[i] == "keyboard" and len(same) > 1 and len(players) < len(names):
      label = f"{nm} staff {same.index(i) + 1}"
    stem_names.append(label)

  tmpdir = tempfile.mkdtemp(prefix="lmdm_corpus_")
  try:
    stems = []
    for i, ((events, shift), prog) in enumerate(zip(perf, programs)):
      mid = os.path.join(tmpdir, f"{i}.mid")
      wav = os.path.join(tmpdir, f"{i}.wav")
      _write_stem_midi(mid, events, prog, pans_by_voice[i], reverb, chorus)
      stems.append(render_midi(mid, wav, cfg.sample_rate, cfg.soundfont))
  finally:
    shutil.rmtree(tmpdir, ignore_errors=True)
  last_end = max(e[1] for events, _ in perf for e in events)
  length = max(s.shape[1] for s in stems)
  length = min(length, int((last_end + 4.0) * cfg.sample_rate))
  stems = [np.pad(s, ((0, 0), (0, max(0, length - s.shape[1]))))[:, :length] for s in stems]
  if cfg.channels == 1:
    stems = [s.mean(axis=0, keepdims=True) for s in stems]
  stems = np.stack(stems)  # (parts, channels, samples)
  # trim the trailing silence of the release tails (keep 0.5 s after the audio falls silent)
  env = np.max(np.abs(stems.sum(0)), axis=0)
  loud = np.nonzero(env > 1e-4)[0]
  end = min(length, (loud[-1] if loud.size else length) + int(0.5 * cfg.sample_rate))
  stems = stems[:, :, :end]
  if excerpt:  # fade out over the last 2 s
    n = min(stems.shape[-1], int(2.0 * cfg.sample_rate))
    stems[:, :, -n:] *= np.linspace(1.0, 0.0, n, dtype=np.float32) ** 2
  mix = stems.sum(0)
  rms = float(np.sqrt(np.mean(mix.astype(np.float64) ** 2)))
  peak = float(np.max(np.abs(mix)))
  if peak <= 0:
    raise SkipPiece("rendered silence")
  gain = min(10 ** (cfg.target_rms_db / 20) / max(rms, 1e-9), 10 ** (cfg.peak_db / 20) / peak)
  stems *= gain
  mix = stems.sum(0)
  duration = mix.shape[1] / cfg.sample_rate
  if duration < cfg.min_seconds:
    raise SkipPiece(f"too short after rendering: {duration:.1f} s")

  ext = cfg.fmt
  audio_dir = os.path.join(out_dir, "audio")
  stem_dir = os.path.join(out_dir, "stems", piece_id)
  stem_meta = []
  if os.path.isdir(stem_dir):  # left by an interrupted run (no sidecar yet)
    shutil.rmtree(stem_dir)
  if cfg.stems:
    for i, s in enumerate(stems):
      fn = f"{i:02d}_{re.sub(r'[^a-z0-9]+', '_', stem_names[i].lower()).strip('_')}.{ext}"
      _atomic_save(os.path.join(stem_dir, fn), s, cfg.sample_rate, ext, cfg.subtype)
      stem_meta.append(dict(
          file=os.path.relpath(os.path.join(stem_dir, fn), audio_dir), name=stem_names[i],
          instrument=names[i], program=int(programs[i]),
          part=an.voices[i].name if i < len(an.voices) else "drums",
          pitched=programs[i] != DRUMS,
          octave_shift=int(perf[i][1]), notes=len(perf[i][0]), pan=int(pans_by_voice[i]),
          rms_db=float(20 * np.log10(max(np.sqrt(np.mean(s.astype(np.float64) ** 2)), 1e-9)))))
  audio_name = f"{piece_id}.{ext}"
  _atomic_save(os.path.join(audio_dir, audio_name), mix, cfg.sample_rate, ext, cfg.subtype)
  meta = dict(
      id=piece_id, audio=audio_name, path=rel, source=f"music21 corpus: {rel}" + (
          f" (score {opus_index})" if opus_index is not None else ""),
      collection=collection, composer=an.composer, title=an.title, work=an.work,
      ensemble=ensemble, kind=an.kind, instruments=names, players=players,
      key=an.key, tonic=an.tonic, mode=an.mode, tempo_bpm=int(bpm),
      beat=_beat_name(an.beat_ql), beat_quarters=an.beat_ql, time_signature=an.time_signature,
      tempo_source="score" if an.marked_bpm and 30 <= an.marked_bpm <= 240 else "chosen",
      duration=round(duration, 3), sample_rate=cfg.sample_rate, channels=cfg.channels,
      excerpt=bool(excerpt), repeats=repeats, expanded_repeats=an.expanded_repeats,
      reverb=reverb, chorus=chorus, stems=stem_meta, seed=seed, generator=GENERATOR,
      timbres=cfg.timbres, drums=drum_style,
      soundfont=os.path.basename(cfg.soundfont),
      render_seconds=round(time.time() - t_start, 3))
  meta["caption"] = make_caption(meta, rng)
  _atomic_json(os.path.join(audio_dir, f"{piece_id}.json"), meta)
  return meta


def _beat_name(beat_ql):
  return {0.5: "eighth", 1.0: "quarter", 1.5: "dotted quarter", 2.0: "half", 3.0: "dotted half",
          4.0: "whole"}.get(beat_ql, f"{beat_ql} quarters")


# ---------------------------------------------------------------------------------------------
# The corpus


def _load_jsonl(path):
  out = []
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return out


def build_corpus(out_dir: str, hours: float, seed: int = 0, cfg: RenderConfig = RenderConfig(),
                 include=None, exclude=DEFAULT_EXCLUDE, limit: Optional[int] = None,
                 progress: bool = True, paths=None, prune: bool = False) -> dict:
  """Render pieces in the deterministic candidate order until ``hours`` of mixes exist.

  Finished pieces are counted, not rendered again. With ``prune``, finished pieces that the walk
  did not reach (left by a run with other settings) are deleted, so the folder holds exactly what a
  fresh run with these settings makes.
  """
  reason = fluidsynth_available(cfg.soundfont)
  if reason:
    raise RuntimeError(reason)
  os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
  skipped_path = os.path.join(out_dir, "skipped.jsonl")
  skipped = {d["path"]: d for d in _load_jsonl(skipped_path)}
  target = hours * 3600.0
  cands = candidates(seed, include, exclude, paths)
  finished = _finished_pieces(out_dir)
  done_seconds, n_done, n_new, n_skipped_new = 0.0, 0, 0, 0
  render_wall, render_audio = 0.0, 0.0
  reasons = collections.Counter()
  selected = set()
  try:
    from tqdm import tqdm
  except ImportError:  # pragma: no cover
    tqdm = None
  bar = tqdm(total=round(target), unit="s", desc="corpus", disable=not progress,
             dynamic_ncols=True) if tqdm else None
  try:
    for path in cands:
      if done_seconds >= target or (limit is not None and n_done >= limit):
        break
      rel = _rel(path)
      side = finished.get(rel)
      if side is not None:
        selected.add(rel)
        done_seconds += side.get("duration", 0.0)
        n_done += 1
        if bar:
          bar.update(round(side.get("duration", 0.0)))
        continue
      if rel in skipped:
        reasons[skipped[rel]["reason"].split(":")[0]] += 1
        continue
      t0 = time.time()
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          meta = render_piece(path, out_dir, seed, cfg)
      except KeyboardInterrupt:
        raise
      except Exception as e:  # noqa: BLE001 - never stop the corpus for one score
        why = str(e) if isinstance(e, SkipPiece) else f"error: {type(e).__name__}: {e}"
        log.warning("skipping %s: %s", rel, why)
        rec = dict(path=rel, reason=why[:300])
        if not why.startswith("timed out"):  # a timeout depends on the machine: retry next run
          skipped[rel] = rec
          with open(skipped_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        reasons[why.split(":")[0]] += 1
        n_skipped_new += 1
        continue
      selected.add(rel)
      dt = time.time() - t0
      render_wall += dt
      render_audio += meta["duration"]
      done_seconds += meta["duration"]
      n_done += 1
      n_new += 1
      if bar:
        bar.update(round(meta["duration"]))
        bar.set_postfix(pieces=n_done, skipped=len(skipped),
                        speed=f"{render_audio / max(render_wall, 1e-9):.1f}x")
  finally:
    if bar:
      bar.close()
  if n_skipped_new:
    warnings.warn(f"{n_skipped_new} scores skipped this run ({len(skipped)} in total, see "
                  f"{skipped_path})", RuntimeWarning)
  pruned = 0
  if prune:
    for rel, m in finished.items():
      if rel not in selected:
        _remove_piece(out_dir, m)
        pruned += 1
  stats = corpus_stats(out_dir)
  stats.update(pruned=pruned, run_new_pieces=n_new, run_skipped=n_skipped_new,
               run_render_wall_seconds=round(render_wall, 1),
               run_render_audio_seconds=round(render_audio, 1),
               run_speed_x_realtime=round(render_audio / render_wall, 2) if render_wall else None,
               skipped_total=len(skipped), skip_reasons=dict(reasons), target_hours=hours,
               seed=seed)
  _atomic_json(os.path.join(out_dir, "corpus_stats.json"), stats)
  return stats


def _remove_piece(out_dir, meta):
  audio = os.path.join(out_dir, "audio")
  os.unlink(os.path.join(audio, meta["id"] + ".json"))  # first: the piece is now unfinished
  with contextlib.suppress(FileNotFoundError):
    os.unlink(os.path.join(audio, meta["audio"]))
  shutil.rmtree(os.path.join(out_dir, "stems", meta["id"]), ignore_errors=True)


def _read_sidecars(out_dir):
  audio = os.path.join(out_dir, "audio")
  metas = []
  if os.path.isdir(audio):
    for fn in sorted(os.listdir(audio)):
      if fn.endswith(".json") and not fn.startswith("."):
        try:
          with open(os.path.join(audio, fn)) as f:
            metas.append(json.load(f))
        except (OSError, json.JSONDecodeError):
          continue
  return metas


def _finished_pieces(out_dir) -> dict:
  """corpus-relative path -> sidecar of every finished piece."""
  return {m["path"]: m for m in _read_sidecars(out_dir) if "path" in m}


def corpus_stats(out_dir: str) -> dict:
  """Counts over the finished pieces' sidecars."""
  metas = _read_sidecars(out_dir)
  dur = sum(m["duration"] for m in metas)
  inst_seconds = collections.Counter()
  for m in metas:
    for nm in set(m["instruments"]):
      inst_seconds[nm] += m["duration"]
  renders = sum(m.get("render_seconds", 0) for m in metas)
  return dict(
      pieces=len(metas), hours=round(dur / 3600, 3),
      stems=sum(len(m["stems"]) for m in metas),
      stem_hours=round(sum(len(m["stems"]) * m["duration"] for m in metas) / 3600, 3),
      by_kind=dict(collections.Counter(m["kind"] for m in metas).most_common()),
      by_ensemble=dict(collections.Counter(m["ensemble"] for m in metas).most_common()),
      by_collection=dict(collections.Counter(m["collection"] for m in metas).most_common()),
      instrument_minutes={k: round(v / 60, 1) for k, v in inst_seconds.most_common()},
      by_mode=dict(collections.Counter(m["mode"] for m in metas).most_common()),
      tempo_bpm_range=[min((m["tempo_bpm"] for m in metas), default=None),
                       max((m["tempo_bpm"] for m in metas), default=None)],
      excerpts=sum(bool(m["excerpt"]) for m in metas),
      speed_x_realtime=round(dur / renders, 2) if renders else None)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True, help="output folder (audio/, stems/, sidecars)")
  ap.add_argument("--hours", type=float, required=True, help="hours of mixes to render")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--sample-rate", type=int, default=44100)
  ap.add_argument("--mono", action="store_true", help="mono output (e.g. with --sample-rate 22050)")
  ap.add_argument("--format", choices=("flac", "wav"), default="flac")
  ap.add_argument("--min-seconds", type=float, default=30.0)
  ap.add_argument("--max-seconds", type=float, default=240.0,
                  help="longer scores are cut at a barline (with a fade) to this length")
  ap.add_argument("--no-stems", action="store_true")
  ap.add_argument("--soundfont", default=DEFAULT_SOUNDFONT)
  ap.add_argument("--include", default="", help="comma-separated corpus collections only")
  ap.add_argument("--exclude", default=",".join(DEFAULT_EXCLUDE))
  ap.add_argument("--limit", type=int, default=None, help="at most this many pieces")
  ap.add_argument("--prune", action="store_true",
                  help="delete finished pieces this run's selection does not include")
  ap.add_argument("--parse-timeout", type=int, default=600)
  ap.add_argument("--timbres", choices=TIMBRES, default="classic",
                  help="'classic': the instruments of the first corpora (reproduces them); "
                       "'wide': adds GM synth leads and pads, electric pianos, guitars and "
                       "basses, and drum kits (channel 10) under bands and synths")
  ap.add_argument("--quiet", action="store_true")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  cfg = RenderConfig(sample_rate=args.sample_rate, channels=1 if args.mono else 2,
                     fmt=args.format, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                     stems=not args.no_stems, soundfont=args.soundfont,
                     parse_timeout=args.parse_timeout, timbres=args.timbres)
  include = [x for x in args.include.split(",") if x] or None
  exclude = [x for x in args.exclude.split(",") if x]
  stats = build_corpus(args.out, args.hours, args.seed, cfg, include, exclude, args.limit,
                       progress=not args.quiet, prune=args.prune)
  print(json.dumps(stats, indent=1, ensure_ascii=False))
  return 0


if __name__ == "__main__":
  sys.exit(main())
