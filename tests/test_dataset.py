"""Tests for lmdm_jax.data.dataset: building latent shards (resume, bad files) and seeded crops.

Uses a trivial codec defined here (frame RMS / mean / peak / zero crossings), so nothing depends on
the project's real codecs.
"""
import json

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")

from lmdm_jax.codecs.base import Codec, StreamDecoder  # noqa: E402
from lmdm_jax.data import dataset as D  # noqa: E402
from lmdm_jax.data.audio import save_audio  # noqa: E402

SR, HOP = 8000, 200  # 40 frames per second


class RMSCodec(Codec):
  """(frames, 4) features per hop: RMS, mean, peak, zero-crossing rate (channel-averaged)."""
  sample_rate = SR
  channels = 1
  hop = HOP
  latent_dim = 4

  def encode(self, audio):
    audio = np.asarray(audio, np.float32)
    n = audio.shape[1] // self.hop
    x = audio[:, :n * self.hop].reshape(audio.shape[0], n, self.hop)
    rms = np.sqrt(np.mean(x ** 2, axis=-1))
    mean = np.mean(x, axis=-1)
    peak = np.max(np.abs(x), axis=-1)
    zcr = np.mean(np.abs(np.diff(np.sign(x), axis=-1)) > 0, axis=-1)
    return np.stack([rms, mean, peak, zcr], -1).mean(0).astype(np.float32)

  def decode(self, latents):
    t = np.arange(self.hop) / self.sample_rate
    return (latents[:, :1] * np.sqrt(2) * np.sin(2 * np.pi * 440 * t)).reshape(1, -1)

  def stream_decoder(self):
    codec = self

    class _S(StreamDecoder):
      def push(self, block):
        return codec.decode(block)

      def flush(self):
        return np.zeros((1, 0), np.float32)
    return _S()


class PickyCodec(RMSCodec):
  """Raises (an ordinary exception) on very loud audio: a codec failure on one file."""

  def encode(self, audio):
    if np.max(np.abs(audio)) > 0.95:
      raise RuntimeError("codec cannot handle this file")
    return super().encode(audio)


class CrashingCodec(PickyCodec):
  """Dies (like a killed process: no cleanup in the builder) on its ``n``-th encode."""

  class Crash(BaseException):
    pass

  def __init__(self, n, exc=None):
    self.n, self.calls, self.exc = n, 0, exc or CrashingCodec.Crash

  def encode(self, audio):
    self.calls += 1
    if self.calls == self.n:
      raise self.exc()
    return super().encode(audio)


def _tone(freq, seconds, amp=0.5, channels=1, sr=SR):
  t = np.arange(int(sr * seconds)) / sr
  x = (amp * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t)))
  x = x.astype(np.float32)[None]
  return np.repeat(x, channels, 0)


def _make_folder(root, n_good=6):
  """n_good captioned files (varied formats/rates/sidecars), one with stems, plus bad files."""
  root.mkdir(parents=True, exist_ok=True)
  for i in range(n_good):
    x = _tone(200 + 50 * i, 2.0 + 0.5 * i, channels=1 + i % 2, sr=SR if i % 3 else 16000)
    ext = ("wav", "flac", "ogg")[i % 3]
    save_audio(root / f"song{i}.{ext}", x, SR if i % 3 else 16000)
    if i % 2:
      (root / f"song{i}.txt").write_text(f"a tone number {i}\n")
    else:
      (root / f"song{i}.json").write_text(json.dumps({"caption": f"tone {i}", "bpm": 100 + i}))
  # a piece with two stems (quiet and loud halves of the mix) in a sub-folder, corpus-style
  a = _tone(330, 3.0, amp=0.2)
  b = _tone(660, 3.0, amp=0.4)
  (root / "stems" / "piece").mkdir(parents=True)
  save_audio(root / "stems" / "piece" / "00_low.flac", a, SR)
  save_audio(root / "stems" / "piece" / "01_high.flac", b[:, :-300], SR)  # shorter: padded
  save_audio(root / "piece.flac", a + b, SR)
  (root / "piece.json").write_text(json.dumps({
      "caption": "two tones", "composer": "test",
      "stems": [{"file": "stems/piece/00_low.flac", "name": "low"}, "stems/piece/01_high.flac"]}))
  # bad files
  (root / "garbage.wav").write_bytes(b"RIFF....not a wav at all" * 10)
  (root / "garbage.txt").write_text("caption of garbage")
  save_audio(root / "silent.wav", np.zeros((1, SR * 2), np.float32), SR)
  (root / "silent.txt").write_text("silence")
  save_audio(root / "short.wav", _tone(300, 0.3), SR)
  (root / "short.txt").write_text("too short")
  save_audio(root / "nocaption.wav", _tone(300, 2.0), SR)
  save_audio(root / "loud.wav", _tone(300, 2.0, amp=1.0), SR)
  (root / "loud.txt").write_text("loud one")
  return n_good + 1


