"""bench/drift.py runs end to end (random tiny weights, synthetic data) and writes its numbers."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_drift_bench_smoke(tmp_path):
  out = tmp_path / "drift"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "drift.py"), "--config",
                      "arc_tiny", "--seconds", "1.5", "--batch", "2", "--steps", "2",
                      "--base-steps", "3", "--row-seconds", "0.5", "--out", str(out)],
                     capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "| t (s) | blocks | FD base |" in r.stdout
  assert "pooled-quarter FD" in r.stdout
  d = json.loads((out / "drift.json").read_text())
  n = len(d["t_end_s"])
  assert n >= 8 and len(d["base"]["fd"]) == n and all(x >= 0 for x in d["base"]["fd"])


def _load_drift():
  import importlib.util
  spec = importlib.util.spec_from_file_location("drift_bench", os.path.join(ROOT, "bench",
                                                                            "drift.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_growth_summary_separates_a_drifting_model_from_a_stable_one():
  """The pooled-quarter growth and its paired bootstrap: a model whose frames drift away from
  the real distribution over the blocks grows, a stationary one does not, and the difference
  is resolved by the stream bootstrap (the statistics the ARC drift claim rests on)."""
  import numpy as np
  drift = _load_drift()
  rng = np.random.default_rng(0)
  b, n_blocks, cs, c = 12, 16, 8, 6
  real = rng.normal(size=(4000, c))
  stable = rng.normal(size=(b, n_blocks * cs, c)) + 0.8  # a constant offset: FD ~ 3.8
  ramp = np.repeat(np.linspace(0, 1.5, n_blocks), cs)[None, :, None]
  drifting = rng.normal(size=(b, n_blocks * cs, c)) + 0.3 + ramp
  s = drift.growth_summary({"drifting": drifting, "stable": stable}, real, n_blocks, cs,
                           n_boot=100, seed=0, ref="drifting")
  assert s["drifting"]["growth"] > 3 and 0.8 < s["stable"]["growth"] < 1.25
  lo, hi = s["drifting"]["growth_ci90"]
  assert lo <= s["drifting"]["growth"] * 1.05 and hi >= s["drifting"]["growth"] * 0.95
  assert all(h > 2 for h in s["drifting"]["growth_halves"])
  assert s["stable"]["d_growth_ci90"][1] < 0 and s["stable"]["p_less_growth"] == 1.0
  assert "d_growth_vs_ref" not in s["drifting"]
  # without resamples: point estimates only, no intervals or paired claims
  s0 = drift.growth_summary({"drifting": drifting, "stable": stable}, real, n_blocks, cs,
                            n_boot=0, seed=0, ref="drifting")
  assert np.isnan(s0["stable"]["growth_ci90"][0]) and "p_less_growth" not in s0["stable"]
  np.testing.assert_allclose(s0["stable"]["growth"], s["stable"]["growth"])
