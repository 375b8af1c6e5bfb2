"""Model files are untrusted data (issue 16): a config named by a file is never run from a path,
declared sizes are checked against the stored arrays before anything is built, a damaged newest
checkpoint falls back to the newest intact one, and random damage gives a clear error."""
import dataclasses
import io
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmdm_jax import bundle
from lmdm_jax import file_checks as fc
from lmdm_jax.sources import SourceError
from lmdm_jax.system import load_system
from lmdm_jax.checkpoint_io import load_model
from lmdm_jax.config import (CONFIG_DIR, DiTConfig, config_named_by_file, load_cli_config,
                             load_config, load_config_file, registered_spec)
from lmdm_jax.nn.dit import DiT
from lmdm_jax.training.checkpoints import INTEGRITY, CheckpointError, Checkpointer, abstract_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = DiTConfig.from_config(load_config("tiny").model)
SMALL = dataclasses.replace(TINY, embed_dim=64, depth=1, num_heads=1)  # fast to build, fuzz


# ------------------------------------------------------------------------- the exploit's parts


@pytest.fixture
def evil(tmp_path):
  """An evil config file that would leave a marker file if it ever ran; (marker, specs naming
  it: a path relative to configs/ as in the report, and an absolute one)."""
  marker = tmp_path / "PWNED"
  d = tmp_path / "x"
  d.mkdir()
  (d / "evil.py").write_text(textwrap.dedent(f"""
      open({str(marker)!r}, "w").write("ran")
      def get_config(arg=""):
        open({str(marker)!r}, "w").write("ran")
        raise SystemExit(0)
      """))
  rel = os.path.relpath(str(d / "evil"), CONFIG_DIR)  # ../../../tmp/.../x/evil
  assert rel.startswith("..")
  return marker, [rel, str(d / "evil.py"), rel + ".py:arg"]


def _bundle(path, config, cfg=TINY, **meta):
  return bundle.save_bundle(DiT(cfg, rngs=nnx.Rngs(0)), str(path), dict(meta, config=config),
                            np.float32)


def _workdir(path, config="tiny", cfg=TINY, steps=(1,), data="synthetic", ema=True):
  """A train.py work directory (config.json + orbax checkpoints/ of a stage-1 state), made
  directly: the state's ``ema`` is params + 1, so which one loads is visible."""
  from lmdm_jax.training.stage1 import Stage1, Stage1Config
  model = DiT(cfg, rngs=nnx.Rngs(0))
  state = Stage1(model, Stage1Config(ema_decay=0.9 if ema else 0.0)).init_state(model)
  if ema:
    state["ema"] = jax.tree.map(lambda x: x + 1, state["params"])
  os.makedirs(path, exist_ok=True)
  ck = Checkpointer(os.path.join(path, "checkpoints"))
  for s in steps:
    ck.save(s, dict(state, step=jnp.asarray(s, jnp.int32)), meta={"step": s, "config": config})
  ck.close()
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"config": config, "model": dataclasses.asdict(cfg), "train": {}, "seed": 0,
               "data": data}, f)
  return str(path), state


def test_registered_names_only(tmp_path):
  assert registered_spec("tiny") == "tiny" and registered_spec("saos:enc_dec") == "saos:enc_dec"
  # a recorded command-line path to a registered file is that name; the registered file runs
  assert registered_spec("configs/arc_demo.py:lr_g=1e-4") == "arc_demo:lr_g=1e-4"
  assert registered_spec("/elsewhere/configs/tiny.py") == "tiny"
  for bad in ("../../x/evil", "/tmp/x/evil.py", "x/tiny.py", "tiny.py", "nope", "", None, 3,
              ["tiny"], "../configs/tiny"):
    assert registered_spec(bad) is None, bad
  with pytest.raises(ValueError, match="not a registered config"):
    load_config("../configs/tiny")
  with pytest.raises(ValueError, match="not a registered config"):
    load_config(os.path.join(CONFIG_DIR, "tiny.py"))
  # the user's own file, named on the command line, still loads (their choice)
  own = tmp_path / "mine.py"
  own.write_text("from lmdm_jax.config import load_config\n"
                 "def get_config(arg=''):\n  c = load_config('tiny')\n  c.name = 'mine'\n"
                 "  return c\n")
  assert load_config_file(str(own)).name == "mine" and load_cli_config(str(own)).name == "mine"
  assert load_cli_config("tiny:enc_dec").sampler.regime == "enc_dec"