BAD = {"garbage.wav": "cannot decode", "silent.wav": "silent", "short.wav": "too short",
       "nocaption.wav": "no caption", "loud.wav": "codec cannot handle"}


def _latents_by_source(out):
  ds = D.LatentDataset(str(out), crop_frames=8)
  return {r["source"]: ds.latents(i).copy() for i, r in enumerate(ds.records)}, ds


def test_build_sidecars_stems_and_bad_files(tmp_path):
  n = _make_folder(tmp_path / "audio")
  with pytest.warns(RuntimeWarning, match="5 files skipped"):
    rep = D.build_dataset(str(tmp_path / "audio"), str(tmp_path / "out"), PickyCodec(),
                          codec_name="picky", progress=False, shard_items=3)
  assert rep["items"] == n and rep["bad_total"] == 5 and rep["bad_this_run"] == 5
  reasons = {b["source"]: b["reason"] for b in rep["bad"]}
  for src, why in BAD.items():
    assert why in reasons[src], (src, reasons[src])
  assert json.loads((tmp_path / "out" / "report.json").read_text())["bad_total"] == 5
  assert len((tmp_path / "out" / "bad_files.jsonl").read_text().splitlines()) == 5
  meta = [json.loads(x) for x in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
  assert [m["source"] for m in meta] == sorted(m["source"] for m in meta)  # deterministic order
  assert not any(m["source"].startswith("stems/") for m in meta)  # stems are not items
  by = {m["source"]: m for m in meta}
  assert by["song1.flac"]["caption"] == "a tone number 1"
  assert by["song0.wav"]["caption"] == "tone 0" and by["song0.wav"]["info"]["bpm"] == 100
  assert by["song3.wav"]["frames"] == int(3.5 * SR) // HOP  # resampled from 16 kHz
  assert abs(by["song3.wav"]["duration"] - 3.5) < 1e-3
  p = by["piece.flac"]
  assert [s["name"] for s in p["stems"]] == ["low", "01_high"]
  assert p["stems"][0]["source"] == "stems/piece/00_low.flac"
  lat, ds = _latents_by_source(tmp_path / "out")
  i = [r["source"] for r in ds.records].index("piece.flac")
  st = ds.stem_latents(i)
  assert len(st) == 2 and all(s.shape == lat["piece.flac"].shape for s in st)
  assert st[0].dtype == np.float16
  # stems are aligned: the low stem's RMS is constant, the high one's is larger
  np.testing.assert_allclose(st[1][:-2, 0], 2 * st[0][:-2, 0], rtol=0.05)
  ds_json = json.loads((tmp_path / "out" / "dataset.json").read_text())
  assert ds_json["latent_dim"] == 4 and ds_json["hop"] == HOP and ds_json["codec"] == "picky"


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_listing_file(tmp_path, kind):
  audio = tmp_path / "a"
  audio.mkdir()
  for i in range(3):
    save_audio(audio / f"x{i}.wav", _tone(300 + 100 * i, 1.5), SR)
  if kind == "csv":
    (tmp_path / "list.csv").write_text(
        "path,caption,genre\na/x0.wav,first,folk\na/x1.wav,\"second, with comma\",rock\n"
        "a/missing.wav,gone,none\n")
  else:
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(d) for d in [
        {"path": "a/x0.wav", "caption": "first", "genre": "folk"},
        {"path": "a/x1.wav", "caption": "second, with comma"},
        {"path": "a/missing.wav", "caption": "gone"}]) + "\n")
  with pytest.warns(RuntimeWarning, match="1 files skipped"):
    rep = D.build_dataset(str(audio), str(tmp_path / "out"), RMSCodec(),
                          captions=str(tmp_path / f"list.{kind}"), progress=False)
  assert rep["items"] == 2 and rep["bad_total"] == 1 and "does not exist" in rep["bad"][0]["reason"]
  ds = D.LatentDataset(str(tmp_path / "out"), crop_frames=10)
  assert sorted(r["caption"] for r in ds.records) == ["first", "second, with comma"]
  assert ds.records[0]["info"]["genre"] == "folk"


