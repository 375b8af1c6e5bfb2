"""Several processes: train.py and arc.py run as 2 processes x 2 CPU devices (jax.distributed with
a coordinator on 127.0.0.1, gloo collectives) give the losses and parameters of the same command
as 1 process with 4 devices, and a 2-process run resumes from its own checkpoint with the same
losses. The global batch, the noise and the mesh are the same in both, so only the reduction
order of the cross-process collectives may differ: losses agree to 1e-5 relative, checkpointed
parameters to 1e-5 and Adam's moments to 1e-4 of the largest magnitude of their kind
(``_compare_arrays``).

The fast tests check the pieces in one process: a batch's rows do not depend on how they are
split, the process flags' errors, and the single-process paths of ``sharding.local_rows`` /
``global_batch`` / ``distributed.agree``."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
TOL_MOMENTS = 1e-4
TIMEOUT = 2400  # one launch, on a loaded 2-core machine


# --------------------------------------------------------------------------------- fast tests

def test_batch_rows_do_not_depend_on_the_split():
  from lmdm_jax.config import DiTConfig, load_config
  from lmdm_jax.training.data import Batcher, SyntheticLatents
  cfg = DiTConfig.from_config(load_config("tiny").model)
  batches = Batcher(SyntheticLatents(24, cfg.io_channels, seed=3), cfg)
  full = batches(7, 4)
  halves = [batches(7, 4, rows) for rows in ([0, 1], [2, 3])]
  odd = batches(7, 4, [3, 1])
  assert set(full) == {"latents", "frame_mask", "cond", "global_cond"}
  for k, v in full.items():
    assert len(v) == 4
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), v)
    np.testing.assert_array_equal(odd[k], v[[3, 1]])
  assert not np.array_equal(full["latents"][0], full["latents"][1])
  # a row depends on (seed, step, row) only: not on the batch size
  np.testing.assert_array_equal(batches(7, 8)["latents"][:4], full["latents"])
  assert not np.array_equal(batches(8, 4)["latents"], full["latents"])


def test_process_flags_errors(monkeypatch, tmp_path):
  from lmdm_jax.apps import train_cli
  from lmdm_jax.training import distributed
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize() is False  # one process: nothing started
  assert distributed.initialize(None, 1, 0) is False
  bad = [((None, 2, 0), "need --coordinator"), (("127.0.0.1:1234", 2, None), "--process-id"),
         (("127.0.0.1:1234", 2, 2), "not in 0..1"), (("127.0.0.1", 2, 0), "HOST:PORT"),
         (("127.0.0.1:1234", 0, 0), "at least 1"), (("127.0.0.1:1234", None, 1), "--num-processes")]
  for (addr, n, pid), msg in bad:
    with pytest.raises(ValueError, match=msg):
      distributed.initialize(addr, n, pid)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    distributed.initialize()
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  # the CLIs: a one-line usage error, exit status 2
  assert train_cli.main(["--workdir", str(tmp_path / "w"), "--num-processes", "2",
                         "--process-id", "0"]) == 2
  assert not (tmp_path / "w").exists()


def test_single_process_paths():
  import jax
  from lmdm_jax.training import distributed, sharding
  mesh = sharding.make_mesh()
  n = mesh.devices.size
  rows = sharding.local_rows(4 * n, mesh)
  np.testing.assert_array_equal(rows, np.arange(4 * n))
  local = {"x": np.arange(4 * n * 3, dtype=np.float32).reshape(4 * n, 3)}
  g = sharding.global_batch(local, 4 * n, mesh)
  assert g["x"].sharding == sharding.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(g["x"]), local["x"])
  key = sharding.put(jax.random.key(3), sharding.replicated(mesh))
  assert np.array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(3)))
  assert sharding.put(g, sharding.batch_sharding(mesh))["x"] is g["x"]  # already placed: kept
  assert distributed.agree({"a": [1, None]}) == {"a": [1, None]} and distributed.is_main()
  assert distributed.all_true(True) and not distributed.all_true(False)


# ---------------------------------------------------------------------------- several processes

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  # Both layouts compile with the same flags (the optimization level only shortens compiling).
  return dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
              JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0")


def _launch(args, processes: int, logs) -> str:
  """Runs ``args`` (a script and its flags) as 1 process with 4 devices or 2 processes with 2
  devices each; returns process 0's output. Outputs go to files (a full pipe would block a
  process, and the other one with it at its next collective)."""
  if processes == 1:
    cmds, env = [[sys.executable] + args], _env(4)
  else:
    port = _free_port()
    cmds = [[sys.executable] + args + ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                       str(processes), "--process-id", str(i)]
            for i in range(processes)]
    env = _env(4 // processes)
  outs = [os.path.join(logs, f"{os.getpid()}_{time.monotonic_ns()}_p{i}.log")
          for i in range(len(cmds))]
  procs = []
  for cmd, out in zip(cmds, outs):
    with open(out, "w") as f:
      procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT))
  deadline = time.monotonic() + TIMEOUT
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [open(o).read() for o in outs]
  for p, t in zip(procs, texts):
    assert p.returncode == 0, f"{' '.join(args[:1])} exit {p.returncode}:\n{t[-3000:]}"
  return texts[0]


def _metrics(path):
  with open(path) as f:
    return {r["step"]: r for r in map(json.loads, f)}


def _arrays(step_dir):
  """{path: array} of every array in a checkpoint step's "state" item (read as numpy)."""
  import jax
  import orbax.checkpoint as ocp
  item = os.path.join(step_dir, "state")
  c = ocp.PyTreeCheckpointer()
  m = c.metadata(item)
  tree = getattr(m, "item_metadata", None) or getattr(m, "tree", None) or m
  tree = getattr(tree, "tree", tree)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  out = c.restore(item, args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path(out)}


