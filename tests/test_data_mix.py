"""Training from several latent dataset folders at once (``--data A:0.7,B:0.3``): the spec, the
``MixedSource`` rows (deterministic per (seed, step, row), in the asked proportions, held-out rows
only from held-out items), a mixed batch whose rows have stems or not through the Batcher's
extras, one-line refusals of bad specs, and a stage-1 run from two folders via the CLI.

The folders are written here with the dataset builder's own shard writer (tiny, no audio): every
latent of item k of folder f holds ``1000 f + k`` in channel 0, so a row says where it came from.
"""
import json
import os

import numpy as np
import pytest

from lmdm_jax.apps import arc_cli, train_cli
from lmdm_jax.data import dataset as D
from lmdm_jax.training.data import (Batcher, MixedSource, make_source, parse_data_spec, same_data,
                                    spec_entries)
from tests.test_cli_inputs import one_error_line


def write_folder(root, tag: int, n_items: int = 12, latent_dim: int = 8, stems: int = 0,
                 melody: bool = False, frames=lambda k: 40 + 7 * k, frame_rate: float = 43.0,
                 codec: str = "spectral", splits=None):
  """A LatentDataset folder of ``n_items`` items (``stems`` stems each; a ``melody.npz`` with a
  voiced pitch for every item and stem if ``melody``); ``splits[k]`` fixes item k's split as a
  recorded-music sidecar does."""
  root = str(root)
  os.makedirs(root)
  D._write_json(os.path.join(root, "dataset.json"), dict(
      format_version=D.FORMAT_VERSION, codec=codec, codec_class=f"test:{codec}", dtype="float32",
      sample_rate=22050, channels=1, hop=512, latent_dim=latent_dim, frame_rate=frame_rate,
      holdout=0.3))
  w = D._ShardWriter(root, 0, 0, shard_items=5, shard_bytes=1 << 30)
  rng = np.random.default_rng(tag)
  for k in range(n_items):
    T = frames(k)
    z = rng.normal(size=(T, latent_dim)).astype(np.float32)
    z[:, 0] = 1000 * tag + k
    st = [(z + s + 1, {"name": f"part{s}"}) for s in range(stems)]
    info = {} if splits is None else {"split": splits[k]}
    w.add(z, st, dict(source=f"f{tag}/item{k}.wav", caption=f"folder {tag} item {k}", frames=T,
                      duration=T / frame_rate, latent_dim=latent_dim, dtype="float32",
                      stems=[r for _, r in st], info=info))
  w.flush()
  if melody:
    recs = D.LatentDataset(root, 1, preload=False).records
    mel = {}
    for r in recs:
      mel[r["key"]] = np.full(r["frames"], 60.0 + tag, np.float32)
      for s in r["stems"]:
        mel[s["key"]] = np.full(r["frames"], 62.0 + tag, np.float32)
    np.savez(os.path.join(root, "melody.npz"), **mel)
  return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """A: rendered-corpus-like (2 stems, melody, hash split); B: recorded-like (no stems, no melody,
  sidecar splits: items 0-3 held out)."""
  d = tmp_path_factory.mktemp("mix")
  a = write_folder(d / "A", 1, stems=2, melody=True)
  b = write_folder(d / "B", 2, n_items=10, splits=["holdout"] * 4 + ["train"] * 6)
  return a, b


def _cfg(io=8, sketch=True):
  import dataclasses

  from lmdm_jax.config import DiTConfig, load_config
  from lmdm_jax.data.sketch import SKETCH_DIM
  cfg = DiTConfig.from_config(load_config("tiny").model)
  return dataclasses.replace(cfg, io_channels=io,
                             input_add_dim=1 + io + 1 + io + (SKETCH_DIM if sketch else 0))


def _origin(latents):
  """(folder tag, item number within the folder) of each row, from channel 0."""
  v = latents[:, 0, 0].astype(np.int64)
  return v // 1000, v % 1000


# ---------------------------------------------------------------------------------- the spec