def test_stems_and_listed_files_stay_inside_the_audio_folder(tmp_path):
  """A stems list (sidecar or listing) or a listing path that names a file outside the audio
  folder, by ``..`` or an absolute path, is refused with an error naming the entry; nothing
  outside is read."""
  audio = tmp_path / "data" / "audio"
  audio.mkdir(parents=True)
  secret = tmp_path / "secret.wav"  # outside the audio folder, readable
  save_audio(secret, _tone(440, 2.0), SR)
  save_audio(audio / "ok.wav", _tone(300, 2.0), SR)
  (audio / "ok.json").write_text(json.dumps({"caption": "fine", "stems": ["ok_stem.wav"]}))
  save_audio(audio / "ok_stem.wav", _tone(300, 2.0), SR)
  for name, entry in [("up", "../../secret.wav"), ("abs", str(secret))]:
    save_audio(audio / f"{name}.wav", _tone(300, 2.0), SR)
    (audio / f"{name}.json").write_text(json.dumps({"caption": name, "stems": [{"file": entry}]}))
  items = {it.source: it for it in D.find_items(str(audio))}
  assert [s["source"] for s in items["ok.wav"].stems] == ["ok_stem.wav"]
  for name, entry, why in [("up", "../../secret.wav", "outside the audio folder"),
                           ("abs", str(secret), "absolute path")]:
    err = items[f"{name}.wav"].info["sidecar_error"]
    assert f"{name}.json: stem entry 0 {entry!r}" in err and why in err, err
    assert not items[f"{name}.wav"].stems
  # the build records those items as bad files, with the reason, and goes on
  with pytest.warns(RuntimeWarning, match="2 files skipped"):
    rep = D.build_dataset(str(audio), str(tmp_path / "out"), RMSCodec(), progress=False)
  assert rep["items"] == 1
  assert sorted(b["source"] for b in rep["bad"]) == ["abs.wav", "up.wav"]
  assert all("stem entry 0" in b["reason"] for b in rep["bad"])
  # a listing: stems and item paths are held to the same folders
  for row, entry in [({"path": "ok.wav", "caption": "c", "stems": ["../../secret.wav"]},
                      "../../secret.wav"),
                     ({"path": str(secret), "caption": "c"}, str(secret)),
                     ({"path": "../../secret.wav", "caption": "c"}, "../../secret.wav")]:
    listing = audio / "captions.jsonl"
    listing.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="captions.jsonl") as ei:
      D.find_items(str(audio))
    assert repr(entry) in str(ei.value)


def test_resume_after_crash_matches_clean_build(tmp_path):
  n = _make_folder(tmp_path / "audio")
  clean_out = tmp_path / "clean"
  with pytest.warns(RuntimeWarning):
    D.build_dataset(str(tmp_path / "audio"), str(clean_out), PickyCodec(), "rms", progress=False)
  clean, _ = _latents_by_source(clean_out)
  out = tmp_path / "out"
  # a hard crash (no cleanup) on the 6th encode: only whole shards of 2 survive
  with pytest.raises(CrashingCodec.Crash):
    D.build_dataset(str(tmp_path / "audio"), str(out), CrashingCodec(6), "rms", progress=False,
                    shard_items=2, stems=False)
  meta = (out / "metadata.jsonl").read_text().splitlines()
  assert len(meta) == 4  # 4 good files in two shards of 2, then the crash
  # make it worse: a torn metadata line and an orphan shard from the crash
  with open(out / "metadata.jsonl", "a") as f:
    f.write('{"source": "song9.wav", "capt')
  np.savez(out / "shard_00077.npz", x=np.zeros(3))
  with pytest.warns(RuntimeWarning):
    rep = D.build_dataset(str(tmp_path / "audio"), str(out), PickyCodec(), "rms", progress=False,
                          shard_items=2)
  assert rep["items"] == n and rep["items_new"] == n - 4
  assert not (out / "shard_00077.npz").exists()
  resumed, ds = _latents_by_source(out)
  assert resumed.keys() == clean.keys()
  for k in clean:
    np.testing.assert_array_equal(resumed[k], clean[k])
  # a third run has nothing to do
  with pytest.warns(RuntimeWarning, match="5 files skipped"):  # bad files are retried
    rep3 = D.build_dataset(str(tmp_path / "audio"), str(out), PickyCodec(), "rms",
                           progress=False)
  assert rep3["items_new"] == 0 and rep3["items"] == n and rep3["bad_this_run"] == 5


