"""ARC-Forcing post-training: a LoRA adapter on a frozen base LMDM (LMDM_REFERENCE §4).

  python3 arc.py --config arc_tiny --data synthetic --workdir runs/arc_tiny --steps 20
  python3 arc.py --config arc_tiny --base runs/tiny --data synthetic --workdir runs/arc_tiny
  python3 arc.py --config configs/my_arc.py --base runs/demo --data data_cache/latents ...
  python3 arc.py ... --fsdp 4            # shard base/adapter/head/optimizers over 4 of the devices
  python3 arc.py ... --coordinator HOST:PORT --num-processes N --process-id I   # each process

--base is a train.py workdir (or its checkpoints/ folder): the base parameters are read from its
latest (or --base-step) orbax checkpoint, {"params", "rest", "opt", "step"}, by a partial restore
of "params" and "rest" only. Without --base the model gets random weights (the run says so).
Only the adapter, the discriminator head and their optimizer states are trained and saved, under
<workdir>/arc_checkpoints (atomic orbax saves; --keep of them). A run restarted with the same
command resumes from its last checkpoint with the same data order, rollouts and losses as an
uninterrupted run (data, PRNG keys and the G/D phase depend only on the seed and the step).
Metrics: <workdir>/arc_metrics.jsonl. ``lmdm_jax.training.arc_run.load_arc_model(workdir)``
returns the base with the adapter merged in, for inference (e.g. bench/drift.py).

Scale: the same sharding as stage 1 (train.py, ``lmdm_jax.training.sharding``): a (data, fsdp)
mesh over all devices (``--fsdp``, default 1 = data parallel; several processes with the same
flags as train.py, docs/TRAINING.md); the batch is split over the mesh, the frozen base,
adapter, head and both optimizer states are FSDP-sharded over ``fsdp`` by the same rules, and
checkpoints restore into that layout. One device is a mesh of one (the same code path).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax

from lmdm_jax import compile_cache
from lmdm_jax.config import load_cli_config
from lmdm_jax.training import distributed, sharding
from lmdm_jax.training.arc_run import (ARC_DIR, METRICS, build, make_step_fns, model_config,
                                       restore_state, sections, train_loop)
from lmdm_jax.training.checkpoints import Checkpointer, latest_step
from lmdm_jax.training.data import Batcher, make_source
from lmdm_jax.training.workdir import checkpoint_dir, truncate_metrics


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default="arc_tiny",
                  help="a registered ARC config (arc_tiny, arc_demo[:key=value,...]) or your own "
                       "path/to/config.py (default: arc_tiny)")
  ap.add_argument("--data", default="synthetic",
                  help="latent dataset folder, or 'synthetic' (default)")
  ap.add_argument("--workdir", required=True,
                  help="run folder: arc_config.json, adapter checkpoints; rerunning resumes")
  ap.add_argument("--base", help="train.py workdir (or checkpoints folder) with the base weights "
                  "(default: none: RANDOM base weights, a smoke run)")
  ap.add_argument("--base-step", type=int,
                  help="the base's checkpoint step (default: its latest when the run starts, pinned)")
  ap.add_argument("--disc-ckpt", help="checkpoint of a separate discriminator backbone "
                  "(config key disc_backbone; default: none, random backbone weights)")
  ap.add_argument("--steps", type=int, help="total steps (default: the config's train.steps)")
  ap.add_argument("--batch-size", type=int, help="global batch size (default: the config's)")
  ap.add_argument("--ckpt-every", type=int, help="steps between checkpoints (default: the config's)")
  ap.add_argument("--keep", type=int, help="checkpoints kept (default: the config's)")
  ap.add_argument("--log-every", type=int, help="steps between metrics lines (default: the config's)")
  ap.add_argument("--seed", type=int, help="seed (default: the config's)")
  ap.add_argument("--fsdp", type=int,
                  help="devices per FSDP group, as train's --fsdp (default: the config's, 1)")
  distributed.add_arguments(ap)
  args = ap.parse_args(argv)
  compile_cache.enable(log=lambda m: print(f"[arc] {m}"))

  distributed.initialize_from_args(args, ap)  # before anything touches a device
  conf = load_cli_config(args.config)
  _, _, _, tr = sections(conf)
  for k in ("steps", "batch_size", "ckpt_every", "keep", "log_every", "fsdp"):
    if getattr(args, k) is not None:
      tr[k] = getattr(args, k)
  seed = conf.get("seed", 0) if args.seed is None else args.seed
  os.makedirs(args.workdir, exist_ok=True)
  rec_path = os.path.join(args.workdir, "arc_config.json")
  old = None
  if os.path.exists(rec_path):
    with open(rec_path) as f:
      old = json.load(f)
  base_step = args.base_step
  if args.base and base_step is None:
    # Pin the base's step: a base run that trains on must not change this adapter's base. A
    # resumed run keeps what it recorded (None for runs recorded before the pin).
    base_step = old.get("base_step") if old is not None else latest_step(checkpoint_dir(args.base))
  resumed = old is not None and os.path.isdir(os.path.join(args.workdir, ARC_DIR))
  cfg = model_config(conf, args.base, old.get("model", {}) if resumed else None)
  rec = {"config": args.config, "seed": seed, "data": args.data,
         "base": os.path.abspath(args.base) if args.base else None, "base_step": base_step,
         "disc_ckpt": args.disc_ckpt, "train": tr,
         "model": dict(conf.model, positions=cfg.positions),
         "adapter": dict(conf.get("adapter", {}) or {}), "arc": dict(conf.get("arc", {}) or {})}
  if old is not None:
    for k in ("config", "seed", "data", "base", "base_step"):
      if old.get(k) != rec[k] and os.path.isdir(os.path.join(args.workdir, ARC_DIR)):
        raise SystemExit(f"[arc] {args.workdir} holds a run with {k}={old.get(k)!r}; this command "
                         f"has {rec[k]!r}. Use another --workdir.")
  distributed.barrier("arc-run-record-read")  # every process has read it before it is rewritten
  if distributed.is_main():
    with open(rec_path + ".tmp", "w") as f:
      json.dump(rec, f, indent=1, default=str)
    os.replace(rec_path + ".tmp", rec_path)

  mesh = sharding.make_mesh(fsdp=tr["fsdp"])
  sharding.check_batch(tr["batch_size"], mesh)
  print(f"[arc] mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} "
        f"({jax.process_count()} process(es))")
  trainer, state, frozen = build(conf, seed, args.base, base_step, args.disc_ckpt, mesh=mesh,
                                 stored_model=rec["model"])
  cfg = trainer.cfg
  source = make_source(args.data, trainer.frames, cfg, seed)
  # plain mixes with the config's prompts: the rollouts leave the extra channels at zero
  batches = Batcher.for_config(source, conf, cfg, p_jam=0.0, p_sketch=0.0)
  ckpt = Checkpointer(os.path.join(args.workdir, ARC_DIR), keep=tr["keep"])
  start = 0
  if ckpt.latest_step() is not None:
    state, _ = restore_state(ckpt, state)
    start = int(state["step"])
    print(f"[arc] resumed from step {start} ({ckpt.directory})")
  metrics_path = os.path.join(args.workdir, METRICS)
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
                       meta={"config": args.config, "base": rec["base"]}, mesh=mesh)
  ckpt.close()
  print(f"[arc] finished at step {steps}; adapter checkpoints in {ckpt.directory}")


if __name__ == "__main__":
  main()
