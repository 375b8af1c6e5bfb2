"""Tests for lmdm_jax.data.corpus: one short score rendered end to end with FluidSynth."""
import json
import os
import re

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # FluidSynth renders (the full suite runs them)

pytest.importorskip("music21", reason="music21 is not installed (pip install music21)")
pytest.importorskip("pretty_midi", reason="pretty_midi is not installed (pip install pretty_midi)")
sf = pytest.importorskip("soundfile")

from lmdm_jax.data import corpus as C  # noqa: E402

FLUID = C.fluidsynth_available()
needs_fluidsynth = pytest.mark.skipif(FLUID is not None, reason=f"cannot render: {FLUID}")

CHORALE = "bach/bwv313.mxl"  # four voices, about 40 s in full; cut to 12 s here
CFG = C.RenderConfig(min_seconds=5.0, max_seconds=12.0)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
  if FLUID is not None:
    pytest.skip(f"cannot render: {FLUID}")
  out = tmp_path_factory.mktemp("corpus")
  meta = C.render_piece(CHORALE, str(out), seed=3, cfg=CFG)
  return out, meta


def _read(path):
  x, sr = sf.read(path, dtype="float32", always_2d=True)
  return x.T, sr


@needs_fluidsynth
@pytest.mark.slow
def test_render_one_score_end_to_end(rendered):
  out, meta = rendered
  side = out / "audio" / f"{meta['id']}.json"
  assert json.loads(side.read_text()) == meta
  mix, sr = _read(out / "audio" / meta["audio"])
  assert sr == 44100 and mix.shape[0] == 2
  assert abs(mix.shape[1] / sr - meta["duration"]) < 1e-3
  assert 10.0 <= meta["duration"] <= 12.0 + 4.0 and meta["excerpt"]
  rms_db = 20 * np.log10(np.sqrt(np.mean(mix ** 2)))
  assert rms_db > -35, rms_db  # not silent (normalized to about -20 dBFS)
  assert np.max(np.abs(mix)) <= 10 ** (-1 / 20) + 1e-3  # peak limit
  # every part is a stem, aligned with the mix sample for sample
  assert len(meta["stems"]) == 4 == len(meta["instruments"])
  stems = []
  for st in meta["stems"]:
    x, ssr = _read(os.path.join(out, "audio", st["file"]))
    assert ssr == sr and x.shape == mix.shape, (st, x.shape, mix.shape)
    assert 20 * np.log10(np.sqrt(np.mean(x ** 2)) + 1e-12) > -50, st  # each stem plays
    stems.append(x)
  stems = np.stack(stems)
  # the mix is the sum of the stems (up to 16-bit quantization of each file)
  assert np.max(np.abs(stems.sum(0) - mix)) < 5 * 2.0 ** -15
  for x in stems:  # and each stem is correlated with the mix at zero lag
    assert np.sum(x * mix) > 0


@needs_fluidsynth
@pytest.mark.slow
def test_caption_fields(rendered):
  _, meta = rendered
  for k in ("composer", "title", "ensemble", "instruments", "key", "mode", "tempo_bpm",
            "time_signature", "caption", "duration", "stems", "source"):
    assert k in meta and meta[k] not in (None, "", []), k
  assert meta["composer"] == "Johann Sebastian Bach"
  assert "313" in meta["title"]
  assert meta["mode"] in ("major", "minor") and meta["key"].endswith(meta["mode"])
  assert re.fullmatch(r"\d+/\d+", meta["time_signature"])
  assert 40 <= meta["tempo_bpm"] <= 200
  cap = meta["caption"]
  assert meta["composer"] in cap and str(meta["tempo_bpm"]) in cap and meta["key"] in cap
  assert meta["time_signature"] in cap
  assert meta["ensemble"].lower() in cap.lower()
  assert all(s["instrument"] in C.GM[s["program"]][0] for s in meta["stems"])


@needs_fluidsynth
@pytest.mark.slow
def test_deterministic_from_seed(rendered, tmp_path):
  out, meta = rendered
  again = C.render_piece(CHORALE, str(tmp_path), seed=3, cfg=CFG)
  drop = ("render_seconds",)
  assert {k: v for k, v in again.items() if k not in drop} == {
      k: v for k, v in meta.items() if k not in drop}
  a, _ = _read(out / "audio" / meta["audio"])
  b, _ = _read(tmp_path / "audio" / again["audio"])
  np.testing.assert_array_equal(a, b)