def test_ctrl_c_keeps_encoded_items(tmp_path):
  _make_folder(tmp_path / "audio")
  out = tmp_path / "out"
  with pytest.raises(KeyboardInterrupt):
    D.build_dataset(str(tmp_path / "audio"), str(out), CrashingCodec(6, KeyboardInterrupt), "rms",
                    progress=False, shard_items=100, stems=False)
  # encode calls: loud.wav (rejected), 4 good files, then Ctrl-C: the pending shard is flushed
  assert len((out / "metadata.jsonl").read_text().splitlines()) == 4
  assert len(list(out.glob("shard_*.npz"))) == 1


def test_codec_mismatch_refused(tmp_path):
  _make_folder(tmp_path / "audio", n_good=2)
  with pytest.warns(RuntimeWarning):
    D.build_dataset(str(tmp_path / "audio"), str(tmp_path / "out"), RMSCodec(), "rms",
                    progress=False)

  class Other(RMSCodec):
    hop = 100
  with pytest.raises(ValueError, match="another codec"):
    D.build_dataset(str(tmp_path / "audio"), str(tmp_path / "out"), Other(), "rms",
                    progress=False)
  # the held-out fraction is part of the dataset: resuming with another one is refused
  with pytest.raises(ValueError, match="built with holdout 0.15, not 0.3"):
    D.build_dataset(str(tmp_path / "audio"), str(tmp_path / "out"), RMSCodec(), "rms",
                    progress=False, holdout=0.3)
  with pytest.raises(ValueError, match="holdout must be a fraction"):
    D.build_dataset(str(tmp_path / "audio"), str(tmp_path / "out2"), RMSCodec(), "rms",
                    progress=False, holdout=1.5)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("ds")
  _make_folder(root / "audio")
  with pytest.warns(RuntimeWarning):
    D.build_dataset(str(root / "audio"), str(root / "out"), PickyCodec(), "rms", progress=False,
                    shard_items=3)
  return root / "out"


def test_crops_deterministic(built):
  a = D.LatentDataset(str(built), crop_frames=32, seed=5)
  b = D.LatentDataset(str(built), crop_frames=32, seed=5, preload=False)
  c = D.LatentDataset(str(built), crop_frames=32, seed=6)
  for step in (0, 1, 17):
    x, y = a.batch(step, 8), b.batch(step, 8)
    for k in ("latents", "mask", "index", "start", "stems", "stem_mask"):
      np.testing.assert_array_equal(x[k], y[k])
    assert x["captions"] == y["captions"]
  assert not np.array_equal(a.batch(0, 8)["latents"], a.batch(1, 8)["latents"])
  assert not np.array_equal(a.batch(0, 8)["latents"], c.batch(0, 8)["latents"])
  # resuming the iterator at step k gives the same batches as running through
  run = list(a.iterate(4, start_step=0, steps=6))
  resumed = list(a.iterate(4, start_step=3, steps=3))
  for x, y in zip(run[3:], resumed):
    np.testing.assert_array_equal(x["latents"], y["latents"])


def test_crops_content_mask_and_stems(built):
  ds = D.LatentDataset(str(built), crop_frames=100, seed=0)
  assert ds.use_stems and ds.max_stems == 2
  bt = ds.batch(3, 16)
  assert bt["latents"].shape == (16, 100, 4) and bt["latents"].dtype == np.float32
  assert bt["stems"].shape == (16, 2, 100, 4)
  for b in range(16):
    i, s = bt["index"][b], bt["start"][b]
    full = ds.latents(i).astype(np.float32)
    m = bt["mask"][b].sum()
    assert m == min(100, full.shape[0] - s)
    np.testing.assert_array_equal(bt["latents"][b, :m], full[s:s + m])
    assert not bt["latents"][b, m:].any()
    assert bt["captions"][b] == ds.records[i]["caption"]
    has = bool(ds.records[i]["stems"])
    assert bt["stem_mask"][b].tolist() == [has, has]
    if has:
      for k, st in enumerate(ds.stem_latents(i)):
        np.testing.assert_array_equal(bt["stems"][b, k, :m], st[s:s + m].astype(np.float32))
      assert bt["stem_names"][b] == ["low", "01_high"]
    else:
      assert not bt["stems"][b].any()


