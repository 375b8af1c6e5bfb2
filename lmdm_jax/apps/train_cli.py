"""Stage-1 training: teacher-forced streaming sequences, sharded, checkpointed, resumable.

  python3 train.py --config tiny --data synthetic --workdir runs/tiny --config.train.steps=200
  python3 train.py --config configs/demo.py --data data_cache/latents --workdir runs/demo
  python3 train.py --config demo --data data_cache/latents_recorded:0.5,data_cache/latents_wide:0.5 ...
                                 # several latent folders, mixed with these weights (A,B: equal)
  python3 train.py --config demo --config.train.batch_size=4 --config.train.stage1.lr=1e-4 ...
  python3 train.py ... --config.train.fsdp=4   # shard params/optimizer over 4 of the devices
  python3 train.py ... --coordinator HOST:PORT --num-processes N --process-id I   # each process
  python3 train.py --config my_saos.py --init converted/sao_small --data ... --workdir runs/ft
                                 # fine-tune from a pretrained model (train.init_from)

--config names the recipe (a registered config or your own file) and --config.FIELD=VALUE sets
any of its fields (``train.steps``, ``train.batch_size``, ``train.stage1.lr``, ``seed``, ...;
``--help --config NAME`` lists them with their values). The fields set on the command line are
recorded in <workdir>/config.json ("overrides") with the config's name, so sampling from the work
directory uses the same config. A run restarted with the same command resumes from its last
checkpoint and continues with the same data order, noise and losses as an uninterrupted run (data
and PRNG keys depend only on the seed and the step); a restart may change the run's length and
logging (``train.*``) but not its model (``model.*``); a restart with other ``--data`` goes on with
a warning, and config.json's ``data_history`` records the step each ``--data`` began at. Metrics
go to <workdir>/metrics.jsonl (one JSON object per logged step). Every ``train.sample_every`` steps the EMA model streams
``train.sample_seconds`` of a held-out prompt into <workdir>/samples/step_NNNNNNN.wav (decoded with
the config's codec; latents .npy without).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from absl import flags
from flax import nnx
from tqdm import tqdm

from lmdm_jax import compile_cache
from lmdm_jax.apps import run_flags
from lmdm_jax.apps.common import UsageError
from lmdm_jax.config import DiTConfig, one_line
from lmdm_jax.nn.dit import DiT
from lmdm_jax.training import distributed, init_from, sharding
from lmdm_jax.training.checkpoints import Checkpointer, abstract_like, latest_step, run_layout
from lmdm_jax.training.data import Batcher, make_source, same_data
from lmdm_jax.training.stage1 import Stage1, Stage1Config
from lmdm_jax.training.workdir import truncate_metrics


# The fields of the config's ``train`` section that train.py reads, with the values it uses where
# a config does not set them (``train.stage1``: ``Stage1Config``'s fields and defaults).
RUN_DEFAULTS = dict(batch_size=8, steps=1000, ckpt_every=100, keep=3, log_every=10, eval_every=100,
                    eval_batches=2, fsdp=1, sample_every=0, sample_seconds=10.0, init_from="",
                    freeze="")


def config_defaults() -> dict:
  """Every config field train.py reads, at the value it uses when the config does not set it:
  filled into the loaded config, so each can be set as ``--config.FIELD=VALUE``."""
  return {"seed": 0, "train": dict(RUN_DEFAULTS, stage1=dataclasses.asdict(Stage1Config()))}


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("data", "synthetic", "latent dataset folder (python3 -m lmdm_jax.data.dataset "
                      "builds one); several, mixed: A,B (equal weights) or A:0.7,B:0.3; or "
                      "'synthetic': random latents, for smoke runs", flag_values=fv)
  flags.DEFINE_string("workdir", None, "run folder (required): config.json, checkpoints/, "
                      "metrics.jsonl, samples/; rerunning the same command resumes", flag_values=fv)
  flags.DEFINE_string("init", None, "start from a pretrained model at step 0 (sets train.init_from): "
                      "a converted checkpoint, a bundle .npz, a train.py or arc.py work directory "
                      "(default: the config's train.init_from, none)", flag_values=fv)
  run_flags.define_process_flags(fv)
  flags.DEFINE_boolean("no_progress", False, "no progress bar (also --no-progress)", flag_values=fv)


def write_sample(graphdef, state, conf, cfg: DiTConfig, caption: str, path: str,
                 seconds: float, seed: int = 0) -> str:
  """Streams ``seconds`` of ``caption`` with the EMA weights of ``state`` through the System of
  the config; writes a WAV (or the latents as .npy when the config has no codec). Returns the
  written path."""
  from lmdm_jax import sources
  from lmdm_jax.training.stage1 import model_from_state
  model = model_from_state(graphdef, jax.device_get(state), use_ema=True)
  system = sources.assemble(model, conf, log=lambda *_: None)
  out = system.generate(caption, seconds, seed=seed, plus_plus=False)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if system.codec is None:
    from lmdm_jax.data.audio import save_npy
    return save_npy(os.path.splitext(path)[0] + ".npy", out)
  from lmdm_jax.data.audio import save_audio
  save_audio(path, out, system.codec.sample_rate)
  return path


def _check_resume(workdir: str, cfg: DiTConfig) -> None:
  """A resumed run must build the model it checkpointed: a one-line UsageError naming the model
  fields that differ from the run's config.json (e.g. a --config.model.* override left out)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    rec = json.load(f)
  try:
    old = DiTConfig.from_stored(rec.get("model") or {})
  except (TypeError, ValueError) as e:
    raise UsageError(f"{path}: model: {e}") from None
  diff = [f"model.{k} {getattr(old, k)!r} there, {getattr(cfg, k)!r} here"
          for k in (f.name for f in dataclasses.fields(DiTConfig))
          if getattr(old, k) != getattr(cfg, k)]
  if diff:
    raise UsageError(f"{workdir} holds a run of another model ({'; '.join(diff)}; its overrides: "
                     f"{rec.get('overrides') or 'none'}): resume with the same --config and "
                     "--config.model.* flags, or use another --workdir")


