"""The bundled-model file format (lmdm_jax.bundle): round trip, half precision, bad files, the
recorded rotary layout and the shipped bundle's stream."""
import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from lmdm_jax import bundle
from lmdm_jax.config import DiTConfig, load_config
from lmdm_jax.nn.dit import DiT


def _model(seed=1):
  return DiT(DiTConfig.from_config(load_config("tiny").model), rngs=nnx.Rngs(seed))


def _forward(model):
  cfg = model.cfg
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, cfg.window_chunks * cfg.chunk, cfg.io_channels)).astype(np.float32)
  add = rng.standard_normal(x.shape[:2] + (cfg.input_add_dim,)).astype(np.float32)
  cond = rng.standard_normal((1, 3, cfg.cond_token_dim)).astype(np.float32)
  glob = rng.standard_normal((1, cfg.global_cond_dim)).astype(np.float32)
  return np.asarray(model(x, np.array([0.3], np.float32), cond_tokens=cond, global_cond=glob,
                          input_add=add))


def test_round_trip_float32_is_exact(tmp_path):
  m = _model()
  path = bundle.save_bundle(m, str(tmp_path / "m.npz"), {"config": "tiny", "step": 7}, np.float32)
  cfg, m2, meta = bundle.load_bundle(path)
  assert cfg == m.cfg and meta["step"] == 7 and meta["config"] == "tiny"
  a, b = bundle.flat_params(m), bundle.flat_params(m2)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  np.testing.assert_array_equal(_forward(m), _forward(m2))


def test_half_precision_rounds_every_parameter(tmp_path):
  m = _model()
  path = bundle.save_bundle(m, str(tmp_path / "m.npz"), {"config": "tiny"})
  _, m2, meta = bundle.load_bundle(path)
  assert meta["dtype"] == "float16"
  a, b = bundle.flat_params(m), bundle.flat_params(m2)
  for k in a:
    np.testing.assert_array_equal(a[k].astype(np.float16).astype(np.float32), b[k])
  out, out2 = _forward(m), _forward(m2)
  assert 0 < np.abs(out - out2).max() < 1e-2 * np.abs(out).max()


def test_bad_bundles_are_named(tmp_path):
  m = _model()
  path = str(tmp_path / "m.npz")
  bundle.save_bundle(m, path, {"config": "tiny"})
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  key = next(k for k in arrays if k.endswith("project_in/kernel"))
  broken = dict(arrays)
  broken[key] = broken[key][:, :-1]
  np.savez(tmp_path / "shape.npz", **broken)
  with pytest.raises(ValueError, match="misshapen.*project_in"):
    bundle.load_bundle(str(tmp_path / "shape.npz"))
  missing = {k: v for k, v in arrays.items() if k != key}
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(ValueError, match="missing.*project_in"):
    bundle.load_bundle(str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "plain.npz", a=np.zeros(3))
  with pytest.raises(ValueError, match="not a model bundle"):
    bundle.load_bundle(str(tmp_path / "plain.npz"))
  with pytest.raises(ValueError, match="no such file"):
    bundle.load_bundle(str(tmp_path / "nope.npz"))


def test_load_model_accepts_a_bundle(tmp_path):
  from lmdm_jax.checkpoint_io import load_model
  m = _model()
  path = bundle.save_bundle(m, str(tmp_path / "m.npz"), {"config": "tiny", "step": 3}, np.float32)
  cfg, m2, extras = load_model(path)
  assert cfg == m.cfg and extras["step"] == 3 and extras["meta"]["config"] == "tiny"
  np.testing.assert_array_equal(_forward(m), _forward(m2))


def _strip_positions(src, dst):
  """A copy of bundle ``src`` whose recorded model config lacks ``positions`` (as bundles
  written before the field existed)."""
  with np.load(src) as z:
    arrays = {k: z[k] for k in z.files}
  meta = json.loads(bytes(arrays["__meta__"]).decode())
  del meta["model"]["positions"]
  arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  np.savez(dst, **arrays)
  return str(dst)


def test_new_bundles_record_their_layout_and_old_ones_load_as_legacy(tmp_path):
  m = _model()
  assert m.cfg.positions == "authors"  # new models: the authors' layout
  path = bundle.save_bundle(m, str(tmp_path / "m.npz"), {"config": "tiny"}, np.float32)
  assert bundle.read_meta(path)["model"]["positions"] == "authors"
  assert bundle.load_bundle(path)[0].positions == "authors"
  old = _strip_positions(path, tmp_path / "old.npz")
  cfg, _, _ = bundle.load_bundle(old)
  assert cfg.positions == "legacy" and cfg == dataclasses.replace(m.cfg, positions="legacy")
  assert DiTConfig.from_stored({**dataclasses.asdict(m.cfg)}).positions == "authors"
  with pytest.raises(ValueError, match="positions"):
    DiTConfig.from_stored({**dataclasses.asdict(m.cfg), "positions": "absolute"})


@pytest.mark.slow  # the legacy layout: with the other legacy tests
def test_shipped_bundle_streams_exactly_as_before_the_authors_positions():
  """The bundled model was trained in the legacy layout: it records no ``positions``, loads as
  "legacy" and streams the blocks the code before the authors' layout streamed
  (tests/golden/bundle_stream.npz, written by tests/golden/make_bundle_stream.py)."""
  from tests.golden import make_bundle_stream as golden
  assert "positions" not in bundle.read_meta(bundle.DEFAULT_BUNDLE)["model"]
  cfg, model, _ = bundle.load_bundle(bundle.DEFAULT_BUNDLE)
  assert cfg.positions == "legacy"
  want = np.load(golden.OUT)["blocks"]
  got = golden.stream_blocks(model)
  err = float(np.abs(got - want).max())
  print(f"shipped bundle, {golden.BLOCKS} blocks vs golden: max abs diff {err:.2e}")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the same weights in the authors' layout stream differently from the first block on
  model.cfg = dataclasses.replace(cfg, positions="authors")
  other = golden.stream_blocks(model)[:, :cfg.chunk]
  assert np.abs(other - want[:, :cfg.chunk]).max() > 1e-2


def test_shipped_bundle_records_no_absolute_paths():
  """The bundled model's provenance names folders, not this machine's paths (issue 16)."""
  import json
  import os

  from lmdm_jax.bundle import DEFAULT_BUNDLE, read_meta
  meta = read_meta(DEFAULT_BUNDLE)
  strings = [v for k, v in meta.items() if k != "model" and isinstance(v, str)]
  assert strings and not any(os.path.isabs(v) or "/work/" in v for v in strings), meta
  assert "/work/" not in json.dumps(meta)