def test_bundle_config_path_is_never_run(tmp_path, evil):
  marker, specs = evil
  for i, spec in enumerate(specs):
    path = _bundle(tmp_path / f"evil{i}.npz", spec)
    with pytest.raises(SourceError) as e:
      load_system(path, log=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg and "'__meta__ config'" in msg and path in msg, msg
    assert "not a registered config" in msg and "--config" in msg
    # with the user's own --config, that one is used (and the file's name is still not run)
    assert load_system(path, config="tiny", log=lambda *_: None).name == "tiny"
  assert not marker.exists()


@pytest.mark.slow
def test_sample_cli_refuses_the_evil_bundle(tmp_path, evil):
  marker, specs = evil
  path = _bundle(tmp_path / "evil.npz", specs[0])
  out = tmp_path / "o.wav"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--checkpoint", path,
                      "--seconds", "1", "--out", str(out), "--no-progress"],
                     capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert r.returncode == 2, r.stdout + r.stderr
  assert "Traceback" not in r.stderr, r.stderr
  err = [ln for ln in r.stderr.splitlines() if ln.startswith("sample.py: error:")]
  assert len(err) == 1 and "not a registered config" in err[0] and path in err[0], r.stderr
  assert not marker.exists() and not out.exists()


@pytest.mark.slow
def test_workdir_config_path_is_never_run(tmp_path, evil):
  marker, specs = evil
  for i, spec in enumerate(specs):
    wd, _ = _workdir(tmp_path / f"wd{i}", config=spec, ema=False)
    with pytest.raises(SourceError, match="'config' = .*not a registered config") as e:
      load_system(wd, log=lambda *_: None)
    assert os.path.join(wd, "config.json") in str(e.value) and "\n" not in str(e.value)
  assert not marker.exists()


def test_arc_run_config_path_is_never_run(tmp_path, evil):
  marker, specs = evil
  from lmdm_jax.training import arc_run as arc
  for i, spec in enumerate(specs):
    wd = tmp_path / f"arc{i}"
    wd.mkdir()
    (wd / "arc_config.json").write_text(json.dumps(
        {"config": spec, "seed": 0, "data": "synthetic", "base": None, "base_step": None}))
    with pytest.raises(ValueError, match="'config' = .*not a registered config") as e:
      arc.load_arc_model(str(wd))
    assert "arc_config.json" in str(e.value)
    with pytest.raises(ValueError, match="not a registered config"):
      bundle.export_arc(str(wd), str(tmp_path / "out.npz"))
  assert not marker.exists() and not (tmp_path / "out.npz").exists()


# --------------------------------------------------------------- declared sizes, checked first


def test_declared_model_values_are_bounded():
  base = dataclasses.asdict(TINY)
  for field, value, msg in [("embed_dim", 10**9, "embed_dim must be an integer in"),
                            ("depth", "4", "depth must be an integer"),
                            ("num_heads", 0, "num_heads must be an integer"),
                            ("chunk", 2.5, "chunk must be an integer"),
                            ("depth", True, "depth must be an integer"),
                            ("rope_base", float("nan"), "rope_base must be a finite"),
                            ("dtype", "object", "dtype must be one of"),
                            ("qk_norm", "exec", "qk_norm must be")]:
    with pytest.raises(ValueError, match=msg):
      DiTConfig.from_config(dict(base, **{field: value}))
  with pytest.raises(ValueError, match="unknown model config fields"):
    DiTConfig.from_config(dict(base, evil=1))
  with pytest.raises(ValueError, match="must be a mapping"):
    DiTConfig.from_config([1, 2])


def _big_bundle(path):
  """901 bytes declaring embed_dim=2048, depth=4 (2 GB of float32 parameters) and storing none."""
  meta = dict(config="tiny", model=dict(dataclasses.asdict(TINY), embed_dim=2048, depth=4,
                                        num_heads=32), dtype="float16")
  np.savez_compressed(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8))
  return str(path)


