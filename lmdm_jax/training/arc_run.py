"""ARC-Forcing post-training runs (LMDM_REFERENCE §4): building the trainer from a config and a
base, the G/D step functions, the loop, and loading a finished run for inference. The command is
arc.py (``lmdm arc``, ``lmdm_jax.apps.arc_cli``), whose help describes the run layout.

The base parameters are read from a train.py work directory's latest (or a given) orbax checkpoint,
{"params", "rest", "opt", "step"}, by a partial restore of "params" and "rest" only (its EMA weights
when it has them). Only the adapter, the discriminator head and their optimizer states are trained
and saved, under <workdir>/arc_checkpoints; metrics go to <workdir>/arc_metrics.jsonl.
``load_arc_model(workdir)`` returns the base with the adapter merged in, for inference.

Scale: the same sharding as stage 1 (``lmdm_jax.training.sharding``): a (data, fsdp) mesh over all
devices; the batch is split over the mesh, the frozen base, adapter, head and both optimizer states
are FSDP-sharded over ``fsdp`` by the same rules, and checkpoints restore into that layout.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections.config_dict import placeholder

from lmdm_jax.config import DiTConfig, config_named_by_file, load_config
from lmdm_jax.nn import adapters
from lmdm_jax.nn.dit import DiT
from lmdm_jax.nn.discriminator import HeadConfig
from lmdm_jax.testing import random_model
from lmdm_jax.training import sharding
from lmdm_jax.training.arc_forcing import ARCConfig, ARCForcing, jit_step, make_head
from lmdm_jax.training.checkpoints import Checkpointer, abstract_like, latest_step, run_layout
from lmdm_jax.training.workdir import checkpoint_dir

ARC_DIR = "arc_checkpoints"
METRICS = "arc_metrics.jsonl"


def load_base_params(path: str, cfg: DiTConfig, step: int | None = None, seed: int = 0,
                     mesh=None):
  """(params, rest, step) of a DiT from a train.py checkpoint, restoring only those two items
  (onto ``mesh`` with the stage-1 shardings, or the first device). The checkpoint's EMA weights
  are the base when it has them (they are what the bundled model ships), else its raw params."""
  d = checkpoint_dir(path)
  if step is None:
    step = latest_step(d)
  if step is None:
    raise FileNotFoundError(f"--base {path}: no orbax checkpoint in {d} (expected train.py's "
                            "<workdir>/checkpoints/<step>/state)")
  _, params, rest = nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(seed))), nnx.Param, ...)
  target = {"params": abstract_like(params), "rest": abstract_like(rest)}
  if mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
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


# The run fields of an ARC config's ``arc_train`` section, with the values used where it lacks them.
ARC_TRAIN_DEFAULTS = dict(batch_size=2, steps=20, ckpt_every=10, keep=3, log_every=1, fsdp=1)


def config_defaults() -> dict:
  """Every config field an ARC run reads beyond ``model`` (``adapter``, ``head``, ``arc``,
  ``arc_train``, ``disc_backbone``, ``seed``), at the value it uses when the config does not set
  it; arc.py fills them into its config so each can be set as ``--config.FIELD=VALUE``. Fields
  that may be None are typed placeholders (``disc_backbone``: a registered config name;
  ``adapter.layers``: a tuple of block indices)."""
  adapter = dict(dataclasses.asdict(adapters.AdapterConfig()), layers=placeholder(tuple))
  return {"seed": 0, "adapter": adapter, "head": dataclasses.asdict(HeadConfig()),
          "arc": dataclasses.asdict(ARCConfig()), "arc_train": dict(ARC_TRAIN_DEFAULTS),
          "disc_backbone": placeholder(str)}


def sections(conf):
  """(AdapterConfig, HeadConfig, ARCConfig, arc_train dict with defaults) of an ARC config."""
  tr = dict(ARC_TRAIN_DEFAULTS)
  if conf.get("arc_train", None) is not None:
    tr.update(dict(conf.arc_train))
  return (adapters.AdapterConfig.from_config(conf.get("adapter", {}) or {}),
          HeadConfig.from_config(conf.get("head", {}) or {}),
          ARCConfig.from_config(conf.get("arc", {}) or {}), tr)


def model_config(conf, base: str | None = None, stored_model: dict | None = None) -> DiTConfig:
  """The generator's DiTConfig: ``conf.model`` in the rotary layout of ``stored_model`` (an ARC
  run's record) if given, else of the base run (``checkpoints.run_layout``)."""
  cfg = DiTConfig.from_config(conf.model)
  if stored_model is not None:
    return dataclasses.replace(cfg, positions=DiTConfig.from_stored(stored_model).positions)
  return run_layout(cfg, base) if base else cfg


