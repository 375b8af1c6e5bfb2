"""ARC-Forcing post-training: a LoRA adapter on a frozen base LMDM (LMDM_REFERENCE §4).

  python3 arc.py --config arc_tiny --data synthetic --workdir runs/arc_tiny --steps 20
  python3 arc.py --config arc_tiny --base runs/tiny --data synthetic --workdir runs/arc_tiny
  python3 arc.py --config configs/my_arc.py --base runs/demo --data data_cache/latents ...
  python3 arc.py ... --fsdp 4            # shard base/adapter/head/optimizers over 4 of the devices

--base is a train.py workdir (or its checkpoints/ folder): the base parameters are read from its
latest (or --base-step) orbax checkpoint, {"params", "rest", "opt", "step"}, by a partial restore
of "params" and "rest" only. Without --base the model gets random weights (the run says so).
Only the adapter, the discriminator head and their optimizer states are trained and saved, under
<workdir>/arc_checkpoints (atomic orbax saves; --keep of them). A run restarted with the same
command resumes from its last checkpoint with the same data order, rollouts and losses as an
uninterrupted run (data, PRNG keys and the G/D phase depend only on the seed and the step).
Metrics: <workdir>/arc_metrics.jsonl. ``load_arc_model(workdir)`` returns the base with the
adapter merged in, for inference (e.g. bench/drift.py).

Scale: the same sharding as stage 1 (train.py, ``lmdm_jax.training.sharding``): a (data, fsdp)
mesh over all devices (``--fsdp``, default 1 = data parallel; multi-host via the same
``init_distributed``); the batch is split over the mesh, the frozen base, adapter, head and both
optimizer states are FSDP-sharded over ``fsdp`` by the same rules, and checkpoints restore into
that layout. One device is a mesh of one (the same code path).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lmdm_jax.config import DiTConfig, load_config
from lmdm_jax.nn import adapters
from lmdm_jax.nn.dit import DiT
from lmdm_jax.nn.discriminator import HeadConfig
from lmdm_jax.testing import random_model
from lmdm_jax.training import sharding
from lmdm_jax.training.arc_forcing import ARCConfig, ARCForcing, jit_step, make_head
from lmdm_jax.training.checkpoints import Checkpointer, abstract_like, latest_step, run_layout
from lmdm_jax.training.data import Batcher, make_source

ARC_DIR = "arc_checkpoints"
METRICS = "arc_metrics.jsonl"


def _ckpt_dir(path: str) -> str:
  path = os.path.abspath(path)  # orbax refuses relative checkpoint paths
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def load_base_params(path: str, cfg: DiTConfig, step: int | None = None, seed: int = 0,
                     mesh=None):
  """(params, rest, step) of a DiT from a train.py checkpoint, restoring only those two items
  (onto ``mesh`` with the stage-1 shardings, or the first device). The checkpoint's EMA weights
  are the base when it has them (they are what the bundled model ships), else its raw params."""
  d = _ckpt_dir(path)
  if step is None:
    step = latest_step(d)
  if step is None:
    raise FileNotFoundError(f"--base {path}: no orbax checkpoint in {d} (expected train.py's "
                            "<workdir>/checkpoints/<step>/state)")
  _, params, rest = nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(seed))), nnx.Param, ...)
  target = {"params": abstract_like(params), "rest": abstract_like(rest)}
  if mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: dev, target)
  else:
    shardings = sharding.state_shardings(target, mesh)
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
  item = os.path.join(d, str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  name = "ema" if "ema" in _top_keys(ckptr, item) else "params"
  out = ckptr.restore(item, args=ocp.args.PyTreeRestore(
      {name: target["params"], "rest": target["rest"]},
      restore_args={name: restore_args["params"], "rest": restore_args["rest"]},
      partial_restore=True))
  return out[name], out["rest"], int(step)


def _top_keys(ckptr, item) -> set:
  """Top-level keys of a saved pytree (empty if this orbax version does not say)."""
  m = ckptr.metadata(item)
  tree = getattr(m, "item_metadata", None) or getattr(m, "tree", None) or m
  try:
    return set(tree.keys())
  except (AttributeError, TypeError):
    return set()


def model_config(conf, base: str | None = None, stored_model: dict | None = None) -> DiTConfig:
  """The generator's DiTConfig: ``conf.model`` in the rotary layout of ``stored_model`` (an ARC
  run's record) if given, else of the base run (``checkpoints.run_layout``)."""
  cfg = DiTConfig.from_config(conf.model)
  if stored_model is not None:
    return dataclasses.replace(cfg, positions=DiTConfig.from_stored(stored_model).positions)
  return run_layout(cfg, base) if base else cfg