def _compare_steps(a: dict, b: dict, keys, what: str) -> float:
  worst = 0.0
  assert sorted(a) == sorted(b), (what, sorted(a), sorted(b))
  for s in a:
    for k in keys:
      if k in a[s] or k in b[s]:
        x, y = a[s][k], b[s][k]
        rel = abs(x - y) / max(abs(x), 1e-12)
        worst = max(worst, rel)
        assert rel < TOL, (what, s, k, x, y)
  return worst


def _group(path: str) -> str:
  """The kind of a checkpointed array: its top-level item (params, ema, adapter, head, ...), or
  for optimizer state also the field (Adam's mu, nu, count)."""
  for field in ("['mu']", "['nu']", "['count']"):
    if field in path:
      return path[:path.index(field) + len(field)]
  return path[:path.index("]") + 1]


def _compare_arrays(a: dict, b: dict, what: str) -> dict:
  """Max |a - b| / the largest |a| among arrays of the same kind (``_group``), worst of the
  parameters (and counters) and worst of Adam's moments: {"params": ..., "moments": ...}.
  Parameters must agree to TOL, moments (gradient statistics, where float32 sums over a
  different reduction order differ most) to TOL_MOMENTS, as test_arc_sharding's gradients.
  Zero-initialized output projections hold only a few updates after a few steps, so each array's
  own maximum is no scale."""
  assert sorted(a) == sorted(b), what
  scale = {}
  for k, x in a.items():
    if x.size:
      scale[_group(k)] = max(scale.get(_group(k), 1e-12), float(np.abs(x).max()))
  worst = {"params": 0.0, "moments": 0.0}
  for k in a:
    assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, (what, k)
    if a[k].size:
      d = float(np.abs(a[k].astype(np.float64) - b[k]).max()) / scale[_group(k)]
      kind = "moments" if _group(k).endswith(("['mu']", "['nu']")) else "params"
      worst[kind] = max(worst[kind], d)
      assert d < (TOL_MOMENTS if kind == "moments" else TOL), (what, k, d)
  return worst


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory):
  """train.py --config tiny, 4 steps, data 1 x fsdp 4 (parameters and optimizer state split
  across the processes): once in 1 process; once in 2 processes as 2 steps, then a second
  launch that resumes from the 2-process checkpoint of step 2."""
  d = tmp_path_factory.mktemp("stage1")
  t0 = time.perf_counter()

  def cmd(workdir, steps):
    return ["train.py", "--config", "tiny", "--data", "synthetic", "--workdir", str(workdir),
            f"--config.train.steps={steps}", "--config.train.ckpt_every=2",
            "--config.train.log_every=1", "--config.train.eval_every=2",
            "--config.train.batch_size=4", "--config.train.fsdp=4", "--no-progress"]

  _launch(cmd(d / "one", 4), 1, d)
  t1 = time.perf_counter()
  _launch(cmd(d / "two", 2), 2, d)
  resumed = _launch(cmd(d / "two", 4), 2, d)
  t2 = time.perf_counter()
  return dict(one=d / "one", two=d / "two", resumed=resumed, logs=d,
              seconds=(t1 - t0, t2 - t1))