def test_orchestration_varies_with_seed():
  from music21 import corpus
  an = C.analyze_score(corpus.parse(CHORALE), CHORALE)
  assert an.kind == "polyphonic" and len(an.voices) == 4
  picks = {C.orchestrate(an, "bach", C._seed_for(s, CHORALE))[0] for s in range(30)}
  assert len(picks) >= 5, picks  # strings, choir, organ, brass, winds, ...
  assert C.orchestrate(an, "bach", C._seed_for(7, CHORALE)) == C.orchestrate(
      an, "bach", C._seed_for(7, CHORALE))


def test_candidates_deterministic_and_interleaved():
  a = C.candidates(seed=0)
  assert a == C.candidates(seed=0) and a != C.candidates(seed=1)
  colls = [C._rel(p).split("/")[0] for p in a[:30]]
  assert len(set(colls)) >= 10  # small collections come early, not after 1300 Palestrina pieces
  assert not any(C._rel(p).endswith(".rntxt") for p in a)
  ids = [C._piece_id(C._rel(p)) for p in a]
  assert len(set(ids)) == len(ids)  # one file per score (the corpus has some in two formats)
  assert any(C._rel(p) == "bach/bwv281.mxl" for p in a)
  assert not any(c in C.DEFAULT_EXCLUDE for c in colls)


@needs_fluidsynth
@pytest.mark.slow
def test_build_resume_skip_and_mono(tmp_path):
  from music21 import corpus
  good = [str(p) for p in corpus.getCorePaths() if str(p).endswith("/bach/bwv313.mxl")][0]
  bad = tmp_path / "broken_score.xml"
  bad.write_text("<score-partwise><this is not musicxml")
  out = tmp_path / "out"
  cfg = C.RenderConfig(min_seconds=5.0, max_seconds=8.0, sample_rate=22050, channels=1)
  with pytest.warns(RuntimeWarning, match="1 scores skipped"):
    st = C.build_corpus(str(out), hours=1.0, seed=0, cfg=cfg, paths=[good, str(bad)],
                        progress=False)
  assert st["run_new_pieces"] == 1 and st["run_skipped"] == 1 and st["skipped_total"] == 1
  assert st["pieces"] == 1 and st["stems"] == 4
  skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
  assert skipped[0]["path"] == "broken_score.xml" and "unparseable" in skipped[0]["reason"]
  audio = next((out / "audio").glob("*.flac"))
  info = sf.info(audio)
  assert info.samplerate == 22050 and info.channels == 1
  mtime = audio.stat().st_mtime_ns
  st2 = C.build_corpus(str(out), hours=1.0, seed=0, cfg=cfg, paths=[good, str(bad)],
                       progress=False)
  assert st2["run_new_pieces"] == 0 and st2["run_skipped"] == 0 and st2["pieces"] == 1
  assert audio.stat().st_mtime_ns == mtime  # finished pieces are not rendered again
  assert not list(out.rglob(".tmp_*"))
  stats = json.loads((out / "corpus_stats.json").read_text())
  assert stats["pieces"] == 1 and stats["instrument_minutes"]
  # a run whose selection no longer includes the piece removes it with prune
  st3 = C.build_corpus(str(out), hours=1.0, seed=0, cfg=cfg, paths=[str(bad)], progress=False,
                       prune=True)
  assert st3["pruned"] == 1 and st3["pieces"] == 0
  assert not list((out / "audio").glob("*.flac")) and not list((out / "stems").iterdir())