def data_history(path: str, data: str, start: int) -> list:
  """The run's ``data_history`` for its config.json: [[step, --data], ...], the --data values it
  trained on and the step each began at. A run resumed at ``start`` > 0 with data other than it
  recorded (``same_data``) gets a warning on stderr and a new entry; otherwise the history is
  unchanged ([[0, data]] for a new run)."""
  old = None
  if start > 0 and os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
  if not isinstance(old, dict) or "data" not in old:
    return [[0, data]]
  hist = old.get("data_history")
  if not (isinstance(hist, list) and hist and all(
      isinstance(h, list) and len(h) == 2 and isinstance(h[1], str) for h in hist)):
    hist = [[0, str(old["data"])]]  # runs recorded before the history (or a mangled one)
  if same_data(hist[-1][1], data):
    return hist
  print(f"train.py: warning: {os.path.dirname(path)} trained on --data {hist[-1][1]!r} until step "
        f"{start}; it goes on with --data {data!r} (the data order changes here; recorded in "
        "config.json's data_history)", file=sys.stderr)
  return hist + [[start, data]]


def main(argv=None):
  """train.py: the command line is checked (a one-line error and exit 2 for a bad flag, config
  field or data folder) before any model is built."""
  try:
    p = run_flags.parse(argv, prog="train.py", doc=__doc__, define=define_flags,
                        default_config="tiny", defaults=config_defaults())
    if p is None:
      return 0
    workdir = run_flags.required(p.flags, "workdir")
    compile_cache.enable(log=lambda m: print(f"[train] {m}"))
    run_flags.init_processes(p.flags)  # before anything touches a device
    conf = p.conf
    cfg = DiTConfig.from_config(conf.model)
    if latest_step(os.path.join(workdir, "checkpoints")) is not None:
      cfg = run_layout(cfg, workdir)  # a resumed run keeps the rotary layout it trained in
      _check_resume(workdir, cfg)
    tr = conf.train.to_dict()
    if p.flags.init is not None:
      tr["init_from"] = p.flags.init
    tc = Stage1Config.from_config(tr["stage1"])
    mesh = sharding.make_mesh(fsdp=tr["fsdp"])
    sharding.check_batch(tr["batch_size"], mesh)
    frames = tc.chunks * cfg.chunk  # Stage1.frames
    sources = (make_source(p.flags.data, frames, cfg, conf.seed),
               make_source(p.flags.data, frames, cfg, conf.seed, holdout=True))
    from lmdm_jax import text as text_lib
    text = text_lib.from_config(conf) if cfg.cond_token_dim else None
  except (UsageError, ValueError, TypeError) as e:
    print(f"train.py: error: {one_line(e)}", file=sys.stderr)
    return 2
  return train(p, workdir, conf, cfg, tr, tc, mesh, sources, text)