def _sections(conf):
  tr = dict(batch_size=2, steps=20, ckpt_every=10, keep=3, log_every=1, fsdp=1)
  if conf.get("arc_train", None) is not None:
    tr.update(dict(conf.arc_train))
  return (adapters.AdapterConfig.from_config(conf.get("adapter", {}) or {}),
          HeadConfig.from_config(conf.get("head", {}) or {}),
          ARCConfig.from_config(conf.get("arc", {}) or {}), tr)


def build(conf, seed: int = 0, base: str | None = None, base_step: int | None = None,
          disc_ckpt: str | None = None, log=print, mesh=None, stored_model: dict | None = None):
  """(trainer, state, frozen) for a config with model/adapter/head/arc sections; with ``mesh``,
  state and frozen arrays are laid out on it with the stage-1 rules (``sharding.place``).
  The generator's rotary layout: the one ``stored_model`` (a run's recorded model config)
  records, else the base run's, else the config's."""
  cfg = model_config(conf, base, stored_model)
  ac_adapter, hc, ac, _ = _sections(conf)
  if base:
    params, rest, step = load_base_params(base, cfg, base_step, seed, mesh)
    model = nnx.merge(nnx.split(DiT(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)[0], params, rest)
    log(f"[arc] base parameters from {_ckpt_dir(base)} step {step}")
  else:
    model = random_model(cfg, seed=seed)
    log("[arc] no --base: the base model has RANDOM weights (a smoke run, not a trained model)")
  adapters.add_adapters(model, ac_adapter, seed=seed + 1)
  disc = None
  spec = conf.get("disc_backbone", None)
  if spec:
    dcfg = DiTConfig.from_config(load_config(spec).model)
    if disc_ckpt:
      dp, dr, _ = load_base_params(disc_ckpt, dcfg, mesh=mesh)
      disc = nnx.merge(nnx.split(DiT(dcfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[0], dp, dr)
    else:
      disc = random_model(dcfg, seed=seed + 2)
      log(f"[arc] discriminator backbone {spec}: RANDOM weights (pass --disc-ckpt)")
  head = make_head(disc.cfg if disc is not None else cfg, hc, seed=seed + 3)
  trainer = ARCForcing(model, ac, head, disc)
  state, frozen = trainer.init(model, head, disc)
  if mesh is not None:
    state, _ = sharding.place(state, mesh)
    frozen, _ = sharding.place(frozen, mesh)
  log(f"[arc] adapter {adapters.count_adapter_params(state['adapter']):,} params (rank "
      f"{ac_adapter.rank}, {len(ac_adapter.projections)} projections); head "
      f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['head'])):,}; rollout "
      f"{ac.rollout_blocks} blocks x {cfg.chunk} frames, k in 1..{ac.max_k} of {ac.steps} steps")
  return trainer, state, frozen


