"""bench/music_eval.py at its smallest setting (--quick) on a tiny random model with accompaniment
channels and a tiny recorded dataset: one targets table, every target a row, each measured."""
import json
import os
import sys

import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.slow  # the music benchmark (the full suite runs them)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import music_eval  # noqa: E402


def _recorded(tmp_path):
  """Two 20-s held-out 'tracks' (chord progressions) encoded with the spectral codec."""
  from lmdm_jax.codecs.spectral import SpectralCodec
  from lmdm_jax.data.dataset import build_dataset
  sr = 22050
  audio = tmp_path / "audio"
  audio.mkdir()
  t = np.arange(2 * sr) / sr
  for j, roots in enumerate(([60, 65, 67, 60], [57, 62, 64, 57])):
    x = np.concatenate([sum(np.sin(2 * np.pi * 440 * 2 ** ((r + i - 69) / 12) * t)
                            for i in (0, 4, 7)) / 6 for r in roots * 3][:10])
    sf.write(str(audio / f"track{j}.wav"), x.astype(np.float32), sr)
    (audio / f"track{j}.json").write_text(json.dumps(
        dict(caption=f"Calm game music 'Track {j}'. C major, 90 BPM.", split="holdout")))
  build_dataset(str(audio), str(tmp_path / "latents"), SpectralCodec(), "default", progress=False)
  return str(tmp_path / "latents")


@pytest.mark.slow
def test_quick_targets_table(tmp_path, capsys):
  from tests.test_sample_cli import ACC, write_config
  cfg = write_config(tmp_path / "tinyacc.py", extra=ACC)
  rec = _recorded(tmp_path)
  out = tmp_path / "eval"
  music_eval.main(["--checkpoint", f"tiny=config:{cfg}", "--recorded", rec, "--quick",
                   "--out", str(out)])
  text = capsys.readouterr().out
  assert "3 streams of 10 s (1 held-out prompts x 2 noise draws from silence + 1 held-out " \
         "recorded contexts of 5 s)" in text
  rows = {name: line for line in text.splitlines()
          for _, name, _, _, _ in music_eval.TARGETS if line.startswith(name)}
  assert len(rows) == len(music_eval.TARGETS)
  header = next(line for line in text.splitlines() if line.startswith("target"))
  assert header.split()[-2:] == ["real", "tiny"]
  res = json.load(open(out / "music_eval.json"))["results"]
  tiny = res["tiny"]
  assert tiny["streams"] == 3
  for key in ("loud", "silent", "level_std", "clipped", "context_r", "seed_distance", "motion",
              "key_exact", "tempo_8pct", "jam_true", "jam_shuffled"):
    assert key in tiny and tiny[key] is not None, key
    assert key not in ("loud", "silent", "clipped") or np.isfinite(tiny[key])
  for key, _, _, ok, _ in music_eval.TARGETS:  # every measured cell says pass or FAIL
    if key in tiny:
      cell = rows[[n for k, n, *_ in music_eval.TARGETS if k == key][0]]
      assert cell.rstrip().endswith(("pass", "FAIL")), cell
  assert "sketch_share" not in tiny  # no --data: no melodies, the row says so with '-'
  assert res["real"]["streams"] == 1 and res["real"]["context_r"] > 0.5  # real music continues
  assert any(f.endswith(".wav") for f in os.listdir(out / "tiny"))


def test_bad_recorded_folder_is_a_usage_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    music_eval.main(["--checkpoint", "x=config:tiny", "--recorded", str(tmp_path), "--quick"])
  assert e.value.code == 2 and "no dataset.json" in capsys.readouterr().err


def test_restyle_replaces_or_appends_key_and_tempo():
  assert music_eval._restyle("Piano. D minor, 3/4 time, 90 BPM.", "G major", 120) == \
      "Piano. G major, 3/4 time, 120 BPM."
  assert music_eval._restyle("Dark piece. No steady beat.", "A minor", 72) == \
      "Dark piece. No steady beat. A minor. 72 BPM."
