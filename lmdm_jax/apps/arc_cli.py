"""ARC-Forcing post-training: a LoRA adapter on a frozen base LMDM (LMDM_REFERENCE §4).

  python3 arc.py --config arc_tiny --data synthetic --workdir runs/arc_tiny --config.arc_train.steps=20
  python3 arc.py --config arc_tiny --base runs/tiny --data synthetic --workdir runs/arc_tiny
  python3 arc.py --config configs/arc_demo.py --config.arc.lr_g=2e-5 --base runs/demo ...
  python3 arc.py ... --config.arc_train.fsdp=4   # shard base/adapter/head/optimizers over 4 devices
  python3 arc.py ... --coordinator HOST:PORT --num-processes N --process-id I   # each process

--config names the recipe (a registered config or your own file) and --config.FIELD=VALUE sets
any of its fields (``arc.lr_g``, ``adapter.rank``, ``arc_train.steps``, ``seed``, ...;
``--help --config NAME`` lists them with their values); the fields set on the command line are
recorded in <workdir>/arc_config.json ("overrides") with the config's name.
--base is a train.py workdir (or its checkpoints/ folder): the base parameters are read from its
latest (or --base_step) orbax checkpoint, {"params", "rest", "opt", "step"}, by a partial restore
of "params" and "rest" only. Without --base the model gets random weights (the run says so).
Only the adapter, the discriminator head and their optimizer states are trained and saved, under
<workdir>/arc_checkpoints (atomic orbax saves; ``arc_train.keep`` of them). A run restarted with
the same command resumes from its last checkpoint with the same data order, rollouts and losses as
an uninterrupted run (data, PRNG keys and the G/D phase depend only on the seed and the step); a
restart may change the run fields (``arc_train.*``), nothing else of the recipe.
Metrics: <workdir>/arc_metrics.jsonl. ``lmdm_jax.training.arc_run.load_arc_model(workdir)``
returns the base with the adapter merged in, for inference (e.g. bench/drift.py).

Scale: the same sharding as stage 1 (train.py, ``lmdm_jax.training.sharding``): a (data, fsdp)
mesh over all devices (``arc_train.fsdp``, default 1 = data parallel; several processes with
the same flags as train.py, docs/TRAINING.md); the batch is split over the mesh, the frozen base,
adapter, head and both optimizer states are FSDP-sharded over ``fsdp`` by the same rules, and
checkpoints restore into that layout. One device is a mesh of one (the same code path).
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
from absl import flags

from lmdm_jax import compile_cache
from lmdm_jax.apps import run_flags
from lmdm_jax.apps.common import UsageError
from lmdm_jax.config import one_line
from lmdm_jax.training import distributed, sharding
from lmdm_jax.training.arc_run import (ARC_DIR, METRICS, build, config_defaults, make_step_fns,
                                       model_config, restore_state, sections, train_loop)
from lmdm_jax.training.checkpoints import Checkpointer, latest_step
from lmdm_jax.training.data import Batcher, check_data, make_source, same_data
from lmdm_jax.training.workdir import checkpoint_dir, truncate_metrics


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("data", "synthetic", "latent dataset folder; several, mixed: A,B (equal "
                      "weights) or A:0.7,B:0.3; or 'synthetic': random latents, for smoke runs",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "run folder (required): arc_config.json, arc_checkpoints/, "
                      "arc_metrics.jsonl; rerunning the same command resumes", flag_values=fv)
  flags.DEFINE_string("base", None, "train.py work directory (or its checkpoints/ folder) with the "
                      "base weights (default: none: RANDOM base weights, a smoke run)",
                      flag_values=fv)
  flags.DEFINE_integer("base_step", None, "the base's checkpoint step (default: its latest when the "
                       "run starts, pinned in arc_config.json; also --base-step)", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_string("disc_ckpt", None, "checkpoint of a separate discriminator backbone (config "
                      "field disc_backbone; default: none, random backbone weights; also "
                      "--disc-ckpt)", flag_values=fv)
  run_flags.define_process_flags(fv)


def _recipe(overrides: dict) -> dict:
  """The overrides a resumed run must repeat: all but the run fields (``arc_train.*``)."""
  return {k: v for k, v in (overrides or {}).items() if not k.startswith("arc_train.")}


def main(argv=None):
  """arc.py: the command line is checked (a one-line error and exit 2 for a bad flag or config
  field, or a work directory that holds another run) before any model is built."""
  try:
    p = run_flags.parse(argv, prog="arc.py", doc=__doc__, define=define_flags,
                        default_config="arc_tiny", defaults=config_defaults())
    if p is None:
      return 0
    checked = _check(p)
  except (UsageError, ValueError, TypeError) as e:
    print(f"arc.py: error: {one_line(e)}", file=sys.stderr)
    return 2
  return train(p, *checked)


def _check(p: run_flags.Parsed):
  """-> (workdir, conf, tr, rec, base_step, mesh) for ``train``, after writing the run's record;
  UsageError for a work directory that holds another run."""
  fv, conf = p.flags, p.conf
  workdir = run_flags.required(fv, "workdir")
  compile_cache.enable(log=lambda m: print(f"[arc] {m}"))
  run_flags.init_processes(fv)  # before anything touches a device
  _, _, _, tr = sections(conf)  # checks the adapter, head and arc fields
  seed = conf.seed
  rec_path = os.path.join(workdir, "arc_config.json")
  old = None
  if os.path.exists(rec_path):
    with open(rec_path) as f:
      old = json.load(f)
  base_step = fv.base_step
  if fv.base and base_step is None:
    # Pin the base's step: a base run that trains on must not change this adapter's base. A
    # resumed run keeps what it recorded (None for runs recorded before the pin).
    base_step = old.get("base_step") if old is not None else latest_step(checkpoint_dir(fv.base))
  resumed = old is not None and os.path.isdir(os.path.join(workdir, ARC_DIR))
  cfg = model_config(conf, fv.base, old.get("model", {}) if resumed else None)
  check_data(fv.data, cfg)  # a bad --data is refused before any model is built
  rec = {"config": p.config, "overrides": p.overrides, "seed": seed, "data": fv.data,
         "base": os.path.abspath(fv.base) if fv.base else None, "base_step": base_step,
         "disc_ckpt": fv.disc_ckpt, "train": tr,
         "model": dict(conf.model, positions=cfg.positions),
         "adapter": dict(conf.adapter), "arc": dict(conf.arc)}
  if resumed:
    for k, was, now in [(k, old.get(k), rec[k]) for k in ("config", "seed", "data", "base",
                                                          "base_step")] + [
        ("overrides", _recipe(old.get("overrides")), _recipe(p.overrides))]:
      if not (same_data(was, now) if k == "data" else was == now):
        raise UsageError(f"{workdir} holds a run with {k}={was!r}; this command has {now!r}. "
                         "Use another --workdir.")
  mesh = sharding.make_mesh(fsdp=tr["fsdp"])
  sharding.check_batch(tr["batch_size"], mesh)
  os.makedirs(workdir, exist_ok=True)
  distributed.barrier("arc-run-record-read")  # every process has read it before it is rewritten
  if distributed.is_main():
    with open(rec_path + ".tmp", "w") as f:
      json.dump(rec, f, indent=1, default=str)
    os.replace(rec_path + ".tmp", rec_path)
  return workdir, conf, tr, rec, base_step, mesh


def train(p: run_flags.Parsed, workdir: str, conf, tr: dict, rec: dict, base_step, mesh):
  """The run of ``main``'s checked command line."""
  fv, seed = p.flags, conf.seed
  print(f"[arc] mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} "
        f"({jax.process_count()} process(es))")
  trainer, state, frozen = build(conf, seed, fv.base, base_step, fv.disc_ckpt, mesh=mesh,
                                 stored_model=rec["model"])
  cfg = trainer.cfg
  source = make_source(fv.data, trainer.frames, cfg, seed)
  # plain mixes with the config's prompts: the rollouts leave the extra channels at zero
  batches = Batcher.for_config(source, conf, cfg, p_jam=0.0, p_sketch=0.0)
  ckpt = Checkpointer(os.path.join(workdir, ARC_DIR), keep=tr["keep"])
  start = 0
  if ckpt.latest_step() is not None:
    state, _ = restore_state(ckpt, state)
    start = int(state["step"])
    print(f"[arc] resumed from step {start} ({ckpt.directory})")
  metrics_path = os.path.join(workdir, METRICS)
  if distributed.is_main():
    truncate_metrics(metrics_path, start)
  fns = make_step_fns(trainer, mesh=mesh)
  steps = tr["steps"]
  t0 = [time.perf_counter()]
  with open(metrics_path if distributed.is_main() else os.devnull, "a") as mf:
    def on_metrics(done, phase, m):
      if done % tr["log_every"] and done != steps:
        return
      m = {k: float(v) for k, v in m.items()}
      now = time.perf_counter()
      rec = {"step": done, "phase": phase, **m, "s_per_step": now - t0[0]}
      t0[0] = now
      mf.write(json.dumps(rec) + "\n")
      mf.flush()
      main_loss = m.get("loss_g", m.get("loss_d", 0.0))
      print(f"[arc] step {done} {phase.upper()} loss {main_loss:.4f}"
            + (f" contrastive {m['loss_c']:.4f}" if "loss_c" in m else "")
            + f" |grad| {m['grad_norm']:.3g}", flush=True)

    state = train_loop(trainer, fns, state, frozen, batches, tr["batch_size"], start, steps,
                       seed, ckpt, tr["ckpt_every"], on_metrics,
                       meta={"config": p.config, "base": rec["base"]}, mesh=mesh)
  ckpt.close()
  print(f"[arc] finished at step {steps}; adapter checkpoints in {ckpt.directory}")


if __name__ == "__main__":
  sys.exit(main())
