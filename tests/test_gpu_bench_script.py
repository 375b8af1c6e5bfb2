"""scripts/gpu_bench.sh, the one-call GPU benchmark: its SMOKE mode runs every stage on CPU with
the tiny config and writes every stage's table; a failing stage (or an XLA flag the library
rejects) is recorded and the next stage still runs; bench/streaming.py's unrolled step loop
computes the blocks of sampling.Stream's fori_loop."""
import os
import re
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_bench.sh")
STAGES = ("streaming-bf16", "serve", "cmdbuf-default", "cmdbuf-off", "cmdbuf-while-cond",
          "cmdbuf-graph-min-1", "cmdbuf-attention-jax", "streaming-fp32")


def _stage_status(md: str) -> dict:
  part = md.split("## stages", 1)[1]
  return {m.group(1): m.group(2) for m in re.finditer(r"^\| (\S+) \| (.+?) \| \d+ \|$", part,
                                                       re.M)}


@pytest.mark.slow
def test_smoke_mode_writes_every_stage_table(tmp_path):
  from lmdm_jax import compile_cache
  out = tmp_path / "out"
  env = dict(os.environ, SMOKE="1", OUT=str(out), PYTHON=sys.executable,
             LMDM_COMPILE_CACHE=compile_cache.default_dir())
  env.pop("XLA_FLAGS", None)
  r = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=900, cwd=ROOT,
                     env=env)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  md = (out / "gpu_bench.md").read_text()
  assert (out / "gpu_bench.log").stat().st_size > 0
  assert re.search(r"jax \S+, jaxlib \S+, flax \S+; backend cpu", md)
  status = _stage_status(md)
  assert status == {s: "ok" for s in STAGES}, status
  num = r"[0-9.]+"
  for dtype in ("bfloat16", "float32"):  # DiT and end to end through the tiny Oobleck decoder
    for mode, steps, cfg in (("cfg8", 8, "on"), ("arc4", 4, "off")):
      assert re.search(rf"^\| {mode} \| {steps} \| {cfg} \| 1 \| {dtype} \| fori \| {num} \| "
                       rf"{num} \| {num}% \| {num} \| {num} \| {num} \| no \(host decoder\) \|$",
                       md, re.M), (mode, dtype, md)
    assert f"# {dtype}: measured matmul peak" in md
  for n in (1, 2):  # the shared slot pool served 1 and 2 sessions
    assert re.search(rf"^\| {n} \| \d+ \| {num} \|", md, re.M), md
  assert re.search(r"^real-time sessions: \d+$", md, re.M)
  assert "shared pool: 2 slots" in md
  variants = {"default": ("fori", "unroll"), "off": ("fori",), "while-cond": ("fori", "unroll"),
              "graph-min-1": ("fori",), "attention-jax": ("fori",)}
  for label, loops in variants.items():
    rows = re.findall(rf"^\| {label} \| `[^`]*` \| ok \| (\w+) \| {num} \| {num} \| {num}% \|$",
                      md, re.M)
    assert tuple(rows) == loops, (label, rows, md)


def test_a_failing_stage_is_recorded_and_the_rest_still_run(tmp_path):
  """Every stage's command fails (a stand-in python); the one whose XLA flag is rejected says
  so; the script still runs every stage and writes the summary."""
  fake = tmp_path / "python"
  fake.write_text('#!/bin/sh\ncase "$XLA_FLAGS" in *graph_min*) echo "F1203 parse_flags_from_env'
                  '.cc:234] Unknown flag in XLA_FLAGS: $XLA_FLAGS"; exit 134;; esac\n'
                  'echo "no such thing"; exit 3\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  out = tmp_path / "out"
  env = dict(os.environ, SMOKE="1", OUT=str(out), PYTHON=str(fake))
  env.pop("XLA_FLAGS", None)
  r = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=120, cwd=ROOT,
                     env=env)
  assert r.returncode == 0, r.stderr
  status = _stage_status((out / "gpu_bench.md").read_text())
  assert list(status) == list(STAGES)
  assert status.pop("cmdbuf-graph-min-1").startswith("FAILED: this XLA rejects the flag")
  assert all(s == "FAILED (rc 3): no such thing" for s in status.values()), status


def test_out_is_required():
  env = {k: v for k, v in os.environ.items() if k != "OUT"}
  r = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=60, env=env)
  assert r.returncode == 2 and "set OUT" in r.stderr


@pytest.mark.slow
def test_unrolled_step_loop_makes_the_blocks_of_the_fori_loop():
  """bench/streaming.py's UnrolledStream (a Python-int step count) and sampling.Stream (the
  step count a runtime value in a fori_loop) stream the same blocks: the unrolled rows time the
  same computation."""
  import importlib.util

  import numpy as np
  from flax import nnx

  from lmdm_jax.config import DiTConfig, load_config
  from lmdm_jax.nn.dit import DiT
  spec = importlib.util.spec_from_file_location("streaming_bench",
                                                os.path.join(ROOT, "bench", "streaming.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  model = DiT(DiTConfig.from_config(load_config("tiny").model), rngs=nnx.Rngs(3))
  for steps, cfg_on, batch in ((8, True, 1), (4, False, 2)):
    fori = bench.make_stream(model, "block_causal", steps, cfg_on, batch, warm=-1)
    unrolled = bench.UnrolledStream(model, steps, cfg_on, batch)
    for _ in range(3):  # the fresh stream's first block, then committed ones
      a, b = np.asarray(fori.next_block()), np.asarray(unrolled.next_block())
      assert np.isfinite(a).all() and np.abs(a).max() > 0.1
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_stage_groups_can_be_picked(tmp_path):
  """GPU_BENCH_STAGES runs only the named groups (a rerun of what a device run left out)."""
  out = tmp_path / "out"
  env = dict(os.environ, SMOKE="1", OUT=str(out), PYTHON="false",
             GPU_BENCH_STAGES="serve fp32")
  r = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=120, cwd=ROOT,
                     env=env)
  assert r.returncode == 0, r.stderr
  md = (out / "gpu_bench.md").read_text()
  assert list(_stage_status(md)) == ["serve", "streaming-fp32"]
  assert "command-buffer variants" not in md