def test_weighting_split_and_filters(built):
  ds = D.LatentDataset(str(built), crop_frames=60, seed=0)
  frames = np.array([r["frames"] for r in ds.records])
  counts = np.bincount(ds.batch(0, 4000)["index"], minlength=len(ds))
  expect = np.maximum(frames - 60 + 1, 1) / np.maximum(frames - 60 + 1, 1).sum()
  np.testing.assert_allclose(counts / 4000, expect, atol=0.03)
  long_only = D.LatentDataset(str(built), crop_frames=60, min_frames=120)
  assert all(r["frames"] >= 120 for r in long_only.records) and len(long_only) < len(ds)
  uni = D.LatentDataset(str(built), crop_frames=60, weighting="items")
  np.testing.assert_allclose(uni.probs, 1 / len(uni))
  train, held = ds.split(0.3)
  assert sorted(train + held) == list(range(len(ds))) and train and held
  assert ds.split(0.3) == (train, held)
  # nested: a larger fraction holds out a superset of the sources
  assert set(ds.split(0.1)[1]) <= set(held) <= set(ds.split(0.6)[1])
  # the default is the fraction recorded in dataset.json (0.05 for folders that predate it)
  assert ds.info["holdout"] == D.DEFAULT_HOLDOUT and ds.split() == ds.split(D.DEFAULT_HOLDOUT)
  legacy = dict(ds.info)
  del legacy["holdout"]
  ds.info = legacy
  assert ds.split() == ds.split(D.LEGACY_HOLDOUT)
  sub = D.LatentDataset(str(built), crop_frames=60, indices=held)
  assert len(sub) == len(held)
  assert 0 < ds.hours < 0.01


def test_get_codec_and_cli(tmp_path, capsys):
  codec = D.get_codec(f"{__name__}:RMSCodec")
  assert isinstance(codec, RMSCodec)
  with pytest.raises(ValueError, match="unknown codec"):
    D.get_codec("no_such_codec_anywhere")
  _make_folder(tmp_path / "audio", n_good=2)
  with pytest.warns(RuntimeWarning):
    rc = D.main(["--audio", str(tmp_path / "audio"), "--out", str(tmp_path / "out"),
                 "--codec", f"{__name__}:RMSCodec", "--quiet", "--dtype", "float32"])
  assert rc == 0
  rep = json.loads(capsys.readouterr().out)
  assert rep["items"] == 4 and rep["codec"] == f"{__name__}:RMSCodec"  # loud.wav is fine here
  ds = D.LatentDataset(str(tmp_path / "out"), crop_frames=10)
  assert ds.latents(0).dtype == np.float32


# ---------------------------------------------------------------- melody tracks and extras


@pytest.fixture(scope="module")
def with_melody(built, tmp_path_factory):
  import shutil

  from lmdm_jax.data import melody
  out = tmp_path_factory.mktemp("mel") / "out"
  shutil.copytree(built, out)
  melody.build(str(out), str(built.parent / "audio"), log=lambda *a: None)
  return out


def test_melody_tracks_and_skyline(with_melody):
  ds = D.LatentDataset(str(with_melody), crop_frames=100, seed=0)
  (i,) = [k for k, r in enumerate(ds.records) if r["stems"]]
  r = ds.records[i]
  low, high = (ds.melody[s["key"]] for s in r["stems"])
  assert low.shape == high.shape == (r["frames"],)
  # 330 Hz = MIDI 63.9, 660 Hz = 75.9 (yin on the stems, voiced through the tone)
  assert abs(np.nanmedian(low) - 63.9) < 0.3 and abs(np.nanmedian(high) - 75.9) < 0.3
  assert np.isfinite(low[2:-2]).all()
  sky = ds.melody[r["key"]]
  both = np.isfinite(low) & np.isfinite(high)
  np.testing.assert_array_equal(sky[both], np.maximum(low, high)[both])
  only_low = np.isfinite(low) & ~np.isfinite(high)  # the high stem is shorter
  np.testing.assert_array_equal(sky[only_low], low[only_low])
  bt = ds.batch(0, 16)
  assert bt["melody"].shape == (16, 100) and bt["stem_melody"].shape == (16, 2, 100)