def test_spec_parsing_and_equivalence():
  assert parse_data_spec("synthetic") == [("synthetic", 1.0)]
  assert parse_data_spec("a") == [("a", 1.0)]
  assert parse_data_spec("a,b") == [("a", 0.5), ("b", 0.5)]
  (fa, wa), (fb, wb) = parse_data_spec("x/a:7, x/b:3")
  assert (fa, fb) == ("x/a", "x/b") and abs(wa - 0.7) < 1e-12 and abs(wb - 0.3) < 1e-12
  assert spec_entries("a:0.7,b") == [("a", "0.7"), ("b", None)]
  assert same_data("a,b", "a:1,b:1") and same_data("./a:0.5,b:0.5", "a,b")
  assert not same_data("a,b", "a:0.6,b:0.4") and not same_data("a,b", "b,a")
  assert not same_data("a", "a,b") and not same_data("a", "bad,,")


# ------------------------------------------------------------------------------- the mix's rows


def test_rows_depend_only_on_seed_step_row(folders):
  a, b = folders
  cfg = _cfg()
  mix = make_source(f"{a}:0.6,{b}:0.4", 24, cfg, seed=3)
  again = make_source(f"{a}:0.6,{b}:0.4", 24, cfg, seed=3)
  assert isinstance(mix, MixedSource) and mix.max_stems == 2 and mix.has_melody
  full = mix.batch(5, 16)
  assert set(full["source"]) == {0, 1}
  rows = [15, 2, 9, 3]
  part = mix.batch(5, 16, rows)
  for k in ("latents", "mask", "index", "start", "source", "stems", "stem_mask", "melody",
            "stem_melody"):
    np.testing.assert_array_equal(part[k], full[k][rows], err_msg=k)
    np.testing.assert_array_equal(again.batch(5, 16)[k], full[k], err_msg=k)
  assert part["captions"] == [full["captions"][r] for r in rows]
  assert part["stem_names"] == [full["stem_names"][r] for r in rows]
  # each row is its folder's own row i of step s (so resuming at any step gives the same data)
  for i in range(16):
    src = mix.sources[full["source"][i]]
    own = src.batch(5, 16, [i])
    np.testing.assert_array_equal(full["latents"][i], own["latents"][0])
    assert full["captions"][i] == own["captions"][0]
  # other steps, other seeds: other rows
  assert not np.array_equal(mix.batch(6, 16)["latents"], full["latents"])
  other = make_source(f"{a}:0.6,{b}:0.4", 24, cfg, seed=4).batch(5, 16)
  assert not np.array_equal(other["latents"], full["latents"])


@pytest.mark.parametrize("spec,share_a", [("{a}:0.7,{b}:0.3", 0.7), ("{a},{b}", 0.5),
                                          ("{a}:1,{b}:9", 0.1)])
def test_empirical_mix_matches_weights(folders, spec, share_a):
  a, b = folders
  mix = make_source(spec.format(a=a, b=b), 24, _cfg(), seed=0)
  got = [mix.batch(s, 500) for s in range(4)]  # 2000 rows
  tags = np.concatenate([_origin(g["latents"])[0] for g in got])
  assert set(tags) <= {1, 2}
  assert abs(np.mean(tags == 1) - share_a) < 0.03, np.mean(tags == 1)
  src = np.concatenate([g["source"] for g in got])
  np.testing.assert_array_equal(src, tags - 1)  # "source" says which folder


def test_holdout_rows_only_from_held_out_items(folders):
  a, b = folders
  cfg = _cfg()
  held_sources = {}
  for tag, f in ((1, a), (2, b)):
    ds = D.LatentDataset(f, 1, preload=False)
    train, held = ds.split()
    assert train and held
    held_sources[tag] = {int(ds.records[i]["source"].split("item")[1][:-4]) for i in held}
  assert held_sources[2] == {0, 1, 2, 3}  # the sidecar splits
  spec = f"{a}:0.5,{b}:0.5"
  for holdout in (True, False):
    src = make_source(spec, 24, cfg, seed=0, holdout=holdout)
    tags, items = _origin(np.concatenate([src.batch(s, 200)["latents"] for s in range(3)]))
    for tag in (1, 2):
      seen = set(items[tags == tag].tolist())
      assert seen, (holdout, tag)
      if holdout:
        assert seen <= held_sources[tag], (tag, seen)
      else:
        assert not seen & held_sources[tag], (tag, seen)
  # held-out and training rows use other crops (another seed) as a lone folder's do
  assert make_source(spec, 24, cfg, seed=0, holdout=True).seed == 10_000