def test_cli_help_and_empty_run(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    C.main(["--help"])
  assert e.value.code == 0
  capsys.readouterr()
  if FLUID is None:
    return
  assert C.main(["--out", str(tmp_path), "--hours", "0", "--quiet"]) == 0
  stats = json.loads(capsys.readouterr().out)
  assert stats["pieces"] == 0 and stats["run_new_pieces"] == 0


WIDE_PROGRAMS = {5, 26, 27, 29, 30, 33, 34, 38, 80, 81, 88, 89, 90, 95}


def test_wide_timbres_add_synths_electric_instruments_and_keep_classic():
  from music21 import corpus
  an = C.analyze_score(corpus.parse(CHORALE), CHORALE)
  classic, wide = set(), set()
  for s in range(60):
    a = C.orchestrate(an, "bach", C._seed_for(s, CHORALE))
    assert a == C.orchestrate(an, "bach", C._seed_for(s, CHORALE), "classic")
    classic.update(a[1])
    b = C.orchestrate(an, "bach", C._seed_for(s, CHORALE), "wide")
    assert b == C.orchestrate(an, "bach", C._seed_for(s, CHORALE), "wide")
    wide.update(b[1])
    assert all(p in C.GM and p != C.DRUMS for p in b[1])
  assert not classic & WIDE_PROGRAMS  # the classic set never draws a new timbre
  assert {80, 81} & wide and {88, 89, 90} & wide  # synth leads and pads
  assert {4, 26, 27, 29, 30} & wide and {33, 34} & wide  # electric keys/guitars, electric bass
  with pytest.raises(ValueError, match="timbres"):
    C.orchestrate(an, "bach", C._seed_for(0, CHORALE), "loud")


def test_drum_part_follows_the_meter(tmp_path):
  import pretty_midi
  from music21 import corpus
  an = C.analyze_score(corpus.parse(CHORALE), CHORALE)
  assert an.time_signature == "4/4" and an.beat_ql == 1.0
  spq = 0.5  # 120 quarter notes per minute
  ev = C.drum_events(an, spq, cut_ql=16.0 + an.measure_offsets[1], repeats=1,
                     rng=np.random.default_rng(0), style="backbeat")
  bars = C._bars(an, 16.0 + an.measure_offsets[1])
  full = [s for s, length in bars if length == 4.0]
  kicks = [t for t, _, k, _ in ev if k == C.KICK]
  snares = [t for t, _, k, _ in ev if k == C.SNARE]
  for s in full:  # kick on beats 1 and 3, snare on 2 and 4 (within the humanization jitter)
    for beat, hits in ((0, kicks), (2, kicks), (1, snares), (3, snares)):
      assert min(abs(t - (s + beat) * spq) for t in hits) < 0.02, (s, beat)
  assert all(0 <= t < (16.0 + an.measure_offsets[1]) * spq + 0.05 for t, *_ in ev)
  waltz = C.Analysis(**{**an.__dict__, "time_signature": "3/4", "measure_offsets": [0.0, 3.0, 6.0],
                        "total_ql": 9.0})
  ev3 = C.drum_events(waltz, spq, 9.0, 1, np.random.default_rng(0), "backbeat")
  assert sorted(round(t / spq) for t, _, k, _ in ev3 if k == C.KICK) == [0, 3, 6]
  assert sorted(round(t / spq) for t, _, k, _ in ev3 if k == C.SNARE) == [1, 2, 4, 5, 7, 8]
  mid = str(tmp_path / "d.mid")  # written on the percussion channel
  C._write_stem_midi(mid, ev, C.DRUMS, 64, 40, 0)
  inst = pretty_midi.PrettyMIDI(mid).instruments
  assert len(inst) == 1 and inst[0].is_drum and len(inst[0].notes) == len(ev)


@needs_fluidsynth
def test_wide_render_with_drums(tmp_path, monkeypatch):
  class Always(dict):
    def get(self, key, default=None):
      return 1.0
  monkeypatch.setattr(C, "WIDE_DRUMS", Always())
  cfg = C.RenderConfig(min_seconds=5.0, max_seconds=8.0, sample_rate=22050, channels=1,
                       timbres="wide")
  meta = C.render_piece(CHORALE, str(tmp_path), seed=1, cfg=cfg)
  assert meta["timbres"] == "wide" and meta["drums"] in C.DRUM_STYLES
  drum = [s for s in meta["stems"] if s["program"] == C.DRUMS]
  assert len(drum) == 1 and drum[0]["pitched"] is False and drum[0]["instrument"] == "drum kit"
  assert all(s["pitched"] for s in meta["stems"] if s["program"] != C.DRUMS)
  assert "drum kit" in meta["players"] and "drum kit" in meta["caption"]
  x, _ = _read(os.path.join(tmp_path, "audio", drum[0]["file"]))
  assert 20 * np.log10(np.sqrt(np.mean(x ** 2)) + 1e-12) > -50  # the kit plays
