"""Tests for lmdm_jax.data.recorded: copyright parsing, descriptors and captions, hold-out, a
resumable build from fake extracted packages (no network, no apt-get), and the dataset builder
reading the result."""
import json
import os
import re

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")

pytestmark = pytest.mark.slow  # recorded-music dataset builds (the full suite runs them)
pytest.importorskip("librosa")

from lmdm_jax.codecs.base import Codec, StreamDecoder  # noqa: E402
from lmdm_jax.data import dataset as D  # noqa: E402
from lmdm_jax.data import licences as L  # noqa: E402
from lmdm_jax.data import recorded as R  # noqa: E402

SR = 22050

# The structure of supertuxkart-data's and hyperrogue-music's copyright files (machine-readable
# format): a catch-all stanza first, per-file stanzas later (the last match wins), multi-line
# Files and Copyright fields, licence texts in their own paragraphs.
DEP5 = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: SuperTuxKart
Upstream-Contact:
 Joerg Henrichs <henrichsjoerg@gmail.com>
Source: https://sourceforge.net/projects/supertuxkart/files/SuperTuxKart/

Files: *
Copyright: 2006-2022 SuperTuxKart-Team
           2002-2015 Nikolaus Gebhardt
License: GPL-3+

Files: debian/*
Copyright: 2013-2016, Someone <someone@debian.org>
License: GPL-3+

Files: data/music/bay.ogg
Copyright: 0zone0ne
License: CC-BY-SA-3.0

Files:
 data/music/ravenbridge_mansion.ogg
 data/music/ravenbridge_mansion_fast.ogg
Copyright: 2017 0zone0ne and Krobonil
License: CC-BY-SA-3.0

Files: data/music/klabauter_dance.ogg
Copyright: Chris Leutwyler (Krobonil)
License: GPL

Files: data/music/jumping*.ogg
Copyright: 2016, 2022 GeekPenguinBR, Heuchi1
License: GPL-2+ OR CC-BY-SA

Files: data/music/nc_song.ogg
Copyright: Somebody Else
License: CC-BY-NC-SA-3.0

Files: music/hr3-caves.ogg
       music/hr3-desert.ogg
Copyright: Shawn Parrotte (http://www.shawnparrotte.com)
License: CC-BY-SA-3.0

License: GPL-3+
 This program is free software; you can redistribute it and/or modify
 it under the terms of the GNU General Public License as published by
 .
 the Free Software Foundation; version 3 dated June, 2007, or (at
 your option) any later version.
"""

# fb-music-high's and nexuiz-music's copyright files: free text, no Files stanzas.
FB_TEXT = """\
This package was debianized by Josselin Mouette <joss@debian.org> on
Thu,  23 Jan 2003 16:33:26 +0100.

It was downloaded from http://www.frozen-bubble.org/

Upstream Author: Matthias Le Bidan <matthias.le_bidan@caramail.com>

Copyright:

You are free to distribute this software under the terms of
the GNU General Public License, version 2 or later.
On Debian systems, the complete text of the GNU General Public
License can be found in /usr/share/common-licenses/GPL-2 file.
"""
NEXUIZ_TEXT = """\
This package was debianized by Bruno "Fuddl" Kleinert <fuddl@tauware.de> on
Fri, 24 Feb 2006 23:21:35 +0100.

Nexuiz is \u00a9 2002 - 2009 Alientrap, Lee Vermeulen <lvermeulen@shaw.ca>

This program is free software; you can redistribute it and/or
modify it under the terms of the GNU General Public License
as published by the Free Software Foundation; either version 2
of the License, or (at your option) any later version.
"""

STK = "usr/share/games/supertuxkart/data/music/"


def test_machine_readable_copyright_per_track():
  assert L.is_machine_readable(DEP5) and not L.is_machine_readable(FB_TEXT)
  c = L.copyright_for(DEP5, STK + "bay.ogg")
  assert c["licence_debian"] == "CC-BY-SA-3.0" and c["copyright"] == "0zone0ne"
  assert c["stanza"] == "data/music/bay.ogg"
  # no stanza of its own: the catch-all (not debian/*), its multi-line holder joined, no email
  c = L.copyright_for(DEP5, STK + "cocoa_river.ogg")
  assert c["licence_debian"] == "GPL-3+" and c["stanza"] == "*"
  assert c["copyright"] == "2006-2022 SuperTuxKart-Team; 2002-2015 Nikolaus Gebhardt"
  c = L.copyright_for(DEP5, STK + "ravenbridge_mansion_fast.ogg")  # multi-line Files field
  assert c["licence_debian"] == "CC-BY-SA-3.0" and "Krobonil" in c["copyright"]
  c = L.copyright_for(DEP5, STK + "jumping_to_the_stars_remake_fast.ogg")  # a wildcard
  assert c["licence_debian"] == "GPL-2+ OR CC-BY-SA"
  c = L.copyright_for(DEP5, "usr/share/hyperrogue/music/hr3-desert.ogg")  # continuation lines
  assert c["licence_debian"] == "CC-BY-SA-3.0" and c["copyright"].startswith("Shawn Parrotte")
  assert L.person_name(c["copyright"]) == "Shawn Parrotte"
  paras = L.parse_paragraphs(DEP5)
  lic = [p for p in paras if "license" in p and "files" not in p][0]["license"]
  assert lic.split("\n")[0] == "GPL-3+" and "\n\n" in lic  # a lone "." is an empty line


def test_free_text_copyright():
  fb = L.copyright_for(FB_TEXT, "usr/share/games/frozen-bubble/snd/frozen-mainzik-2p.xm")
  assert fb == dict(licence_debian="GPL-2+", copyright="Matthias Le Bidan", stanza="free text")
  nx = L.copyright_for(NEXUIZ_TEXT, "pk3/sound/cdtracks/thunder.ogg")
  assert nx["licence_debian"] == "GPL-2+"
  assert nx["copyright"] == "2002 - 2009 Alientrap, Lee Vermeulen"
  assert L.person_name(nx["copyright"]) == "Alientrap, Lee Vermeulen"
  assert L.copyright_for("no licence here\n", "x.ogg")["licence_debian"] == ""


@pytest.mark.parametrize("debian,spdx,free", [
    ("GPL-2+", "GPL-2.0-or-later", True),
    ("GPL-3", "GPL-3.0-only", True),
    ("GPL", "GPL-1.0-or-later", True),
    ("LGPL-2.1+", "LGPL-2.1-or-later", True),
    ("CC-BY-SA-3.0", "CC-BY-SA-3.0", True),
    ("CC-BY-3.0", "CC-BY-3.0", True),
    ("CC0", "CC0-1.0", True),
    ("Expat", "MIT", True),
    ("GPL-2+ OR CC-BY-SA", "GPL-2.0-or-later OR CC-BY-SA", True),
    ("CC-BY-NC-SA-3.0 or GPL-2+", "CC-BY-NC-SA-3.0 OR GPL-2.0-or-later", True),
    ("CC-BY-NC-SA-3.0", "CC-BY-NC-SA-3.0", False),
    ("CC-BY-ND-4.0", "CC-BY-ND-4.0", False),
    ("GPL-2+ and CC-BY-NC-3.0", "GPL-2.0-or-later AND CC-BY-NC-3.0", False),
    ("Drascula-License", "LicenseRef-Drascula", True),
    ("Some-Custom-EULA", "LicenseRef-Some-Custom-EULA", False),
])
def test_licence_names_and_freedom(debian, spdx, free):
  assert L.spdx_name(debian) == spdx
  assert L.is_free(spdx) is free
  assert L.is_free("") is False


def _clicks(bpm=120.0, seconds=20.0, sr=SR):
  y = np.zeros(int(seconds * sr), np.float32)
  for t in np.arange(0, seconds, 60.0 / bpm):
    i = int(t * sr)
    n = min(300, len(y) - i)
    y[i:i + n] += 0.8 * np.hanning(600)[300:300 + n] * np.sign(np.sin(np.arange(n) * 0.9))
  return y


def _a_minor(seconds=16.0, sr=SR):
  """A-minor triad tones (A, C, E and the A an octave up) in turn, 0.5 s each, with harmonics."""
  t = np.arange(int(0.5 * sr)) / sr
  env = np.minimum(1, t / 0.02) * np.exp(-t * 2)
  notes = []
  for k in range(int(seconds / 0.5)):
    f = (220.0, 261.63, 329.63, 440.0)[k % 4]
    notes.append(env * sum(0.3 / h * np.sin(2 * np.pi * f * h * t) for h in (1, 2, 3)))
  drone = np.concatenate(notes)
  tt = np.arange(len(drone)) / sr
  drone = drone + 0.08 * sum(np.sin(2 * np.pi * f * tt) for f in (110.0, 220.0, 329.63))
  return drone.astype(np.float32)


def _chord(seconds=16.0, sr=SR):
  t = np.arange(int(seconds * sr)) / sr
  return (0.2 * sum(np.sin(2 * np.pi * f * t) for f in (220.0, 261.63, 329.63))).astype(np.float32)


def test_descriptors_and_captions_from_known_audio():
  meta = dict(game="SuperTuxKart", title="Bay", composer="0zone0ne")
  click = R.describe(_clicks())
  assert abs(click["tempo_bpm"] - 120) / 120 < 0.05, click
  assert click["pulse_clarity"] >= R.PULSE_CLARITY_MIN and click["percussive_share"] > 0.35
  cap = R.make_caption(meta, click, "supertuxkart-data/bay.flac")
  bpm = int(re.search(r"(\d+) BPM", cap).group(1))
  assert abs(bpm - 120) <= 6 and "percussive" in cap and "'Bay' by 0zone0ne" in cap, cap
  assert "SuperTuxKart" in cap
  am = R.describe(_a_minor())
  assert (am["tonic"], am["mode"]) == ("A", "minor"), am
  assert am["key_correlation"] >= R.KEY_CORRELATION_MIN
  cap = R.make_caption(meta, am, "x")
  assert "A minor" in cap, cap
  held = R.describe(_chord())  # a held chord: no beat to state, no percussion, dark
  assert held["pulse_clarity"] < R.PULSE_CLARITY_MIN and held["percussive_share"] < 0.1
  cap = R.make_caption(dict(game="G", title="T", composer=""), held, "x")
  assert "no steady beat" in cap.lower() and "BPM" not in cap and "sustained" in cap and " by " not in cap
  assert "dark" in cap, cap
  # loudness words follow the measured level
  quiet = R.describe(0.01 * _a_minor())
  assert quiet["rms_db"] < am["rms_db"] - 30
  assert R.descriptor_words(quiet)["loudness"] == "very quiet"
  # deterministic: the same source gets the same template
  assert R.make_caption(meta, am, "p/a.flac") == R.make_caption(meta, am, "p/a.flac")
  templates = {R.make_caption(meta, am, f"p/{i}.flac").split("'")[0] for i in range(20)}
  assert len(templates) >= 2


def _tracks(spec):
  return [R.Track(pkg, name, "", "", name, f"{pkg}/{group}") for pkg, name, group in spec]


def test_holdout_by_whole_work_and_deterministic():
  spec = [("a-pkg", f"t{i}", f"t{i}") for i in range(40)]
  spec += [("a-pkg", f"t{i}_fast", f"t{i}") for i in range(0, 40, 3)]  # variants
  spec += [("b-pkg", f"s{i}", f"s{i}") for i in range(5)]
  spec += [("c-pkg", "only", "only")]
  tracks = _tracks(spec)
  held = R.holdout_groups(tracks)
  assert held == R.holdout_groups(list(reversed(tracks)))  # order does not matter
  assert held == R.holdout_groups(_tracks(spec))
  per = {p: {g for g in held if g.startswith(p + "/")} for p in ("a-pkg", "b-pkg", "c-pkg")}
  assert len(per["a-pkg"]) == 6 and len(per["b-pkg"]) == 1 and not per["c-pkg"]
  for t in tracks:  # a variant goes where its work goes
    if t.name.endswith("_fast"):
      assert (t.group in held) == (f"{t.package}/{t.name[:-5]}" in held)
  # the choice depends on the work's name, not on what else is in the package
  fewer = R.holdout_groups(_tracks(spec[:-1]))
  assert fewer == held


class RMSCodec(Codec):
  """(frames, 2) per hop: RMS and peak."""
  sample_rate = 8000
  channels = 1
  hop = 200
  latent_dim = 2

  def encode(self, audio):
    n = audio.shape[1] // self.hop
    x = np.asarray(audio, np.float32)[:, :n * self.hop].reshape(audio.shape[0], n, self.hop)
    return np.stack([np.sqrt((x ** 2).mean(-1)), np.abs(x).max(-1)], -1).mean(0)

  def decode(self, latents):
    return np.zeros((1, len(latents) * self.hop), np.float32)

  def stream_decoder(self):
    class _S(StreamDecoder):
      def push(self, block):
        return np.zeros((1, 0), np.float32)

      def flush(self):
        return np.zeros((1, 0), np.float32)
    return _S()


def _fake_packages(root):
  """Two packages as ``prepare_package`` leaves them (no .deb): SuperTuxKart-style tracks with
  .music files (one with a fast version, one under a non-free licence, one too short) and
  HyperRogue-style tracks."""
  ex = os.path.join(root, "extract")

  def write(pkg, rel, y, sr=44100, channels=2):
    p = os.path.join(ex, pkg, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    sf.write(p, np.stack([y] * channels, 1), sr, format="OGG", subtype="VORBIS")

  for pkg, text in (("supertuxkart-data", DEP5), ("hyperrogue-music", DEP5)):
    d = os.path.join(ex, pkg, "usr/share/doc", pkg)
    os.makedirs(d)
    with open(os.path.join(d, "copyright"), "w") as f:
      f.write(text)
    with open(os.path.join(ex, pkg, ".extracted.json"), "w") as f:
      json.dump(dict(package=pkg, version="1.0-1", deb=f"{pkg}_1.0-1_all.deb", sha256="0" * 64,
                     homepage=""), f)
  y = np.concatenate([np.zeros(4410, np.float32), np.repeat(_a_minor(6.0, 22050), 2)[:44100 * 6],
                      np.zeros(8820, np.float32)])
  for name in ("bay", "farm", "farm_f", "subsea", "nc_song"):
    write("supertuxkart-data", STK + name + ".ogg", y)
  write("supertuxkart-data", STK + "jingle.ogg", y[:44100])
  for name, title in (("farm", "Golden Fields"), ("bay", "Bay")):
    extra = ' fast="true" fast-filename="farm_f.ogg"' if name == "farm" else ""
    with open(os.path.join(ex, "supertuxkart-data", STK + name + ".music"), "w") as f:
      f.write(f'<?xml version="1.0"?>\n<music title="{title}" composer="Krobonil &amp; '
              f'OzoneOne" file="{name}.ogg"{extra}/>\n')
  for name in ("hr3-caves", "hr3-desert", "hr-savino-ocean"):
    write("hyperrogue-music", "usr/share/hyperrogue/music/" + name + ".ogg", y, sr=48000,
          channels=1)
  return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = _fake_packages(str(tmp_path_factory.mktemp("recorded")))
  report = R.build(root, ["supertuxkart-data", "hyperrogue-music"], fetch=False, min_seconds=3.0,
                   progress=False)
  return root, report


def _sides(root):
  out = {}
  for dirpath, _, files in os.walk(os.path.join(root, "audio")):
    for fn in files:
      if fn.endswith(".json"):
        with open(os.path.join(dirpath, fn)) as f:
          out[os.path.relpath(os.path.join(dirpath, fn), os.path.join(root, "audio"))] = json.load(f)
  return out


def test_build_sidecars_licences_and_holdout(built):
  root, report = built
  sides = _sides(root)
  assert sorted(sides) == sorted(
      ["supertuxkart-data/bay.json", "supertuxkart-data/farm.json", "supertuxkart-data/farm_f.json",
       "supertuxkart-data/subsea.json", "hyperrogue-music/hr3_caves.json",
       "hyperrogue-music/hr3_desert.json", "hyperrogue-music/hr_savino_ocean.json"])
  assert report["tracks"] == 7 and report["made_this_run"] == 7
  assert [r["source"] for r in report["rejected_for_licence"]] == ["supertuxkart-data/nc_song.flac"]
  assert not os.path.exists(os.path.join(root, "audio/supertuxkart-data/nc_song.flac"))
  assert [s["source"] for s in report["skipped"]] == ["supertuxkart-data/jingle.flac"]
  assert "too short" in report["skipped"][0]["reason"]
  bay = sides["supertuxkart-data/bay.json"]
  assert bay["licence"] == "CC-BY-SA-3.0" and bay["copyright"] == "0zone0ne"
  assert bay["composer"] == "Krobonil & OzoneOne" and bay["title"] == "Bay"
  assert bay["version"] == "1.0-1" and "Debian package supertuxkart-data 1.0-1" in bay["attribution"]
  assert "'Bay' by Krobonil & OzoneOne" in bay["caption"] and "A minor" in bay["caption"]
  sub = sides["supertuxkart-data/subsea.json"]  # no stanza of its own: the catch-all's GPL-3+
  assert sub["licence"] == "GPL-3.0-or-later" and sub["composer"] == ""
  fast = sides["supertuxkart-data/farm_f.json"]
  assert fast["group"] == sides["supertuxkart-data/farm.json"]["group"] == "supertuxkart-data/farm"
  assert fast["title"] == "Golden Fields (fast version)" and fast["variant_of"] == "farm"
  caves = sides["hyperrogue-music/hr3_caves.json"]
  assert caves["composer"] == "Shawn Parrotte" and caves["title"] == "Caves"
  assert caves["sample_rate"] == 48000 and caves["channels"] == 1
  # the leading/trailing silence is cut (0.1 s kept), the audio is native rate FLAC
  info = sf.info(os.path.join(root, "audio/supertuxkart-data/bay.flac"))
  assert info.samplerate == 44100 and info.channels == 2 and info.format == "FLAC"
  assert abs(info.frames / 44100 - 6.2) < 0.05 and bay["trimmed_seconds"][0] == pytest.approx(0.0)
  lic = json.load(open(os.path.join(root, "licences.json")))
  assert set(lic["tracks"]) == {s[:-5] + ".flac" for s in sides}
  assert lic["tracks"]["supertuxkart-data/bay.flac"]["licence"] == "CC-BY-SA-3.0"
  assert lic["packages"]["hyperrogue-music"]["licences"] == ["CC-BY-SA-3.0", "GPL-3.0-or-later"]
  assert lic["rejected"][0]["licence"] == "CC-BY-NC-SA-3.0"
  assert open(os.path.join(root, "copyright/supertuxkart-data")).read() == DEP5
  hold = json.load(open(os.path.join(root, "holdout.json")))
  assert hold["sources"] == sorted(s[:-5] + ".flac" for s, v in sides.items()
                                   if v["split"] == "holdout")
  for v in sides.values():  # whole works on one side
    assert v["split"] == ("holdout" if v["group"] in hold["groups"] else "train")
  # one of each package's 3 usable works (bay, farm + farm_f, subsea; caves, desert, ocean)
  assert len(hold["groups"]) == 2 and len({g.split("/")[0] for g in hold["groups"]}) == 2


def test_rerun_does_nothing(built):
  root, _ = built
  paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs  # report.json: a new run
           if not f.startswith(".") and "extract" not in d and f != "report.json"]
  before = {p: os.stat(p).st_mtime_ns for p in paths}
  again = R.build(root, ["supertuxkart-data", "hyperrogue-music"], fetch=False, min_seconds=3.0,
                  progress=False)
  assert again["made_this_run"] == 0 and again["tracks"] == 7
  after = {p: os.stat(p).st_mtime_ns for p in paths}
  assert after == before
  # a sidecar whose caption rules changed is brought up to date without touching the audio
  p = os.path.join(root, "audio/supertuxkart-data/bay.json")
  side = json.load(open(p))
  side["caption"] = "old caption"
  json.dump(side, open(p, "w"))
  R.build(root, ["supertuxkart-data", "hyperrogue-music"], fetch=False, min_seconds=3.0,
          progress=False)
  assert json.load(open(p))["caption"] != "old caption"
  flac = os.path.join(root, "audio/supertuxkart-data/bay.flac")
  assert os.stat(flac).st_mtime_ns == before[flac]


def test_dataset_builder_reads_the_folder_and_honours_the_holdout(built, tmp_path):
  root, _ = built
  out = str(tmp_path / "latents")
  rep = D.build_dataset(os.path.join(root, "audio"), out, RMSCodec(), codec_name="rms",
                        progress=False)
  assert rep["items"] == 7 and rep["bad_total"] == 0
  ds = D.LatentDataset(out, crop_frames=20)
  train, held = ds.split()
  hold = json.load(open(os.path.join(root, "holdout.json")))
  assert sorted(ds.records[i]["source"] for i in held) == hold["sources"]
  assert len(train) + len(held) == 7
  rec = next(r for r in ds.records if r["source"] == "supertuxkart-data/bay.flac")
  side = json.load(open(os.path.join(root, "audio/supertuxkart-data/bay.json")))
  assert rec["caption"] == side["caption"] and rec["info"]["descriptors"] == side["descriptors"]
  assert rec["info"]["licence"] == "CC-BY-SA-3.0" and rec["info"]["split"] in ("train", "holdout")


def test_cli_errors(tmp_path, capsys):
  assert R.main(["--out", str(tmp_path), "--packages", "not-a-package", "--quiet"]) == 2
  assert "unknown package" in capsys.readouterr().err
  assert R.main(["--out", str(tmp_path), "--packages", "asc-music", "--no-fetch", "--quiet"]) == 2
  assert "not extracted" in capsys.readouterr().err


def test_extract_ignores_paths_leaving_the_folder():
  assert R._safe_rel("./usr/share/x.ogg") == "usr/share/x.ogg"
  assert R._safe_rel("../../etc/passwd") is None
  assert R._safe_rel("usr/../../x") is None
  assert R._safe_rel("/abs/path.ogg") == "abs/path.ogg"
