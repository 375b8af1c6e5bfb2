"""bench/drift.py runs end to end (random tiny weights, synthetic data) and writes its numbers."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_drift_bench_smoke(tmp_path):
  out = tmp_path / "drift"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "drift.py"), "--config",
                      "arc_tiny", "--seconds", "1.5", "--batch", "2", "--steps", "2",
                      "--base-steps", "3", "--row-seconds", "0.5", "--out", str(out)],
                     capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "| t (s) | blocks | FD base |" in r.stdout
  d = json.loads((out / "drift.json").read_text())
  n = len(d["t_end_s"])
  assert n >= 8 and len(d["base"]["fd"]) == n and all(x >= 0 for x in d["base"]["fd"])