def test_mix_holdout_leaves_out_a_folder_without_held_out_items(folders, tmp_path):
  a, _ = folders
  c = write_folder(tmp_path / "C", 3, n_items=4, splits=["train"] * 4)
  held = make_source(f"{a},{c}", 24, _cfg(), seed=0, holdout=True)
  assert set(_origin(held.batch(0, 300)["latents"])[0]) == {1}
  train = make_source(f"{a},{c}", 24, _cfg(), seed=0)
  assert set(_origin(train.batch(0, 300)["latents"])[0]) == {1, 3}


def test_single_folder_is_a_plain_dataset_as_before(folders):
  a, _ = folders
  one = make_source(a, 24, _cfg(), seed=2)
  same = make_source(f"{a}:0.3", 24, _cfg(), seed=2)
  assert isinstance(one, D.LatentDataset) and isinstance(same, D.LatentDataset)
  ds = D.LatentDataset(a, 24, preload=False)
  train, _ = ds.split()
  ref = D.LatentDataset(a, 24, seed=2, indices=train)
  np.testing.assert_array_equal(one.batch(1, 8)["latents"], ref.batch(1, 8)["latents"])


def test_batcher_extras_on_rows_with_and_without_stems(folders):
  """Rows of the stem-less folder get no accompaniment and no sketch (as an item without stems
  always did); rows of the folder with stems get exactly what a batch of that folder alone gives
  them; and the Batcher's rows too depend only on (seed, step, row)."""
  a, b = folders
  cfg = _cfg()
  text = lambda caps: np.zeros((len(caps), 3, cfg.cond_token_dim), np.float32)  # noqa: E731
  kw = dict(p_jam=1.0, p_acc_uncond=0.0, p_acc_partial=0.0, p_sketch=1.0)
  mix = make_source(f"{a},{b}", 24, cfg, seed=1)
  bat = Batcher(mix, cfg, text, **kw)
  raw, out = mix.batch(3, 32), bat(3, 32)
  acc_w = 1 + cfg.io_channels
  assert out["extra"].shape == (32, 24, acc_w + 14)  # [accomp mask | accomp | sketch]
  which = raw["source"]
  assert set(which) == {0, 1}
  alone = Batcher(mix.sources[0], cfg, text, **kw)
  for i in range(32):
    acc, sk = out["extra"][i, :, :acc_w], out["extra"][i, :, acc_w:]
    if which[i] == 1:  # recorded-like: the mix is the target, nothing extra
      np.testing.assert_array_equal(out["latents"][i], raw["latents"][i])
      assert not acc.any() and not sk.any()
      assert not raw["stem_mask"][i].any() and np.isnan(raw["melody"][i]).all()
    else:
      ref = alone(3, 32, [i])
      np.testing.assert_array_equal(out["extra"][i], ref["extra"][0])
      np.testing.assert_array_equal(out["latents"][i], ref["latents"][0])
      assert acc[:, 0].any() and sk.any()  # p_jam = p_sketch = 1 with 2 stems and a melody
  rows = [31, 0, 7]
  sub = bat(3, 32, rows)
  for k in ("latents", "extra", "frame_mask", "cond"):
    np.testing.assert_array_equal(sub[k], out[k][rows], err_msg=k)


# ------------------------------------------------------------------------------ refusals