def test_melody_leaves_unpitched_stems_out(built, tmp_path):
  import shutil

  from lmdm_jax.data import melody
  out = tmp_path / "out"
  shutil.copytree(built, out)
  recs = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
  for r in recs:
    for s in r["stems"]:
      if s["name"] != "low":
        s["pitched"] = False  # as the corpus marks a drum kit
  (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  melody.build(str(out), str(built.parent / "audio"), log=lambda *a: None)
  ds = D.LatentDataset(str(out), crop_frames=100, seed=0)
  (i,) = [k for k, r in enumerate(ds.records) if r["stems"]]
  r = ds.records[i]
  low, high = (ds.melody[s["key"]] for s in r["stems"])
  assert np.isnan(high).all() and np.isfinite(low[2:-2]).all()
  np.testing.assert_array_equal(ds.melody[r["key"]], low)  # the skyline is the pitched stem's


def _extras_cfg(latent_dim=4):
  import dataclasses

  from lmdm_jax.config import DiTConfig, load_config
  from lmdm_jax.data.sketch import SKETCH_DIM
  cfg = DiTConfig.from_config(load_config("tiny").model)
  return dataclasses.replace(cfg, io_channels=latent_dim,
                             input_add_dim=1 + latent_dim + 1 + latent_dim + SKETCH_DIM)


def test_batcher_jam_and_sketch_extras(with_melody):
  from lmdm_jax.data.sketch import pitch_features
  from lmdm_jax.training.data import Batcher
  cfg = _extras_cfg()
  text = lambda caps: np.zeros((len(caps), 3, cfg.cond_token_dim), np.float32)  # noqa: E731
  ds = D.LatentDataset(str(with_melody), crop_frames=48, seed=1)
  bat = Batcher(ds, cfg, text, p_jam=1.0, p_acc_uncond=0.0, p_acc_partial=0.0, p_sketch=1.0)
  raw, out = ds.batch(2, 16), bat(2, 16)
  assert out["extra"].shape == (16, 48, 1 + 4 + 14)  # [accomp mask | accomp | sketch]
  jam = 0
  for b in range(16):
    m = raw["mask"][b]
    acc, sk = out["extra"][b, :, :5], out["extra"][b, :, 5:]
    if raw["stem_mask"][b].sum() >= 2:
      jam += 1
      i = [k for k in range(2) if np.array_equal(out["latents"][b], raw["stems"][b, k])]
      assert len(i) == 1  # the target is one stem, the partner the other
      j = 1 - i[0]
      np.testing.assert_array_equal(acc[:, 0], m.astype(np.float32))
      np.testing.assert_array_equal(acc[:, 1:], raw["stems"][b, j] * m[:, None])
      np.testing.assert_array_equal(sk, pitch_features(raw["stem_melody"][b, i[0]]) * m[:, None])
    else:  # no partner: the mix is the target, no accompaniment
      np.testing.assert_array_equal(out["latents"][b], raw["latents"][b])
      assert not acc.any()
  assert jam > 0
  # deterministic in (seed, step), different across steps
  again = Batcher(ds, cfg, text, p_jam=1.0, p_acc_uncond=0.0, p_acc_partial=0.0, p_sketch=1.0)(2, 16)
  np.testing.assert_array_equal(again["extra"], out["extra"])
  # partial knowledge: each chunk knows its partner up to a frame (a prefix of the chunk)
  part = Batcher(ds, cfg, text, p_jam=1.0, p_acc_uncond=0.0, p_acc_partial=1.0, p_sketch=0.0)(2, 16)
  km = part["extra"][:, :, 0].reshape(16, -1, cfg.chunk)
  assert (np.diff(km, axis=-1) <= 0).all() and 0 < km.mean() < 1
  assert not part["extra"][:, :, 5:].any()


def test_batcher_rejects_unknown_extra_width():
  import dataclasses

  from lmdm_jax.training.data import Batcher
  cfg = dataclasses.replace(_extras_cfg(), input_add_dim=1 + 4 + 3)
  with pytest.raises(ValueError, match="extra input_add channels = 3"):
    Batcher(None, cfg, lambda c: None)