def _lying_bundle(path):
  """Headers that match a 2048-wide model, and no data behind them."""
  cfg = dataclasses.replace(TINY, embed_dim=2048, depth=4, num_heads=32)
  want = fc.param_shapes(fc.abstract_model(cfg, "x"))
  meta = dict(config="tiny", model=dataclasses.asdict(cfg), dtype="float32")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("__meta__.npy", _npy(np.frombuffer(json.dumps(meta).encode(), np.uint8)))
    for k, (shape, _) in want.items():
      hdr = np.lib.format.header_data_from_array_1_0(np.zeros((0,), np.float32))
      hdr["shape"] = shape
      b = io.BytesIO()
      np.lib.format.write_array_header_1_0(b, hdr)
      z.writestr(f"param/{k}.npy", b.getvalue() + b"\0" * 64)
  return str(path)


def _npy(a):
  b = io.BytesIO()
  np.save(b, a)
  return b.getvalue()


@pytest.mark.slow
def test_oversized_declarations_error_with_small_memory(tmp_path):
  """Each file declares a model of ~2 GB that it does not hold; loading says so, and the loader's
  peak memory (ru_maxrss, in a fresh process) grows by far less than the declared model."""
  big = dataclasses.replace(TINY, embed_dim=2048, depth=4, num_heads=32)
  wd, _ = _workdir(tmp_path / "wd", ema=False)
  with open(os.path.join(wd, "config.json")) as f:
    rec = json.load(f)
  rec["model"] = dataclasses.asdict(big)
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump(rec, f)
  from lmdm_jax.convert import dit as conv
  conv_dir = str(tmp_path / "converted")
  conv.save_converted(conv_dir, TINY, DiT(TINY, rngs=nnx.Rngs(0)))
  meta_file = os.path.join(conv_dir, "config", "metadata")
  with open(meta_file) as f:
    meta = json.load(f)
  meta["dit"] = dataclasses.asdict(big)
  with open(meta_file, "w") as f:
    json.dump(meta, f)
  cases = {"bundle": _big_bundle(tmp_path / "big.npz"),
           "headers": _lying_bundle(tmp_path / "lying.npz"), "workdir": wd, "converted": conv_dir}
  assert os.path.getsize(cases["bundle"]) < 1200
  script = textwrap.dedent(f"""
      import json, resource, sys
      from flax import nnx
      from lmdm_jax.checkpoint_io import load_model
      from lmdm_jax.config import DiTConfig, load_config
      from lmdm_jax.nn.dit import DiT
      DiT(DiTConfig.from_config(load_config("tiny").model), rngs=nnx.Rngs(0))  # warm up
      peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
      out = {{}}
      for name, path in {cases!r}.items():
        before = peak()
        try:
          load_model(path)
          err = None
        except ValueError as e:
          err = type(e).__name__ + ": " + str(e)
        out[name] = [peak() - before, err]
      print(json.dumps(out))
      """)
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                     env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  print({k: (round(v[0] / 2**20, 1), v[1][:100]) for k, v in res.items()})
  declared = 4 * sum(int(np.prod(s)) for s, _ in
                     fc.param_shapes(fc.abstract_model(big, "x")).values())
  assert declared > 1 << 30  # the declared model: > 1 GiB of float32
  for name, (grew, err) in res.items():
    assert err is not None and "\n" not in err, (name, err)
    assert grew < 128 << 20, (name, grew / 2**20, err)
  assert "does not match its config" in res["bundle"][1] and "missing" in res["bundle"][1]
  assert "ModelFileError" in res["headers"][1]
  assert "does not match its config" in res["workdir"][1]
  assert "does not match its config" in res["converted"][1]