def test_folders_of_another_shape_or_codec_refused(folders, tmp_path):
  a, _ = folders
  wide = write_folder(tmp_path / "wide", 4, n_items=3, latent_dim=6)
  slow = write_folder(tmp_path / "slow", 5, n_items=3, frame_rate=21.5)
  other = write_folder(tmp_path / "other", 6, n_items=3, codec="mel")
  for f, needle in ((wide, "latent_dim 6 does not match the model's io_channels 8"),
                    (slow, "frame_rate 21.5 differs"), (other, "codec_class 'test:mel' differs")):
    with pytest.raises(ValueError) as e:
      make_source(f"{a},{f}", 24, _cfg(), seed=0)
    msg = str(e.value)
    assert f in msg and needle in msg and "\n" not in msg, msg


BAD = [
    ("{a},{tmp}/nothere", ["nothere", "not a latent dataset folder"]),
    ("{a}:0.5,{b}:0", ["--data entry", ":0'", "must be > 0"]),
    ("{a}:0.5,{b}:-1", ["must be > 0"]),
    ("{a}:0.5,{b}:abc", ["weight 'abc' is not a finite number"]),
    ("{a}:0.5,{b}:nan", ["weight 'nan' is not a finite number"]),
    ("{a}:0.5,{b}:", ["weight '' is not a finite number"]),
    ("{a},{a}/.", ["named twice"]),
    ("{a},,{b}", ["an empty entry"]),
    ("{a},", ["an empty entry"]),
    ("{a}:0.5,{b}", ["give every folder a weight"]),
    ("{a},synthetic", ["'synthetic' is a --data value of its own"]),
    ("{a},{tmp}/wide", ["wide/dataset.json", "latent_dim 6"]),
]


@pytest.mark.parametrize("spec,needles", BAD, ids=[s for s, _ in BAD])
def test_bad_specs_exit_2_with_one_line(folders, tmp_path, capsys, spec, needles):
  a, b = folders
  if "wide" in spec:
    write_folder(tmp_path / "wide", 4, n_items=3, latent_dim=6)
  spec = spec.format(a=a, b=b, tmp=tmp_path)
  wd = tmp_path / "run"
  rc = train_cli.main(["--workdir", str(wd), "--data", spec])
  one_error_line(capsys, rc, "train.py: error:", *needles)
  assert not wd.exists()
  rc = arc_cli.main(["--workdir", str(wd), "--data", spec])
  one_error_line(capsys, rc, "arc.py: error:", *needles)
  assert not wd.exists()


# -------------------------------------------------------------------------- a run from two


@pytest.mark.slow  # a tiny stage-1 run, then a resume with another mix
def test_stage1_run_from_two_folders(folders, tmp_path, capsys):
  a, b = folders
  wd = str(tmp_path / "run")
  spec = f"{a}:0.5,{b}:0.5"
  cmd = ["--config", "tiny", "--workdir", wd, "--no-progress", "--config.train.batch_size=4",
         "--config.train.eval_every=2", "--config.train.log_every=2", "--config.train.eval_batches=1"]
  assert train_cli.main(cmd + ["--data", spec, "--config.train.steps=2"]) in (0, None)
  with open(os.path.join(wd, "config.json")) as f:
    rec = json.load(f)
  assert rec["data"] == spec and rec["data_history"] == [[0, spec]]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    m = [json.loads(x) for x in f]
  assert [r["step"] for r in m] == [2] and np.isfinite([m[0]["loss"], m[0]["heldout_loss"]]).all()
  capsys.readouterr()
  # the same mix spelled otherwise resumes quietly; another mix resumes with a warning, recorded
  assert train_cli.main(cmd + ["--data", f"{a}:1,{b}:1", "--config.train.steps=3"]) in (0, None)
  out, err = capsys.readouterr()
  assert "resumed from step 2" in out and "warning" not in err
  other = f"{a}:0.2,{b}:0.8"
  assert train_cli.main(cmd + ["--data", other, "--config.train.steps=4"]) in (0, None)
  out, err = capsys.readouterr()
  assert "resumed from step 3" in out and "warning" in err and "until step 3" in err, err
  with open(os.path.join(wd, "config.json")) as f:
    rec = json.load(f)
  assert rec["data"] == other and rec["data_history"] == [[0, spec], [3, other]]
