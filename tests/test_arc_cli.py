"""arc.py from the command line on a trained base: the adapter's base step is pinned when the run
starts, so a base that trains on does not change it on resume or export; the bundle records it."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _run(*args):
  out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=ENV,
                       timeout=900)
  return out


def _train(workdir, steps):
  out = _run("train.py", "--config", "tiny", "--data", "synthetic", "--workdir", workdir,
             f"--config.train.steps={steps}", "--config.train.ckpt_every=1",
             "--config.train.eval_every=0", "--config.train.batch_size=2", "--no-progress")
  assert out.returncode == 0, out.stdout + out.stderr


def _arc(workdir, base, steps, *extra):
  return _run("arc.py", "--config", "arc_tiny", "--base", base, "--data", "synthetic",
              "--workdir", workdir, f"--config.arc_train.steps={steps}",
              "--config.arc_train.ckpt_every=1", "--config.arc.lr_g=1e-4", *extra)


def _positions(path):
  with open(path) as f:
    return json.load(f)["model"].get("positions")


def test_arc_pins_base_step_across_resume_and_export(tmp_path):
  """... and the base's rotary layout: a base recorded before ``positions`` existed (legacy)
  trains on in it when resumed, and its adapter and exported bundle keep it."""
  base, wd = str(tmp_path / "base"), str(tmp_path / "arc")
  _train(base, 2)
  rec = os.path.join(base, "config.json")
  assert _positions(rec) == "authors"
  with open(rec) as f:
    old = json.load(f)
  del old["model"]["positions"]  # as train.py wrote it before the field existed
  with open(rec, "w") as f:
    json.dump(old, f)
  out = _arc(wd, base, 1)
  assert out.returncode == 0, out.stdout + out.stderr
  with open(os.path.join(wd, "arc_config.json")) as f:
    assert json.load(f)["base_step"] == 2  # the base's latest step when the run started
  assert _positions(os.path.join(wd, "arc_config.json")) == "legacy"
  _train(base, 3)  # the base trains on, in its layout
  assert _positions(rec) == "legacy"
  out = _arc(wd, base, 2)  # resume: still on step 2 of the base
  assert out.returncode == 0, out.stdout + out.stderr
  assert "base parameters from" in out.stdout and "step 2" in out.stdout, out.stdout
  with open(os.path.join(wd, "arc_config.json")) as f:
    assert json.load(f)["base_step"] == 2
  out = _arc(wd, base, 3, "--base_step", "3")  # another base under the same adapter: refused
  assert out.returncode == 2 and "base_step=2" in out.stderr, out.stdout + out.stderr
  out = _arc(wd, base, 3, "--config.arc.lr_d=1e-3")  # another recipe under the same adapter
  assert out.returncode == 2 and "overrides=" in out.stderr and "lr_d" in out.stderr, out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  with open(os.path.join(wd, "arc_config.json")) as f:
    assert json.load(f)["overrides"] == {"arc_train.steps": 2, "arc_train.ckpt_every": 1,
                                         "arc.lr_g": 1e-4}  # the last run's, kept
  bundle = str(tmp_path / "merged.npz")
  out = _run("-m", "lmdm_jax.bundle", "--arc", wd, "--out", bundle)
  assert out.returncode == 0, out.stdout + out.stderr
  from lmdm_jax.bundle import read_meta
  meta = read_meta(bundle)
  assert (meta["config"], meta["base_step"], meta["arc_step"]) == ("arc_tiny", 2, 2)
  assert meta["data"] == "synthetic" and "merged" in meta["weights"]
  # provenance is folder names only: nothing of this machine's paths is in a shared bundle
  assert (meta["source"], meta["base"]) == ("arc", "base") and str(tmp_path) not in json.dumps(meta)
  assert meta["model"]["positions"] == "legacy"
  assert meta["overrides"]["arc.lr_g"] == 1e-4  # sampling the bundle uses the run's recipe