def build(conf, seed: int = 0, base: str | None = None, base_step: int | None = None,
          disc_ckpt: str | None = None, log=print, mesh=None, stored_model: dict | None = None):
  """(trainer, state, frozen) for a config with model/adapter/head/arc sections; with ``mesh``,
  state and frozen arrays are laid out on it with the stage-1 rules (``sharding.place``).
  The generator's rotary layout: the one ``stored_model`` (a run's recorded model config)
  records, else the base run's, else the config's."""
  cfg = model_config(conf, base, stored_model)
  ac_adapter, hc, ac, _ = sections(conf)
  if base:
    params, rest, step = load_base_params(base, cfg, base_step, seed, mesh)
    model = nnx.merge(nnx.split(DiT(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)[0], params, rest)
    log(f"[arc] base parameters from {checkpoint_dir(base)} step {step}")
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
      log(f"[arc] discriminator backbone {spec}: RANDOM weights (pass --disc_ckpt)")
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
  frozen arrays, batch and key out on the mesh first (``sharding.put``: a no-op for arrays
  already there, e.g. from ``build(..., mesh=mesh)``, a previous step or
  ``sharding.global_batch``; host values must then be the same in every process)."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  jitted, compiled = {}, {}

  def make(phase):
    def call(state, frozen, batch, key):
      sharding.check_batch(len(batch["latents"]), mesh)
      if phase not in jitted:
        jitted[phase] = jit_step(trainer, phase, state, frozen, mesh)
      fn, shardings = jitted[phase]
      args = sharding.put((state, frozen, dict(batch), key), shardings)
      if compiler_options:
        if phase not in compiled:
          compiled[phase] = fn.lower(*args).compile(compiler_options=compiler_options)
        fn = compiled[phase]
      return fn(*args)
    return call
  return make("g"), make("d")


def train_loop(trainer: ARCForcing, fns, state, frozen, batches, batch_size: int, start: int,
               steps: int, seed: int, ckpt: Checkpointer | None = None, ckpt_every: int = 0,
               on_metrics=None, meta=None, mesh=None):
  """Steps start..steps-1; step s uses batch s, key fold_in(key(seed), s) and phase s mod 2.
  With the step functions' ``mesh``, each process builds only its rows of each batch
  (``sharding.local_rows`` / ``global_batch``); without, every process builds all of it."""
  g_fn, d_fn = fns
  base_key = jax.random.key(seed)
  rows = sharding.local_rows(batch_size, mesh) if mesh is not None else None
  for step in range(start, steps):
    if mesh is not None:
      b = sharding.global_batch(batches(step, batch_size, rows), batch_size, mesh)
    else:
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
  conf = config_named_by_file(rec["config"], "config", os.path.join(workdir, "arc_config.json"),
                              rec.get("overrides"))
  seed = rec["seed"] if seed is None else seed
  trainer, state, frozen = build(conf, seed, base if base is not None else rec.get("base"),
                                 rec.get("base_step"), rec.get("disc_ckpt"), log=lambda *_: None,
                                 stored_model=rec.get("model", {}))
  ck = Checkpointer(os.path.join(workdir, ARC_DIR))
  state, _ = ck.restore(abstract_like(state), step)
  ck.close()
  model = nnx.merge(trainer.gd, state["adapter"], frozen["params"], frozen["rest"])
  return adapters.merge_adapters(model) if merge else model