def train(p: run_flags.Parsed, workdir: str, conf, cfg: DiTConfig, tr: dict, tc: Stage1Config,
          mesh, sources, text):
  """The run of ``main``'s checked command line (``sources``: training and held-out data;
  ``text``: the config's text encoder or None)."""
  seed = conf.seed
  os.makedirs(workdir, exist_ok=True)
  model = DiT(cfg, rngs=nnx.Rngs(seed))
  try:
    from lmdm_jax.sources import load_dit
    init_from.start(model, tr, workdir, latest_step(os.path.join(workdir, "checkpoints"))
                    is not None, load=load_dit, log=lambda m: print(f"[train] {m}"))
  except init_from.InitError as e:
    print(f"train.py: error: {one_line(e)}", file=sys.stderr)
    return 2
  trainer = Stage1(model, tc, freeze=tr["freeze"])
  source, held = sources
  batches, held_batches = Batcher(source, cfg, text), Batcher(held, cfg, text)

  state = trainer.init_state(model)
  del model
  state, shard = sharding.place(state, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tr["keep"])
  start = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(state, shard))
    start = int(state["step"])
    print(f"[train] resumed from step {start} ({ckpt.directory})")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  main_process = distributed.is_main()  # writes config.json and metrics.jsonl
  if main_process:
    truncate_metrics(metrics_path, start)
    history = data_history(os.path.join(workdir, "config.json"), p.flags.data, start)
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
      json.dump({"config": p.config, "overrides": p.overrides,
                 "model": dict(conf.model, positions=cfg.positions), "train": tr, "seed": seed,
                 "data": p.flags.data, "data_history": history}, f, indent=1, default=str)
    os.replace(tmp, os.path.join(workdir, "config.json"))

  bsh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  step_fn = jax.jit(trainer.train_step, donate_argnums=(0,), in_shardings=(shard, bsh, rep),
                    out_shardings=(shard, rep))
  eval_fn = jax.jit(trainer.eval_loss, in_shardings=(shard, bsh, rep), out_shardings=rep)
  base_key = jax.random.key(seed)
  rows = sharding.local_rows(tr["batch_size"], mesh)  # this process's rows of each batch

  def batch_at(batcher, step):
    return sharding.global_batch(batcher(step, tr["batch_size"], rows), tr["batch_size"], mesh)

  def key_at(key):
    return sharding.put(key, rep)

  steps = tr["steps"]
  bar = tqdm(range(start, steps), initial=start, total=steps,
             disable=p.flags.no_progress or not main_process, dynamic_ncols=True, desc="train")
  t_last, n_last = time.perf_counter(), start
  with open(metrics_path if main_process else os.devnull, "a") as mf:
    for step in bar:
      batch = batch_at(batches, step)
      state, m = step_fn(state, batch, key_at(jax.random.fold_in(base_key, step)))
      done = step + 1
      if done % tr["log_every"] == 0 or done == steps:
        m = {k: float(v) for k, v in m.items()}
        now = time.perf_counter()
        rate = (done - n_last) / max(now - t_last, 1e-9)
        t_last, n_last = now, done
        rec = {"step": done, **m, "steps_per_s": rate}
        if tr["eval_every"] and (done % tr["eval_every"] == 0 or done == steps):
          ev = [float(eval_fn(state, batch_at(held_batches, 10_000_000 + i),
                              key_at(jax.random.key(i)))) for i in range(tr["eval_batches"])]
          rec["heldout_loss"] = float(np.mean(ev))
        mf.write(json.dumps(rec) + "\n")
        mf.flush()
        bar.set_postfix(loss=f"{m['loss']:.4f}", it_s=f"{rate:.2f}")
      if done % tr["ckpt_every"] == 0 or done == steps:
        ckpt.save(done, state, meta={"step": done, "config": p.config})
      if tr["sample_every"] and done % tr["sample_every"] == 0 and jax.process_count() == 1:
        caption = held.batch(20_000_000 + done, 1)["captions"][0]
        out = write_sample(trainer.graphdef, state, conf, cfg, caption,
                           os.path.join(workdir, "samples", f"step_{done:07d}.wav"),
                           tr["sample_seconds"], seed=done)
        bar.write(f"[train] step {done}: sample {out} ({caption!r})")
  ckpt.close()
  print(f"[train] finished at step {steps}; checkpoints in {ckpt.directory}")


if __name__ == "__main__":
  sys.exit(main())