@pytest.mark.slow
def test_workdir_loads_the_stored_weights(tmp_path):
  """The checked, partial restore (parameters and buffers only) gives the saved weights: EMA when
  asked and present, raw otherwise; and an export records folder names only."""
  wd, state = _workdir(tmp_path / "run", config="configs/tiny.py", steps=(1, 2),
                       data=str(tmp_path / "data" / "latents"))
  for use_ema, key in ((True, "ema"), (False, "params")):
    cfg, model, ex = load_model(wd, use_ema=use_ema)
    assert cfg == TINY and ex["step"] == 2
    got = nnx.state(model, nnx.Param)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state[key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  out = bundle.export_workdir(wd, str(tmp_path / "b.npz"), dtype=np.float32)
  meta = bundle.read_meta(out)
  assert meta["config"] == "tiny" and meta["source"] == "run" and meta["data"] == "latents"
  assert str(tmp_path) not in json.dumps(meta)
  assert load_system(out, log=lambda *_: None).name == "tiny"  # and it samples with tiny


def test_bundle_rejects_odd_members(tmp_path):
  path = _bundle(tmp_path / "m.npz", "tiny")
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  key = next(k for k in arrays if k.startswith("param/"))
  for name, change, msg in [
      ("int", {key: arrays[key].astype(np.int64)}, "parameters must be"),
      ("obj", {key: np.array([{"a": 1}], dtype=object)}, "holds object data"),
      ("meta", {"__meta__": np.zeros(3, np.float32)}, "__meta__ must be JSON"),
      ("json", {"__meta__": np.frombuffer(b"[" * 100000, np.uint8)}, "not valid JSON"),
      ("extra", {"evil": np.zeros(2)}, "unexpected.*evil")]:
    p = str(tmp_path / f"{name}.npz")
    np.savez(p, **dict(arrays, **change))
    with pytest.raises(fc.ModelFileError, match=msg):
      bundle.load_bundle(p)
  (tmp_path / "text.npz").write_text("not a zip")
  with pytest.raises(fc.ModelFileError, match="not an .npz file"):
    bundle.load_bundle(str(tmp_path / "text.npz"))


# ---------------------------------------------------------------------- damaged checkpoints


def _state(v):
  return {"a": jnp.full((300,), v, jnp.float32), "b": {"c": jnp.arange(1200.0).reshape(30, 40) + v},
          "step": jnp.asarray(int(v), jnp.int32)}


def _saved(d, steps=(1, 2, 3)):
  ck = Checkpointer(str(d), keep=5)
  for s in steps:
    ck.save(s, _state(s), meta={"step": s})
  ck.close()
  return str(d)


def _data_file(step_dir):
  """The largest array data file of a step (a flipped byte there is silent to orbax itself)."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs if os.sep + "d" + os.sep in os.path.join(r, f)]
  return max(files, key=os.path.getsize)


def _damage(path, how, rng=None):
  b = bytearray(open(path, "rb").read())
  rng = rng or random.Random(0)
  if how == "truncate":
    b = b[:rng.randrange(len(b))]
  else:
    i = rng.randrange(len(b))
    b[i] ^= 1 << rng.randrange(8)
  open(path, "wb").write(bytes(b))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_latest_checkpoint_falls_back(tmp_path, capsys, how):
  d = _saved(tmp_path / "ck")
  _damage(_data_file(os.path.join(d, "3")), how)
  ck = Checkpointer(d, keep=5)
  state, meta = ck.restore(abstract_like(_state(0)))
  assert int(state["step"]) == 2 and meta == {"step": 2}
  np.testing.assert_array_equal(np.asarray(state["a"]), np.full(300, 2.0))
  err = [ln for ln in capsys.readouterr().err.splitlines() if "[checkpoints]" in ln]
  assert len(err) == 1 and "step 3" in err[0] and os.path.join(d, "3") in err[0], err
  # a run resumed from step 2 writes step 3 again: the damaged one is kept aside, not in the way
  ck.save(3, _state(3.5), meta={"step": 3})
  assert os.path.isdir(os.path.join(d, "3.damaged")) and ck.latest_step() == 3
  state, _ = ck.restore(abstract_like(_state(0)))
  np.testing.assert_array_equal(np.asarray(state["a"]), np.full(300, 3.5))
  ck.close()


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
  d = _saved(tmp_path / "ck", steps=(1, 2))
  _damage(_data_file(os.path.join(d, "2")), "flip")
  os.remove(os.path.join(d, "1", INTEGRITY))  # saved before the record existed: orbax's check
  _damage(_data_file(os.path.join(d, "1")), "truncate")
  ck = Checkpointer(d)
  with pytest.raises(CheckpointError) as e:
    ck.restore(abstract_like(_state(0)))
  ck.close()
  msg = str(e.value)
  assert "no intact checkpoint" in msg and "step 2:" in msg and "step 1:" in msg and "\n" not in msg


def test_intact_step_that_does_not_fit_is_not_skipped(tmp_path, capsys):
  """A read failure of a step whose files verify is not damage: raised as is, no fallback (so a
  target of the wrong shape never silently rewinds a run to an older step)."""
  d = _saved(tmp_path / "ck", steps=(1, 2))
  wrong = dict(abstract_like(_state(0)), a=jax.ShapeDtypeStruct((7,), jnp.float32))
  ck = Checkpointer(d)
  with pytest.raises(ValueError) as e:
    ck.restore(wrong)
  assert not isinstance(e.value, CheckpointError) and not ck.damaged
  ck.close()
  assert "[checkpoints]" not in capsys.readouterr().err


@pytest.mark.slow
def test_damaged_workdir_loads_previous_step(tmp_path, capsys):
  wd, _ = _workdir(tmp_path / "run", steps=(1, 2), ema=False)
  _damage(_data_file(os.path.join(wd, "checkpoints", "2")), "flip")
  _, _, ex = load_model(wd)
  assert ex["step"] == 1 and "step 2" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- fuzz


@pytest.mark.slow
def test_fuzz_bundle_damage_gives_clear_errors(tmp_path):
  """40 seeded truncations and bit flips of a bundle: each loads (a flip in bytes nothing checks,
  e.g. a zip timestamp) or raises ValueError with a one-line message; numpy allocations stay small."""
  good = _bundle(tmp_path / "good.npz", "tiny", cfg=SMALL)
  data = open(good, "rb").read()
  rng = random.Random(16)
  outcomes = {"loaded": 0, "error": 0}
  tracemalloc.start()
  try:
    for i in range(40):
      b = bytearray(data)
      if i % 2:
        b = b[:rng.randrange(len(b))]
      else:
        for _ in range(rng.randint(1, 4)):
          j = rng.randrange(len(b))
          b[j] ^= 1 << rng.randrange(8)
      p = tmp_path / f"f{i}.npz"
      p.write_bytes(bytes(b))
      try:
        cfg, _, _ = bundle.load_bundle(str(p))
        assert cfg == SMALL
        outcomes["loaded"] += 1
      except ValueError as e:
        assert "\n" not in str(e) and str(p) in str(e), (i, str(e))
        outcomes["error"] += 1
      p.unlink()
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  print(outcomes, f"numpy/python peak {peak / 2**20:.1f} MiB for a {len(data) / 2**20:.2f} MiB file")
  assert outcomes["error"] >= 30
  assert peak < 64 << 20


@pytest.mark.slow
def test_fuzz_checkpoint_damage_falls_back_or_errors(tmp_path):
  """30 seeded truncations and bit flips of any file of the newest step: restore always gives the
  previous step's exact state (never a changed one, never an exception)."""
  src = _saved(tmp_path / "src", steps=(1, 2))
  files = sorted(os.path.relpath(os.path.join(r, f), os.path.join(src, "2"))
                 for r, _, fs in os.walk(os.path.join(src, "2")) for f in fs)
  rng = random.Random(7)
  for i in range(30):
    d = str(tmp_path / f"c{i}")
    shutil.copytree(src, d)
    rel = rng.choice(files)
    _damage(os.path.join(d, "2", rel), "truncate" if i % 2 else "flip", rng)
    ck = Checkpointer(d)
    state, _ = ck.restore(abstract_like(_state(0)))
    ck.close()
    assert int(state["step"]) == 1, (i, rel)
    np.testing.assert_array_equal(np.asarray(state["b"]["c"]), np.arange(1200.0).reshape(30, 40) + 1)
    shutil.rmtree(d)