def make_step_fns(trainer: ARCForcing, compiler_options=None, mesh=None):
  """The G and D steps under the stage-1 ``mesh`` (default: all devices, fsdp 1), each jitted
  (``arc_forcing.jit_step``, state donated) and compiled on first use. Each call lays its state,
  frozen arrays and batch (host or device arrays) out on the mesh first (a no-op for arrays
  already there, e.g. from ``build(..., mesh=mesh)`` or a previous step)."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  jitted, compiled = {}, {}

  def make(phase):
    def call(state, frozen, batch, key):
      sharding.check_batch(len(batch["latents"]), mesh)
      if phase not in jitted:
        jitted[phase] = jit_step(trainer, phase, state, frozen, mesh)
      fn, shardings = jitted[phase]
      args = jax.device_put((state, frozen, dict(batch), key), shardings)
      if compiler_options:
        if phase not in compiled:
          compiled[phase] = fn.lower(*args).compile(compiler_options=compiler_options)
        fn = compiled[phase]
      return fn(*args)
    return call
  return make("g"), make("d")


def train_loop(trainer: ARCForcing, fns, state, frozen, batches, batch_size: int, start: int,
               steps: int, seed: int, ckpt: Checkpointer | None = None, ckpt_every: int = 0,
               on_metrics=None, meta=None):
  """Steps start..steps-1; step s uses batch s, key fold_in(key(seed), s) and phase s mod 2."""
  g_fn, d_fn = fns
  base_key = jax.random.key(seed)
  for step in range(start, steps):
    b = {k: np.asarray(v) for k, v in batches(step, batch_size).items()}  # split by the step fn
    fn = g_fn if trainer.phase(step) == "g" else d_fn
    state, m = fn(state, frozen, b, jax.random.fold_in(base_key, step))
    done = step + 1
    if on_metrics is not None:
      on_metrics(done, trainer.phase(step), m)
    if ckpt is not None and ckpt_every and (done % ckpt_every == 0 or done == steps):
      ckpt.save(done, state, meta=dict(meta or {}, step=done))
  return state


def restore_state(ckpt: Checkpointer, state):
  restored, meta = ckpt.restore(abstract_like(state))
  return restored, meta


def load_arc_model(workdir: str, base: str | None = None, step: int | None = None,
                   merge: bool = True, seed: int | None = None) -> DiT:
  """The ARC-forced generator of an arc.py run: base (from the run's recorded --base unless
  given) + its latest adapter, merged into the kernels (``merge``) or kept as an adapter."""
  with open(os.path.join(workdir, "arc_config.json")) as f:
    rec = json.load(f)
  conf = load_config(rec["config"])
  seed = rec["seed"] if seed is None else seed
  trainer, state, frozen = build(conf, seed, base if base is not None else rec.get("base"),
                                 rec.get("base_step"), rec.get("disc_ckpt"), log=lambda *_: None,
                                 stored_model=rec.get("model", {}))
  ck = Checkpointer(os.path.join(workdir, ARC_DIR))
  state, _ = ck.restore(abstract_like(state), step)
  ck.close()
  model = nnx.merge(trainer.gd, state["adapter"], frozen["params"], frozen["rest"])
  return adapters.merge_adapters(model) if merge else model


def main(argv=None):
  from train import truncate_metrics  # the same torn-log handling as stage 1

  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default="arc_tiny")
  ap.add_argument("--data", default="synthetic", help="latent dataset folder, or 'synthetic'")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--base", help="train.py workdir (or checkpoints folder) with the base weights")
  ap.add_argument("--base-step", type=int)
  ap.add_argument("--disc-ckpt", help="checkpoint of a separate discriminator backbone "
                  "(config key disc_backbone)")
  ap.add_argument("--steps", type=int)
  ap.add_argument("--batch-size", type=int)
  ap.add_argument("--ckpt-every", type=int)
  ap.add_argument("--keep", type=int)
  ap.add_argument("--log-every", type=int)
  ap.add_argument("--seed", type=int)
  ap.add_argument("--fsdp", type=int, help="devices per FSDP group (train.py's --fsdp)")
  args = ap.parse_args(argv)

  sharding.init_distributed()
  conf = load_config(args.config)
  _, _, _, tr = _sections(conf)
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
    base_step = old.get("base_step") if old is not None else latest_step(_ckpt_dir(args.base))
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
  with open(rec_path, "w") as f:
    json.dump(rec, f, indent=1, default=str)

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
  truncate_metrics(metrics_path, start)
  fns = make_step_fns(trainer, mesh=mesh)
  steps = tr["steps"]
  t0 = [time.perf_counter()]
  with open(metrics_path, "a") as mf:
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
                       meta={"config": args.config, "base": rec["base"]})
  ckpt.close()
  print(f"[arc] finished at step {steps}; adapter checkpoints in {ckpt.directory}")


if __name__ == "__main__":
  main()