@pytest.mark.slow
def test_stage1_two_processes_equal_one_process_and_resume(stage1_runs):
  from lmdm_jax.training.checkpoints import check_integrity
  r = stage1_runs
  assert "resumed from step 2" in r["resumed"]
  m1, m2 = _metrics(r["one"] / "metrics.jsonl"), _metrics(r["two"] / "metrics.jsonl")
  assert sorted(m1) == sorted(m2) == [1, 2, 3, 4]
  d_loss = _compare_steps(m1, m2, ("loss", "grad_norm", "heldout_loss"), "stage 1")
  assert "heldout_loss" in m2[4] and "heldout_loss" in m2[2]
  d_arr = {}
  for step in (2, 4):
    step_dir = str(r["two"] / "checkpoints" / str(step))
    assert check_integrity(step_dir)  # the record process 0 wrote covers both processes' files
    assert os.path.isdir(os.path.join(step_dir, "state", "ocdbt.process_1"))  # process 1 wrote
    d_arr[step] = _compare_arrays(_arrays(str(r["one"] / "checkpoints" / str(step))),
                                  _arrays(step_dir), f"stage 1 checkpoint {step}")
  print(f"stage 1, tiny, 4 steps: 2 processes x 2 devices vs 1 process x 4 devices (fsdp 4): "
        f"losses/grad norms/held-out max rel diff {d_loss:.1e}; checkpointed parameters / Adam "
        f"moments max diff / max |x| of their kind: step 2 {d_arr[2]['params']:.1e} / "
        f"{d_arr[2]['moments']:.1e}, step 4 (after the 2-process resume) "
        f"{d_arr[4]['params']:.1e} / {d_arr[4]['moments']:.1e}; "
        f"wall {r['seconds'][0]:.0f} s (1 process), {r['seconds'][1]:.0f} s (2 launches of 2)")


@pytest.mark.slow
def test_arc_two_processes_equal_one_process(stage1_runs, tmp_path):
  """arc.py --config arc_tiny on the stage-1 model (its checkpoint restored onto the mesh of 2
  processes), one G and one D step, data 2 x fsdp 2, a checkpoint at step 2."""
  base = str(stage1_runs["one"])
  t0 = time.perf_counter()

  def cmd(workdir):
    return ["arc.py", "--config", "arc_tiny", "--base", base, "--data", "synthetic",
            "--workdir", str(workdir), "--config.arc_train.steps=2",
            "--config.arc_train.batch_size=4", "--config.arc_train.fsdp=2",
            "--config.arc_train.log_every=1", "--config.arc_train.ckpt_every=2"]

  _launch(cmd(tmp_path / "one"), 1, tmp_path)
  t1 = time.perf_counter()
  out = _launch(cmd(tmp_path / "two"), 2, tmp_path)
  t2 = time.perf_counter()
  assert "2 process(es)" in out
  m1, m2 = (_metrics(tmp_path / w / "arc_metrics.jsonl") for w in ("one", "two"))
  assert sorted(m1) == [1, 2] and m1[1]["phase"] == "g" and m1[2]["phase"] == "d"
  d_loss = _compare_steps(m1, m2, ("loss_g", "loss_d", "loss_c", "grad_norm", "s_real",
                                   "s_fake"), "ARC")
  a1, a2 = (_arrays(str(tmp_path / w / "arc_checkpoints" / "2")) for w in ("one", "two"))
  assert any("adapter" in k for k in a1) and any("head" in k for k in a1)
  d_arr = _compare_arrays(a1, a2, "ARC checkpoint")
  print(f"ARC, arc_tiny, G + D step: 2 processes x 2 devices vs 1 process x 4 devices (data 2 x "
        f"fsdp 2): losses/grad norms/scores max rel diff {d_loss:.1e}; adapter and head / Adam "
        f"moments max diff / max |x| of their kind {d_arr['params']:.1e} / "
        f"{d_arr['moments']:.1e}; wall {t1 - t0:.0f} s "
        f"(1 process), "
        f"{t2 - t1:.0f} s (2 processes)")
